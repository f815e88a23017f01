"""EditServer: the deployers' Python API, with step-level continuous batching.

Every request becomes an :class:`~omniace.engine.pipeline.EditJob` (codec and text encoding done once, in
the submitting thread). One scheduler thread then runs the denoising loop of all admitted jobs together: at
every step it packs the current step of every active job (both CFG branches, every condition image and
history unit) into ONE padding-free :class:`~omniace.engine.lcu.PackedLCU` within the token budget, runs one
model forward, and hands each job its own rows of the output for its CFG combination and sampler update.
Jobs join at the next step boundary and leave when done, whatever their sizes, aspect ratios, step counts,
guidance or sampler; decoding runs on a separate thread, outside the step loop.

A request's output depends only on its own inputs and seed: it equals ``EditPipeline.edit`` with the same
arguments up to float rounding (the packed forward treats every sample's segments independently).
This follows the iteration-level scheduling of Orca / vLLM, applied to diffusion steps of ragged LCUs.
"""
from __future__ import annotations

import itertools
import os
import resource
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from omniace.engine.lcu import PackedLCU
from omniace.engine.pipeline import EditJob, EditPipeline, EditSession, Turn, turn_inputs

# the model call every backend implements: (packed batch, x [L_tgt, C*p*p], t [B]) -> prediction [L_tgt, C*p*p];
# for a self-conditioning model (ACEConfig.self_condition) the server also passes ``x0_prev=`` [L_tgt, C*p*p]
Denoiser = Callable[..., Tensor]
BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")


class ServerOverloaded(RuntimeError):
    """The request queue is full: retry later (HTTP 429/503)."""


class ServerClosed(RuntimeError):
    """The server was closed: it takes no new requests, and ``close(cancel=True)`` fails the unfinished ones."""


def make_denoiser(model: torch.nn.Module, backend: str, artifact: str | os.PathLike | None = None,
                  log: Callable[[str], None] = print) -> Denoiser:
    """The model call for ``backend``:

    - ``torch``: eager; ``torch-compile``: ``torch.compile`` with dynamic shapes (a new token count does not
      recompile);
    - ``onnxruntime``: the ``portable`` ONNX export run by ONNX Runtime (CUDA provider on a GPU); ``artifact``
      is an ``omniace export`` folder of these weights, else the model is exported once into a cache folder;
    - ``tensorrt``: a TensorRT engine (``export/tensorrt.py``, extra ``trt``; not run yet); ``artifact`` is the
      export folder the engine was built in.

    Raises ValueError for any other name or an artifact of other weights; ImportError naming the extra when
    a backend's package is missing."""
    if backend == "torch":
        return model
    if backend == "torch-compile":
        return torch.compile(model, dynamic=True)
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeDenoiser, onnx_for_model

        return OnnxRuntimeDenoiser(onnx_for_model(model, artifact, log=log), verify_files=False)  # just verified
    if backend == "tensorrt":
        from .tensorrt import denoiser_for_model, require_tensorrt

        require_tensorrt()  # the missing package first: it is what most machines lack
        if artifact is None:
            raise ValueError("the tensorrt backend needs an `omniace export --tensorrt` folder (artifact=, --artifact)")
        return denoiser_for_model(model, artifact, device=next(model.parameters()).device)
    raise ValueError(f"backend {backend!r}; expected one of {BACKENDS}")


@dataclass
class _Request:
    id: int
    future: Future
    job: EditJob
    submitted: float
    started: float | None = None
    finished: float | None = None
    status: str = "queued"  # queued | running | done | failed | cancelled
    wrap: bool = True  # resolve to [image] (EditPipeline.edit's return) rather than the image (EditSession)


