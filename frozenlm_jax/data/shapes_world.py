"""The procedural captioned-shapes world: scenes of flat-coloured shapes, their pixels, captions and questions.

Pure numpy and deterministic: a scene is a function of a seed sequence, so the tfds builder, the VQA
files and the few-shot episodes all come from the same generator without any download.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross")
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "brown": (130, 80, 40),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "beige": (225, 210, 170),
}
SIZES = ("small", "medium", "large")
# Object radius as a fraction of the image side, per size class.
SIZE_RADIUS = {"small": 0.09, "medium": 0.13, "large": 0.18}
NUMBER_WORDS = ("zero", "one", "two", "three")
# Words with no meaning, bound to categories inside a few-shot prompt (the paper's dax, blicket, ...).
NONSENSE_WORDS = ("dax", "blicket", "slation", "perpo", "shously", "wug", "zorp", "toma", "fep", "kiki")
GRADIENT_LEVELS = 12  # background brightness varies by up to this many levels across the image

# The seed stream of each tfds split of the world (frozenlm_jax.data.shapes); evaluation files use later ones.
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One object: `x`, `y` are its centre as fractions of the image side (y grows downwards)."""

    kind: str
    color: str
    size: str
    x: float
    y: float

    @property
    def noun(self) -> str:
        return f"{self.color} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str
    gradient: tuple[float, float]  # direction of the background's brightness ramp


def sample_scene(rng: np.random.Generator, num_objects: int | None = None, kinds=KINDS) -> Scene:
    """1-3 non-overlapping objects (so every centre pixel shows its own object) on a background."""
    n = int(rng.integers(1, 4)) if num_objects is None else num_objects
    while True:
        shapes: list[Shape] = []
        for _ in range(n):
            for _attempt in range(50):
                size = SIZES[int(rng.integers(len(SIZES)))]
                r = SIZE_RADIUS[size]
                x, y = rng.uniform(r, 1 - r, size=2)
                if all(np.hypot(x - s.x, y - s.y) > 1.1 * (r + SIZE_RADIUS[s.size]) for s in shapes):
                    kind = kinds[int(rng.integers(len(kinds)))]
                    color = list(COLORS)[int(rng.integers(len(COLORS)))]
                    shapes.append(Shape(kind, color, size, float(x), float(y)))
                    break
        if len(shapes) == n:
            break
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    angle = rng.uniform(0, 2 * np.pi)
    return Scene(tuple(shapes), background, (float(np.cos(angle)), float(np.sin(angle))))


def _polygon(xs, ys, vertices):
    """Even-odd point-in-polygon test over a pixel grid."""
    inside = np.zeros(xs.shape, bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, 1, axis=0)):
        crosses = (y0 > ys) != (y1 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at)
    return inside


