"""The HTTP front of :class:`~omniace.export.runtime.EditServer` (FastAPI + uvicorn, Prometheus metrics).

Endpoints:
- ``POST /v1/edit``: multipart form (files ``images``/``masks``, fields ``instruction``, ``steps``,
  ``guidance`` (default: the pipeline's), ``rescale``, ``seed``, ``size`` as ``WIDTHxHEIGHT``, ``negative``,
  ``truncate``, ``resize`` (``resize``, ``crop`` or ``error``: how an image off the model grid is fitted),
  ``response``) or JSON with base64 ``images``/``masks`` (a ``null`` mask, or an empty multipart ``masks``
  field: none for that image). Returns
  ``image/png``, or JSON ``{"image": <base64 PNG>, ...}`` with ``response=json``. A bad or unknown field gives
  422 naming it; a full queue 429 with ``Retry-After``; a closed server 503; a client that disconnects has its request
  cancelled (499 in the metrics). Decoding and encoding run off the event loop. No request can take the
  process down: every error is answered.
- ``GET /healthz``: ``{"status": "ok", "queued": n, "active": n}``.
- ``GET /metrics``: Prometheus text format (``prometheus-client``).

Extra ``serve`` (``pip install 'omniace[serve]'``); imported lazily by ``omniace serve``.
"""

import asyncio
import base64
import binascii
import io
import re
import time
from typing import Any

from omniace import require
from omniace.engine.cli import parse_size
from omniace.engine.imageio import decode_image
from omniace.engine.resize import RESIZE_MODES
from omniace.engine.sampler import check_finite, check_int

from .runtime import EditServer, ServerClosed, ServerOverloaded

MAX_STEPS = 200  # one HTTP request may not hold the server for longer than this many steps
MAX_PART_BYTES = 64 << 20  # one uploaded image (Starlette's default, 1 MB, refuses ordinary photos)
MAX_FILES = 16
FIELDS = {"images", "masks", "instruction", "steps", "guidance", "rescale", "seed", "negative", "size", "response",
          "truncate", "resize"}


class FieldError(ValueError):
    """A request field is missing or malformed: answered 422 naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _int(form: dict, name: str, default: int, lo: int, hi: int | None = None) -> int:
    raw = form.get(name, default)
    try:
        return check_int(int(raw) if isinstance(raw, str) else raw, name, lo, hi)
    except ValueError:
        expected = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise FieldError(name, f"{raw!r} is not {expected}") from None


def _float(form: dict, name: str, default: float) -> float:
    raw = form.get(name, default)
    try:
        return check_finite(float(raw) if isinstance(raw, str) else raw, name)
    except (TypeError, ValueError):
        raise FieldError(name, f"{raw!r} is not a finite number") from None


def _size(raw: Any) -> tuple[int, int] | None:
    """``WIDTHxHEIGHT`` (the CLI's form) or ``[width, height]``."""
    if raw in (None, ""):
        return None
    try:
        if not isinstance(raw, str) and not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            raise ValueError
        return parse_size(raw) if isinstance(raw, str) else parse_size("x".join(str(v) for v in raw))
    except (TypeError, ValueError):
        raise FieldError("size", f"{raw!r} is not WIDTHxHEIGHT in positive pixels (e.g. 512x384) or "
                                 f"[width, height]") from None


def _bool(form: dict, name: str, default: bool) -> bool:
    raw = form.get(name, default)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "false", "0", "no"):
        return raw.lower() in ("true", "1", "yes")
    raise FieldError(name, f"{raw!r} is not a boolean (true or false)")


def _images(blobs: list[bytes | None], field: str) -> list:
    out = []
    for i, b in enumerate(blobs):
        if b is None:  # a JSON null mask: this image has none
            out.append(None)
            continue
        try:
            out.append(decode_image(b, f"{field}[{i}]"))
        except ValueError as err:
            raise FieldError(f"{field}[{i}]", str(err).split(": ", 1)[-1]) from None
    return out


