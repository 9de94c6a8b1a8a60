"""Procedural image set of the toy benchmark: shapes (the concepts) in places (contexts).

Every image is 16 x 16 RGB in [-1, 1]: one coloured shape (or none), centred, on a
background that stands for a place. The ten shapes play the role of the paper's ten
Imagenette classes; the thirty places are exactly the <place> list of the paper's object
template (fia_core.prompts.PLACES, Table 7), so FIA's own "objects" template ("a circle
in a forest" / "a forest") works on this model unchanged. Each place has a fixed,
low-frequency colour layout (solid, gradient, horizon, left-right); places of one kind
look alike (lawn, park and valley are green), as in the real world.

Prompts describe what is drawn, in several phrasings, so that the model sees "a red
circle in a forest", "a circle near the forest", "a circle", "a forest", ... and an
empty prompt (classifier-free-guidance dropout) for a tenth of the images.

Everything is a pure function of a numpy Generator: the same seed gives the same
images on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

DATA_VERSION = 3  # bump when the images change (part of the training recipe hash)
SIZE = 16  # image side in pixels (the UNet latent is SIZE x SIZE; ComfyUI pixels are 8x that)
SUPER = 4  # supersampling factor for anti-aliased shape edges
RADIUS = 5.8  # shape radius in pixels (centred: the model learns shapes, not where to put them)

#: The concepts, in class-index order (the classifier's classes 0..9; class 10 = no shape).
CONCEPTS = ("circle", "square", "triangle", "cross", "ring", "diamond", "heart", "moon", "arrow", "star")
NONE_CLASS = len(CONCEPTS)
CLASS_NAMES = CONCEPTS + ("none",)

#: Shape colours (RGB in [0, 1]) named in prompts.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "orange": (1.0, 0.55, 0.0),
    "yellow": (0.98, 0.9, 0.1),
    "green": (0.1, 0.7, 0.15),
    "blue": (0.1, 0.25, 0.95),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.97, 0.97, 0.97),
    "black": (0.05, 0.05, 0.05),
}

_C = {
    "dark grey": (0.25, 0.25, 0.27), "grey": (0.5, 0.5, 0.52), "light grey": (0.78, 0.78, 0.8),
    "white": (0.95, 0.95, 0.95), "dark green": (0.1, 0.35, 0.12), "green": (0.3, 0.62, 0.25),
    "brown": (0.45, 0.3, 0.15), "light brown": (0.68, 0.5, 0.3), "beige": (0.9, 0.84, 0.68),
    "sand": (0.93, 0.8, 0.5), "sky": (0.55, 0.78, 0.95), "blue": (0.2, 0.45, 0.8),
    "dark blue": (0.1, 0.15, 0.45), "dark red": (0.5, 0.1, 0.12), "pink": (0.95, 0.6, 0.75),
    "orange": (0.98, 0.6, 0.25), "purple": (0.4, 0.2, 0.5), "tan": (0.8, 0.66, 0.45),
}

#: place -> (layout, colour 1, colour 2). Keys are the paper's 30 places (Table 7).
#: Layouts are low-frequency (solid, vertical gradient, horizon = two bands, side =
#: left/right gradient): the shapes, not background textures, are what the small model
#: must get right.
PLACES: dict[str, tuple[str, str, str]] = {
    "road": ("horizon", "light grey", "dark grey"),
    "tree": ("side", "dark green", "brown"),
    "forest": ("solid", "dark green", "dark green"),
    "lawn": ("solid", "green", "green"),
    "clubhouse": ("horizon", "white", "green"),
    "courtyard": ("solid", "light grey", "light grey"),
    "backyard": ("horizon", "beige", "green"),
    "cityscape": ("horizon", "grey", "dark blue"),
    "suburb": ("gradient", "sky", "green"),
    "mall": ("solid", "white", "white"),
    "cafe": ("horizon", "beige", "brown"),
    "office": ("gradient", "white", "light grey"),
    "library": ("solid", "brown", "brown"),
    "market": ("side", "beige", "orange"),
    "bridge": ("horizon", "grey", "blue"),
    "harbor": ("gradient", "blue", "dark blue"),
    "garden": ("horizon", "green", "pink"),
    "beach": ("horizon", "sky", "sand"),
    "room": ("solid", "beige", "beige"),
    "park": ("gradient", "green", "dark green"),
    "street": ("solid", "grey", "grey"),
    "shelter": ("side", "brown", "beige"),
    "chair": ("solid", "dark red", "dark red"),
    "table": ("solid", "light brown", "light brown"),
    "bag": ("side", "tan", "brown"),
    "mountain": ("gradient", "white", "grey"),
    "valley": ("side", "green", "dark green"),
    "waterfall": ("gradient", "white", "blue"),
    "desert": ("solid", "sand", "sand"),
    "sunrise": ("gradient", "orange", "purple"),
}
PLACE_NAMES = tuple(PLACES)

#: Training prompt phrasings and their weights. The first two are FIA's object template
#: (fia_core.prompts.TEMPLATES["objects"]); "a {place}" is its base prompt.
SHAPE_TEMPLATES = (
    ("a {concept} in a {place}", 3.0),
    ("a {concept} near the {place}", 2.0),
    ("a {color} {concept} in a {place}", 2.0),
    ("a {color} {concept}", 1.0),
    ("a {concept}", 1.0),
)
BACKGROUND_TEMPLATE = "a {place}"
P_BACKGROUND = 0.15  # share of images without a shape (prompt "a {place}")
P_EMPTY_PROMPT = 0.1  # classifier-free guidance dropout: prompt ""
MIN_CONTRAST = 0.55  # minimum RGB distance between a shape colour and both background colours

#: Evaluation phrasings: one in FIA's template, two outside it (colour, no place), so
#: the benchmark also measures whether erasure generalises beyond the saliency prompts.
EVAL_TEMPLATES = ("a {concept} in a {place}", "a {color} {concept} in a {place}", "a {concept}")


@dataclass(frozen=True)
class Sample:
    """What one image shows and its caption."""

    label: int  # concept index, or NONE_CLASS
    color: str | None
    place: str | None
    prompt: str


def _unit(n: int) -> np.ndarray:
    return (np.arange(n) + 0.5) / n


@lru_cache(maxsize=None)
def _shape_polygon(concept: str) -> list | None:
    """Polygon (unit coordinates, y down) of the shapes drawn as polygons."""
    if concept == "triangle":
        return [(0.0, -0.95), (0.95, 0.75), (-0.95, 0.75)]
    if concept == "diamond":
        return [(0.0, -1.0), (0.9, 0.0), (0.0, 1.0), (-0.9, 0.0)]
    if concept == "arrow":
        return [(-0.95, -0.22), (0.1, -0.22), (0.1, -0.65), (0.95, 0.0), (0.1, 0.65), (0.1, 0.22), (-0.95, 0.22)]
    if concept == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((r * np.cos(a), r * np.sin(a) + 0.08))
        return pts
    if concept == "heart":
        t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return list(zip(x / 17.0, (y + 2.5) / 17.0))
    return None


def shape_mask(concept: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape, [SIZE, SIZE] float32.

    (cx, cy) centre and radius in pixels; drawn at SUPER x resolution with PIL, then averaged.
    """
    n = SIZE * SUPER
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    s = SUPER

    def box(r):
        return [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]

    if concept == "circle":
        draw.ellipse(box(radius * 0.95), fill=255)
    elif concept == "square":
        draw.rectangle(box(radius * 0.8), fill=255)
    elif concept == "cross":
        a, b = radius * 0.95, radius * 0.32
        draw.rectangle([(cx - a) * s, (cy - b) * s, (cx + a) * s, (cy + b) * s], fill=255)
        draw.rectangle([(cx - b) * s, (cy - a) * s, (cx + b) * s, (cy + a) * s], fill=255)
    elif concept == "ring":
        draw.ellipse(box(radius * 0.98), fill=255)
        draw.ellipse(box(radius * 0.5), fill=0)
    elif concept == "moon":
        draw.ellipse(box(radius * 0.98), fill=255)
        r2 = radius * 0.78
        ox, oy = cx + radius * 0.48, cy - radius * 0.18
        draw.ellipse([(ox - r2) * s, (oy - r2) * s, (ox + r2) * s, (oy + r2) * s], fill=0)
    else:
        poly = _shape_polygon(concept)
        if poly is None:
            raise ValueError(f"unknown concept {concept!r}")
        draw.polygon([((cx + x * radius) * s, (cy + y * radius) * s) for x, y in poly], fill=255)
    a = np.asarray(img, dtype=np.float32) / 255.0
    return a.reshape(SIZE, SUPER, SIZE, SUPER).mean(axis=(1, 3))


