"""The embedded editing corpus: specialist-made, judge-scored pairs in the OmniEdit-Filtered-1.2M schema.

``python -m omniace.train.synthetic --out data/synth --pairs 4000`` writes Parquet shards. Each record is
a procedurally drawn scene (``scenes.py``) at one of OmniEdit's seven aspect ratios and several sizes, an
instruction for one of the seven OmniEdit tasks (object swap, removal, addition, attribute change,
background swap, environment change, style transfer), ACE's mask tasks (inpainting, outpainting) or ACE's
generation families: text-to-image (no source image: ``src_img`` is null), controllable generation (the
source is an edge or segmentation map of the target scene) and reference-guided editing (a second image,
``ref_img``, whose object the instruction's ``{image1}`` puts into ``{image}``). An edit of a scene (every
task but the two generation ones) may end a 2-3 turn chain (``history``); ``multi_turn`` of all records
do. A task's *specialist* makes the target and fails
the way real specialists do at a known rate (wrong object, partial edit, artefacts, unchanged output); the
judge (``scorer.py``) then grades the pair from the images alone and fills the score columns, so the
importance weight learns from the judge, exactly as with the real data.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from omniace import require

from .scenes import (ASPECTS, BACKGROUNDS, COLORS, MAP_KINDS, PLAIN_BACKGROUNDS, POSITIONS, SHAPES, Obj, Scene,
                     box_mask, frame_size, free_position, layout_scene, object_box, random_scene, reference_scene,
                     render, render_map)
from .scorer import MID_GREY, score

TASKS = ("object_swap", "object_removal", "object_addition", "attribute_modification", "background_swap",
         "environment_change", "style_transfer", "inpainting", "outpainting", "text_to_image",
         "controllable_generation", "reference_guided")
OMNIEDIT_TASKS = TASKS[:7]  # the seven of OmniEdit-Filtered-1.2M (its released columns hold no mask or ref_img)
FAILURES = ("wrong_object", "partial", "artifacts", "unchanged")
OBJECT_TASKS = ("object_swap", "object_removal", "object_addition", "attribute_modification")
# generation from text or a map: their input is no scene an earlier turn could have made, so no history
NO_HISTORY = ("text_to_image", "controllable_generation")


@dataclass
class Edit:
    """One instructed edit of ``source`` (a scene) into ``target``; ``mask_box`` for the mask tasks."""
    task: str
    prompts: list[str]  # the instruction and paraphrases; the first is canonical
    source: Scene | None  # None: text-to-image (no source image)
    target: Scene
    mask_box: tuple[float, float, float, float] | None = None
    mask_inside: bool = True
    alternative: Scene | None = None  # what a specialist that picks the wrong object or variant makes
    condition: str | None = None  # a MAP_KINDS entry: the source is shown as that map (controllable generation)
    reference: Scene | None = None  # the second image's content (reference-guided editing)


def _a(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def _listing(objs: tuple[Obj, ...], where: list[str] | None = None) -> str:
    """"a red circle at the top left and a blue square" (positions with ``where``)."""
    return " and ".join(f"{_a(o.color)} {o.name}" + (f" at the {where[i]}" if where else "")
                        for i, o in enumerate(objs))


def _recolored(scene: Scene, rng: random.Random) -> Scene:
    """``scene`` with one object in a colour the scene does not have: the wrong-object failure of generation."""
    o = rng.choice(scene.objects)
    return scene.with_object(o, replace(o, color=_other_color(scene, rng)))


def _new_object(scene: Scene, rng: random.Random) -> tuple[str, Obj] | None:
    """A new object in a colour the scene lacks at a free named position (and that position), or None when
    the scene has no free position or already 4 objects."""
    pos = free_position(scene, rng)
    if pos is None or len(scene.objects) >= 4:
        return None
    x, y = POSITIONS[pos]
    return pos, Obj(rng.choice(SHAPES), _other_color(scene, rng), x, y, rng.uniform(0.12, 0.17))


def make_generation(task: str, rng: random.Random) -> Edit:
    """A text-to-image or controllable-generation example on a fresh :func:`layout_scene`."""
    if task == "text_to_image":
        scene, where = layout_scene(rng)
        text = f"{_listing(scene.objects, where)} on {_a(scene.background)} {scene.background} background"
        return Edit(task, [text, f"draw {text}"], None, scene, alternative=_recolored(scene, rng))
    if task == "controllable_generation":
        scene, _ = layout_scene(rng, distinct_shapes=True)
        kind = rng.choice(MAP_KINDS)
        text = f"{_listing(scene.objects)} on {_a(scene.background)} {scene.background} background"
        objs = scene.objects  # two objects: their colours swapped; one: another colour
        alt = (replace(scene, objects=(replace(objs[0], color=objs[1].color), replace(objs[1], color=objs[0].color)))
               if len(objs) == 2 else _recolored(scene, rng))
        # the shorter wording first (canonical): the tiny presets' byte-level text encoder keeps 63 bytes
        return Edit(task, [f"render the {kind} map as {text}", f"generate the scene from the {kind} map: {text}"],
                    scene, scene, alternative=alt, condition=kind)
    raise ValueError(f"{task!r} is not a generation task; expected one of {NO_HISTORY}")


def _other_color(scene: Scene, rng: random.Random, exclude: str = "") -> str:
    used = {o.color for o in scene.objects} | {exclude}
    return rng.choice([c for c in COLORS if c not in used])


def _alternative_object(scene: Scene, obj: Obj, rng: random.Random) -> Obj | None:
    others = [o for o in scene.objects if o is not obj]
    return rng.choice(others) if others else None


def make_edit(task: str, scene: Scene, rng: random.Random) -> Edit | None:
    """An edit of ``task`` on ``scene``, or None when the scene cannot host it (e.g. no object to remove).
    The generation tasks (:data:`NO_HISTORY`) ignore ``scene`` and draw their own (:func:`make_generation`)."""
    if task in NO_HISTORY:
        return make_generation(task, rng)
    objs = list(scene.objects)
    if task in ("object_swap", "object_removal", "attribute_modification") and not objs:
        return None
    if task == "object_swap":
        o = rng.choice(objs)
        new = replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]), color=_other_color(scene, rng))
        p = [f"replace the {o.name} with a {new.name}", f"swap the {o.name} for a {new.name}"]
        alt_o = _alternative_object(scene, o, rng)
        alt = scene.with_object(alt_o, replace(new, cx=alt_o.cx, cy=alt_o.cy)) if alt_o else None
        return Edit(task, p, scene, scene.with_object(o, new), alternative=alt)
    if task == "object_removal":
        o = rng.choice(objs)
        alt_o = _alternative_object(scene, o, rng)
        return Edit(task, [f"remove the {o.name}", f"erase the {o.name}", f"delete the {o.name}"], scene,
                    scene.without(o), alternative=scene.without(alt_o) if alt_o else None)
    if task == "object_addition":
        placed = _new_object(scene, rng)
        if placed is None:
            return None
        pos, new = placed
        others = [p for p in POSITIONS if p != pos]
        ax, ay = POSITIONS[rng.choice(others)]
        return Edit(task, [f"add a {new.name} at the {pos}", f"put a {new.name} in the {pos}"], scene,
                    scene.with_object(None, new), alternative=scene.with_object(None, replace(new, cx=ax, cy=ay)))
    if task == "attribute_modification":
        o = rng.choice(objs)
        alt_o = _alternative_object(scene, o, rng)
        if rng.random() < 0.6:
            c = _other_color(scene, rng)
            alt = scene.with_object(alt_o, replace(alt_o, color=c)) if alt_o else None
            return Edit(task, [f"make the {o.name} {c}", f"paint the {o.name} {c}"], scene,
                        scene.with_object(o, replace(o, color=c)), alternative=alt)
        alt = scene.with_object(alt_o, replace(alt_o, size=alt_o.size * 1.6)) if alt_o else None
        return Edit(task, [f"make the {o.name} bigger", f"make the {o.name} larger"], scene,
                    scene.with_object(o, replace(o, size=o.size * 1.6)), alternative=alt)
    if task == "reference_guided":
        placed = _new_object(scene, rng)
        if placed is None:
            return None
        pos, new = placed
        wrong = replace(new, color=_other_color(scene, rng, new.color))  # another object than the reference's
        return Edit(task, [f"add the {{image1}} object at the {pos}",
                           f"put the object from {{image1}} at the {pos} of {{image}}"], scene, scene.with_object(None, new),
                    alternative=scene.with_object(None, wrong),
                    reference=reference_scene(new, rng.choice(PLAIN_BACKGROUNDS)))
    if task == "background_swap":
        bg = rng.choice([b for b in BACKGROUNDS if b != scene.background])
        alt = rng.choice([b for b in BACKGROUNDS if b not in (bg, scene.background)])
        return Edit(task, [f"change the background to {bg}", f"set the background to {bg}"], scene,
                    replace(scene, background=bg), alternative=replace(scene, background=alt))
    if task == "environment_change":
        env, alt = ("night", "fog") if rng.random() < 0.5 else ("fog", "night")
        p = ["make it night", "turn the scene into nighttime"] if env == "night" else ["make it foggy", "add fog"]
        return Edit(task, p, scene, replace(scene, environment=env), alternative=replace(scene, environment=alt))
    if task == "style_transfer":
        style, alt = ("sketch", "posterize") if rng.random() < 0.5 else ("posterize", "sketch")
        p = (["turn it into a pencil sketch", "make it look like a sketch"] if style == "sketch"
             else ["posterize the image", "make it posterized"])
        return Edit(task, p, scene, replace(scene, style=style), alternative=replace(scene, style=alt))
    if task == "inpainting":
        if not objs:
            return None
        o = rng.choice(objs)
        box = object_box(o, 1, 1, pad=0.02)
        alt_color = _other_color(scene, rng, o.color)
        return Edit(task, [f"fill the masked area with a {o.name}", f"paint the masked region with a {o.name}"],
                    replace(scene, hole=box), scene, mask_box=box,
                    alternative=scene.with_object(o, replace(o, color=alt_color)))
    if task == "outpainting":
        m = rng.uniform(0.15, 0.25)
        box = (m, m, 1 - m, 1 - m)
        return Edit(task, ["extend the image beyond the masked border", "outpaint the masked border"],
                    replace(scene, keep=box), scene, mask_box=box, mask_inside=False,
                    alternative=replace(scene, background=rng.choice([b for b in BACKGROUNDS if b != scene.background])))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _artifacts(img: Image.Image, rng: random.Random) -> Image.Image:
    a = np.asarray(img).copy()
    h, w, _ = a.shape
    g = np.random.default_rng(rng.randrange(2**32))
    for _ in range(rng.randint(3, 6)):
        s = max(3, min(h, w) // rng.randint(6, 10))
        y, x = rng.randrange(0, h - s), rng.randrange(0, w - s)
        a[y:y + s, x:x + s] = g.integers(0, 256, (s, s, 3))
    return Image.fromarray(a)


def render_source(edit: Edit, w: int, h: int) -> Image.Image | None:
    """The edit's input image: the source scene, its condition map, or None (text-to-image)."""
    if edit.source is None:
        return None
    return render(edit.source, w, h) if edit.condition is None else render_map(edit.source, w, h, edit.condition)