def _b64(items: Any, field: str, nulls: bool = False) -> list[bytes | None]:
    """Base64 (or data-URL) strings -> bytes; with ``nulls``, a JSON null or an empty string stays None (masks:
    none for that image, as an empty multipart ``masks`` field). Raises FieldError naming the bad item."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list):
        raise FieldError(field, "expected a list of base64 strings")
    out: list[bytes | None] = []
    for i, s in enumerate(items):
        if nulls and (s is None or s == ""):
            out.append(None)
            continue
        if not isinstance(s, str) or s == "":
            got = "an empty string" if s == "" else "null" if s is None else type(s).__name__
            raise FieldError(f"{field}[{i}]", f"expected a base64 string, got {got}")
        try:
            out.append(base64.b64decode(s.split(",", 1)[-1] if s.startswith("data:") else s, validate=True))
        except (binascii.Error, AttributeError, ValueError):
            raise FieldError(f"{field}[{i}]", "not valid base64") from None
    return out


_PIPELINE_FIELDS = [(re.compile(r"^(steps|guidance|rescale|seed|size|negative)\b"), None),
                    (re.compile(r"^image (\d+)"), "images[{}]"), (re.compile(r"^mask (\d+)"), "masks[{}]"),
                    (re.compile(r"^\d+ masks? for"), "masks"),
                    (re.compile(r"instruction"), "instruction"), (re.compile(r"image tokens"), "images"),
                    (re.compile(r"^text-to-image needs size"), "size")]


def pipeline_field(message: str) -> str | None:
    """The request field a pipeline error names (its messages start with the argument they refuse)."""
    for pattern, template in _PIPELINE_FIELDS:
        m = pattern.search(message)
        if m:
            return m.group(1) if template is None else template.format(*m.groups())
    return None


def create_app(server: EditServer, retry_after_s: int = 1, timeout_s: float = 600.0):
    """A FastAPI app serving ``server``; raises ImportError naming the ``serve`` extra without FastAPI."""
    fastapi = require("fastapi", "serve", "omniace serve")
    prom = require("prometheus_client", "serve", "omniace serve's /metrics")
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException  # what Starlette's form parser raises

    registry = prom.CollectorRegistry()
    requests_total = prom.Counter("omniace_requests_total", "HTTP edit requests by outcome", ["status"],
                                  registry=registry)
    latency = prom.Histogram("omniace_request_seconds", "end-to-end latency of successful edit requests",
                             buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=registry)
    for name, doc, key in (("omniace_queue_depth", "requests waiting to be admitted", "queued"),
                           ("omniace_active_requests", "requests in the denoising loop", "active"),
                           ("omniace_tokens_per_second", "image tokens per second of busy time", "tokens_per_s"),
                           ("omniace_forwards_per_second", "model forwards per second of busy time",
                            "forwards_per_s"),
                           ("omniace_mean_batch_occupancy", "mean fraction of the token budget per forward",
                            "mean_occupancy"),
                           ("omniace_peak_memory_bytes", "peak memory (CUDA allocated or process RSS)",
                            "peak_memory_bytes")):
        prom.Gauge(name, doc, registry=registry).set_function(lambda key=key: server.stats()["server"][key])

    app = fastapi.FastAPI(title="omniace", summary="instruction-based image editing (ACE / OmniEdit)")

    def error(status: int, message: str, field: str | None = None, headers: dict | None = None):
        requests_total.labels(str(status)).inc()
        body = {"error": message} | ({"field": field} if field else {})
        return JSONResponse(body, status_code=status, headers=headers)

    async def parse(request: Request) -> tuple[dict, list[bytes], list[bytes]]:
        kind = request.headers.get("content-type", "")
        if kind.startswith("application/json"):
            try:
                form = await request.json()
            except ValueError:
                raise FieldError("body", "not valid JSON") from None
            if not isinstance(form, dict):
                raise FieldError("body", "expected a JSON object")
            return form, _b64(form.get("images"), "images"), _b64(form.get("masks"), "masks", nulls=True)
        if kind.startswith("multipart/form-data") or kind.startswith("application/x-www-form-urlencoded"):
            try:
                data = await request.form(max_files=MAX_FILES, max_fields=64, max_part_size=MAX_PART_BYTES)
            except HTTPException as err:  # too many files or fields, a part over the limit, a broken body
                raise FieldError("body", str(err.detail)) from None
            form = {k: v for k, v in data.items() if isinstance(v, str)}
            files: dict[str, list[bytes | None]] = {"images": [], "masks": []}
            for name in files:
                for i, part in enumerate(data.getlist(name)):
                    if name == "masks" and part == "":  # curl -F masks= : no mask for this image (JSON's null)
                        files[name].append(None)
                    elif isinstance(part, str):
                        raise FieldError(f"{name}[{i}]", "expected a file upload (curl -F name=@file), got text"
                                         + (" (an empty masks field means none for that image)"
                                            if name == "masks" else ""))
                    else:
                        files[name].append(await part.read())
            return form, files["images"], files["masks"]
        raise FieldError("content-type", f"{kind or 'none'}; expected multipart/form-data or application/json")

    def submit(form: dict, image_blobs: list[bytes], mask_blobs: list[bytes]):
        """Field checks, image decoding and ``server.submit`` (text and codec encoding): off the event loop."""
        unknown = sorted(set(form) - FIELDS)
        if unknown:
            raise FieldError(unknown[0], f"unknown field; expected some of {sorted(FIELDS)}")
        instruction = form.get("instruction")
        if not isinstance(instruction, str):
            raise FieldError("instruction", "a string is required")
        response = form.get("response", "png")
        if response not in ("png", "json"):
            raise FieldError("response", f"{response!r}; expected 'png' or 'json'")
        resize = form.get("resize", "resize")
        if resize not in RESIZE_MODES:
            raise FieldError("resize", f"{resize!r}; expected one of {list(RESIZE_MODES)}")
        negative = form.get("negative", "")
        if not isinstance(negative, str):
            raise FieldError("negative", "a string is required")
        guidance = None if form.get("guidance") in (None, "") else _float(form, "guidance", 0.0)
        kw = dict(steps=_int(form, "steps", 20, 1, MAX_STEPS), guidance=guidance,
                  rescale=_float(form, "rescale", 0.5), seed=_int(form, "seed", 0, 0, 2**63 - 1),
                  negative=negative, size=_size(form.get("size")), truncate=_bool(form, "truncate", True),
                  resize=resize)
        images, masks = _images(image_blobs, "images"), _images(mask_blobs, "masks")
        return response, server.submit(images or None, instruction, masks=masks or None, **kw)

    async def until_disconnected(request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    @app.post("/v1/edit")
    async def edit(request: Request):
        t0 = time.perf_counter()
        try:
            form, image_blobs, mask_blobs = await parse(request)
            response, future = await asyncio.to_thread(submit, form, image_blobs, mask_blobs)
        except FieldError as err:
            return error(422, str(err), err.field)
        except ServerOverloaded as err:
            return error(429, str(err), headers={"Retry-After": str(retry_after_s)})
        except ServerClosed as err:
            return error(503, str(err), headers={"Retry-After": str(retry_after_s)})
        except (ValueError, TypeError) as err:
            return error(422, str(err), pipeline_field(str(err)))
        result = asyncio.ensure_future(asyncio.wrap_future(future))
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            done, _ = await asyncio.wait({result, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the front cancelled this handler (Ray Serve does on a disconnect)
            future.cancel()
            requests_total.labels("disconnected").inc()
            raise
        finally:
            gone.cancel()
        if result not in done:  # the client left (its request is dropped at the next step) or the time is up
            future.cancel()
            result.cancel()
            if gone in done:
                requests_total.labels("disconnected").inc()
                return Response(status_code=499)
            return error(504, f"the edit did not finish within {timeout_s:.0f} s")
        try:
            out = result.result()[0]
        except ServerClosed as err:
            return error(503, str(err), headers={"Retry-After": str(retry_after_s)})
        except (ValueError, TypeError, FloatingPointError) as err:  # the pipeline's verdict on this request
            field = pipeline_field(str(err))
            return error(422, str(err), "size" if field == "images" and not image_blobs else field)
        except Exception as err:  # noqa: BLE001 - answered, never raised into the server
            return error(500, f"{type(err).__name__}: {err}")
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        requests_total.labels("200").inc()
        latency.observe(time.perf_counter() - t0)
        if response == "json":
            return JSONResponse({"image": base64.b64encode(buf.getvalue()).decode(), "format": "png",
                                 "width": out.width, "height": out.height})
        return Response(buf.getvalue(), media_type="image/png")

    @app.get("/healthz")
    def healthz():
        st = server.stats()["server"]
        return {"status": "ok", "queued": st["queued"], "active": st["active"]}

    @app.get("/metrics")
    def metrics():
        return Response(prom.generate_latest(registry), media_type=prom.CONTENT_TYPE_LATEST)

    return app


def serve(server: EditServer, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the HTTP front with uvicorn until interrupted; the server is closed (draining) on exit."""
    uvicorn = require("uvicorn", "serve", "omniace serve")
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level=log_level)
    finally:
        server.close()
