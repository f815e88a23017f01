"""Procedural scenes for the synthetic editing corpus: flat shapes on plain or textured backgrounds.

A :class:`Scene` is a small description (background, objects, environment, style) that renders to an RGB
image at any size; positions and sizes are fractions of the frame, so one scene renders at every OmniEdit
aspect ratio. Every object in a scene has its own colour, so an instruction that names a colour and a
shape picks exactly one object, and a scorer can find it by colour alone.

ACE's generation tasks draw from the same scenes: :func:`layout_scene` places objects at named positions
(text-to-image), :func:`render_map` draws a scene's condition map (controllable generation: an edge map or
a segmentation map, neither of which carries the objects' colours), :func:`reference_scene` shows one object
alone (the second image of reference-guided editing).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

# OmniEdit's aspect ratios (width:height)
ASPECTS: dict[str, tuple[int, int]] = {"1:1": (1, 1), "2:3": (2, 3), "3:2": (3, 2), "3:4": (3, 4), "4:3": (4, 3),
                                       "9:16": (9, 16), "16:9": (16, 9)}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (250, 250, 250), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# background name -> (kind, colour, second colour); the colours are kept away from the object colours
BACKGROUNDS: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int]]] = {
    "gray": ("plain", (150, 150, 150), (150, 150, 150)),
    "sky blue": ("plain", (150, 200, 235), (150, 200, 235)),
    "beige": ("plain", (225, 205, 170), (225, 205, 170)),
    "stripes": ("stripes", (190, 190, 205), (120, 125, 140)),
    "checkerboard": ("checker", (200, 200, 200), (95, 95, 95)),
    "dots": ("dots", (215, 225, 200), (150, 170, 130)),
}
POSITIONS: dict[str, tuple[float, float]] = {"top left": (0.25, 0.25), "top right": (0.75, 0.25),
                                             "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75),
                                             "center": (0.5, 0.5)}
# segmentation-map class colours, one per shape kind (on black); far from every object and background
# colour, so a copied map never passes for the scene
SEG_COLORS: dict[str, tuple[int, int, int]] = {"circle": (0, 200, 200), "square": (200, 0, 200),
                                               "triangle": (120, 255, 120)}
MAP_KINDS = ("edge", "segmentation")
PLAIN_BACKGROUNDS = tuple(b for b, (kind, _, _) in BACKGROUNDS.items() if kind == "plain")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: float  # centre, fraction of width
    cy: float  # centre, fraction of height
    size: float  # half-extent, fraction of the shorter side

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]
    environment: str = "day"  # day | night | fog
    style: str = "photo"  # photo | sketch | posterize
    hole: tuple[float, float, float, float] | None = None  # a grey box (x0, y0, x1, y1 fractions): inpainting input
    keep: tuple[float, float, float, float] | None = None  # only this box is visible: outpainting input

    def find(self, color: str) -> Obj | None:
        return next((o for o in self.objects if o.color == color), None)

    def without(self, obj: Obj) -> Scene:
        return replace(self, objects=tuple(o for o in self.objects if o is not obj))

    def with_object(self, old: Obj | None, new: Obj) -> Scene:
        objs = [new if o is old else o for o in self.objects]
        return replace(self, objects=tuple(objs if old is not None else [*objs, new]))


def frame_size(aspect: str, short_side: int, multiple: int = 8) -> tuple[int, int]:
    """``(width, height)`` of ``aspect`` with the shorter side ``short_side``, both multiples of ``multiple``."""
    aw, ah = ASPECTS[aspect]
    long = short_side * max(aw, ah) / min(aw, ah)
    long = max(multiple, int(round(long / multiple)) * multiple)
    return (long, short_side) if aw > ah else (short_side, long)


def random_scene(rng: random.Random, n_objects: tuple[int, int] = (1, 3)) -> Scene:
    n = rng.randint(*n_objects)
    colors = rng.sample([c for c in COLORS if c not in ("white", "black")] + ["white", "black"], n)
    slots = rng.sample([(0.25, 0.3), (0.75, 0.3), (0.25, 0.72), (0.75, 0.72), (0.5, 0.5)], n)
    objs = tuple(Obj(rng.choice(SHAPES), c, x + rng.uniform(-0.06, 0.06), y + rng.uniform(-0.06, 0.06),
                     rng.uniform(0.12, 0.18)) for c, (x, y) in zip(colors, slots))
    return Scene(rng.choice(list(BACKGROUNDS)), objs)


def free_position(scene: Scene, rng: random.Random) -> str | None:
    """A named position with no object near it, or None."""
    free = [p for p, (x, y) in POSITIONS.items()
            if all(abs(o.cx - x) > 0.2 or abs(o.cy - y) > 0.2 for o in scene.objects)]
    return rng.choice(free) if free else None


def render_background(name: str, w: int, h: int) -> Image.Image:
    kind, c1, c2 = BACKGROUNDS[name]
    img = Image.new("RGB", (w, h), c1)
    d = ImageDraw.Draw(img)
    step = max(4, min(w, h) // 8)
    if kind == "stripes":
        for x in range(0, w, 2 * step):
            d.rectangle([x, 0, x + step - 1, h], fill=c2)
    elif kind == "checker":
        for y in range(0, h, step):
            for x in range((y // step % 2) * step, w, 2 * step):
                d.rectangle([x, y, x + step - 1, y + step - 1], fill=c2)
    elif kind == "dots":
        r = max(1, step // 4)
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=c2)
    return img


def layout_scene(rng: random.Random, n_objects: tuple[int, int] = (1, 2),
                 distinct_shapes: bool = False) -> tuple[Scene, list[str]]:
    """A day/photo scene of 1-2 objects at named :data:`POSITIONS` (a pair takes two corners, so they never
    touch) and the position name of each object, in order. ``distinct_shapes``: no two objects share a shape
    (a condition map shows shapes, not colours: the text's colours are matched to the map by shape)."""
    n = rng.randint(*n_objects)
    where = rng.sample(list(POSITIONS) if n == 1 else [p for p in POSITIONS if p != "center"], n)
    colors = rng.sample(list(COLORS), n)
    shapes = rng.sample(SHAPES, n) if distinct_shapes else [rng.choice(SHAPES) for _ in range(n)]
    objs = tuple(Obj(s, c, POSITIONS[p][0] + rng.uniform(-0.03, 0.03), POSITIONS[p][1] + rng.uniform(-0.03, 0.03),
                     rng.uniform(0.11, 0.15)) for s, c, p in zip(shapes, colors, where))
    return Scene(rng.choice(list(BACKGROUNDS)), objs), where


def reference_scene(obj: Obj, background: str) -> Scene:
    """``obj`` alone, centred and large, on ``background`` (a plain one): a reference image's content."""
    return Scene(background, (replace(obj, cx=0.5, cy=0.5, size=0.25),))


def _draw(d: ImageDraw.ImageDraw, o: Obj, w: int, h: int, fill: tuple[int, int, int] | int | None = None) -> None:
    s = o.size * min(w, h)
    x, y = o.cx * w, o.cy * h
    fill = COLORS[o.color] if fill is None else fill
    if o.shape == "circle":
        d.ellipse([x - s, y - s, x + s, y + s], fill=fill)
    elif o.shape == "square":
        d.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    else:
        d.polygon([(x, y - s), (x + s, y + s), (x - s, y + s)], fill=fill)


def _box(box: tuple[float, float, float, float], w: int, h: int) -> tuple[int, int, int, int]:
    return int(box[0] * w), int(box[1] * h), int(np.ceil(box[2] * w)) - 1, int(np.ceil(box[3] * h)) - 1


HOLE_GRAY = (128, 128, 128)


def render(scene: Scene, w: int, h: int) -> Image.Image:
    img = render_background(scene.background, w, h)
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(d, o, w, h)
    if scene.environment == "night":
        a = np.asarray(img, dtype=np.float32) * np.array([0.35, 0.38, 0.55])
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    elif scene.environment == "fog":
        img = Image.blend(img, Image.new("RGB", (w, h), (225, 225, 230)), 0.55)
    if scene.style == "sketch":
        edges = ImageOps.invert(img.convert("L").filter(ImageFilter.FIND_EDGES))
        img = ImageOps.autocontrast(edges).convert("RGB")
    elif scene.style == "posterize":
        img = ImageOps.posterize(img, 2)
    if scene.hole is not None:
        ImageDraw.Draw(img).rectangle(_box(scene.hole, w, h), fill=HOLE_GRAY)
    if scene.keep is not None:
        img = Image.composite(img, Image.new("RGB", (w, h), HOLE_GRAY), box_mask(scene.keep, w, h))
    return img


def render_map(scene: Scene, w: int, h: int, kind: str) -> Image.Image:
    """The condition map of ``scene``'s objects, RGB ``w`` x ``h``: ``"edge"``, their outlines (Pillow's
    FIND_EDGES of the objects' silhouettes: white 1-pixel lines on black), or ``"segmentation"``, each object
    filled with its shape's class colour (:data:`SEG_COLORS`) on black. The background's texture is left out
    (the instruction names the background), so the map's only lines are the objects'."""
    if kind == "segmentation":
        img = Image.new("RGB", (w, h), (0, 0, 0))
        d = ImageDraw.Draw(img)
        for o in scene.objects:
            _draw(d, o, w, h, SEG_COLORS[o.shape])
        return img
    if kind != "edge":
        raise ValueError(f"condition map kind {kind!r}; expected one of {MAP_KINDS}")
    sil = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(sil)
    for o in scene.objects:
        _draw(d, o, w, h, 255)
    return sil.filter(ImageFilter.FIND_EDGES).convert("RGB")


def box_mask(box: tuple[float, float, float, float], w: int, h: int, inside: bool = True) -> Image.Image:
    """An 'L' mask, 255 inside ``box`` (or outside it with ``inside=False``)."""
    m = Image.new("L", (w, h), 0 if inside else 255)
    ImageDraw.Draw(m).rectangle(_box(box, w, h), fill=255 if inside else 0)
    return m


def object_box(o: Obj, w: int, h: int, pad: float = 0.03) -> tuple[float, float, float, float]:
    sx, sy = o.size * min(w, h) / w + pad, o.size * min(w, h) / h + pad
    return max(0.0, o.cx - sx), max(0.0, o.cy - sy), min(1.0, o.cx + sx), min(1.0, o.cy + sy)
