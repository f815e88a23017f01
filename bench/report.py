"""Bench output: a text table, a JSON results file, SVG plots, the issue's targets, and a comparison of
two results files. Rows whose numbers cannot be true are flagged, never quoted."""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from .denoiser import StepRow
from .hardware import Hardware
from .op_bench import MODES, OMNIACE, Row

BASELINES = ("reference", "compile", "sdpa", "flex", "varlen", "flash_attn", "xformers")


def best_baseline(row: Row, rows: list[Row]) -> tuple[str, float] | None:
    """The fastest baseline measured for the row's (op, case, mode), and this row's speedup over it."""
    same = [r for r in rows if (r.op, r.case, r.mode) == (row.op, row.case, row.mode) and r.provider in BASELINES
            and r.median_ms is not None and r.provider != row.provider and not r.status.startswith(IMPOSSIBLE)]
    if not same:
        return None
    best = min(same, key=lambda r: r.median_ms)
    return best.provider, best.median_ms / row.median_ms


IMPOSSIBLE = "IMPOSSIBLE: "


def mark_impossible(rows: list[Row], steps: list[StepRow]) -> int:
    """Set the status of rows whose numbers cannot be true (a timing or a FLOP/byte count is wrong there)
    to ``IMPOSSIBLE: <why>``, so no table, target or comparison quotes them; returns how many.

    ``full`` (forward + backward) faster than ``fwd`` or ``bwd`` alone; a throughput above 100% of the
    measured limit; a training step faster than the inference step, or an MFU above 100%.
    """
    out: dict[int, str] = {}
    by_key = {(r.op, r.case, r.provider, r.mode): r for r in rows if r.median_ms is not None}
    for r in by_key.values():
        why = []
        # full = fwd + bwd: faster than either part means one of the two rows is wrong; flag both
        if r.mode == "full":
            why += [f"full faster than {m}" for m in ("fwd", "bwd")
                    if (o := by_key.get((r.op, r.case, r.provider, m))) and r.median_ms < o.median_ms]
        elif (full := by_key.get((r.op, r.case, r.provider, "full"))) and full.median_ms < r.median_ms:
            why.append(f"{r.mode} slower than full ({r.mode} + the other half)")
        if r.fraction_of_limit is not None and r.fraction_of_limit > 1.0:
            why.append(f"{100 * r.fraction_of_limit:.0f}% of the measured limit")
        if why:
            out[id(r)] = "; ".join(why)
    timed = {(s.preset, s.provider, s.mode): s for s in steps if s.median_ms is not None}
    for s in timed.values():
        why = []
        inf = timed.get((s.preset, s.provider, "inference"))
        train = timed.get((s.preset, s.provider, "training"))
        if s.mode == "training" and inf and s.median_ms < inf.median_ms:
            why.append("training faster than inference")
        if s.mode == "inference" and train and train.median_ms < s.median_ms:
            why.append("inference slower than training")
        if s.mfu is not None and s.mfu > 1.0:
            why.append(f"MFU {100 * s.mfu:.0f}%")
        if why:
            out[id(s)] = "; ".join(why)
    for r in [*rows, *steps]:
        if id(r) in out:
            r.status = IMPOSSIBLE + out[id(r)]
    return len(out)


def _spread(median: float, p20: float | None, p80: float | None) -> str:
    """``p20-p80`` as a +-percentage of the median: how far one run's number can be trusted."""
    if p20 is None or p80 is None or median <= 0:
        return "-"
    return f"-{100 * (median - p20) / median:.0f}/+{100 * (p80 - median) / median:.0f}%"


