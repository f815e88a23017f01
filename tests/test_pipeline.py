"""Sampler, pipeline, session, weights I/O and the CLI on the tiny default."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from omniace.engine.cli import main
from omniace.engine.model import build_model, load_model, save_model
from omniace.engine.pipeline import EditPipeline, EditSession
from omniace.engine.sampler import DDIMSampler, FlowEulerSampler, guide, make_sampler
from omniace.engine.weights import load_state_dict_file

from helpers import demo_scene, randomise


def test_ddim_schedule_matches_ace():
    s = DDIMSampler(steps=20)
    assert s.timesteps().tolist() == list(range(999, 0, -50))
    sigma, alpha = s.schedule()
    assert torch.allclose(sigma**2 + alpha**2, torch.ones(1000, dtype=torch.float64))
    assert DDIMSampler(steps=50).timesteps()[-1] == 19


@pytest.mark.parametrize("steps", [1, 2, 7, 10, 13, 200])
def test_sigma_spacing_takes_the_training_steps_nearest_to_evenly_spaced_noise_levels(steps):
    """Reference: for each level, a scan of all 1000 training steps for the smallest |sigma_t - level|."""
    s = DDIMSampler(steps=steps, timestep_spacing="sigma")
    sigma = s.schedule()[0].tolist()
    levels = [sigma[-1] + (sigma[0] - sigma[-1]) * i / max(steps - 1, 1) for i in range(steps)]
    want = [min(range(1000), key=lambda t: abs(sigma[t] - level)) for level in levels]
    got = s.timesteps().tolist()
    assert got == want and got[0] == 999 and len(set(got)) == steps
    assert all(a > b for a, b in zip(got, got[1:]))
    if steps == 10:  # the docstring's example; trailing spends 5 of its 10 steps above t = 499
        assert got == [999, 391, 301, 239, 189, 145, 106, 68, 33, 0]


def test_every_step_count_gives_that_many_distinct_timesteps_up_to_the_spacings_limit():
    """Trailing: exactly ``steps`` timesteps for every count (a float arange left one more, for 62 counts, so the
    last update stopped short of sigma 0). "sigma": distinct up to ``max_distinct_steps`` (271), refused above."""
    for n in range(1, 1001):
        ts = DDIMSampler(steps=n).timesteps().tolist()
        assert len(ts) == n and len(set(ts)) == n and ts[0] == 999, n
    assert DDIMSampler(timestep_spacing="sigma").max_distinct_steps() == 271
    for n in range(1, 300):
        if n <= 271:
            assert len(set(DDIMSampler(steps=n, timestep_spacing="sigma").timesteps().tolist())) == n
        else:
            with pytest.raises(ValueError, match=f"steps={n} repeats training steps"):
                DDIMSampler(steps=n, timestep_spacing="sigma")
    x0 = torch.randn(5, 3)  # with 61 steps (one of the 62) the last update now reaches x0 exactly
    assert torch.allclose(DDIMSampler(steps=61, prediction="x0").sample(lambda x, t: x0, torch.randn(5, 3), 1), x0,
                          atol=1e-6)


def test_samplers_are_exact_on_a_perfect_model():
    x0, noise = torch.randn(12, 4), torch.randn(12, 4)
    s = DDIMSampler(steps=10)
    sigma, alpha = s.schedule()
    t0 = int(s.timesteps()[0])
    xt = float(alpha[t0]) * x0 + float(sigma[t0]) * noise
    eps = lambda x, t: (x - float(alpha[int(t[0])]) * x0) / float(sigma[int(t[0])])  # noqa: E731
    assert torch.allclose(s.sample(eps, xt, 1), x0, atol=1e-5)
    x0_model = DDIMSampler(steps=10, prediction="x0")
    assert torch.allclose(x0_model.sample(lambda x, t: x0, xt, 1), x0, atol=1e-6)
    for prediction, model in (("x0", lambda x, t: x0), ("eps", eps)):  # any spacing, from its first step's x
        s = DDIMSampler(steps=10, prediction=prediction, timestep_spacing="sigma")
        assert torch.allclose(s.sample(model, xt, 1), x0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown prediction type 'v'"):
        make_sampler("v", 10)
    f = FlowEulerSampler(steps=7, shift=3.0)
    assert torch.allclose(f.sample(lambda x, t: noise - x0, noise, 1), x0, atol=1e-5)


def test_guidance_rescale_per_sample():
    c, u = torch.randn(10, 3), torch.randn(10, 3)
    out = guide(c, u, 4.5, 1.0, [0, 4, 10])
    for a, b in ((0, 4), (4, 10)):
        assert torch.allclose(out[a:b].std(), c[a:b].std(), rtol=1e-5)
    assert torch.allclose(guide(c, u, 4.5, 0.0, [0, 10]), u + 4.5 * (c - u))


@pytest.fixture(scope="module")
def pipe():
    p = EditPipeline.tiny("ace")
    randomise(p.model, 5, std=0.05)
    return p


def test_edit_is_seeded_and_keeps_size(pipe):
    src = demo_scene(96, 64)
    a = pipe.edit(src, "{image} make it blue", steps=3, seed=1)[0]
    b = pipe.edit(src, "{image} make it blue", steps=3, seed=1)[0]
    c = pipe.edit(src, "{image} make it blue", steps=3, seed=2)[0]
    assert a.size == (96, 64)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 40, 30))
    assert pipe.edit(src, "{image} paint the corner", masks=mask, steps=2)[0].size == (96, 64)


def test_pipeline_errors(pipe):
    with pytest.raises(ValueError, match="not a multiple of patch x codec factor = 8 pixels"):
        pipe.edit(Image.new("RGB", (30, 32)), "x", steps=1, resize="error")  # today's strict behaviour
    with pytest.raises(ValueError, match="size 36x24 is not a multiple of 8 pixels"):
        pipe.edit(None, "a red ball", steps=1, size=(36, 24), resize="error")
    with pytest.raises(ValueError, match=r"^instruction names \{image1\} but the request has 1 image\(s\)"):
        pipe.edit(demo_scene(), "put {image1} here", steps=1)
    with pytest.raises(ValueError, match="text-to-image needs size"):
        pipe.edit(None, "a red ball", steps=1)
    assert pipe.edit(None, "a red ball", steps=1, size=(40, 24))[0].size == (40, 24)


def test_session_keeps_history_and_renames_indicators(pipe):
    s = EditSession(pipe)
    first = s.edit("{image} add a hat", images=[demo_scene()], steps=2)
    assert s.rename("{image} now red", 1) == "{image1} now red"
    second = s.edit("{image} now red", steps=2)  # defaults to the previous output
    assert first.size == second.size and len(s.history) == 2
    assert s.history[1].instruction == "{image1} now red" and s.history[1].images[0].tobytes() == first.tobytes()
    with pytest.raises(ValueError, match=r"turn 2: instruction names \{image1\} but the turn has 1"):
        s.edit("{image1} again", steps=1)
    with pytest.raises(ValueError, match=r"images= replaces the previous output: .* pass \[session.last, other\]"):
        s.edit("put {image1} into {image}", images=[demo_scene()], steps=1)
    with pytest.raises(ValueError, match=r"the turn has 1 image\(s\)$"):  # no previous output: no hint
        EditSession(pipe).edit("put {image1} into {image}", images=[demo_scene()], steps=1)


def test_sd3_editnet_pipeline():
    p = EditPipeline.tiny("sd3")
    out = p.edit(demo_scene(64, 32), "make it night", steps=2)[0]
    assert out.size == (64, 32)
    with pytest.raises(ValueError, match="masks are used by the ACE family only"):
        p.edit(demo_scene(64, 32), "x", masks=Image.new("L", (64, 32)), steps=1)


def test_checkpoints_roundtrip_and_refuse_pickled_code(tmp_path):
    model = randomise(build_model("ace-tiny"), 3)
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind
    loaded = load_model(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ok.pth")
    assert set(load_state_dict_file(tmp_path / "ok.pth")) == set(model.state_dict())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ValueError, match="cannot be loaded without executing pickled code"):
        load_state_dict_file(tmp_path / "evil.pth")


def test_pretrained_needs_a_trained_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors: does not exist; train a model"):
        EditPipeline.pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="no trained weights there"):  # a folder without model.safetensors
        EditPipeline.pretrained(tmp_path)
    save_model(build_model("ace-tiny"), tmp_path / "t.safetensors")
    assert EditPipeline.pretrained(tmp_path / "t.safetensors").cfg.hidden_size == 64
    (tmp_path / "t.safetensors").rename(tmp_path / "model.safetensors")  # a trainer's --out folder
    assert EditPipeline.pretrained(tmp_path).cfg.hidden_size == 64
    with pytest.raises(FileNotFoundError, match="is a file, not a model folder; a trainer export file loads with "
                                                r"EditPipeline.pretrained\(path\)"):
        EditPipeline.from_pretrained(tmp_path / "model.safetensors")


def test_cli(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path), "--steps", "2", "--per-task", "1"])
    assert (tmp_path / "demo_grid.png").is_file() and "object_swap" in capsys.readouterr().out
    main(["info", "--preset", "ace-0.6b-512", "--images", "2"])
    assert "611,030,688 parameters" in capsys.readouterr().out
    model = build_model("ace-tiny")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    main(["convert", str(tmp_path / "w.pth"), str(tmp_path / "w.safetensors")])
    assert set(load_state_dict_file(tmp_path / "w.safetensors")) == set(model.state_dict())


def test_memory_estimate_formula():
    """omniace.engine.memory's documented formula, by hand for ace-tiny (d 64, 4 heads) and the SD3 EditNet."""
    from omniace.engine.memory import estimate_memory
    from omniace.engine.model import count_parameters

    model = build_model("ace-tiny")
    est = estimate_memory(model, image_tokens=100, text_tokens=28, branches=2, pixels=6400)
    assert est.weights == count_parameters(model) * 4
    assert est.activations == 2 * 128 * 64 * 4 * 16 + 4 * 128**2 * 8 and est.codec == 6400 * 48
    on_gpu = estimate_memory(model, 100, 28, 2, 6400, element_size=2, weights_resident=True, vae=True, scores=False)
    assert (on_gpu.weights, on_gpu.activations, on_gpu.codec) == (0, 2 * 128 * 64 * 2 * 16, 6400 * 3072)
    sd3 = estimate_memory(build_model("sd3-tiny-editnet"), 10, 6, 1, 0)
    assert sd3.activations == 2 * 16 * 64 * 4 * 16 + 4 * 16**2 * 8  # two streams: base and EditNet
    # the embedded default's per-pixel head (k = 16, s = 16 smooth features, no keys): + branches x pixels x
    # (5k + 2s + 3q + 24) x e
    edit = estimate_memory(build_model("ace-edit"), 100, 28, 2, 6400)
    assert edit.activations == 2 * 128 * 192 * 4 * 16 + 4 * 128**2 * 8 + 2 * 6400 * (5 * 16 + 2 * 16 + 24) * 4


