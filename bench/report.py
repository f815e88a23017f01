"""Bench output: a text table, a JSON file under bench/results/, an SVG plot, and the issue's targets."""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from .denoiser import StepRow
from .hardware import Hardware
from .op_bench import OMNIACE, Row

BASELINES = ("reference", "compile", "sdpa", "flex", "varlen", "flash_attn", "xformers")


def best_baseline(row: Row, rows: list[Row]) -> tuple[str, float] | None:
    """The fastest baseline measured for the row's (op, case, mode), and this row's speedup over it."""
    same = [r for r in rows if (r.op, r.case, r.mode) == (row.op, row.case, row.mode) and r.provider in BASELINES
            and r.median_ms is not None and r.provider != row.provider]
    if not same:
        return None
    best = min(same, key=lambda r: r.median_ms)
    return best.provider, best.median_ms / row.median_ms


def table(hw: Hardware, rows: list[Row], steps: list[StepRow]) -> str:
    lines = [f"# {hw.name} ({hw.device}), torch {hw.torch}, triton {hw.triton}, {hw.date}",
             f"# measured limits: copy {hw.copy_gb_s:,.0f} GB/s, {hw.matmul_dtype} matmul {hw.matmul_tflop_s:,.1f} TFLOP/s",
             f"{'op':18} {'case':22} {'mode':4} {'provider':10} {'ms':>9} {'throughput':>16} {'% limit':>7}  "
             f"{'vs best baseline':20} status"]
    not_run: dict[tuple[str, str, str], set[str]] = {}
    for r in rows:
        if r.median_ms is None and r.status.startswith(("unavailable", "skipped")):
            not_run.setdefault((r.op, r.provider, r.status), set()).add(r.case)
            continue
        if r.median_ms is None:
            lines.append(f"{r.op:18} {r.case:22} {r.mode:4} {r.provider:10} {'-':>9} {'-':>16} {'-':>7}  {'':20} {r.status}")
            continue
        bb = best_baseline(r, rows)
        vs = f"{bb[1]:.2f}x {bb[0]}" if bb else ""
        lines.append(f"{r.op:18} {r.case:22} {r.mode:4} {r.provider:10} {r.median_ms:9.4f} "
                     f"{r.throughput:9.4g} {r.metric:6} {100 * r.fraction_of_limit:6.1f}%  {vs:20} {r.status}")
    for (op, prov, why), cases in not_run.items():
        lines.append(f"not run: {op} {prov} on {len(cases)} case(s): {why}")
    if steps:
        lines.append(f"\n{'preset':20} {'mode':9} {'provider':18} {'ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} "
                     f"{'MFU':>6}  speedup over")
        for s in steps:
            if s.median_ms is None:
                lines.append(f"{s.preset:20} {s.mode:9} {s.provider:18} {s.status}")
                continue
            over = ", ".join(f"{k} {v:.2f}x" for k, v in s.speedup_over.items())
            lines.append(f"{s.preset:20} {s.mode:9} {s.provider:18} {s.median_ms:9.2f} {s.tokens_per_s:11,.0f} "
                         f"{s.tflop_s:8.2f} {100 * s.mfu:5.1f}%  {over}")
    return "\n".join(lines)


def _best(rows: list[Row], op: str, mode: str, case_re: str, providers) -> dict[str, Row]:
    """Per case: the fastest row among ``providers``."""
    out: dict[str, Row] = {}
    for r in rows:
        if r.op == op and r.mode == mode and re.search(case_re, r.case) and r.provider in providers \
                and r.median_ms is not None and r.status == "ok":
            if r.case not in out or r.median_ms < out[r.case].median_ms:
                out[r.case] = r
    return out