def table(hw: Hardware, rows: list[Row], steps: list[StepRow]) -> str:
    cpu = f"{hw.cpu + ', ' if hw.cpu and hw.cpu != hw.name else ''}{hw.threads} threads"
    lines = [f"# {hw.name} ({hw.device}{', driver ' + hw.driver if hw.driver else ''}), {cpu}, torch {hw.torch}, "
             f"triton {hw.triton}, omniace {(hw.git_sha or 'unknown')[:10]}{' +local changes' if hw.git_dirty else ''}, "
             f"{hw.date}",
             f"# measured limits: copy {_num(hw.copy_gb_s)} GB/s, {hw.matmul_dtype} matmul {_num(hw.matmul_tflop_s)} TFLOP/s",
             "# ms: median; spread: p20/p80 relative to it",
             f"{'op':18} {'case':22} {'mode':4} {'provider':10} {'ms':>9} {'spread':>9} {'throughput':>16} "
             f"{'% limit':>7}  {'vs best baseline':20} status"]
    not_run: dict[tuple[str, str, str], set[str]] = {}
    for r in rows:
        if r.median_ms is None and r.status.startswith(("unavailable", "skipped")):
            not_run.setdefault((r.op, r.provider, r.status), set()).add(r.case)
            continue
        head = f"{r.op:18} {r.case:22} {r.mode:4} {r.provider:10}"
        if r.median_ms is None:
            lines.append(f"{head} {'-':>9} {'-':>9} {'-':>16} {'-':>7}  {'':20} {r.status}")
            continue
        spread = _spread(r.median_ms, r.p20_ms, r.p80_ms)
        if r.status.startswith(IMPOSSIBLE):  # wrong somewhere: show the time, not a throughput to quote
            lines.append(f"{head} {r.median_ms:9.4f} {spread:>9} {'-':>16} {'-':>7}  {'':20} {r.status}")
            continue
        bb = best_baseline(r, rows)
        vs = f"{bb[1]:.2f}x {bb[0]}" if bb else ""
        lines.append(f"{head} {r.median_ms:9.4f} {spread:>9} {r.throughput:9.4g} {r.metric:6} "
                     f"{100 * r.fraction_of_limit:6.1f}%  {vs:20} {r.status}")
    for (op, prov, why), cases in not_run.items():
        lines.append(f"not run: {op} {prov} on {len(cases)} case(s): {why}")
    if steps:
        lines.append(f"\n{'preset':20} {'mode':9} {'provider':18} {'ms':>9} {'spread':>9} {'tokens/s':>11} "
                     f"{'TFLOP/s':>8} {'MFU':>6}  speedup over")
        for s in steps:
            if s.median_ms is None:
                lines.append(f"{s.preset:20} {s.mode:9} {s.provider:18} {s.status}")
                continue
            head = f"{s.preset:20} {s.mode:9} {s.provider:18} {s.median_ms:9.2f} " \
                   f"{_spread(s.median_ms, s.p20_ms, s.p80_ms):>9}"
            if s.status.startswith(IMPOSSIBLE):
                lines.append(f"{head} {s.status}")
                continue
            over = ", ".join(f"{k} {v:.2f}x" for k, v in s.speedup_over.items())
            lines.append(f"{head} {s.tokens_per_s:11,.0f} {_num(s.tflop_s):>8} {100 * s.mfu:5.1f}%  {over}")
    bad = sum(r.status.startswith(IMPOSSIBLE) for r in [*rows, *steps])
    if bad:
        lines.append(f"\n{bad} row(s) flagged IMPOSSIBLE: their throughput is not shown; check the timing "
                     "and the byte/FLOP counts before quoting them")
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
    for s in (s for s in steps if s.status == "ok"):
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


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values ``0, step, 2 step, ...`` covering ``[0, top]`` with ``step`` 1, 2 or 5 x 10^k."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


