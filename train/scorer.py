"""A judge for synthetic edit pairs that grades only what it can see: the two images, the instruction, the mask.

It plays the role of OmniEdit's LMM judge and fills the same columns: ``sc_score_1`` (was the instructed
edit made), ``sc_score_2`` (was everything else left alone), ``pq_score`` (perceptual quality: no noise or
blotches), and ``o_score = sqrt(min(sc_score_1, sc_score_2) * pq_score)``, all 0-10. It reads the
instruction with the templates' grammar, finds the named object by its colour (each object in a scene has
its own), and checks the expected change; it never sees the specialist's failure flag.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import BACKGROUNDS, COLORS, HOLE_GRAY, POSITIONS, SHAPES, render_background

_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_B = "|".join(BACKGROUNDS)
_P = "|".join(POSITIONS)
GRAMMAR: list[tuple[str, re.Pattern]] = [
    ("swap", re.compile(rf"(?:replace|swap) the ({_C}) ({_S}) (?:with|for) an? ({_C}) ({_S})")),
    ("remove", re.compile(rf"(?:remove|erase|delete) the ({_C}) ({_S})")),
    ("add", re.compile(rf"(?:add|put|place) an? ({_C}) ({_S}) (?:at|in) the ({_P})")),
    ("recolor", re.compile(rf"(?:make|paint|turn) the ({_C}) ({_S}) ({_C})")),
    ("grow", re.compile(rf"(?:make|scale) the ({_C}) ({_S}) (?:bigger|larger|up)")),
    ("background", re.compile(rf"(?:change|set|turn) the background (?:to|into) (?:a |an )?({_B})")),
    ("night", re.compile(r"\b(?:night|nighttime|dark)\b")),
    ("fog", re.compile(r"\b(?:fog|foggy|mist|misty)\b")),
    ("sketch", re.compile(r"\bsketch\b")),
    ("posterize", re.compile(r"\bposteri[sz]e")),
    ("inpaint", re.compile(rf"(?:fill|paint) the masked (?:area|region) with an? ({_C}) ({_S})")),
    ("outpaint", re.compile(r"\b(?:extend|outpaint|complete)\b")),
]


@dataclass
class Scores:
    sc_score_1: int
    sc_score_2: int
    pq_score: int
    o_score: float
    sc_reasoning: str
    pq_reasoning: str


def parse(instruction: str) -> tuple[str, tuple[str, ...]] | None:
    text = instruction.lower()
    for kind, pattern in GRAMMAR:
        m = pattern.search(text)
        if m:
            return kind, m.groups()
    return None


def color_mask(a: np.ndarray, color: str, tol: float = 60.0) -> np.ndarray:
    return np.linalg.norm(a - np.array(COLORS[color], dtype=np.float32), axis=-1) < tol


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(m, dy, 0), dx, 1)
    return out


def _shape_of(m: np.ndarray) -> str | None:
    """Classify a blob by how much of its bounding box it fills (square ~1, circle ~0.79, triangle ~0.5)."""
    ys, xs = np.nonzero(m)
    if len(ys) < 6:
        return None
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def _isolated_fraction(a: np.ndarray) -> float:
    """Fraction of colourful pixels unlike all four neighbours: noise and blotches, not edges, thin lines or
    grey sketch strokes."""
    diffs = [np.abs(a - np.roll(a, s, axis)).sum(-1) > 60 for s, axis in ((1, 0), (-1, 0), (1, 1), (-1, 1))]
    colourful = (a.max(-1) - a.min(-1)) > 40
    iso = diffs[0] & diffs[1] & diffs[2] & diffs[3] & colourful
    return float(iso[1:-1, 1:-1].mean())


def _palette(src: np.ndarray, min_share: float = 0.005) -> np.ndarray:
    """The colours this edit may draw with: every object colour, the hole grey, and each colour that
    covers at least ``min_share`` of the source (its background)."""
    colours, counts = np.unique(src.reshape(-1, 3).astype(np.int32), axis=0, return_counts=True)
    common = colours[counts >= min_share * counts.sum()].astype(np.float32)
    known = np.array(list(COLORS.values()) + [HOLE_GRAY], dtype=np.float32)
    return np.concatenate([known, common])


def _on_palette(a: np.ndarray, region: np.ndarray, palette: np.ndarray, tol: float = 30.0) -> float:
    """Fraction of ``region`` drawn in palette colours: a half-done edit blends two colours into a third."""
    if region.sum() == 0:
        return 1.0
    px = a[region]
    return float((np.linalg.norm(px[:, None, :] - palette[None], axis=-1) < tol).any(-1).mean())


def _preservation(src: np.ndarray, out: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """0-10 from the mean absolute change (0-255 scale) over the pixels that should not change."""
    if keep.sum() == 0:
        return 10.0, 0.0
    diff = float(np.abs(src - out).mean(-1)[keep].mean())
    return float(np.clip(10 - (diff - 2.0) / 2.5, 0, 10)), diff


def _structure(src: np.ndarray, out: np.ndarray) -> float:
    """Share of the source's edges that reappear (within a pixel) in the output: a restyle keeps them."""
    def edges(a):
        g = a.mean(-1)
        mag = np.zeros(g.shape, np.float32)
        mag[:-1, :-1] = np.hypot(np.diff(g, axis=0)[:, :-1], np.diff(g, axis=1)[:-1, :])
        return mag > 0.3 * mag.max() if mag.max() > 0 else np.zeros(g.shape, bool)
    es, eo = edges(src), edges(out)
    if es.sum() == 0:
        return 1.0
    return float(_dilate(eo, 1)[es].mean())