@dataclass
class ServerStats:
    """Counters since the server started; ``busy_s`` is the time spent in model forwards and sampler steps."""

    forwards: int = 0
    tokens: int = 0  # image tokens processed by forwards (every frame of every branch)
    occupancy_sum: float = 0.0  # sum over forwards of batch tokens / token budget
    busy_s: float = 0.0
    completed: int = 0
    failed: int = 0  # in the denoising loop (a non-finite latent, a failed forward)
    refused: int = 0  # at submission: bad input, over the token budget (their Futures hold the error)
    cancelled: int = 0
    requests: deque = field(default_factory=lambda: deque(maxlen=1024))  # the last finished requests
    batches: deque = field(default_factory=lambda: deque(maxlen=4096))  # (request ids, image tokens) per forward


class EditServer:
    """Serve edit and generation requests from many threads with one batched denoising loop.

    Args:
        pipe: the :class:`EditPipeline` (model, text encoder, codec, device) to serve.
        backend: ``"torch"``, ``"torch-compile"``, ``"onnxruntime"`` or ``"tensorrt"`` (see :func:`make_denoiser`).
        artifact: the ``onnxruntime`` backend's export folder (default: exported once into a cache folder) or,
            for ``tensorrt``, the export folder its engine was built in.
        token_budget: image tokens per forward (every frame of every CFG branch of every active request); the
            default holds one edit at the embedded default's largest fitted size (624x416 px, both branches).
        max_queue: requests waiting to be admitted; beyond it :meth:`submit` raises :class:`ServerOverloaded`.
        log_every: seconds between log lines while busy (0 disables them).
    """

    def __init__(self, pipe: EditPipeline, backend: str = "torch", token_budget: int = 16384, max_queue: int = 64,
                 log_every: float = 5.0, log: Callable[[str], None] = print,
                 artifact: str | os.PathLike | None = None):
        if token_budget < 1 or max_queue < 1:
            raise ValueError(f"token_budget {token_budget} and max_queue {max_queue} must be >= 1")
        self.pipe = pipe
        self.backend = backend
        self.denoise = make_denoiser(pipe.model, backend, artifact, log)
        self.token_budget, self.max_queue = token_budget, max_queue
        self.log_every, self.log = log_every, log
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._reserved = 0  # submissions between their queue-slot check and their enqueue (preparing)
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._closing = False
        self._stats = ServerStats()
        self._batch_key: tuple[int, ...] | None = None
        self._batch: PackedLCU | None = None
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omniace-decode")
        self._thread = threading.Thread(target=self._loop, name="omniace-scheduler", daemon=True)
        self._thread.start()

    @classmethod
    def pretrained(cls, path: str | None = None, device: str = "cpu", **kw) -> "EditServer":
        """A server over :meth:`EditPipeline.pretrained` (the embedded default, or a trainer export)."""
        return cls(EditPipeline.pretrained(path, device=device), **kw)

    def __enter__(self) -> "EditServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_ace(self) -> bool:
        return self.pipe.is_ace

    # --- submitting ----------------------------------------------------------------------------------
    def submit(self, images: Image.Image | list[Image.Image] | None, instruction: str,
               masks: Image.Image | list | None = None, steps: int = 20, guidance: float | None = None,
               rescale: float = 0.5, seed: int = 0, negative: str = "",
               size: tuple[int, int] | None = None, truncate: bool = True, resize: str = "resize") -> Future:
        """Queue one request; the Future resolves to what ``EditPipeline.edit`` returns (``[PIL image]``).

        ``guidance=None`` takes the pipeline's ``default_guidance``.
        Bad input (sizes, ``{image3}`` with one image, NaN guidance ...) fails only this Future, with the
        pipeline's error. Raises :class:`ServerOverloaded` at once when ``max_queue`` requests are waiting,
        and :class:`ServerClosed` after :meth:`close`. ``future.cancel()`` drops the request at the next step.
        """
        return self._submit([], lambda: Turn(instruction, *turn_inputs(images, masks), resize), size, steps, guidance,
                            rescale, seed, negative, truncate, wrap=True)

    def edit(self, *args, **kw) -> list[Image.Image]:
        """``submit(...).result()``: blocks until the request is done."""
        return self.submit(*args, **kw).result()

    def run(self, history: list[Turn], current: Turn, size: tuple[int, int] | None, steps: int,
            guidance: float, rescale: float, seed: int, negative: str, truncate: bool = True) -> Image.Image:
        """``EditPipeline.run`` through the server (what :class:`EditSession` calls)."""
        return self._submit(history, lambda: current, size, steps, guidance, rescale, seed, negative, truncate,
                            wrap=False).result()

    def session(self, **kw) -> EditSession:
        """Multi-turn editing (:class:`EditSession`) whose turns run through this server."""
        return EditSession(self, **kw)

    def _submit(self, history: list[Turn], current: Callable[[], Turn], size, steps, guidance, rescale, seed,
                negative, truncate: bool, wrap: bool) -> Future:
        with self._cond:
            if self._closing:
                raise ServerClosed("the server is closed; it takes no new requests")
            if len(self._waiting) + self._reserved >= self.max_queue:
                raise ServerOverloaded(f"the request queue is full ({self.max_queue} requests waiting); "
                                       f"retry later or raise max_queue")
            self._reserved += 1
        future: Future = Future()
        try:
            # the token budget is checked from the image sizes, before any encoding
            job = self.pipe.prepare(history, current(), size, steps, guidance, rescale, seed, negative, truncate,
                                    budget=(self.token_budget, "the server's token budget"))
        except Exception as err:  # noqa: BLE001 - bad input fails only this request's Future
            with self._cond:
                self._reserved -= 1
                self._stats.refused += 1
            future.set_exception(err)
            return future
        request = _Request(next(self._ids), future, job, time.perf_counter(), wrap=wrap)
        with self._cond:
            self._reserved -= 1
            if self._closing:
                future.set_exception(ServerClosed("the server was closed before this request was queued"))
                return future
            self._waiting.append(request)
            self._cond.notify()
        return future

    # --- the scheduler -------------------------------------------------------------------------------
    def _loop(self) -> None:
        last_log = time.perf_counter()
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._waiting and not self._active and not self._closing:
                        self._cond.wait()
                    if self._closing and not self._waiting and not self._active:
                        return
                    self._drop_cancelled()
                    self._admit()
                    active = list(self._active)
                if active:
                    self._step(active)
                if active and self.log_every and time.perf_counter() - last_log >= self.log_every:
                    last_log = time.perf_counter()
                    self.log(self._log_line())

    def _drop_cancelled(self) -> None:
        for queue in (self._waiting, self._active):
            for r in [r for r in queue if r.future.cancelled()]:
                queue.remove(r)
                self._retire(r, "cancelled")

    def _admit(self) -> None:
        """Move waiting requests into the running set, first come first served, while they fit the budget."""
        used = sum(r.job.image_tokens for r in self._active)
        while self._waiting and used + self._waiting[0].job.image_tokens <= self.token_budget:
            r = self._waiting.popleft()
            r.started, r.status = time.perf_counter(), "running"
            used += r.job.image_tokens
            self._active.append(r)

    def _step(self, active: list[_Request]) -> None:
        t0 = time.perf_counter()
        key = tuple(r.id for r in active)
        try:
            if key != self._batch_key:  # membership changed at this step boundary: pack once for it
                self._batch = self.pipe.pack([s for r in active for s in r.job.samples])
                self._batch_key = key
            inputs = [r.job.model_input() for r in active]
            x = torch.cat([xi for xi, _ in inputs])
            t = torch.cat([ti for _, ti in inputs]).to(self.pipe.device)
            out = self.denoise(self._batch, x, t, **self.pipe.self_condition_input([r.job for r in active]))
        except Exception as err:  # noqa: BLE001 - a failed forward fails the requests in it, not the server
            for r in active:
                self._fail(r, err)
            return
        tokens = sum(r.job.image_tokens for r in active)
        offset = 0
        for r in active:
            n = r.job.target_tokens
            try:
                r.job.advance(out[offset:offset + n])
            except Exception as err:  # noqa: BLE001 - e.g. a non-finite latent: this request alone fails
                self._fail(r, err)
            offset += n
            if r.job.done and r.status == "running":
                with self._cond:
                    self._active.remove(r)
                self._finisher.submit(self._finish, r)
        s = self._stats
        s.forwards += 1
        s.tokens += tokens
        s.occupancy_sum += tokens / self.token_budget
        s.batches.append((key, tokens))
        s.busy_s += time.perf_counter() - t0

    def _finish(self, r: _Request) -> None:
        try:
            image = self.pipe.finish(r.job)
        except Exception as err:  # noqa: BLE001
            self._fail(r, err)
            return
        if self._resolve(r, [image] if r.wrap else image):
            self._retire(r, "done")

    def _fail(self, r: _Request, err: BaseException) -> None:
        with self._cond:
            if r in self._active:
                self._active.remove(r)
        try:
            r.future.set_exception(err)
            self._retire(r, "failed")
        except InvalidStateError:  # cancelled meanwhile
            self._retire(r, "cancelled")

    def _resolve(self, r: _Request, value) -> bool:
        try:
            r.future.set_result(value)
            return True
        except InvalidStateError:  # cancelled between its last step and its decode
            self._retire(r, "cancelled")
            return False

    def _retire(self, r: _Request, status: str) -> None:
        r.status, r.finished = status, time.perf_counter()
        s = self._stats
        if status == "done":
            s.completed += 1
        elif status == "failed":
            s.failed += 1
        else:
            s.cancelled += 1
        s.requests.append({"id": r.id, "status": status, "steps": r.job.i,
                           "queue_s": (r.started or r.finished) - r.submitted,
                           "latency_s": r.finished - r.submitted, "tokens": r.job.image_tokens})

    # --- closing and stats ----------------------------------------------------------------------------
    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests; finish what is queued and running (``cancel=False``), or fail it with
        :class:`ServerClosed` (``cancel=True``). Idempotent."""
        with self._cond:
            self._closing = True
            if cancel:
                for r in [*self._waiting, *self._active]:
                    self._fail(r, ServerClosed("the server was closed (close(cancel=True)) before this request "
                                               "finished"))
                self._waiting.clear()
                self._active.clear()
            self._cond.notify_all()
        self._thread.join(timeout)
        self._finisher.shutdown(wait=True)

    def stats(self) -> dict:
        """Per request (the last 1024 finished): status, queue time and latency (s), steps, tokens; for the
        server: tokens/s and forwards/s over busy time, mean occupancy of the token budget, peak memory;
        per forward (the last 4096): the ids of the requests it carried and its image tokens."""
        s = self._stats
        with self._cond:
            queued, active = len(self._waiting), len(self._active)
        if self.pipe.device != "cpu" and torch.cuda.is_available():
            peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"
        busy = max(s.busy_s, 1e-9)
        return {"server": {"backend": self.backend, "token_budget": self.token_budget, "queued": queued,
                           "active": active, "completed": s.completed, "failed": s.failed, "refused": s.refused,
                           "cancelled": s.cancelled, "forwards": s.forwards, "tokens": s.tokens,
                           "busy_s": s.busy_s, "tokens_per_s": s.tokens / busy, "forwards_per_s": s.forwards / busy,
                           "mean_occupancy": s.occupancy_sum / max(s.forwards, 1),
                           "peak_memory_bytes": peak, "peak_memory_kind": kind},
                "requests": list(s.requests), "batches": list(s.batches)}

    def _log_line(self) -> str:
        st = self.stats()["server"]
        return (f"serve: {st['active']} running, {st['queued']} queued, {st['completed']} done | "
                f"{st['forwards_per_s']:.1f} forwards/s, {st['tokens_per_s']:,.0f} tokens/s, "
                f"occupancy {st['mean_occupancy'] * 100:.0f}%")