def specialist(edit: Edit, size: tuple[int, int], rng: random.Random,
               failure_rate: float) -> tuple[Image.Image | None, Image.Image, str]:
    """``(source, output, failure)``: the task's specialist renders the target, failing at ``failure_rate``.
    Text-to-image has no source (None); its failures start from a blank mid-grey canvas instead."""
    w, h = size
    src, tgt = render_source(edit, w, h), render(edit.target, w, h)
    start = src if src is not None else Image.new("RGB", (w, h), MID_GREY)
    failure = "none"
    if rng.random() < failure_rate:
        failure = rng.choice(FAILURES if edit.alternative is not None else FAILURES[1:])
    if failure == "wrong_object":
        return src, render(edit.alternative, w, h), failure
    if failure == "partial":
        return src, Image.blend(start, tgt, rng.uniform(0.3, 0.55)), failure
    if failure == "artifacts":
        return src, _artifacts(tgt, rng), failure
    if failure == "unchanged":
        return src, start.copy(), failure
    return src, tgt, failure


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt.upper(), **({"quality": 95} if fmt.lower() in ("jpeg", "jpg") else {}))
    return buf.getvalue()


def _record_id(seed: int, index: int) -> str:
    return "synth-" + hashlib.sha1(f"{seed}:{index}".encode()).hexdigest()[:16]


