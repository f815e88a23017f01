"""``omniace bench serving``: a seeded request stream replayed against three ways of serving it.

(a) ``sequential``: one request at a time through ``EditPipeline.edit``;
(b) ``static-padded``: static batching as peer diffusion pipelines batch: the requests waiting when the
    previous batch ends start together, every frame is padded to the batch's largest frame and every sample
    to its largest frame count, and the batch runs until its longest request is done (finished requests ride
    along); outputs are cropped back (a cost model of padding, not an equal-output path);
(c) ``server``: :class:`~omniace.export.runtime.EditServer`, step-level continuous batching, no padding.

``--backends torch,torch-compile,onnxruntime,tensorrt`` runs the server mode once per denoiser backend and
measures each backend's per-step latency (p20/p50/p80 of one forward over the same packed batch of stream
requests) and its largest output difference from eager torch, side by side in one run; a backend that
cannot run here (TensorRT without the package or a GPU) is recorded as skipped with the reason.

The stream: Poisson arrivals at several rates (relative to the measured one-at-a-time capacity), sizes from
OmniEdit's seven aspect ratios, 1-2 condition images, mixed step counts and guidance. Reported per mode and
rate: requests/s, p50/p95 latency (arrival to result), token utilisation (useful / processed image tokens).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample
from omniace.engine.pipeline import EditJob, EditPipeline, Turn, turn_inputs
from omniace.export.runtime import EditServer
from omniace.train.scenes import ASPECTS, frame_size, random_scene, render

RESULTS = Path("bench_results")  # relative to where it runs, like `omniace bench`: never the installed package
MODES = ("sequential", "static-padded", "server")


@dataclass
class StreamRequest:
    arrival: float  # seconds after the stream starts
    kwargs: dict  # EditPipeline.edit arguments


def request_stream(n: int, rate: float, seed: int, short_side: int = 64, multiple: int = 8) -> list[StreamRequest]:
    """``n`` requests with exponential inter-arrival times of mean ``1 / rate`` seconds (deterministic in seed)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        images = []
        for _ in range(rng.choice((1, 1, 2))):
            w, h = frame_size(rng.choice(list(ASPECTS)), short_side, multiple)
            images.append(render(random_scene(rng), w, h))
        instruction = "{image} make the red circle blue" if len(images) == 1 else "{image} add the object of {image1}"
        out.append(StreamRequest(t, dict(images=images, instruction=instruction, steps=rng.choice((4, 6, 8, 10)),
                                         guidance=rng.choice((1.0, 1.5, 3.0)), seed=i)))
    return out


@dataclass
class ModeResult:
    mode: str
    rate: float  # offered requests/s
    requests: int
    throughput: float  # completed requests/s over the makespan
    p50_s: float
    p95_s: float
    mean_s: float
    useful_tokens: int
    processed_tokens: int

    @property
    def utilisation(self) -> float:
        return self.useful_tokens / max(self.processed_tokens, 1)


def _summary(mode: str, rate: float, stream: list[StreamRequest], t0: float, ends: list[float], useful: int,
             processed: int) -> ModeResult:
    lat = sorted(e - (t0 + r.arrival) for r, e in zip(stream, ends))
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))]  # noqa: E731
    makespan = max(ends) - (t0 + stream[0].arrival)
    return ModeResult(mode, rate, len(stream), len(stream) / makespan, q(0.5), q(0.95), sum(lat) / len(lat),
                      useful, processed)


def _wait_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _prepare(pipe: EditPipeline, r: StreamRequest) -> EditJob:
    kw = r.kwargs
    return pipe.prepare([], Turn(kw["instruction"], *turn_inputs(kw["images"], None)), None, kw["steps"],
                        kw["guidance"], 0.5, kw["seed"], "")


def run_sequential(pipe: EditPipeline, stream: list[StreamRequest], rate: float) -> ModeResult:
    ends, tokens = [], 0
    t0 = time.perf_counter()
    for r in stream:
        _wait_until(t0 + r.arrival)
        job = _prepare(pipe, r)
        pipe.run_job(job)
        tokens += job.image_tokens * job.sampler.steps
        ends.append(time.perf_counter())
    return _summary("sequential", rate, stream, t0, ends, tokens, tokens)


