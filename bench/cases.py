"""Benchmark shapes, taken from the presets.

ACE-0.6B (hidden 1152, 16 heads of 72): 1024 image tokens per image at 512px and 4096 at 1024px, with
1-4 condition images; two samples per batch at 512px (a CFG pair), one at 1024px. Per-frame text lengths
cycle through typical instruction lengths (at most the preset's 120). SD3-medium EditNet at 1024px
(24 heads of 64): the base joint stream is 4096 image + 154 text tokens per sample, the control stream
adds the 4096 condition tokens. A head-dim-128 variant (8 heads) of the ACE 512px case. ``small=True``
gives CPU-sized versions of the same structure.
"""
from __future__ import annotations

from dataclasses import dataclass

from omniace.engine.config import ace_rope_axes

TEXT_LENS = (120, 77, 96, 64, 110)


@dataclass(frozen=True)
class AttnCase:
    name: str
    kind: str  # "self" (q segments = k segments) or "cross" (image frames against their unit's text)
    lq: tuple[int, ...]
    lk: tuple[int, ...]
    heads: int
    head_dim: int

    @property
    def tokens(self) -> int:
        return sum(self.lq)


@dataclass(frozen=True)
class RopeCase:
    name: str
    tokens: int
    heads: int
    head_dim: int

    @property
    def axes(self) -> tuple[int, int, int]:
        return ace_rope_axes(self.head_dim)


@dataclass(frozen=True)
class InjectCase:
    name: str
    lengths: tuple[int, ...]  # rows per segment (sample)
    channels: int

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def _texts(n: int, cap: int) -> tuple[int, ...]:
    return tuple(min(cap, TEXT_LENS[i % len(TEXT_LENS)]) for i in range(n))


def attention_cases(small: bool) -> list[AttnCase]:
    if small:
        per_img, text_cap, conds = 64, 24, (1, 2)
        grids = [("ace-small", per_img, 2)]
        sd3 = (2 * 64 + 20, 3 * 64 + 20, 4, 64)
    else:
        text_cap, conds = 120, (1, 2, 3, 4)
        grids = [("ace512", 1024, 2), ("ace1024", 4096, 1)]
        sd3 = (4096 + 154, 2 * 4096 + 154, 24, 64)
    out = []
    for label, per_img, batch in grids:
        for n in conds:
            frames = n + 1
            out.append(AttnCase(f"{label}-c{n}-self", "self", (per_img * frames,) * batch, (per_img * frames,) * batch,
                                16 if not small else 2, 72))
            out.append(AttnCase(f"{label}-c{n}-cross", "cross", (per_img,) * (frames * batch),
                                _texts(frames * batch, text_cap), 16 if not small else 2, 72))
    base, ctrl, heads, dim = sd3
    out.append(AttnCase("sd3-editnet-base", "self", (base,) * 2, (base,) * 2, heads if not small else 2, dim))
    out.append(AttnCase("sd3-editnet-control", "self", (ctrl,) * 2, (ctrl,) * 2, heads if not small else 2, dim))
    per_img = 64 if small else 1024
    out.append(AttnCase("d128-c2-self", "self", (3 * per_img,) * 2, (3 * per_img,) * 2, 8 if not small else 2, 128))
    out.append(AttnCase("d128-c2-cross", "cross", (per_img,) * 6, _texts(6, 24 if small else 120),
                        8 if not small else 2, 128))
    return out


def rope_cases(small: bool) -> list[RopeCase]:
    if small:
        return [RopeCase("ace-small-c1", 2 * 2 * 64, 2, 72), RopeCase("ace-small-c2", 2 * 3 * 64, 2, 72),
                RopeCase("d128-small", 2 * 3 * 64, 2, 128)]
    out = [RopeCase(f"ace512-c{n}", 2 * (n + 1) * 1024, 16, 72) for n in (1, 2, 3, 4)]
    out += [RopeCase(f"ace1024-c{n}", (n + 1) * 4096, 16, 72) for n in (1, 2, 3, 4)]
    out.append(RopeCase("d128-c2", 2 * 3 * 1024, 8, 128))
    return out


def inject_cases(small: bool) -> list[InjectCase]:
    if small:
        return [InjectCase("ace-small-c1", (128, 128), 72), InjectCase("sd3-small", (148, 148), 96)]
    out = [InjectCase(f"ace512-c{n}", ((n + 1) * 1024,) * 2, 1152) for n in (1, 2, 3, 4)]
    out += [InjectCase(f"ace1024-c{n}", ((n + 1) * 4096,), 1152) for n in (1, 2, 4)]
    out.append(InjectCase("sd3-editnet-img", (4096, 4096), 1536))
    return out