def check_tasks(tasks: tuple[str, ...]) -> None:
    """ValueError naming the unknown tasks of ``tasks`` (or an empty selection)."""
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown task(s) {bad or list(tasks)}; expected some of {TASKS}")


def generate(n: int, seed: int = 0, short_sides: tuple[int, ...] = (64, 96), failure_rate: float = 0.3,
             multi_turn: float = 0.15, fmt: str = "png", tasks: tuple[str, ...] = TASKS) -> Iterator[dict]:
    """``n`` records (dicts in the OmniEdit schema plus our optional columns), deterministic in ``seed``.

    Each record's task is drawn uniformly from ``tasks`` (a scene that cannot host it is redrawn, so every
    task keeps its share). ``multi_turn`` is the fraction of all records that carry a ``history`` chain; the
    generation tasks (:data:`NO_HISTORY`) never do, so the edits of a scene carry one a little more often.
    A text-to-image record's ``src_img`` is None; a reference-guided one has ``ref_img``."""
    check_tasks(tasks)
    with_history = [t for t in tasks if t not in NO_HISTORY]
    p_history = min(1.0, multi_turn * len(tasks) / len(with_history)) if with_history else 0.0
    ext = "png" if fmt == "png" else "jpg"

    def struct(img: Image.Image | None, rid: str, name: str, f: str = fmt, e: str = ext) -> dict | None:
        return None if img is None else {"bytes": encode(img, f), "path": f"{rid}_{name}.{e}"}

    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        aspect = rng.choice(list(ASPECTS))
        w, h = frame_size(aspect, rng.choice(short_sides))
        task = rng.choice(tasks)
        edit = None
        while edit is None:  # a scene that cannot host the task (nothing to remove, no free place) is redrawn
            scene = random_scene(rng)
            history = []
            if task not in NO_HISTORY and rng.random() < p_history:  # earlier turns feed this one
                for _ in range(rng.randint(1, 2)):
                    prev = make_edit(rng.choice(OBJECT_TASKS), scene, rng)
                    if prev is None:
                        break
                    history.append({"prompt": prev.prompts[0],
                                    "image": {"bytes": encode(render(scene, w, h), fmt), "path": None}})
                    scene = prev.target
            edit = make_edit(task, scene, rng)
        src, out, failure = specialist(edit, (w, h), rng, failure_rate)
        ref = None if edit.reference is None else render(edit.reference, w, h)
        mask = box_mask(edit.mask_box, w, h, edit.mask_inside) if edit.mask_box else None
        s = score(src, out, edit.prompts[0], mask, ref_img=ref)
        rid = _record_id(seed, i)
        yield {
            "omni_edit_id": rid, "task": edit.task,
            "src_img": struct(src, rid, "src"), "edited_img": struct(out, rid, "edited"),
            "edited_prompt_list": edit.prompts, "width": w, "height": h,
            "sc_score_1": s.sc_score_1, "sc_score_2": s.sc_score_2, "sc_reasoning": s.sc_reasoning,
            "pq_score": s.pq_score, "pq_reasoning": s.pq_reasoning, "o_score": s.o_score,
            "mask_img": struct(mask, rid, "mask", "png", "png"), "ref_img": struct(ref, rid, "ref"),
            "history": history or None, "specialist": f"{edit.task}-specialist", "failure": failure,
        }