def score(src_img: Image.Image, edited_img: Image.Image, instruction: str,
          mask_img: Image.Image | None = None) -> Scores:
    src = np.asarray(src_img.convert("RGB"), dtype=np.float32)
    out = np.asarray(edited_img.convert("RGB"), dtype=np.float32)
    h, w, _ = src.shape
    iso = max(0.0, _isolated_fraction(out) - _isolated_fraction(src))
    pq = float(np.clip(10 * (1 - iso / 0.01), 0, 10))
    pq_reason = f"{100 * iso:.2f}% of pixels are isolated noise" + (" (clean)" if pq >= 9 else " (artefacts)")
    if out.shape != src.shape:
        return Scores(0, 0, round(pq), 0.0, "output size differs from the source", pq_reason)
    parsed = parse(instruction)
    if parsed is None:
        return Scores(0, 0, round(pq), 0.0, f"cannot read the instruction {instruction!r}", pq_reason)
    kind, args = parsed
    mask = None if mask_img is None else np.asarray(mask_img.convert("L").resize((w, h))) > 127
    sc1, keep, why = _semantic(kind, args, src, out, mask)
    sc2, diff = _preservation(src, out, keep) if keep is not None else (10 * max(0.0, _structure(src, out)), 0.0)
    if keep is None:
        why += f"; edge structure kept {sc2 / 10:.2f}"
    else:
        why += f"; mean change elsewhere {diff:.1f}/255"
    o = math.sqrt(min(sc1, sc2) * pq)
    return Scores(round(sc1), round(sc2), round(pq), round(o, 3), why, pq_reason)