def test_pipeline_memory_estimate_checks_the_request_first():
    from omniace.engine.config import get_config
    from omniace.engine.pipeline import Turn, turn_inputs

    dry = EditPipeline.dry(get_config("ace-0.6b-1024"), dtype=torch.bfloat16)
    assert next(dry.model.parameters()).device.type == "meta"
    turn = Turn("{image} x", *turn_inputs(Image.new("RGB", (4000, 3000)), None))
    est = dry.memory_estimate(turn, weights_resident=False, device="cuda")
    # 4000x3000 into the 1024^2 budget: 1168x880, 73 x 55 = 4015 tokens a frame (target and condition)
    assert est.weights == 611_030_688 * 2 and est.activations == 2 * (2 * 4015 + 120) * 1152 * 2 * 16
    assert dry.memory_estimate(turn, device="cpu").activations > est.activations  # + the reference's scores
    with pytest.raises(ValueError, match="image 0: image size 1x300 is too small"):
        dry.memory_estimate(Turn("x", *turn_inputs(Image.new("RGB", (1, 300)), None)))


def test_jobs_stepped_together_give_what_each_gives_alone():
    """run_jobs packs several requests per model call; every output equals the same request run alone
    (mixed sizes, text-to-image, two images, a mask, CFG on; the gated source-skip head of the default)."""
    from omniace.engine import get_config
    from omniace.engine.codec import PixelCodec
    from omniace.engine.pipeline import tiny_text_encoder

    cfg = get_config("ace-tiny", prediction="x0", source_skip=True, source_gate=True)
    model = randomise(build_model(cfg), seed=1, std=0.05).eval()
    pipe = EditPipeline(model, tiny_text_encoder(cfg), PixelCodec(cfg.codec_factor))
    a, b = demo_scene(40, 24, seed=1), demo_scene(24, 32, seed=2)
    mask = Image.new("L", (40, 24), 0)
    mask.paste(255, (5, 3, 20, 15))
    requests = [dict(images=a, instruction="{image} make it red", masks=mask, seed=3),
                dict(images=None, instruction="a red circle", size=(32, 16), seed=4),
                dict(images=[b, a], instruction="{image} add the {image1} object", seed=5),
                dict(images=b, instruction="{image} remove the square", seed=6, guidance=1.0)]
    alone = [pipe.edit(steps=3, **{"guidance": 2.0, **r})[0] for r in requests]
    together = pipe.run_jobs([pipe.prepare_edit(steps=3, **{"guidance": 2.0, **r}) for r in requests])
    for x, y in zip(alone, together):
        assert x.size == y.size
        # matmuls over another batch may round differently: at most one uint8 level apart, rarely
        diff = np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.01
    assert len({np.asarray(x).tobytes() for x in together}) == 4  # really different requests
    with pytest.raises(ValueError, match="one step count"):
        pipe.run_jobs([pipe.prepare_edit(a, "{image} x", steps=2), pipe.prepare_edit(a, "{image} x", steps=3)])


