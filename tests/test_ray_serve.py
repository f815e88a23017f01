"""``omniace serve --ray``: the HTTP API on a local Ray Serve instance with 2 CPU replicas; a replica that
dies mid-stream costs no request (Ray Serve routes around it and restarts it). Bounded: ~20 s on 2 cores."""
import glob
import io
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from omniace.engine.pipeline import EditPipeline  # noqa: E402
from omniace.export.ray_serve import RayServeConfig, run  # noqa: E402

from helpers import demo_scene  # noqa: E402


def _replica_pids() -> list[int]:
    """Processes whose title Ray set to the omniace replica actor."""
    pids = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if b"ServeReplica:omniace" in open(path, "rb").read():
                pids.append(int(path.split("/")[2]))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        run(RayServeConfig(min_replicas=2, max_replicas=2, cpus_per_replica=1), port=port, blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _edit(url: str, seed: int, size=(64, 64)) -> httpx.Response:
    buf = io.BytesIO()
    demo_scene(*size).save(buf, format="PNG")
    return httpx.post(f"{url}/v1/edit", files={"images": ("in.png", buf.getvalue(), "image/png")},
                      data={"instruction": "{image} make it blue", "steps": "2", "guidance": "1.5",
                            "seed": str(seed)}, timeout=120)


def test_two_replicas_serve_the_same_api(cluster):
    status = serve.status().applications["omniace"].deployments["omniace"]
    assert status.replica_states.get("RUNNING") == 2
    r = _edit(cluster, 3, (96, 64))
    assert r.status_code == 200, r.text
    ref = EditPipeline.pretrained().edit(demo_scene(96, 64), "{image} make it blue", steps=2, guidance=1.5, seed=3)[0]
    got = Image.open(io.BytesIO(r.content))
    assert np.abs(np.asarray(got, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 2
    bad = httpx.post(f"{cluster}/v1/edit", json={"instruction": "{image} x", "steps": 0}, timeout=30)
    assert bad.status_code == 422 and bad.json()["field"] == "steps"
    assert httpx.get(f"{cluster}/healthz").json()["status"] == "ok"


def test_a_dead_replica_costs_no_request_and_is_replaced(cluster):
    pids = _replica_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    with ThreadPoolExecutor(6) as pool:
        codes = [r.status_code for r in pool.map(lambda i: _edit(cluster, i), range(6))]
    assert codes == [200] * 6
    deadline = time.time() + 60
    while time.time() < deadline:
        states = serve.status().applications["omniace"].deployments["omniace"].replica_states
        if states.get("RUNNING") == 2 and len(_replica_pids()) == 2:
            break
        time.sleep(0.5)
    assert states.get("RUNNING") == 2 and pids[0] not in _replica_pids()


def test_a_client_that_disconnects_frees_its_replica(cluster):
    """Ray Serve cancels the handler of a request whose client left; the request leaves the batch with it."""
    buf = io.BytesIO()
    demo_scene(256, 256).save(buf, format="PNG")  # 200 steps at this size take far longer than the wait below
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{cluster}/v1/edit", files={"images": ("in.png", buf.getvalue(), "image/png")},
                   data={"instruction": "{image} x", "steps": "200"}, timeout=2.0)
    deadline, idle = time.time() + 5, 0  # the 200 steps alone take longer than this
    while time.time() < deadline and idle < 6:  # /healthz answers from either replica: six idle answers in a row
        idle = idle + 1 if httpx.get(f"{cluster}/healthz").json()["active"] == 0 else 0
        time.sleep(0.2)
    assert idle >= 6
