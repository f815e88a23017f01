"""A judge for synthetic edit pairs that grades only what it can see: the two images, the instruction, the mask.

It plays the role of OmniEdit's LMM judge and fills the same columns: ``sc_score_1`` (was the instructed
edit made), ``sc_score_2`` (was everything else left alone), ``pq_score`` (perceptual quality: no noise or
blotches), and ``o_score = sqrt(min(sc_score_1, sc_score_2) * pq_score)``, all 0-10. It reads the
instruction with the templates' grammar, finds the named object by its colour (each object in a scene has
its own), and checks the expected change; it never sees the specialist's failure flag.

ACE's generation tasks have nothing to preserve (``sc_score_2`` is 10): text-to-image (no source image)
checks each named object's colour, position and shape and the background; controllable generation checks
that each named colour covers the map's shape of its kind (IoU) and the background; reference-guided
editing reads the object's colour and shape from the reference image (``ref_img``) and is then judged as
an addition.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import BACKGROUNDS, COLORS, HOLE_GRAY, POSITIONS, SEG_COLORS, SHAPES, render_background

MID_GREY = (128, 128, 128)  # the blank canvas: what "doing nothing" means where there is no source image
_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_B = "|".join(BACKGROUNDS)
_P = "|".join(POSITIONS)
_OBJ_AT = rf"an? (?:{_C}) (?:{_S}) at the (?:{_P})"
_OBJ = rf"an? (?:{_C}) (?:{_S})"
OBJECT_AT = re.compile(rf"an? ({_C}) ({_S}) at the ({_P})")
OBJECT = re.compile(rf"an? ({_C}) ({_S})")
GRAMMAR: list[tuple[str, re.Pattern]] = [
    # ACE's generation families first: their texts name objects the edit patterns below would also match
    ("control", re.compile(rf"(?:generate the scene from|render) the (edge|segmentation) map(?::| as) "
                           rf"({_OBJ}(?: and {_OBJ})*) on an? ({_B}) background")),
    ("reference", re.compile(rf"(?:put|place) the object from \{{image1\}} (?:at|in) the ({_P})")),
    ("reference", re.compile(rf"(?:add|put) the \{{image1\}} object (?:at|in) the ({_P})")),
    ("t2i", re.compile(rf"^(?:draw |generate )?({_OBJ_AT}(?: and {_OBJ_AT})*) on an? ({_B}) background$")),
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


def fill_fraction(m: np.ndarray) -> float | None:
    """How much of its bounding box the boolean mask ``m [H, W]`` fills (a square ~1, a circle ~0.79, a triangle
    ~0.5); None under 6 pixels."""
    ys, xs = np.nonzero(m)
    if len(ys) < 6:
        return None
    return len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def shape_of(m: np.ndarray) -> str | None:
    """Classify a blob by how much of its bounding box it fills (square > 0.9 > circle > 0.65 > triangle)."""
    fill = fill_fraction(m)
    if fill is None:
        return None
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


def rgb(img: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` float32 pixels 0-255 of ``img``: the array every check here reads."""
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def score(src_img: Image.Image | None, edited_img: Image.Image, instruction: str,
          mask_img: Image.Image | None = None, *, ref_img: Image.Image | None = None) -> Scores:
    """Grade ``edited_img`` made from ``src_img`` (None for text-to-image) by ``instruction``; ``mask_img``
    for the mask tasks (white = edit), ``ref_img`` the ``{image1}`` of reference-guided editing (any size).
    Returns the 0-10 :class:`Scores`; an instruction it cannot read, an edit without its source or reference
    image, or an output of another size than the source scores 0, with the reason."""
    out = rgb(edited_img)
    src = None if src_img is None else rgb(src_img)
    iso = max(0.0, _isolated_fraction(out) - (0.0 if src is None else _isolated_fraction(src)))
    pq = float(np.clip(10 * (1 - iso / 0.01), 0, 10))
    pq_reason = f"{100 * iso:.2f}% of pixels are isolated noise" + (" (clean)" if pq >= 9 else " (artefacts)")
    parsed = parse(instruction)
    if parsed is None:
        return Scores(0, 0, round(pq), 0.0, f"cannot read the instruction {instruction!r}", pq_reason)
    kind, args = parsed
    if kind == "t2i":
        sc1, why = _generated(out, [m.groups() for m in OBJECT_AT.finditer(args[0])], args[1])
        return _scores(sc1, 10.0, pq, why + "; no source image: nothing to preserve", pq_reason)
    if src is None:
        return Scores(0, 0, round(pq), 0.0, f"an edit ({kind}) needs a source image; none was given", pq_reason)
    if out.shape != src.shape:
        return Scores(0, 0, round(pq), 0.0, "output size differs from the source", pq_reason)
    if kind == "control":
        sc1, why = _controlled(src, out, [m.groups() for m in OBJECT.finditer(args[1])], args[2])
        return _scores(sc1, 10.0, pq, why + "; a map is not kept: nothing to preserve", pq_reason)
    if kind == "reference":
        if ref_img is None:
            return Scores(0, 0, round(pq), 0.0, "the instruction names {image1} but no reference image was given",
                          pq_reason)
        found = reference_object(rgb(ref_img))
        if found is None:
            return Scores(0, 0, round(pq), 0.0, "the reference image shows no object of a known colour", pq_reason)
        kind, args = "add", (*found, args[0])
    h, w, _ = src.shape
    mask = None if mask_img is None else np.asarray(mask_img.convert("L").resize((w, h))) > 127
    sc1, keep, why = _semantic(kind, args, src, out, mask)
    sc2, diff = _preservation(src, out, keep) if keep is not None else (10 * max(0.0, _structure(src, out)), 0.0)
    if keep is None:
        why += f"; edge structure kept {sc2 / 10:.2f}"
    else:
        why += f"; mean change elsewhere {diff:.1f}/255"
    return _scores(sc1, sc2, pq, why, pq_reason)