def background(place: str, phase: int = 0) -> np.ndarray:
    """[SIZE, SIZE, 3] background in [0, 1] of a place; ``phase`` (0..3) moves its edge."""
    layout, c1, c2 = PLACES[place]
    a, b = np.array(_C[c1], np.float32), np.array(_C[c2], np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if layout == "solid":
        w = np.zeros((SIZE, SIZE), np.float32)
    elif layout == "gradient":
        w = yy / (SIZE - 1)
    elif layout == "side":
        w = xx / (SIZE - 1)
    elif layout == "horizon":
        w = (yy >= SIZE // 2 - 1 + phase % 3).astype(np.float32)
    else:
        raise ValueError(layout)
    return a * (1 - w[..., None]) + b * w[..., None]


def allowed_colors(place: str | None) -> list[str]:
    """Shape colours that stand out from the place's background."""
    if place is None:
        return list(COLORS)
    _, c1, c2 = PLACES[place]
    out = []
    for name, rgb in COLORS.items():
        v = np.array(rgb)
        if min(np.linalg.norm(v - np.array(_C[c1])), np.linalg.norm(v - np.array(_C[c2]))) >= MIN_CONTRAST:
            out.append(name)
    return out


def render(label: int, color: str | None, place: str | None, rng: np.random.Generator,
           jitter: bool = False) -> np.ndarray:
    """One image [SIZE, SIZE, 3] in [-1, 1]. A place of None gets a random one (the
    prompt did not name it). The shape is centred with a fixed size; ``jitter`` moves it
    by up to 1.5 pixels and scales it by -14 %..+7 % (the classifier's training images, so
    that it judges imperfect generations too). The generator is advanced the same way
    either way."""
    if place is None:
        place = PLACE_NAMES[rng.integers(len(PLACE_NAMES))]
    img = background(place, phase=int(rng.integers(4)))
    if label != NONE_CLASS:
        if color is None:
            colors = allowed_colors(place)
            color = colors[rng.integers(len(colors))]
        dx, dy, radius = rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5), rng.uniform(5.0, 6.2)
        if not jitter:
            dx, dy, radius = 0.0, 0.0, RADIUS
        cx, cy = SIZE / 2 + dx, SIZE / 2 + dy
        m = shape_mask(CONCEPTS[label], cx, cy, radius)[..., None]
        img = img * (1 - m) + np.array(COLORS[color], np.float32) * m
    return (img * 2.0 - 1.0).astype(np.float32)


def caption(label: int, color: str, place: str, template: str) -> str:
    if label == NONE_CLASS:
        return BACKGROUND_TEMPLATE.format(place=place)
    return template.format(concept=CONCEPTS[label], color=color, place=place)


def draw_sample(rng: np.random.Generator) -> tuple[Sample, np.ndarray]:
    """One training pair (what is drawn + its prompt, image). The image always has a
    place and, unless it is a background-only image, a shape colour; the prompt names
    them only when its phrasing does."""
    place = PLACE_NAMES[rng.integers(len(PLACE_NAMES))]
    if rng.random() < P_BACKGROUND:
        label, color, prompt = NONE_CLASS, None, BACKGROUND_TEMPLATE.format(place=place)
    else:
        label = int(rng.integers(len(CONCEPTS)))
        colors = allowed_colors(place)
        color = colors[rng.integers(len(colors))]
        weights = np.array([w for _, w in SHAPE_TEMPLATES])
        template = SHAPE_TEMPLATES[rng.choice(len(weights), p=weights / weights.sum())][0]
        prompt = caption(label, color, place, template)
    image = render(label, color, place, rng)
    if rng.random() < P_EMPTY_PROMPT:
        prompt = ""
    return Sample(label, color, place, prompt), image


def batch(rng: np.random.Generator, n: int) -> tuple[list[Sample], np.ndarray]:
    """n training pairs; images as [n, 3, SIZE, SIZE] float32 in [-1, 1]."""
    samples, images = [], []
    for _ in range(n):
        s, img = draw_sample(rng)
        samples.append(s)
        images.append(img.transpose(2, 0, 1))
    return samples, np.stack(images)


def eval_prompts(concept: str, n: int, seed: int = 0) -> list[str]:
    """n evaluation prompts for one concept: EVAL_TEMPLATES cycled, places and colours
    drawn from a generator seeded by (seed, concept index)."""
    rng = np.random.default_rng([seed, CONCEPTS.index(concept), 7])
    out = []
    for i in range(n):
        template = EVAL_TEMPLATES[i % len(EVAL_TEMPLATES)]
        place = PLACE_NAMES[rng.integers(len(PLACE_NAMES))]
        colors = allowed_colors(place)
        color = colors[rng.integers(len(colors))]
        out.append(template.format(concept=concept, color=color, place=place))
    return out


def classifier_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labelled images for the classifier: [n, 3, SIZE, SIZE] in [-1, 1] and labels
    (0..9 concepts, 10 = no shape; each class equally likely)."""
    labels = rng.integers(len(CLASS_NAMES), size=n)
    images = np.stack([render(int(k), None, None, rng, jitter=True).transpose(2, 0, 1) for k in labels])
    return images, labels.astype(np.int64)


def contact_sheet(images: np.ndarray, cols: int, scale: int = 4, pad: int = 1) -> Image.Image:
    """Grid of [n, 3, H, W] images in [-1, 1] as a PIL image (nearest upscaling)."""
    n, _, h, w = images.shape
    rows = (n + cols - 1) // cols
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 40, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = ((np.clip(images[i].transpose(1, 2, 0), -1, 1) + 1) * 127.5).round().astype(np.uint8)
        sheet[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    img = Image.fromarray(sheet)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)