def _pad_sample(s: LCUSample, h: int, w: int, frames: int) -> LCUSample:
    """Every frame zero-padded (bottom/right) to ``h x w`` latents, zero frames appended up to ``frames``."""
    def pad(img: ImageInput) -> ImageInput:
        lat = img.latent
        lat = F.pad(lat, (0, w - lat.shape[2], 0, h - lat.shape[1]))
        mask = None if img.mask is None else F.pad(img.mask, (0, w - img.mask.shape[-1], 0, h - img.mask.shape[-2]))
        return ImageInput(lat, mask)

    units = [ConditionUnit(u.instruction, [pad(i) for i in u.images], u.text, u.pooled) for u in s.units]
    have = 1 + sum(len(u.images) for u in units)
    c = s.target.latent.shape[0]
    units[-1].images += [ImageInput(torch.zeros(c, h, w)) for _ in range(frames - have)]
    return LCUSample(units, pad(s.target))


def _grid_index(job: EditJob, w_pad: int) -> torch.Tensor:
    """Rows of the padded target grid that hold the job's own tokens (row-major patch grid)."""
    p = job.patch_size
    gh, gw = job.target_size[0] // p, job.target_size[1] // p
    return (torch.arange(gh)[:, None] * (w_pad // p) + torch.arange(gw)[None, :]).flatten()


def run_static_padded(pipe: EditPipeline, stream: list[StreamRequest], rate: float, max_batch: int) -> ModeResult:
    ends: list[float | None] = [None] * len(stream)
    useful = processed = 0
    t0 = time.perf_counter()
    nxt = 0
    while nxt < len(stream):
        _wait_until(t0 + stream[nxt].arrival)
        now = time.perf_counter() - t0
        members = [i for i in range(nxt, len(stream)) if stream[i].arrival <= now][:max_batch]
        nxt = members[-1] + 1
        jobs = [_prepare(pipe, stream[i]) for i in members]
        frames = [f for j in jobs for f in [j.samples[0].target] + [im for u in j.samples[0].units for im in u.images]]
        h = max(f.latent.shape[1] for f in frames)
        w = max(f.latent.shape[2] for f in frames)
        n_frames = max(1 + sum(len(u.images) for u in j.samples[0].units) for j in jobs)
        batch = pipe.pack([_pad_sample(s, h, w, n_frames) for j in jobs for s in j.samples])
        per_frame = (h // pipe.cfg.patch_size) * (w // pipe.cfg.patch_size)
        rows = [_grid_index(j, w) for j in jobs]
        padded_rows = per_frame  # target rows per branch in the padded batch
        batch_tokens = sum(j.branches for j in jobs) * n_frames * per_frame
        def padded(j: EditJob, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            xp = x.new_zeros(j.branches * padded_rows, x.shape[1])
            for b in range(j.branches):
                xp[b * padded_rows + idx] = x[b * j.x.shape[0]:(b + 1) * j.x.shape[0]]
            return xp

        self_cond = getattr(pipe.cfg, "self_condition", False)
        for step in range(max(j.sampler.steps for j in jobs)):
            xs, ts, prev = [], [], []
            for j, idx in zip(jobs, rows):
                # a finished request rides along at its last state
                xs.append(padded(j, idx, torch.cat([j.x] * j.branches)))
                if self_cond:
                    prev.append(padded(j, idx, j.previous_estimate()))
                ts.append(j.sampler.timestep(min(j.i, j.sampler.steps - 1), j.branches))
            out = pipe.model(batch, torch.cat(xs), torch.cat(ts).to(pipe.device),
                             **({"x0_prev": torch.cat(prev)} if self_cond else {}))
            processed += batch_tokens
            offset = 0
            for j, idx, i in zip(jobs, rows, members):
                if not j.done:
                    mine = torch.cat([out[offset + b * padded_rows + idx] for b in range(j.branches)])
                    j.advance(mine)
                    useful += j.image_tokens
                    if j.done:
                        pipe.finish(j)
                        ends[i] = time.perf_counter()
                offset += j.branches * padded_rows
    return _summary("static-padded", rate, stream, t0, ends, useful, processed)


def run_server(pipe: EditPipeline, stream: list[StreamRequest], rate: float, token_budget: int,
               backend: str = "torch", denoise=None) -> ModeResult:
    ends: list[float | None] = [None] * len(stream)
    done = threading.Event()
    left = [len(stream)]
    lock = threading.Lock()
    with EditServer(pipe, token_budget=token_budget, max_queue=len(stream) + 1, log_every=0) as server:
        if denoise is not None:  # a backend built once for every rate (an export or a compile is not timed)
            server.denoise, server.backend = denoise, backend
        t0 = time.perf_counter()
        for i, r in enumerate(stream):
            _wait_until(t0 + r.arrival)

            def record(_, i=i):
                ends[i] = time.perf_counter()
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

            server.submit(**r.kwargs).add_done_callback(record)
        done.wait()
        tokens = server.stats()["server"]["tokens"]
    return _summary("server" if backend == "torch" else f"server[{backend}]", rate, stream, t0, ends, tokens, tokens)


def step_batch(pipe: EditPipeline, stream: list[StreamRequest], token_budget: int):
    """The packed batch of the first stream requests (both CFG branches) that fits ``token_budget``, with
    its noisy target tokens and timesteps: what one server step feeds the denoiser."""
    samples: list[LCUSample] = []
    tokens = 0
    for r in stream:
        job = _prepare(pipe, r)
        if samples and tokens + job.image_tokens > token_budget:
            break
        samples += job.samples
        tokens += job.image_tokens
    batch = pipe.pack(samples)
    x = torch.randn(batch.target_index.numel(), batch.latent_channels * batch.patch_size**2,
                    generator=torch.Generator().manual_seed(0)).to(batch.device)
    t = torch.full((batch.num_samples,), 500.0, device=batch.device)
    return batch, x, t


def step_latency(denoise, batch, x, t, repeats: int) -> list[float]:
    """Seconds per forward, ``repeats`` times after two warm-up calls (a GPU is synchronised per call)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(2):
        denoise(batch, x, t)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        denoise(batch, x, t)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def backend_rows(pipe: EditPipeline, backends: list[str], stream: list[StreamRequest], token_budget: int,
                 repeats: int) -> tuple[list[dict], dict]:
    """Per backend: per-step latency (p20/p50/p80 ms), image tokens/s, max |output - eager torch|, or the reason
    it was skipped; and the denoisers that could be built (reused by the server runs)."""
    from omniace.export.runtime import make_denoiser

    batch, x, t = step_batch(pipe, stream, token_budget)
    ref = pipe.model(batch, x, t)
    rows, built = [], {}
    for name in backends:
        try:
            denoise = make_denoiser(pipe.model, name, log=lambda m: print(m, file=sys.stderr))
            out = denoise(batch, x, t)
        except (ImportError, ValueError, RuntimeError, FileNotFoundError) as err:
            rows.append({"backend": name, "skipped": " ".join(str(err).split())[:300]})
            continue
        times = sorted(step_latency(denoise, batch, x, t, repeats))
        q = lambda p: times[min(len(times) - 1, int(round(p * (len(times) - 1))))] * 1e3  # noqa: E731
        rows.append({"backend": name, "step_ms_p20": q(0.2), "step_ms_p50": q(0.5), "step_ms_p80": q(0.8),
                     "image_tokens": batch.tokens.shape[0], "samples": batch.num_samples,
                     "image_tokens_per_s": batch.tokens.shape[0] / (q(0.5) / 1e3),
                     "max_abs_diff_vs_torch": float((out.float() - ref.float()).abs().max())})
        built[name] = denoise
    return rows, built


def capacity(pipe: EditPipeline, n: int, seed: int) -> float:
    """One-at-a-time requests/s on a back-to-back stream (the rates are offered relative to it)."""
    stream = [StreamRequest(0.0, r.kwargs) for r in request_stream(n, 1.0, seed)]
    run_sequential(pipe, stream[:2], 0.0)  # warm-up
    t0 = time.perf_counter()
    run_sequential(pipe, stream, 0.0)
    return n / (time.perf_counter() - t0)


def svg(results: list[dict], title: str) -> str:
    """Two panels: throughput and p95 latency against the offered rate, one line per mode."""
    W, H, L, B, T, G = 860, 380, 60, 50, 40, 70
    pw = (W - 2 * L - G) / 2
    rates = sorted({r["rate"] for r in results})
    colors = dict(zip(MODES, ("#7f7f7f", "#ff7f0e", "#1f77b4")))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="11"><text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>']
    for k, (key, label) in enumerate((("throughput", "requests/s"), ("p95_s", "p95 latency (s)"))):
        x0 = L + k * (pw + G)
        ymax = max(r[key] for r in results) * 1.1 or 1.0
        px = lambda v: x0 + (v - rates[0]) / ((rates[-1] - rates[0]) or 1) * pw  # noqa: E731
        py = lambda v: H - B - v / ymax * (H - B - T)  # noqa: E731
        out += [f'<line x1="{x0}" y1="{H - B}" x2="{x0 + pw}" y2="{H - B}" stroke="black"/>',
                f'<line x1="{x0}" y1="{T}" x2="{x0}" y2="{H - B}" stroke="black"/>',
                f'<text x="{x0 + pw / 2}" y="{H - 12}" text-anchor="middle">offered requests/s</text>',
                f'<text x="{x0 + 4}" y="{T - 6}">{label}</text>']
        for i in range(5):
            out.append(f'<text x="{x0 - 4}" y="{py(ymax * i / 4) + 4:.1f}" text-anchor="end">{ymax * i / 4:.2f}</text>')
        for rate in rates:
            out.append(f'<text x="{px(rate):.1f}" y="{H - B + 14}" text-anchor="middle">{rate:.2f}</text>')
        for j, mode in enumerate(MODES):
            pts = sorted((r["rate"], r[key]) for r in results if r["mode"] == mode)
            if pts:
                out.append(f'<polyline points="{" ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in pts)}" fill="none" '
                           f'stroke="{colors[mode]}" stroke-width="2"/>')
                if k == 0:
                    out.append(f'<text x="{x0 + 8}" y="{T + 14 * (j + 1)}" fill="{colors[mode]}">{mode}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="omniace bench serving", description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="a trainer export (default: the embedded default)")
    ap.add_argument("--requests", type=int, default=32, help="requests per rate")
    ap.add_argument("--loads", default="0.5,1,2,4", help="offered rates as multiples of one-at-a-time capacity")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--backends", default="torch",
                    help="denoiser backends of the server mode, side by side (torch,torch-compile,onnxruntime,tensorrt)")
    ap.add_argument("--step-repeats", type=int, default=10, help="forwards timed per backend for the step latency")
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--max-batch", type=int, default=8, help="static batching: requests per batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default ./{RESULTS})")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",")]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; expected some of {list(MODES)}")
    try:
        loads = [float(v) for v in args.loads.split(",")]
    except ValueError:
        ap.error(f"--loads {args.loads!r}: expected comma-separated positive numbers")
    if not all(0 < v < float("inf") for v in loads) or args.requests < 1 or args.step_repeats < 1:
        ap.error(f"need --loads > 0 (got {args.loads}), --requests >= 1 (got {args.requests}) and "
                 f"--step-repeats >= 1 (got {args.step_repeats})")
    from omniace.export.runtime import BACKENDS

    backends = [b.strip() for b in args.backends.split(",")]
    if [b for b in backends if b not in BACKENDS]:
        ap.error(f"unknown backend(s) {[b for b in backends if b not in BACKENDS]}; expected some of {list(BACKENDS)}")
    pipe = EditPipeline.pretrained(args.weights)
    torch.manual_seed(0)
    with torch.inference_mode():
        step_rows, denoisers = backend_rows(pipe, backends, request_stream(args.requests, 1.0, args.seed),
                                            args.token_budget, args.step_repeats)
        for row in step_rows:
            if "skipped" in row:
                print(f"backend {row['backend']:>13}: skipped ({row['skipped']})", file=sys.stderr)
            else:
                print(f"backend {row['backend']:>13}: step p50 {row['step_ms_p50']:7.1f} ms (p20 {row['step_ms_p20']:.1f}"
                      f", p80 {row['step_ms_p80']:.1f}) over {row['image_tokens']} image tokens, "
                      f"{row['image_tokens_per_s']:,.0f} tokens/s, max |diff| vs torch {row['max_abs_diff_vs_torch']:.2e}",
                      file=sys.stderr)
        if "server" in modes and not denoisers:
            ap.error(f"no backend of {backends} can run here (see the lines above); the server mode needs one")
        cap = capacity(pipe, 8, args.seed + 99)
        print(f"one-at-a-time capacity: {cap:.2f} requests/s on {torch.get_num_threads()} CPU thread(s)",
              file=sys.stderr)
        rows: list[ModeResult] = []
        for load in loads:
            stream = request_stream(args.requests, load * cap, args.seed)
            for mode in modes:
                if mode == "sequential":
                    res = run_sequential(pipe, stream, load * cap)
                elif mode == "static-padded":
                    res = run_static_padded(pipe, stream, load * cap, args.max_batch)
                else:
                    runs = [run_server(pipe, stream, load * cap, args.token_budget, name, denoisers[name])
                            for name in backends if name in denoisers]
                rows += [res] if mode != "server" else runs
                for res in [res] if mode != "server" else runs:
                    print(f"load {load:>4} x | {res.mode:>24} | {res.throughput:6.2f} req/s | p50 {res.p50_s:6.2f} s | "
                          f"p95 {res.p95_s:6.2f} s | utilisation {res.utilisation * 100:5.1f}%", file=sys.stderr)
    results = [asdict(r) | {"utilisation": r.utilisation} for r in rows]
    doc = {"device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "model": args.weights or "embedded default (ace-edit)", "capacity_req_s": cap,
           "config": vars(args) | {"out": str(args.out), "weights": args.weights}, "results": results,
           "backends": step_rows,
           "targets": targets(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"serving_{doc['device'].replace(' ', '-').lower()}_{doc['date'][:19].replace(':', '').replace('-', '')}"
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(doc, indent=1))
    path.with_suffix(".svg").write_text(svg(results, f"serving on {doc['device']}: {args.requests} requests per rate"))
    for t in doc["targets"]:
        print(f"target {t['name']}: {t['value']:.2f} (need >= {t['need']}) {'met' if t['met'] else 'NOT met'}",
              file=sys.stderr)
    print(f"wrote {path} and {path.with_suffix('.svg')}")
    return 0


def targets(rows: list[ModeResult]) -> list[dict]:
    """The issue's targets at the highest offered load: server throughput vs each baseline, at a p95 no worse."""
    if not rows:
        return []
    top = max(r.rate for r in rows)
    by = {r.mode: r for r in rows if r.rate == top}
    out = []
    if "server" in by:
        s = by["server"]
        for base, need in (("sequential", 1.5), ("static-padded", 1.3)):
            if base in by:
                b = by[base]
                out.append({"name": f"server throughput / {base}", "value": s.throughput / b.throughput,
                            "need": need, "p95_no_worse": s.p95_s <= b.p95_s,
                            "met": s.throughput / b.throughput >= need and s.p95_s <= b.p95_s})
        out.append({"name": "server token utilisation", "value": s.utilisation, "need": 1.0,
                    "met": s.utilisation >= 1.0})
    return out


if __name__ == "__main__":
    sys.exit(main())