def _scores(sc1: float, sc2: float, pq: float, why: str, pq_reason: str) -> Scores:
    o = math.sqrt(min(sc1, sc2) * pq)
    return Scores(round(sc1), round(sc2), round(pq), round(o, 3), why, pq_reason)


def reference_object(ref: np.ndarray) -> tuple[str, str] | None:
    """``(colour, shape)`` of the object a reference image shows: the pixels unlike its commonest colour (its
    plain background), named by the nearest object colour; None when there is none within tolerance."""
    colours, counts = np.unique(ref.reshape(-1, 3), axis=0, return_counts=True)
    obj = np.linalg.norm(ref - colours[counts.argmax()], axis=-1) > 60
    if obj.sum() < 6:
        return None
    mean = np.median(ref[obj], axis=0)
    name, dist = min(((c, float(np.linalg.norm(mean - np.array(v)))) for c, v in COLORS.items()), key=lambda t: t[1])
    if dist > 60:
        return None
    return name, shape_of(obj & color_mask(ref, name)) or "circle"


def _background_match(out: np.ndarray, background: str, objects: np.ndarray) -> float:
    """0-1 credit for the background: the share of pixels away from ``objects`` that show ``background``."""
    h, w, _ = out.shape
    want = np.asarray(render_background(background, w, h), dtype=np.float32)
    bg = ~_dilate(objects, 1)
    match = float((np.abs(out - want).sum(-1) < 60)[bg].mean()) if bg.any() else 0.0
    return float(np.clip((match - 0.3) / 0.6, 0, 1))


