"""Scale-out on Ray Serve: every replica runs one :class:`EditServer` behind the same HTTP API.

Each replica is a Ray actor holding the pipeline, its scheduler thread and the FastAPI app of
:mod:`omniace.export.http_app` (built on the replica by ``serve.ingress``'s builder form), so ``/v1/edit``,
``/healthz`` and ``/metrics`` answer exactly as ``omniace serve`` does. Ray Serve's proxy routes requests
to replicas, autoscales on ongoing requests per replica (queue depth), restarts a replica that dies and
health-checks them. One replica per GPU (``num_gpus=1``) or per ``cpus_per_replica`` CPU cores.

Extra ``ray`` (``pip install 'omniace[ray]'``), imported lazily.
"""
from __future__ import annotations

from dataclasses import dataclass

from omniace import require


@dataclass
class RayServeConfig:
    """How to deploy: replicas (fixed, or autoscaled between ``min_replicas`` and ``max_replicas`` to keep
    ``target_ongoing_requests`` per replica), and what each replica serves with."""

    weights: str | None = None  # a trainer export; None: the embedded default
    device: str = "cpu"  # "cuda": one GPU per replica
    cpus_per_replica: float = 1.0
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0  # autoscaling: requests in flight per replica
    max_ongoing_requests: int = 64  # per replica, beyond which Ray Serve queues at the proxy
    backend: str = "torch"
    artifact: str | None = None  # the onnxruntime / tensorrt backend's export folder (see make_denoiser)
    token_budget: int = 16384  # one edit at the default pipeline's largest fitted size, both CFG branches
    max_queue: int = 64
    torch_threads: int | None = None  # intra-op threads per replica (default: cpus_per_replica)

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replicas: need 1 <= min_replicas ({self.min_replicas}) <= max_replicas "
                             f"({self.max_replicas})")
        if self.cpus_per_replica <= 0:
            raise ValueError(f"cpus_per_replica {self.cpus_per_replica} must be > 0")


def build_application(cfg: RayServeConfig):
    """A Ray Serve application (``serve.run(app)``) of the omniace HTTP API on ``cfg``'s replicas."""
    serve = require("ray.serve", "ray", "omniace serve --ray")

    def build_app():  # runs on each replica: its own pipeline, scheduler and metrics
        import torch

        from .http_app import create_app
        from .runtime import EditServer

        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_replica)))
        server = EditServer.pretrained(cfg.weights, device=cfg.device, backend=cfg.backend, artifact=cfg.artifact,
                                       token_budget=cfg.token_budget, max_queue=cfg.max_queue, log_every=0)
        return create_app(server)

    actor = {"num_gpus": 1} if cfg.device.startswith("cuda") else {"num_cpus": cfg.cpus_per_replica}
    scaling: dict = ({"num_replicas": cfg.min_replicas} if cfg.min_replicas == cfg.max_replicas else
                     {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                             "target_ongoing_requests": cfg.target_ongoing_requests}})
    deployment = serve.deployment(serve.ingress(build_app)(), name="omniace", ray_actor_options=actor,
                                  max_ongoing_requests=cfg.max_ongoing_requests, **scaling)
    return deployment.bind()


def run(cfg: RayServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
        address: str | None = None):
    """Start (or join, with ``address``) a Ray cluster, deploy, and serve HTTP on ``host:port``."""
    ray = require("ray", "ray", "omniace serve --ray")
    serve = require("ray.serve", "ray", "omniace serve --ray")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    if not blocking:
        return serve.run(build_application(cfg), name="omniace", route_prefix="/")
    try:
        serve.run(build_application(cfg), name="omniace", route_prefix="/", blocking=True)
    except KeyboardInterrupt:  # Ctrl-C: take the replicas down with the command
        serve.shutdown()
        ray.shutdown()