def _regular(cx, cy, radii, start_deg):
    angles = np.deg2rad(start_deg) + 2 * np.pi * np.arange(len(radii)) / len(radii)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def shape_mask(kind: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of `kind` centred at pixel coordinates (cx, cy) with radius r."""
    dx, dy = xs - cx, ys - cy
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if kind == "diamond":
        return np.abs(dx) / (0.75 * r) + np.abs(dy) / r <= 1
    if kind == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if kind == "triangle":
        return _polygon(xs, ys, _regular(cx, cy + 0.2 * r, np.full(3, 1.2 * r), -90))
    if kind == "hexagon":
        return _polygon(xs, ys, _regular(cx, cy, np.full(6, r), 0))
    if kind == "star":
        return _polygon(xs, ys, _regular(cx, cy, np.tile([r * 1.15, r * 0.5], 5), -90))
    raise ValueError(f"unknown shape kind {kind!r}; known: {', '.join(KINDS)}")


def render(scene: Scene, size: int) -> np.ndarray:
    """uint8[size, size, 3]: a background with a gentle brightness ramp, objects in flat palette colours."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    ramp = ((xs / size - 0.5) * scene.gradient[0] + (ys / size - 0.5) * scene.gradient[1]) * GRADIENT_LEVELS
    image = np.asarray(BACKGROUNDS[scene.background], np.float32) + ramp[..., None]
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    for s in scene.shapes:
        mask = shape_mask(s.kind, s.x * size, s.y * size, SIZE_RADIUS[s.size] * size, xs, ys)
        image[mask] = COLORS[s.color]
    return image


# ----------------------------------------------------------------------------------------------
# Language: captions and questions are derived from the structured scene only.


def plural(kind: str) -> str:
    return kind + ("es" if kind.endswith("s") else "s")


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _with_size(s: Shape) -> str:
    return with_article(s.noun if s.size == "medium" else f"{s.size} {s.noun}")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _listing(shapes) -> str:
    """'two green triangles and a small red circle': identical nouns are counted, singletons sized."""
    groups: dict[str, list[Shape]] = {}
    for s in shapes:
        groups.setdefault(s.noun, []).append(s)
    parts = []
    for members in groups.values():
        if len(members) == 1:
            parts.append(_with_size(members[0]))
        else:
            parts.append(f"{NUMBER_WORDS[len(members)]} {members[0].color} {plural(members[0].kind)}")
    return _join(parts)


def where(s: Shape) -> str:
    """Absolute position in thirds of the image: 'in the top left', 'at the bottom', 'in the center'."""
    horizontal = "left" if s.x < 1 / 3 else "right" if s.x > 2 / 3 else ""
    vertical = "top" if s.y < 1 / 3 else "bottom" if s.y > 2 / 3 else ""
    if horizontal and vertical:
        return f"in the {vertical} {horizontal}"
    if vertical:
        return f"at the {vertical}"
    if horizontal:
        return f"on the {horizontal}"
    return "in the center"


def relation(a: Shape, b: Shape) -> str:
    """Where a is relative to b, along the axis on which they are further apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def captions(scene: Scene, rng: np.random.Generator, count: int = 4) -> list[str]:
    """`count` distinct English descriptions, each true of the scene (some mention only part of it)."""
    shapes = list(scene.shapes)
    n = len(shapes)
    listing = _listing(shapes)
    options = [
        listing,
        f"{listing} on a {scene.background} background",
        f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: {listing}",
        _join([f"{_with_size(s)} {where(s)}" for s in shapes]),
    ]
    if n >= 2:
        i, j = rng.choice(n, size=2, replace=False)
        options.append(f"{_with_size(shapes[i])} {relation(shapes[i], shapes[j])} {_with_size(shapes[j])}")
    chosen = rng.choice(len(options), size=min(count, len(options)), replace=False)
    return [options[k] for k in sorted(chosen)]


def describe(scene: Scene) -> str:
    """The plain text of a whole scene, every object with its size and place: 'a small red circle in the top
    left and a blue square at the bottom, on a white background' (the text oracle's stand-in for the image)."""
    return f"{_join([f'{_with_size(s)} {where(s)}' for s in scene.shapes])}, on a {scene.background} background"


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    answer: str
    question_type: str  # VQAv2's question_type: the question's opening words
    answer_type: str  # VQAv2's answer_type: 'yes/no', 'number' or 'other'


def questions(scene: Scene, rng: np.random.Generator, count: int = 3) -> list[Question]:
    """Up to `count` unambiguous questions about colour, shape, count and position, with their answers."""
    shapes = list(scene.shapes)
    kinds = [s.kind for s in shapes]
    colors = [s.color for s in shapes]
    nouns = [s.noun for s in shapes]
    pool = [Question("How many shapes are there?", str(len(shapes)), "how many", "number")]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    pool.append(Question(f"How many {color} shapes are there?", str(colors.count(color)), "how many", "number"))
    kind = KINDS[int(rng.integers(len(KINDS)))]
    pool.append(Question(f"How many {plural(kind)} are there?", str(kinds.count(kind)), "how many", "number"))
    probe = Shape(kind, color, "medium", 0.5, 0.5)
    answer = "yes" if probe.noun in nouns else "no"
    pool.append(Question(f"Is there {with_article(probe.noun)}?", answer, "is there a", "yes/no"))
    for s in shapes:
        if kinds.count(s.kind) == 1:
            pool.append(Question(f"What color is the {s.kind}?", s.color, "what color is the", "other"))
        if colors.count(s.color) == 1:
            pool.append(Question(f"What shape is the {s.color} object?", s.kind, "what", "other"))
        if nouns.count(s.noun) == 1 and abs(s.x - 0.5) > 0.1:
            side = "left" if s.x < 0.5 else "right"
            pool.append(Question(f"Is the {s.noun} on the left or on the right?", side, "is the", "other"))
    for a in shapes:
        for b in shapes:
            if a is not b and nouns.count(a.noun) == 1 and nouns.count(b.noun) == 1 and abs(a.y - b.y) > 0.1:
                answer = "above" if a.y < b.y else "below"
                pool.append(Question(f"Is the {a.noun} above or below the {b.noun}?", answer, "is the", "other"))
    chosen = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return [pool[k] for k in sorted(chosen)]
