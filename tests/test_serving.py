"""EditServer: step-level continuous batching gives every request the output EditPipeline gives it alone.

Reference: ``EditPipeline.edit`` with the same arguments, one request at a time. Tolerance: max pixel
difference <= 2/255 (the packed forward runs other requests' rows through the same matmuls, so rounding may
differ); the measured maximum is printed.
"""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from omniace.engine.pipeline import EditPipeline, EditSession, Turn, turn_inputs
from omniace.export.runtime import EditServer, ServerClosed, ServerOverloaded

from helpers import demo_scene

TOL = 2  # of 255


@pytest.fixture(scope="module")
def pipe():
    return EditPipeline.pretrained()


def _diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


# six requests: sizes of several aspect ratios (multiples of 8 px), step counts, guidance on and off, 0-2 images
REQUESTS = [
    dict(images=demo_scene(64, 64, 0), instruction="{image} make the red circle blue", steps=3, guidance=1.5, seed=0),
    dict(images=demo_scene(96, 64, 1), instruction="{image} add fog", steps=2, guidance=1.0, seed=1),
    dict(images=demo_scene(64, 112, 2), instruction="{image} remove the green square", steps=4, guidance=3.0, seed=2),
    dict(images=[demo_scene(48, 80, 3), demo_scene(64, 64, 4)], instruction="{image} put the circle of {image1}",
         steps=3, guidance=1.5, seed=3),
    dict(images=None, instruction="a red circle on grass", steps=3, guidance=2.0, seed=4, size=(80, 48)),
    dict(images=demo_scene(128, 72, 5), instruction="{image} make it night", steps=1, guidance=1.5, seed=5,
         rescale=0.0),
]


def _reference(pipe, req):
    return pipe.edit(**req)[0]


def test_requests_sharing_steps_equal_each_request_alone(pipe):
    refs = [_reference(pipe, r) for r in REQUESTS]
    with EditServer(pipe, token_budget=4096, log_every=0) as server:
        alone = server.edit(**REQUESTS[0])[0]  # the first request with the server to itself
        futures = [server.submit(**r) for r in REQUESTS]
        outs = [f.result(timeout=120)[0] for f in futures]
        st = server.stats()
    worst = max([_diff(alone, refs[0])] + [_diff(o, r) for o, r in zip(outs, refs)])
    print(f"max pixel difference vs EditPipeline.edit: {worst}/255")
    assert worst <= TOL
    # the six really shared forwards: some forward carried more than one request
    shared = [ids for ids, _ in st["batches"] if len(ids) > 1]
    assert shared, st["batches"]
    assert st["server"]["completed"] == len(REQUESTS) + 1 and st["server"]["failed"] == 0


def test_requests_join_and_leave_at_step_boundaries(pipe):
    reqs = [dict(REQUESTS[0], steps=s, seed=s) for s in (2, 4, 3)]
    one = pipe.prepare([], Turn(reqs[0]["instruction"], *turn_inputs(reqs[0]["images"], None)), None, 2, 1.5, 0.5, 0, "")
    budget = 2 * one.image_tokens  # two requests at a time: the third joins when the first leaves
    with EditServer(pipe, token_budget=budget, log_every=0) as server:
        futures = [server.submit(**r) for r in reqs]
        outs = [f.result(timeout=120)[0] for f in futures]
        st = server.stats()
    for o, r in zip(outs, reqs):
        assert _diff(o, _reference(pipe, r)) <= TOL
    batches = st["batches"]
    assert all(tokens <= budget for _, tokens in batches)
    steps = {rec["id"]: rec["steps"] for rec in st["requests"]}
    for rid, n in steps.items():  # each request is in exactly `steps` forwards, consecutive ones
        where = [i for i, (ids, _) in enumerate(batches) if rid in ids]
        assert len(where) == n and where == list(range(where[0], where[0] + n))
    ids = sorted(steps)
    first_of = {rid: next(i for i, (b, _) in enumerate(batches) if rid in b) for rid in ids}
    last_of = {rid: max(i for i, (b, _) in enumerate(batches) if rid in b) for rid in ids}
    # the third request joined on the forward right after the first one (2 steps) left
    assert first_of[ids[2]] == last_of[ids[0]] + 1


def test_a_bad_request_fails_only_its_own_future(pipe):
    with EditServer(pipe, log_every=0) as server:
        good = server.submit(**REQUESTS[0])
        bad_indicator = server.submit(demo_scene(64, 64), "{image3} make it blue", steps=2)
        bad_size = server.submit(demo_scene(60, 64), "{image} make it blue", steps=2, resize="error")
        nan = server.submit(demo_scene(64, 64), "{image} make it blue", steps=2, guidance=float("nan"))
        after = server.submit(**REQUESTS[1])
        with pytest.raises(ValueError, match=r"\{image3\}"):
            bad_indicator.result(timeout=60)
        with pytest.raises(ValueError, match="60x64"):
            bad_size.result(timeout=60)
        with pytest.raises((ValueError, FloatingPointError), match="nan|finite"):
            nan.result(timeout=60)
        assert _diff(good.result(timeout=60)[0], _reference(pipe, REQUESTS[0])) <= TOL
        assert _diff(after.result(timeout=60)[0], _reference(pipe, REQUESTS[1])) <= TOL
        st = server.stats()["server"]  # the three bad ones were refused at submission (they counted nowhere)
        assert (st["refused"], st["failed"], st["completed"]) == (3, 0, 2)