def write_corpus(out: Path, n: int, shard_size: int = 1000, log: Callable[[str], None] = print, **kw) -> list[Path]:
    """Write ``n`` records as Parquet shards ``part-00000.parquet``...; each shard lands atomically."""
    from .omniedit_format import write_shard

    out.mkdir(parents=True, exist_ok=True)
    paths, batch = [], []
    for rec in generate(n, **kw):
        batch.append(rec)
        if len(batch) == shard_size:
            paths.append(write_shard(batch, out / f"part-{len(paths):05d}.parquet"))
            batch = []
    if batch:
        paths.append(write_shard(batch, out / f"part-{len(paths):05d}.parquet"))
    log(f"wrote {n} pairs in {len(paths)} shard(s) to {out}")
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m omniace.train.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--short-sides", default="64,96", help="comma list of shorter-side sizes in pixels")
    ap.add_argument("--failure-rate", type=float, default=0.3, help="how often a specialist fails")
    ap.add_argument("--multi-turn", type=float, default=0.15, help="fraction of records with a history chain")
    ap.add_argument("--format", choices=["png", "jpeg"], default="png")
    ap.add_argument("--tasks", default=",".join(TASKS))
    a = ap.parse_args(argv)
    try:
        sides = tuple(int(v) for v in a.short_sides.split(","))
    except ValueError:
        sides = ()
    if not sides or min(sides) < 16:  # the smallest frame the pixel-space presets' 8-pixel grid can take well
        ap.error(f"--short-sides must be a comma list of integers >= 16, got {a.short_sides!r}")
    if a.pairs < 1 or a.shard_size < 1:
        ap.error(f"--pairs and --shard-size must be >= 1, got {a.pairs} and {a.shard_size}")
    for name in ("failure_rate", "multi_turn"):
        if not 0.0 <= getattr(a, name) <= 1.0:
            ap.error(f"--{name.replace('_', '-')} must be a fraction in [0, 1], got {getattr(a, name)}")
    tasks = tuple(t.strip() for t in a.tasks.split(","))
    try:
        check_tasks(tasks)
    except ValueError as err:
        ap.error(f"--tasks: {err}")
    try:  # before any pair is drawn: the shards are Parquet
        require("pyarrow", "train", "writing the corpus's Parquet shards")
    except ImportError as err:  # one line: the flags were fine, the install is not
        print(f"{ap.prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    write_corpus(a.out, a.pairs, a.shard_size, seed=a.seed, short_sides=sides,
                 failure_rate=a.failure_rate, multi_turn=a.multi_turn, fmt=a.format, tasks=tasks)


if __name__ == "__main__":
    main()