def _generated(out: np.ndarray, objects: list[tuple[str, str, str]], background: str) -> tuple[float, str]:
    """Text-to-image: each named ``(colour, shape, position)`` drawn by its colour, its centre within 0.15 of
    the frame of the position, its shape right; the rest of the frame the named background."""
    h, w, _ = out.shape
    expected = 0.25 * (0.12 * min(h, w)) ** 2 * 3  # a shape of the smallest size, with slack
    credit, notes, drawn = [], [], np.zeros((h, w), bool)
    for color, shape, pos in objects:
        m = color_mask(out, color)
        drawn |= m
        ys, xs = np.nonzero(m)
        cover = min(1.0, len(ys) / expected)
        px, py = POSITIONS[pos]
        near = len(ys) > 0 and abs(xs.mean() / w - px) < 0.15 and abs(ys.mean() / h - py) < 0.15
        got = shape_of(m)
        credit.append(cover * near * (1.0 if got == shape else 0.5))
        notes.append(f"{color} {shape}: {len(ys)} px{'' if near else ' not'} at the {pos}, looks like a {got}")
    bg = _background_match(out, background, drawn)
    return 10 * min(credit) * bg, "; ".join(notes) + f"; background {background} {100 * bg:.0f}%"


def _grow4(m: np.ndarray) -> np.ndarray:
    """``m`` with its 4-neighbours (no wrap-around at the border)."""
    g = m.copy()
    g[1:] |= m[:-1]
    g[:-1] |= m[1:]
    g[:, 1:] |= m[:, :-1]
    g[:, :-1] |= m[:, 1:]
    return g


