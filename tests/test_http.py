"""``omniace serve``'s HTTP front end to end: a real uvicorn server on 127.0.0.1 and a real HTTP client."""
import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from omniace.engine.pipeline import EditPipeline  # noqa: E402
from omniace.export.http_app import create_app  # noqa: E402
from omniace.export.runtime import EditServer, ServerOverloaded  # noqa: E402

from helpers import demo_scene  # noqa: E402


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def live():
    """(base url, pipeline, EditServer) with uvicorn running in a thread; shut down after the module."""
    pipe = EditPipeline.pretrained()
    server = EditServer(pipe, token_budget=4096, max_queue=3, log_every=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not http.started and time.time() < deadline:
        time.sleep(0.05)
    assert http.started
    yield f"http://127.0.0.1:{port}", pipe, server
    http.should_exit = True
    thread.join(10)
    server.close(cancel=True)


def test_concurrent_mixed_aspect_requests_match_the_pipeline(live):
    url, pipe, _ = live
    cases = [(demo_scene(64, 64, 0), 3, 1.5), (demo_scene(96, 64, 1), 2, 1.0), (demo_scene(48, 80, 2), 2, 1.5)]

    def call(case):
        img, steps, guidance = case
        files = {"images": ("in.png", _png(img), "image/png")}
        data = {"instruction": "{image} make the red circle blue", "steps": str(steps), "guidance": str(guidance),
                "seed": "7"}
        with httpx.Client(timeout=120) as client:
            return client.post(f"{url}/v1/edit", files=files, data=data)

    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(call, cases))
    for r, (img, steps, guidance) in zip(responses, cases):
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        got = Image.open(io.BytesIO(r.content))
        ref = pipe.edit(img, "{image} make the red circle blue", steps=steps, guidance=guidance, seed=7)[0]
        assert got.size == img.size
        assert np.abs(np.asarray(got, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 2


def test_json_with_base64_images_and_text_to_image(live):
    url, pipe, _ = live
    body = {"instruction": "a red circle", "size": "64x48", "steps": 2, "guidance": 1.5, "seed": 3,
            "response": "json"}
    r = httpx.post(f"{url}/v1/edit", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    got = Image.open(io.BytesIO(base64.b64decode(out["image"])))
    assert (out["width"], out["height"]) == got.size == (64, 48)
    ref = pipe.edit(None, "a red circle", size=(64, 48), steps=2, guidance=1.5, seed=3)[0]
    assert np.abs(np.asarray(got, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 2
    body = {"instruction": "{image} add fog", "images": [base64.b64encode(_png(demo_scene(64, 64))).decode()],
            "steps": 1}
    r = httpx.post(f"{url}/v1/edit", json=body, timeout=60)
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    # a null mask: none for that image, so a mask can go with a later image only
    a, b = demo_scene(64, 64, seed=1), demo_scene(64, 64, seed=2)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    body = {"instruction": "{image} add the {image1} object", "steps": 2, "seed": 1,
            "images": [base64.b64encode(_png(im)).decode() for im in (a, b)],
            "masks": [None, base64.b64encode(_png(mask)).decode()]}
    body_empty = {**body, "masks": ["", body["masks"][1]]}  # an empty string: none, as multipart's empty field
    r = httpx.post(f"{url}/v1/edit", json=body, timeout=60)
    assert r.status_code == 200, r.text
    ref = pipe.edit([a, b], "{image} add the {image1} object", masks=[None, mask], steps=2, seed=1)[0]
    got = np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.int16)
    assert np.abs(got - np.asarray(ref, dtype=np.int16)).max() <= 2
    r = httpx.post(f"{url}/v1/edit", json=body_empty, timeout=60)
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.int16)
    assert np.abs(got - np.asarray(ref, dtype=np.int16)).max() <= 2
    # multipart: an empty masks field is that null (curl -F masks= -F masks=@m.png)
    r = httpx.post(f"{url}/v1/edit", timeout=60,
                   data={"instruction": "{image} add the {image1} object", "steps": "2", "seed": "1", "masks": ""},
                   files=[("images", ("a.png", _png(a), "image/png")), ("images", ("b.png", _png(b), "image/png")),
                          ("masks", ("m.png", _png(mask), "image/png"))])
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.int16)
    assert np.abs(got - np.asarray(ref, dtype=np.int16)).max() <= 2


@pytest.mark.parametrize("body, field, text", [
    ({"instruction": "{image} x", "steps": 0, "images": []}, "steps", "0 is not an integer in [1, 200]"),
    ({"instruction": "{image} x", "guidance": "nan"}, "guidance", "not a finite number"),
    ({"instruction": "x", "size": "64X"}, "size", "WIDTHxHEIGHT"),
    ({"steps": 2}, "instruction", "a string is required"),
    ({"instruction": "{image} x", "images": ["%%%"]}, "images[0]", "not valid base64"),
    ({"instruction": "{image} x", "images": ["aGk=", None]}, "images[1]", "expected a base64 string, got null"),
    ({"instruction": "{image} x", "images": [""]}, "images[0]", "expected a base64 string, got an empty string"),
    ({"instruction": "{image} x", "images": ["aGk="], "masks": [3]}, "masks[0]", "expected a base64 string, got int"),
    ({"instruction": "{image} x", "response": "gif", "size": "64x64"}, "response", "'gif'"),
    ({"instruction": "x", "size": "64x64", "bogus": 1}, "bogus", "unknown field"),
    ({"instruction": "a red circle"}, "size", "text-to-image needs size"),  # no images: the size is required
    ({"instruction": "x", "size": [64.7, 64]}, "size", "[width, height]"),
    ({"instruction": "x", "size": "64x64", "negative": {"a": 1}}, "negative", "a string is required"),
    ({"instruction": "x", "size": "64x64", "truncate": "maybe"}, "truncate", "not a boolean"),
])
def test_bad_fields_get_422_naming_the_field(live, body, field, text):
    r = httpx.post(f"{live[0]}/v1/edit", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and text in r.json()["error"]


def test_pipeline_errors_are_422_and_the_server_survives_them(live):
    url = live[0]
    corrupt = {"images": ("in.png", b"\x89PNG\r\n\x1a\nnot really", "image/png")}
    r = httpx.post(f"{url}/v1/edit", files=corrupt, data={"instruction": "{image} x"}, timeout=30)
    assert r.status_code == 422 and "images[0]" in r.json()["error"] and r.json()["field"] == "images[0]"
    files = {"images": ("in.png", _png(demo_scene(64, 64)), "image/png")}
    r = httpx.post(f"{url}/v1/edit", files=files, data={"instruction": "{image3} x", "steps": "1"}, timeout=30)
    assert r.status_code == 422 and "{image3}" in r.json()["error"]
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_overload_gets_429_with_retry_after(live):
    url, _, server = live
    futures, full = [], False
    deadline = time.time() + 60
    while not full and time.time() < deadline:  # long requests fill the token budget (16), then the queue (3)
        try:
            # 250 steps: long, and within the default's "sigma" spacing (at most 271)
            futures.append(server.submit(demo_scene(64, 64), "{image} x", steps=250, guidance=1.5))
        except ServerOverloaded:
            st = server.stats()["server"]
            full = st["active"] == 16 and st["queued"] == 3
            time.sleep(0.02)
    assert full
    files = {"images": ("in.png", _png(demo_scene(64, 64)), "image/png")}
    r = httpx.post(f"{url}/v1/edit", files=files, data={"instruction": "{image} x", "steps": "1"}, timeout=30)
    for f in futures:
        f.cancel()
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]


def test_healthz_and_prometheus_metrics(live):
    url = live[0]
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    text = httpx.get(f"{url}/metrics").text
    assert 'omniace_requests_total{status="200"}' in text and "omniace_tokens_per_second" in text
    assert "omniace_request_seconds_bucket" in text


def test_the_omniace_serve_command(tmp_path):
    """The README's command: ``omniace serve`` answers /healthz and an edit, and stops cleanly on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "omniace.engine.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline, up = time.time() + 60, False
        while time.time() < deadline and not up:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                time.sleep(0.2)
        assert up, proc.stdout.read() if proc.poll() is not None else "no answer"
        files = {"images": ("in.png", _png(demo_scene(64, 64)), "image/png")}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/edit", files=files,
                       data={"instruction": "{image} make it blue", "steps": "2"}, timeout=60)
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit by SIGTERM is its contract)
    assert code in (0, -signal.SIGTERM) and "Finished server process" in proc.stdout.read()


def test_serve_arguments_are_one_line_errors(capsys):
    from omniace.engine.cli import main

    with pytest.raises(SystemExit) as err:
        main(["serve", "--port", "http"])
    assert err.value.code == 2 and "port must be an integer >= 1, got 'http'" in capsys.readouterr().err


def test_multipart_mistakes_are_422_naming_the_field(live):
    url = live[0]
    r = httpx.post(f"{url}/v1/edit", data={"instruction": "{image} x", "images": "abc"}, files={"x": ("a", b"")},
                   timeout=30)
    assert r.status_code == 422 and r.json()["field"] == "images[0]" and "file upload" in r.json()["error"]
    many = [("images", (f"{i}.png", _png(demo_scene(64, 64)), "image/png")) for i in range(20)]
    r = httpx.post(f"{url}/v1/edit", data={"instruction": "{image} x"}, files=many, timeout=30)
    assert r.status_code == 422 and r.json()["field"] == "body" and "files" in r.json()["error"].lower()


def test_an_oversized_request_is_refused_at_once_and_the_loop_stays_responsive(live):
    url = live[0]
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/edit", json={"instruction": "x", "steps": 2, "size": "16000x16000"}, timeout=30)
    assert r.status_code == 422 and "over the pipeline's max_tokens" in r.json()["error"]
    assert time.perf_counter() - t0 < 5


def test_truncate_false_refuses_a_long_instruction(live):
    body = {"instruction": "x " * 100, "size": "64x64", "steps": 1, "truncate": False}  # over 63 words and bytes
    r = httpx.post(f"{live[0]}/v1/edit", json=body, timeout=30)
    assert r.status_code == 422 and "instruction" in r.json()["error"]


def test_a_client_that_disconnects_cancels_its_request(live):
    url, _, server = live
    files = {"images": ("in.png", _png(demo_scene(64, 64)), "image/png")}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/edit", files=files, data={"instruction": "{image} x", "steps": "200"}, timeout=1.0)
    deadline = time.time() + 20
    while time.time() < deadline and server.stats()["server"]["active"]:
        time.sleep(0.1)
    st = server.stats()
    assert st["server"]["active"] == 0
    assert st["requests"][-1]["status"] == "cancelled" and st["requests"][-1]["steps"] < 200


def test_an_image_of_any_size_comes_back_at_its_size(live):
    url, pipe, _ = live
    img = demo_scene(101, 67, 4)
    files = {"images": ("in.png", _png(img), "image/png")}
    r = httpx.post(f"{url}/v1/edit", data={"instruction": "{image} x", "steps": "2", "resize": "crop", "seed": "1"},
                   files=files, timeout=120)
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(r.content)), dtype=int)
    ref = np.asarray(pipe.edit(img, "{image} x", steps=2, resize="crop", seed=1)[0], dtype=int)
    assert got.shape == (67, 101, 3) and np.abs(got - ref).max() <= 2


@pytest.mark.parametrize("body, field", [
    ({"instruction": "{image3} x", "images": "one"}, "instruction"),
    ({"instruction": "x", "size": "60x64", "steps": 1, "resize": "error"}, "size"),  # off the grid, strict
    ({"instruction": "x", "size": "60x64", "steps": 1, "resize": "fill"}, "resize"),
    ({"instruction": "x", "size": "64x64", "rescale": 2}, "rescale"),
    ({"instruction": "x", "size": "16000x16000"}, "size"),
    ({"instruction": "{image} x", "images": "one", "masks": ["black", "black"]}, "masks"),  # 2 masks for 1 image
    ({"instruction": "{image} x", "images": "one", "masks": ["black"]}, "masks[0]"),  # marks no pixel
])
def test_pipeline_errors_name_their_field(live, body, field):
    png = lambda im: base64.b64encode(_png(im)).decode()
    if body.get("images") == "one":
        body = dict(body, images=[png(demo_scene(64, 64))])
    if "masks" in body:
        body = dict(body, masks=[png(Image.new("L", (64, 64), 0)) for _ in body["masks"]])
    r = httpx.post(f"{live[0]}/v1/edit", json=body, timeout=30)
    assert r.status_code == 422 and r.json().get("field") == field, r.text