def test_cancel_drops_a_running_request_and_the_server_goes_on(pipe):
    with EditServer(pipe, log_every=0) as server:
        # 250 steps: long, and within the default's "sigma" spacing (at most 271)
        long = server.submit(demo_scene(64, 64), "{image} make it blue", steps=250, guidance=1.0)
        deadline = time.time() + 30
        while not server.stats()["batches"] and time.time() < deadline:
            time.sleep(0.01)
        assert long.cancel()  # running requests stay cancellable until their result is set
        out = server.edit(**REQUESTS[1])[0]
        st = server.stats()
    assert long.cancelled()
    assert _diff(out, _reference(pipe, REQUESTS[1])) <= TOL
    rec = next(r for r in st["requests"] if r["status"] == "cancelled")
    assert 0 < rec["steps"] < 250


def test_the_queue_bound_and_the_token_budget_refuse_clearly(pipe):
    one = pipe.prepare([], Turn("{image} x", *turn_inputs(demo_scene(64, 64), None)), None, 2, 1.5, 0.5, 0, "")
    with EditServer(pipe, token_budget=one.image_tokens, max_queue=2, log_every=0) as server:
        too_big = server.submit(demo_scene(128, 128), "{image} make it blue", steps=2, guidance=1.5)
        with pytest.raises(ValueError, match=f"needs {4 * one.image_tokens} image tokens .* token budget of "
                                             f"{one.image_tokens}"):
            too_big.result(timeout=10)
        futures = []
        with pytest.raises(ServerOverloaded, match="queue is full \\(2 requests waiting\\)"):
            for _ in range(4):  # at most one runs, so by the fourth two are waiting
                futures.append(server.submit(demo_scene(64, 64), "{image} make it blue", steps=200, guidance=1.5))
        server.close(cancel=True)
        for f in futures:
            with pytest.raises(ServerClosed, match="closed"):
                f.result(timeout=10)
    with pytest.raises(ServerClosed):
        server.submit(demo_scene(64, 64), "{image} x")


def test_eight_threads_submitting_at_once(pipe):
    reqs = [dict(REQUESTS[i % 3], seed=10 + i, steps=1 + i % 2) for i in range(8)]
    barrier = threading.Barrier(8)
    with EditServer(pipe, log_every=0) as server:
        def call(r):
            barrier.wait()
            return server.edit(**r)[0]

        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(call, reqs))
    for o, r in zip(outs, reqs):
        assert _diff(o, _reference(pipe, r)) <= TOL


def test_a_session_through_the_server_equals_edit_session(pipe):
    turns = ["{image} make the red circle blue", "{image} add fog"]
    ref = EditSession(pipe)
    expected = [ref.edit(t, images=[demo_scene(64, 64)] if i == 0 else None, steps=2, guidance=1.5)
                for i, t in enumerate(turns)]
    with EditServer(pipe, log_every=0) as server:
        chat = server.session()
        got = [chat.edit(t, images=[demo_scene(64, 64)] if i == 0 else None, steps=2, guidance=1.5)
               for i, t in enumerate(turns)]
    assert all(_diff(a, b) <= TOL for a, b in zip(got, expected))
    assert len(chat.history) == 2


def test_close_finishes_what_is_queued(pipe):
    server = EditServer(pipe, log_every=0)
    futures = [server.submit(**REQUESTS[i]) for i in (0, 1)]
    server.close()
    assert all(f.done() and not f.exception() for f in futures)


def test_the_readme_serving_example_runs_as_written(capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## Serving", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(block, "README.md (Serving)", "exec"), {})
    # the example prints the mean occupancy last; a slow machine may also get the server's periodic log line
    assert 0 < float(capsys.readouterr().out.strip().splitlines()[-1]) <= 1


def test_a_self_conditioning_model_is_served_as_it_samples_alone():
    """``ACEConfig.self_condition``: the server feeds each request its own previous estimate, as
    ``EditPipeline.edit`` does, so the outputs match; its forwards carry ``x0_prev``."""
    from omniace.engine import build_model, get_config
    from omniace.engine.codec import PixelCodec
    from omniace.engine.pipeline import tiny_sampling, tiny_text_encoder

    from helpers import randomise

    cfg = get_config("ace-edit", depth=1, hidden_size=32, num_heads=2, self_condition=True)
    sc = EditPipeline(randomise(build_model(cfg), seed=3, std=0.05), tiny_text_encoder(cfg), PixelCodec(4),
                      **tiny_sampling(cfg))
    refs = [_reference(sc, r) for r in REQUESTS[:3]]
    fed = []
    real = sc.model.forward
    sc.model.forward = lambda batch, x, t, indicator_table=True, x0_prev=None: (
        fed.append(x0_prev is not None and bool(x0_prev.abs().max() > 0)), real(batch, x, t, indicator_table, x0_prev))[1]
    with EditServer(sc, token_budget=4096, log_every=0) as server:
        outs = [f.result(timeout=120)[0] for f in [server.submit(**r) for r in REQUESTS[:3]]]
    worst = max(_diff(o, r) for o, r in zip(outs, refs))
    print(f"max pixel difference vs EditPipeline.edit: {worst}/255")
    assert worst <= TOL and any(fed) and not fed[0]  # zeros at the first step, estimates after