def _num(x: float) -> str:
    """Three significant digits, thousands as k/M: 0.0123, 4.5, 1,250 -> 1.25k."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def svg_plot(doc: dict, op: str, mode: str = "fwd", kind: str | None = None) -> str | None:
    """Throughput vs tokens per provider for one op and mode, with the measured hardware limit as a line
    (or named in the corner when it is over 3x the best measurement and would flatten every curve)."""
    rows = [r for r in doc["ops"] if r["op"] == op and r["mode"] == mode and r["throughput"]
            and not r["status"].startswith(IMPOSSIBLE) and (kind is None or r["case"].endswith(kind))]
    if not rows:
        return None
    metric = rows[0]["metric"]
    hw = doc["hardware"]
    limit = hw["copy_gb_s"] if metric == "GB/s" else hw["matmul_tflop_s"]
    W, H, L, B, T, R = 760, 440, 80, 56, 44, 170
    xs = sorted({r["tokens"] for r in rows})
    best_y = max(r["throughput"] for r in rows)
    limit_on_scale = limit <= 3 * best_y
    ticks = nice_ticks(max(best_y, limit if limit_on_scale else 0) * 1.05)
    ymax = ticks[-1]
    lo = math.log(xs[0])
    hi = math.log(xs[-1]) if xs[-1] > xs[0] else lo + 1

    def px(x):  # log-scale tokens
        return L + (math.log(x) - lo) / (hi - lo) * (W - L - R)

    def py(y):
        return H - B - y / ymax * (H - B - T)

    title = f"{op} {kind or ''} ({mode}), {hw['name']}, {rows[0]['dtype'].removeprefix('torch.')}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{(L + W - R) / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 14}" text-anchor="middle">tokens per call (log scale)</text>',
           f'<text x="18" y="{(H - B + T) / 2}" transform="rotate(-90 18 {(H - B + T) / 2})" '
           f'text-anchor="middle">throughput, {metric} (higher is better)</text>']
    for y in ticks:
        out.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_num(y)}</text>')
    last = -1e9
    for x in xs:  # skip labels that would overlap the previous one
        if px(x) - last >= 44:
            out.append(f'<line x1="{px(x):.1f}" y1="{H - B}" x2="{px(x):.1f}" y2="{H - B + 4}" stroke="black"/>')
            out.append(f'<text x="{px(x):.1f}" y="{H - B + 17}" text-anchor="middle">{_num(x)}</text>')
            last = px(x)
    lim = f"measured limit {_num(limit)} {metric}"
    if limit_on_scale:
        out.append(f'<line x1="{L}" y1="{py(limit):.1f}" x2="{W - R}" y2="{py(limit):.1f}" stroke="black" '
                   f'stroke-dasharray="6 4"/>')
        out.append(f'<text x="{W - R + 4}" y="{py(limit) + 4:.1f}">{lim}</text>')
    else:
        out.append(f'<text x="{W - R + 4}" y="{H - B}">{lim} (off scale)</text>')
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
    """One SVG per op (attention: self and cross apart) and mode present in the results file."""
    doc = json.loads(json_path.read_text())
    written = []
    modes = [m for m in MODES if any(r["mode"] == m for r in doc["ops"])]
    for op, kind in (("rope3d", None), ("editnet_inject", None), ("segment_attention", "self"),
                     ("segment_attention", "cross")):
        for mode in modes:
            svg = svg_plot(doc, op, mode, kind)
            if svg:
                path = json_path.with_name(f"{json_path.stem}_{op}{'_' + kind if kind else ''}_{mode}.svg")
                path.write_text(svg)
                written.append(path)
    return written


def load_results(path: Path) -> dict:
    """A results file of ``omniace bench``; raises ValueError naming the file if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read a bench results file ({exc})") from None
    missing = [k for k in ("hardware", "ops", "denoiser") if k not in doc]
    if missing:
        raise ValueError(f"{path}: not an omniace bench results file (no {missing}); expected the JSON that "
                         "'omniace bench' writes")
    return doc


def _overlap(a: dict, b: dict) -> bool:
    """The p20-p80 ranges of two rows overlap: the difference is within this run's noise."""
    if None in (a.get("p20_ms"), a.get("p80_ms"), b.get("p20_ms"), b.get("p80_ms")):
        return False
    return a["p20_ms"] <= b["p80_ms"] and b["p20_ms"] <= a["p80_ms"]


def compare(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Row-by-row comparison of two results files: A ms, B ms, A/B (above 1: B is faster), and whether
    the difference is within the spread. Host differences (commit, device, versions) come first."""
    ha, hb = a["hardware"], b["hardware"]
    lines = [f"# A = {name_a}", f"# B = {name_b}"]
    for key in ("name", "cpu", "threads", "driver", "git_sha", "git_dirty", "versions", "copy_gb_s", "matmul_tflop_s"):
        if ha.get(key) != hb.get(key):
            lines.append(f"# differs: {key}: A {ha.get(key)!r} | B {hb.get(key)!r}")
    lines.append(f"{'op/preset':18} {'case':22} {'mode':9} {'provider':18} {'A ms':>9} {'B ms':>9} {'A/B':>6}  note")
    unmatched = 0
    sections = (("ops", ("op", "case", "mode", "provider")), ("denoiser", ("preset", "mode", "provider")))
    for section, key in sections:
        rows_b = {tuple(r[k] for k in key): r for r in b[section]}
        for ra in a[section]:
            k = tuple(ra[f] for f in key)
            rb = rows_b.pop(k, None)
            if rb is None or ra.get("median_ms") is None or rb.get("median_ms") is None:
                unmatched += 1
                continue
            label = (k[0], k[1], k[2], k[3]) if section == "ops" else (k[0], "", k[1], k[2])
            head = f"{label[0]:18} {label[1]:22} {label[2]:9} {label[3]:18} {ra['median_ms']:9.4g} {rb['median_ms']:9.4g}"
            bad = [f"{n} {r['status']}" for n, r in (("A", ra), ("B", rb)) if r["status"].startswith(IMPOSSIBLE)]
            if bad:
                lines.append(f"{head} {'-':>6}  " + "; ".join(bad))
                continue
            note = "within spread" if _overlap(ra, rb) else ""
            lines.append(f"{head} {ra['median_ms'] / rb['median_ms']:6.2f}  {note}")
        unmatched += len(rows_b)
    if unmatched:
        lines.append(f"{unmatched} row(s) timed in only one of the files (or in neither) are not compared")
    return "\n".join(lines)