def test_run_jobs_refuses_a_job_twice_or_jobs_at_different_steps_before_any_step():
    """A finished job beside a fresh one used to return the fresh one's noise (or an IndexError the other way
    round); one job listed twice stepped twice per call. An empty list is no work; a finished job alone is
    finished again, like run_job."""
    pipe = EditPipeline.tiny("ace")
    img = demo_scene(24, 16, seed=7)

    def fresh(seed: int = 1):
        return pipe.prepare_edit(img, "{image} make it blue", steps=2, seed=seed)

    assert pipe.run_jobs([]) == []
    done = fresh()
    first = pipe.run_jobs([done])[0]
    assert np.array_equal(np.asarray(pipe.run_jobs([done])[0]), np.asarray(first))  # run twice: the same image
    for fresh_first in (False, True):
        new = fresh()
        jobs, taken = ([new, done], r"\[0, 2\]") if fresh_first else ([done, new], r"\[2, 0\]")
        with pytest.raises(ValueError, match=f"must have taken the same steps, got {taken}"):
            pipe.run_jobs(jobs)
        assert new.i == 0 and done.i == 2  # refused before any step
    job = fresh()
    with pytest.raises(ValueError, match="jobs 0 and 2 are the same job"):
        pipe.run_jobs([job, fresh(2), job])
    assert job.i == 0
    with pytest.raises(ValueError, match="jobs 1 and 2 are the same job"):
        pipe.run_jobs([fresh(3), job, job])