def _fill(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The 4-connected part of ``allowed`` that ``seed`` reaches."""
    region = seed & allowed
    while True:
        grown = _grow4(region) & allowed
        if (grown == region).all():
            return region
        region = grown


def _components(m: np.ndarray, min_px: int = 6) -> list[np.ndarray]:
    """4-connected components of ``m`` of at least ``min_px`` pixels."""
    left, out = m.copy(), []
    while left.any():
        seed = np.zeros_like(m)
        seed[tuple(np.argwhere(left)[0])] = True
        comp = _fill(seed, left)
        left &= ~comp
        if comp.sum() >= min_px:
            out.append(comp)
    return out


def map_shapes(cond: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The shapes a condition map shows, ``(shape, pixels)`` each: a segmentation map's regions of each class
    colour (:data:`SEG_COLORS`), or an edge map's outlines filled (what the border cannot reach through
    non-edge pixels), classified by :func:`shape_of`."""
    seg = [(s, np.linalg.norm(cond - np.array(c, np.float32), axis=-1) < 40) for s, c in SEG_COLORS.items()]
    if any(m.sum() >= 6 for _, m in seg):
        return [(s, comp) for s, m in seg for comp in _components(m)]
    edges = cond.mean(-1) > 127
    border = np.zeros_like(edges)
    border[[0, -1], :] = border[:, [0, -1]] = True
    inside = ~_fill(border, ~edges)
    return [(shape_of(comp), comp) for comp in _components(inside)]


def _controlled(cond: np.ndarray, out: np.ndarray, objects: list[tuple[str, str]], background: str) -> tuple[float, str]:
    """Controllable generation: each named ``(colour, shape)`` covers the map's shape of its kind (best IoU of
    the colour's pixels with one of them), the rest of the frame the named background."""
    shapes = map_shapes(cond)
    credit, notes, drawn = [], [], np.zeros(out.shape[:2], bool)
    for color, shape in objects:
        m = color_mask(out, color)
        drawn |= m
        ious = [float((m & r).sum() / max(1, (m | r).sum())) for s, r in shapes if s == shape]
        iou = max(ious, default=0.0)
        credit.append(float(np.clip((iou - 0.3) / 0.4, 0, 1)))
        notes.append(f"{color} {shape}: IoU {iou:.2f} with the map's {shape}" if ious else
                     f"the map shows no {shape} for the {color} one")
    bg = _background_match(out, background, drawn)
    return 10 * min(credit) * bg, "; ".join(notes) + f"; background {background} {100 * bg:.0f}%"


def edit_region(kind: str, args: tuple[str, ...], src: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``[H, W]`` bool: where the judge looks at the object a ``swap``, ``recolor``, ``remove`` or ``grow``
    edits (around the old object), an ``add`` draws (a box of half the frame around the named position) or an
    ``inpaint`` draws (the mask). ``args`` are :func:`parse`'s groups; ``src`` ``[H, W, 3]`` 0-255 floats."""
    h, w, _ = src.shape
    if kind in ("swap", "recolor", "remove", "grow"):
        return _dilate(color_mask(src, args[0]), max(2, min(h, w) // 16))
    if kind == "add":
        px, py = POSITIONS[args[2]]
        area = np.zeros((h, w), bool)
        area[int(max(0, py - 0.25) * h):int(min(1, py + 0.25) * h), int(max(0, px - 0.25) * w):int(min(1, px + 0.25) * w)] = True
        return area
    if kind == "inpaint":
        return mask if mask is not None else np.ones((h, w), bool)
    raise ValueError(f"no edit region for a {kind!r} edit; expected swap, recolor, remove, grow, add or inpaint")


def new_object(kind: str, args: tuple[str, ...], src: np.ndarray, out: np.ndarray,
               region: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool: the pixels whose shape the judge classifies: of the new colour (a swap's or recolouring's
    ``args[2]``, an addition's or inpainting's ``args[0]``) in ``out``, inside ``region`` (:func:`edit_region`),
    not of that colour in the source."""
    color = args[2] if kind in ("swap", "recolor") else args[0]
    return color_mask(out, color) & region & ~color_mask(src, color)


def _semantic(kind: str, args: tuple[str, ...], src: np.ndarray, out: np.ndarray,
              mask: np.ndarray | None) -> tuple[float, np.ndarray | None, str]:
    """(0-10 success of the edit, pixels that must stay unchanged or None for global edits, reasoning)."""
    h, w, _ = src.shape
    if kind in ("swap", "remove", "recolor", "grow"):
        color, shape = args[0], args[1]
        before = color_mask(src, color)
        if before.sum() == 0:
            return 0.0, np.ones((h, w), bool), f"no {color} {shape} in the source"
        region = edit_region(kind, args, src, mask)
        gone = 1 - color_mask(out, color)[before].mean()
        clean = float(np.clip((_on_palette(out, region, _palette(src)) - 0.5) / 0.45, 0, 1))
        if kind == "remove":
            return 10 * gone * clean, ~region, f"{100 * gone:.0f}% of the {color} {shape} removed, {100 * clean:.0f}% clean"
        if kind == "grow":
            ratio = color_mask(out, color).sum() / before.sum()
            keep = ~_dilate(before, max(4, min(h, w) // 6))
            return float(np.clip(10 * (ratio - 1) / 0.6, 0, 10)), keep, f"{color} {shape} area x{ratio:.2f}"
        new_color, new_shape = args[2], (args[3] if kind == "swap" else shape)
        appeared = new_object(kind, args, src, out, region)
        cover = min(1.0, appeared.sum() / max(1.0, 0.6 * before.sum()))
        got_shape = shape_of(appeared)
        shape_ok = 1.0 if got_shape == new_shape else 0.5
        sc = 10 * min(gone, cover) * shape_ok * clean
        return sc, ~region, (f"{100 * gone:.0f}% of the {color} {shape} replaced, {new_color} covers "
                             f"{100 * cover:.0f}%, shape looks like a {got_shape}, {100 * clean:.0f}% clean")
    if kind in ("add", "inpaint"):
        color, shape = args[0], args[1]
        area = edit_region(kind, args, src, mask)
        drawn = new_object(kind, args, src, out, area)
        inside = drawn.sum()
        clean = float(np.clip((_on_palette(out, area, _palette(src)) - 0.5) / 0.45, 0, 1))
        expected = 0.25 * (0.12 * min(h, w)) ** 2 * 3  # a shape of the smallest size, with slack
        cover = min(1.0, inside / expected)
        got_shape = shape_of(drawn)
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
    # posterize: 2 bits a channel, levels 0, 64, 128, 192; within 6 of one, as a JPEG or a model draws them
    level = np.clip(np.round(out / 64), 0, 3) * 64
    levels = float((np.abs(out - level) <= 6).all(-1).mean())
    # full marks from 90%: a JPEG's 4:2:0 chroma smears each colour edge over a pixel or two off the levels
    return float(np.clip(10 * (levels - 0.5) / 0.4, 0, 10)), None, f"{100 * levels:.0f}% of pixels near 4 levels"
