"""The shape-word probe (train/shape_probe.py): a model that draws the shape it is asked for shows three fills and
the judge reads each shape; one that draws the same blob whatever the word shows one fill three times."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from omniace.train.eval import held_out, main as eval_main
from omniace.train.scenes import COLORS, POSITIONS
from omniace.train.scorer import color_mask, parse, rgb
from omniace.train.shape_probe import PROBED_TASKS, probe, table, with_shape

HALF = 8  # pixels: the half-extent of what the fake models draw (the corpus draws 7-12 on a 64-pixel side)


class FakePipe:
    """An ACE pipeline stand-in that draws the named colour at the edit's place: the asked shape, or a circle
    whatever was asked (``always``)."""

    is_ace = True

    def __init__(self, always: str | None = None):
        self.always, self.seeds = always, []

    def prepare_edit(self, images, instruction, masks=None, steps=10, guidance=1.0, seed=0):
        self.seeds.append(seed)
        return images[0], instruction.removeprefix("{image} "), masks

    def run_jobs(self, jobs):
        return [self._draw(*job) for job in jobs]

    def _draw(self, source: Image.Image, instruction: str, mask) -> Image.Image:
        kind, args = parse(instruction)
        w, h = source.size
        if kind == "swap":
            old = color_mask(rgb(source), args[0])
            ys, xs = np.nonzero(old)
            cx, cy, color, shape = xs.mean(), ys.mean(), args[2], args[3]
        elif kind == "add":
            (px, py), color, shape = POSITIONS[args[2]], args[0], args[1]
            cx, cy = px * w, py * h
        else:  # inpaint: the middle of the mask
            ys, xs = np.nonzero(np.asarray(mask.convert("L").resize((w, h))) > 127)
            cx, cy, color, shape = xs.mean(), ys.mean(), args[0], args[1]
        out = source.copy()
        d = ImageDraw.Draw(out)
        if kind == "swap":  # the old object goes: its box painted with the background's corner colour
            d.rectangle([xs.min(), ys.min(), xs.max(), ys.max()], fill=source.getpixel((0, 0)))
        box = [cx - HALF, cy - HALF, cx + HALF, cy + HALF]
        shape = self.always or shape
        fill = COLORS[color]
        if shape == "square":
            d.rectangle(box, fill=fill)
        elif shape == "circle":
            d.ellipse(box, fill=fill)
        else:
            d.polygon([(cx, cy - HALF), (cx - HALF, cy + HALF), (cx + HALF, cy + HALF)], fill=fill)
        return out


@pytest.fixture(scope="module")
def samples():
    return held_out(3, seed=20000)


def test_the_probe_tells_a_model_that_reads_the_shape_word_from_one_that_ignores_it(samples):
    reads = {r.asked: r for r in probe(FakePipe(), samples)}
    assert all(r.n + r.missing == 9 for r in reads.values())  # 3 swaps, 3 additions, 3 inpaintings
    assert reads["square"].mean_fill > 0.9 and 0.65 < reads["circle"].mean_fill < 0.9
    assert reads["triangle"].mean_fill < 0.65
    for shape, r in reads.items():  # the judge reads every drawn shape as asked
        assert r.drawn == {shape: r.n}, (shape, r.drawn)
    blind = {r.asked: r for r in probe(FakePipe(always="circle"), samples)}
    fills = {round(r.mean_fill, 6) for r in blind.values()}
    assert len(fills) == 1 and all(r.drawn == {"circle": r.n} for r in blind.values())
    text = table(list(blind.values()))
    assert "| square | 9 | " in text and "| 1.000 | circle 100%, square 0%, triangle 0% | 0 |" in text


def test_each_variant_gets_its_samples_seed_and_only_the_new_objects_shape_word_changes(samples):
    pipe = FakePipe()
    probe(pipe, samples, seed=5)
    chosen = [s for s in samples if s.task in PROBED_TASKS]
    assert pipe.seeds == [5 + i for i in range(len(chosen)) for _ in range(3)]
    assert with_shape("replace the red square with a blue circle", "triangle") == \
        "replace the red square with a blue triangle"
    assert with_shape("add a red square at the top left", "circle") == "add a red circle at the top left"
    with pytest.raises(ValueError, match="names no shape"):
        with_shape("make it night", "circle")
    with pytest.raises(ValueError, match="no samples of"):
        probe(pipe, [s for s in samples if s.task not in PROBED_TASKS])


def test_the_cli_refuses_the_probe_with_another_report_before_loading(capsys):
    for extra, message in ((["--from-target", "0"], "two different reports"), (["--out", "x"], "--out is not written"),
                           (["--grid-per-task", "2"], "--grid-per-task sets the scored run's eval_grid.png")):
        with pytest.raises(SystemExit) as e:
            eval_main(["--weights", "missing.safetensors", "--shape-probe", *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_cli_prints_the_table_for_the_embedded_default(capsys):
    import omniace.engine

    weights = Path(omniace.engine.__file__).parent / "assets" / "ace-edit.safetensors"
    eval_main(["--weights", str(weights), "--shape-probe", "--per-task", "1", "--steps", "2"])
    out = capsys.readouterr().out
    assert out.startswith("| shape asked | outputs with a new object | mean fill of its box | exact shape's fill |")
    assert all(f"| {shape} | " in out for shape in ("circle", "square", "triangle"))