def targets(rows: list[Row], steps: list[StepRow]) -> list[dict]:
    """The issue's H100 targets, evaluated on whatever this run measured (absent data: not evaluated)."""
    out = []

    def add(name: str, case: str, measured: float, goal: float):
        out.append({"target": name, "case": case, "measured": round(measured, 3), "goal": goal,
                    "met": measured >= goal})

    for op, goal in (("rope3d", 0.8), ("editnet_inject", 0.8)):
        for mode in ("fwd", "bwd"):
            for case, r in _best(rows, op, mode, ".", OMNIACE).items():
                add(f"{op} {mode}: fraction of copy bandwidth", case, r.fraction_of_limit, goal)
                ref = _best(rows, op, mode, f"^{re.escape(case)}$", ("reference",)).get(case)
                if op == "rope3d" and ref:
                    add(f"rope3d {mode}: speedup over eager reference", case, ref.median_ms / r.median_ms, 4.0)
    for mode in ("fwd", "bwd"):
        ours = _best(rows, "segment_attention", mode, "self", OMNIACE)
        fa = _best(rows, "segment_attention", mode, "self", ("varlen", "flash_attn"))
        flex = _best(rows, "segment_attention", mode, "self", ("flex",))
        for case, r in ours.items():
            if case in fa:
                add(f"self-attention {mode}: speedup over best of varlen/flash-attn", case, fa[case].median_ms / r.median_ms, 1.0)
            if case in flex:
                add(f"self-attention {mode}: speedup over FlexAttention", case, flex[case].median_ms / r.median_ms, 1.2)
        ours = _best(rows, "segment_attention", mode, "cross", OMNIACE)
        base = _best(rows, "segment_attention", mode, "cross", ("varlen", "flash_attn", "xformers"))
        for case, r in ours.items():
            if case in base:
                add(f"cross-attention {mode}: speedup over best varlen baseline", case, base[case].median_ms / r.median_ms, 1.5)
    for s in steps:
        if s.preset.startswith("ace-0.6b") and s.provider == "omniace" and "reference" in s.speedup_over:
            add(f"denoiser {s.mode}: speedup over reference (eager)", s.preset, s.speedup_over["reference"], 1.5)
        if s.preset.startswith("ace-0.6b") and s.provider == "omniace+compile" and "reference+compile" in s.speedup_over:
            add(f"denoiser {s.mode}: speedup over reference (torch.compile)", s.preset, s.speedup_over["reference+compile"], 1.1)
    return out


def slug(hw: Hardware) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "-", hw.name if hw.device == "cuda" else "cpu").strip("-").lower()
    return f"{name}_{hw.date[:19].replace(':', '').replace('-', '')}"


def write_json(path: Path, hw: Hardware, rows: list[Row], steps: list[StepRow], config: dict) -> list[dict]:
    """Write the results file atomically; returns the evaluated targets it holds."""
    doc = {"hardware": hw.to_dict(), "config": config, "ops": [asdict(r) for r in rows],
           "denoiser": [asdict(s) for s in steps], "targets": targets(rows, steps)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return doc["targets"]


COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


def svg_plot(doc: dict, op: str, mode: str = "fwd", kind: str | None = None) -> str | None:
    """Throughput vs tokens per provider for one op and mode, with the measured hardware limit as a line."""
    rows = [r for r in doc["ops"] if r["op"] == op and r["mode"] == mode and r["throughput"]
            and (kind is None or r["case"].endswith(kind))]
    if not rows:
        return None
    metric = rows[0]["metric"]
    hw = doc["hardware"]
    limit = hw["copy_gb_s"] if metric == "GB/s" else hw["matmul_tflop_s"]
    W, H, L, B, T, R = 720, 420, 70, 50, 40, 150
    xs = sorted({r["tokens"] for r in rows})
    ymax = max(limit, max(r["throughput"] for r in rows)) * 1.1

    def px(x):  # log-scale tokens
        import math
        lo, hi = math.log(xs[0]), math.log(xs[-1]) if xs[-1] > xs[0] else math.log(xs[0]) + 1
        return L + (math.log(x) - lo) / (hi - lo) * (W - L - R)

    def py(y):
        return H - B - y / ymax * (H - B - T)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{op} {kind or ""} ({mode}), '
           f'{hw["name"]}, {rows[0]["dtype"].removeprefix("torch.")}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">tokens (log scale)</text>',
           f'<text x="16" y="{(H - B + T) / 2}" transform="rotate(-90 16 {(H - B + T) / 2})" text-anchor="middle">{metric}</text>',
           f'<line x1="{L}" y1="{py(limit):.1f}" x2="{W - R}" y2="{py(limit):.1f}" stroke="black" stroke-dasharray="6 4"/>',
           f'<text x="{W - R + 4}" y="{py(limit) + 4:.1f}">limit {limit:,.0f}</text>']
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:,.0f}</text>')
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{H - B + 14}" text-anchor="middle">{x}</text>')
    providers = sorted({r["provider"] for r in rows})
    for i, prov in enumerate(providers):
        c = COLORS[i % len(COLORS)]
        best: dict[int, float] = {}
        for r in rows:
            if r["provider"] == prov:
                best[r["tokens"]] = max(best.get(r["tokens"], 0.0), r["throughput"])
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(best.items()))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>' for x, y in best.items()]
        out.append(f'<text x="{W - R + 4}" y="{T + 16 * (i + 1)}" fill="{c}">{prov}</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_plots(json_path: Path) -> list[Path]:
    doc = json.loads(json_path.read_text())
    written = []
    for op, kind in (("rope3d", None), ("editnet_inject", None), ("segment_attention", "self"),
                     ("segment_attention", "cross")):
        svg = svg_plot(doc, op, "fwd", kind)
        if svg:
            path = json_path.with_name(f"{json_path.stem}_{op}{'_' + kind if kind else ''}.svg")
            path.write_text(svg)
            written.append(path)
    return written