def _semantic(kind: str, args: tuple[str, ...], src: np.ndarray, out: np.ndarray,
              mask: np.ndarray | None) -> tuple[float, np.ndarray | None, str]:
    """(0-10 success of the edit, pixels that must stay unchanged or None for global edits, reasoning)."""
    h, w, _ = src.shape
    if kind in ("swap", "remove", "recolor", "grow"):
        color, shape = args[0], args[1]
        before = color_mask(src, color)
        if before.sum() == 0:
            return 0.0, np.ones((h, w), bool), f"no {color} {shape} in the source"
        region = _dilate(before, max(2, min(h, w) // 16))
        gone = 1 - color_mask(out, color)[before].mean()
        clean = float(np.clip((_on_palette(out, region, _palette(src)) - 0.5) / 0.45, 0, 1))
        if kind == "remove":
            return 10 * gone * clean, ~region, f"{100 * gone:.0f}% of the {color} {shape} removed, {100 * clean:.0f}% clean"
        if kind == "grow":
            ratio = color_mask(out, color).sum() / before.sum()
            keep = ~_dilate(before, max(4, min(h, w) // 6))
            return float(np.clip(10 * (ratio - 1) / 0.6, 0, 10)), keep, f"{color} {shape} area x{ratio:.2f}"
        new_color = args[2]
        new_shape = args[3] if kind == "swap" else shape
        appeared = color_mask(out, new_color) & region & ~color_mask(src, new_color)
        cover = min(1.0, appeared.sum() / max(1.0, 0.6 * before.sum()))
        got_shape = _shape_of(appeared)
        shape_ok = 1.0 if got_shape == new_shape else 0.5
        sc = 10 * min(gone, cover) * shape_ok * clean
        return sc, ~region, (f"{100 * gone:.0f}% of the {color} {shape} replaced, {new_color} covers "
                             f"{100 * cover:.0f}%, shape looks like a {got_shape}, {100 * clean:.0f}% clean")
    if kind in ("add", "inpaint"):
        color, shape = args[0], args[1]
        new = color_mask(out, color) & ~color_mask(src, color)
        if kind == "add":
            px, py = POSITIONS[args[2]]
            area = np.zeros((h, w), bool)
            area[int(max(0, py - 0.25) * h):int(min(1, py + 0.25) * h), int(max(0, px - 0.25) * w):int(min(1, px + 0.25) * w)] = True
        else:
            area = mask if mask is not None else np.ones((h, w), bool)
        inside = (new & area).sum()
        clean = float(np.clip((_on_palette(out, area, _palette(src)) - 0.5) / 0.45, 0, 1))
        expected = 0.25 * (0.12 * min(h, w)) ** 2 * 3  # a shape of the smallest size, with slack
        cover = min(1.0, inside / expected)
        got_shape = _shape_of(new & area)
        sc = 10 * cover * (1.0 if got_shape == shape else 0.5) * clean
        return sc, ~_dilate(area, 1), (f"new {color} pixels in place: {int(inside)}, shape looks like a {got_shape}, "
                                       f"{100 * clean:.0f}% clean")
    if kind == "outpaint":
        area = mask if mask is not None else np.ones((h, w), bool)
        grey = (np.abs(out - np.array(HOLE_GRAY, np.float32)).sum(-1) < 6) & area
        filled = 1 - grey.sum() / max(1, area.sum())
        clean = float(np.clip((_on_palette(out, area & ~grey, _palette(src)) - 0.5) / 0.45, 0, 1))
        return 10 * filled * clean, ~_dilate(area, 1), f"{100 * filled:.0f}% of the masked border filled, {100 * clean:.0f}% clean"
    if kind == "background":
        objects = np.zeros((h, w), bool)
        for c in COLORS:
            objects |= color_mask(src, c, 40)
        near_objects = _dilate(objects, 1)
        inner = ~_dilate(~objects, 1)  # object pixels away from their outline
        want = np.asarray(render_background(args[0], w, h), dtype=np.float32)
        bg = ~near_objects
        match = float((np.abs(out - want).sum(-1) < 60)[bg].mean()) if bg.any() else 0.0
        sc = float(np.clip(10 * (match - 0.3) / 0.6, 0, 10))
        return sc, inner, f"{100 * match:.0f}% of the background is {args[0]}"
    if kind == "night":
        ratio = out.mean() / max(1.0, src.mean())
        blue = out[..., 2].mean() / max(1.0, out.mean())
        sc = float(np.clip(10 * (1 - ratio) / 0.5, 0, 10)) * (1.0 if blue > 1.05 else 0.6)
        return sc, None, f"brightness x{ratio:.2f}, blue share {blue:.2f}"
    if kind == "fog":
        contrast = out.std() / max(1.0, src.std())
        brighter = out.mean() >= src.mean() - 5
        sc = float(np.clip(10 * (1 - contrast) / 0.4, 0, 10)) * (1.0 if brighter else 0.5)
        return sc, None, f"contrast x{contrast:.2f}"
    if kind == "sketch":
        sat = float((out.max(-1) - out.min(-1)).mean())
        light = float(out.mean())
        sc = float(np.clip(10 * (1 - sat / 30), 0, 10)) * float(np.clip((light - 120) / 80, 0, 1))
        return sc, None, f"saturation {sat:.0f}, lightness {light:.0f}"
    # posterize
    levels = float((out.astype(np.int64) % 64 == 0).all(-1).mean())
    return float(np.clip(10 * (levels - 0.5) / 0.45, 0, 10)), None, f"{100 * levels:.0f}% of pixels on 4 levels"
