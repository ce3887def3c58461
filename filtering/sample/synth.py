"""The synthetic image-text domain behind the bundled sample and the tiny CLIP.

An image shows one object of a class in :data:`CLASSES`, filled with one of the
named :data:`COLOURS`, on a background that is a solid colour, a gradient, smooth
noise or soft stripes. Rules that the sample pool and the tiny CLIP rely on:

- Everything random is drawn from the ``numpy.random.Generator`` passed in, so a
  seed fixes every pixel and every caption.
- The object always lies inside the central square of the image (side = the
  shorter side), because CLIP's preprocessing (resize the shorter side, centre
  crop) keeps only that square; its extent is 45-95% of that side, so the class is
  still recognisable at the model's 64 px input.
- Background colours stay far from the object colour (RGB distance >=
  :data:`MIN_CONTRAST`), and stripes or noise are low-contrast, so the object is the
  only salient shape.
- English captions always name the class; colour, size word ("small"/"large") and
  a solid background's colour are mentioned only by some templates. Non-English
  captions (German, French, Spanish) describe the same scene in that language.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "heart",
    "arrow",
    "crescent",
    "hexagon",
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "purple": (130, 50, 180),
    "pink": (245, 130, 190),
    "brown": (130, 80, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}

BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "noise", "stripes")
LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "es")

# Below this RGB distance a shape is hard to see at 64 px (red on brown, orange on yellow).
MIN_CONTRAST = 130.0
# Object extent as a fraction of the shorter image side; the size word follows it.
SCALE_RANGE = (0.45, 0.95)
SMALL_BELOW = 0.6
LARGE_ABOVE = 0.8
# Draw masks at this multiple of the output size, then downsample: cheap anti-aliasing.
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Scene:
    """Every random choice behind one image, so it can be drawn at any size.

    ``scale`` is the object's extent over the shorter side; ``dx``/``dy`` place its
    centre inside the central square in units of the free margin (-1..1); ``angle``
    is in radians; ``jitter`` perturbs the fill colour; ``background_colour`` is the
    named colour of a solid background and ``None`` for the other kinds, whose
    colours are ``bg_rgb`` (two of them for gradient and stripes).
    """

    cls: str
    colour: str
    scale: float
    dx: float
    dy: float
    angle: float
    jitter: tuple[int, int, int]
    background: str
    background_colour: str | None
    bg_rgb: tuple[tuple[int, int, int], ...]
    bg_param: float
    noise_seed: int

    @property
    def size(self) -> str | None:
        """The size word a caption may use: "small", "large", or None in between."""
        if self.scale < SMALL_BELOW:
            return "small"
        if self.scale > LARGE_ABOVE:
            return "large"
        return None


def contrasting_colours(colour: str) -> list[str]:
    """Named colours usable as a background behind an object of ``colour``."""
    ref = np.array(COLOURS[colour], dtype=float)
    return [name for name, rgb in COLOURS.items() if np.linalg.norm(np.array(rgb, dtype=float) - ref) >= MIN_CONTRAST]


def random_scene(
    rng: np.random.Generator,
    cls: str | None = None,
    colour: str | None = None,
    *,
    background: str | None = None,
) -> Scene:
    """Draw a scene; ``cls``, ``colour`` and the ``background`` kind are random unless given."""
    cls = cls if cls is not None else CLASSES[int(rng.integers(len(CLASSES)))]
    colour = colour if colour is not None else list(COLOURS)[int(rng.integers(len(COLOURS)))]
    if cls not in CLASSES:
        raise ValueError(f"Unknown class {cls!r}. Available: {list(CLASSES)}")
    if colour not in COLOURS:
        raise ValueError(f"Unknown colour {colour!r}. Available: {list(COLOURS)}")
    kind = background or BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    if kind not in BACKGROUND_KINDS:
        raise ValueError(f"Unknown background {kind!r}. Available: {list(BACKGROUND_KINDS)}")
    allowed = contrasting_colours(colour)
    picks = [allowed[int(i)] for i in rng.choice(len(allowed), size=2, replace=False)]
    # A heart upside down reads as something else; the other shapes may turn freely.
    angle = rng.uniform(-0.6, 0.6) if cls == "heart" else rng.uniform(0.0, 2 * math.pi)
    return Scene(
        cls=cls,
        colour=colour,
        scale=float(rng.uniform(*SCALE_RANGE)),
        dx=float(rng.uniform(-1.0, 1.0)),
        dy=float(rng.uniform(-1.0, 1.0)),
        angle=float(angle),
        jitter=tuple(int(v) for v in rng.integers(-18, 19, size=3)),
        background=kind,
        background_colour=picks[0] if kind == "solid" else None,
        bg_rgb=tuple(_vary(COLOURS[p], rng) for p in picks),
        bg_param=float(rng.uniform(0.0, 1.0)),
        noise_seed=int(rng.integers(2**31)),
    )


def _vary(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in rgb)


# --- shapes: polygons in a unit frame (object fits the unit disc), drawn in order ---


def _ngon(n: int, radius: float = 1.0, phase: float = 0.0, cx: float = 0.0, cy: float = 0.0):
    return [
        (cx + radius * math.cos(phase + 2 * math.pi * k / n), cy + radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star():
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.42
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart():
    pts = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        # Image y grows downwards; shift so the heart's bounding box is centred.
        pts.append((x / 17.0, -(y + 2.5) / 15.5))
    return pts


def _cross():
    a, w = 1.0, 0.3
    return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]


def _arrow():
    return [(-1.0, -0.2), (0.15, -0.2), (0.15, -0.6), (1.0, 0.0), (0.15, 0.6), (0.15, 0.2), (-1.0, 0.2)]


# (points, fill) pairs: fill 0 cuts a hole (ring, crescent) back to the background.
SHAPES: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "circle": [(_ngon(72), 255)],
    "square": [([(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)], 255)],
    "triangle": [(_ngon(3, 1.0, -math.pi / 2, 0.0, 0.15), 255)],
    "star": [(_star(), 255)],
    "cross": [(_cross(), 255)],
    "ring": [(_ngon(72), 255), (_ngon(72, 0.58), 0)],
    "heart": [(_heart(), 255)],
    "arrow": [(_arrow(), 255)],
    "crescent": [(_ngon(72), 255), (_ngon(72, 0.85, 0.0, 0.42, -0.12), 0)],
    "hexagon": [(_ngon(6), 255)],
}


def _mask(scene: Scene, width: int, height: int) -> Image.Image:
    ss = SUPERSAMPLE
    side = min(width, height)
    radius = scene.scale * side / 2
    margin = side / 2 - radius
    cx = width / 2 + scene.dx * margin * 0.9
    cy = height / 2 + scene.dy * margin * 0.9
    cos_a, sin_a = math.cos(scene.angle), math.sin(scene.angle)
    img = Image.new("L", (width * ss, height * ss), 0)
    draw = ImageDraw.Draw(img)
    for pts, fill in SHAPES[scene.cls]:
        xy = [
            (ss * (cx + radius * (x * cos_a - y * sin_a)), ss * (cy + radius * (x * sin_a + y * cos_a))) for x, y in pts
        ]
        draw.polygon(xy, fill=fill)
    return img.resize((width, height), Image.Resampling.BOX)


def _background(scene: Scene, width: int, height: int) -> np.ndarray:
    c0 = np.array(scene.bg_rgb[0], dtype=np.float32)
    c1 = np.array(scene.bg_rgb[1], dtype=np.float32)
    if scene.background == "solid":
        return np.broadcast_to(c0, (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = scene.bg_param * 2 * math.pi
    proj = xx * math.cos(theta) + yy * math.sin(theta)
    if scene.background == "gradient":
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
        return c0 + t[..., None] * (c1 - c0)
    if scene.background == "stripes":
        period = 14 + 20 * scene.bg_param
        wave = 0.5 + 0.5 * np.sin(proj * (2 * math.pi / period))
        # Soft, low-contrast stripes never out-shout the object, and compress well.
        return c0 + wave[..., None] * 0.3 * (c1 - c0)
    # Smooth noise: a coarse random field upsampled, so it compresses well as JPEG.
    nrng = np.random.default_rng(scene.noise_seed)
    coarse = nrng.normal(0.0, 1.0, size=(6, 6)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    return c0 + np.clip(field, -2, 2)[..., None] * 12.0


def render_scene(scene: Scene, width: int, height: int) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``width`` x ``height`` pixels (deterministic)."""
    bg = _background(scene, width, height)
    alpha = np.asarray(_mask(scene, width, height), dtype=np.float32)[..., None] / 255.0
    fg = np.clip(np.array(COLOURS[scene.colour], dtype=np.float32) + np.array(scene.jitter), 0, 255)
    out = bg * (1.0 - alpha) + fg * alpha
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def render(
    rng: np.random.Generator,
    cls: str,
    colour: str,
    width: int,
    height: int,
    *,
    background: str | None = None,
) -> Image.Image:
    """Draw a random scene of ``cls`` in ``colour``; see :func:`random_scene`."""
    return render_scene(random_scene(rng, cls, colour, background=background), width, height)


# --- captions ---

_EN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {colour} {cls}",
    "a photo of a {cls}",
    "a {colour} {cls}",
    "{colour} {cls}",
    "a {cls}",
    "{cls}",
    "a drawing of a {colour} {cls}",
    "a picture of the {cls}",
    "a {cls} shape in {colour}",
    "the {cls} is {colour}",
    "an image of a {colour} {cls}",
    "a simple {cls} icon",
)
_EN_SIZE_TEMPLATES: tuple[str, ...] = ("a {size} {colour} {cls}", "a {size} {cls}")
_EN_BG_TEMPLATES: tuple[str, ...] = (
    "a photo of a {colour} {cls} on a {bg} background",
    "a {cls} on a {bg} background",
    "{colour} {cls} on {bg}",
)

# German: every class noun is masculine or neuter, so "ein"/"einem" always agree.
_DE_CLASSES = dict(
    zip(
        CLASSES,
        ("Kreis", "Quadrat", "Dreieck", "Stern", "Kreuz", "Ring", "Herz", "Pfeil", "Halbmond", "Sechseck"),
        strict=True,
    )
)
_DE_COLOURS = dict(
    zip(COLOURS, ("Rot", "Orange", "Gelb", "Grün", "Blau", "Lila", "Rosa", "Braun", "Schwarz", "Weiß"), strict=True)
)
_DE_TEMPLATES = (
    "ein {cls} in {colour}",
    "ein Foto von einem {cls} in {colour}",
    "{cls} in {colour}",
    "Zeichnung von einem {cls}",
    "ein {cls}",
)
# French and Spanish: (noun, grammatical gender); adjectives agree with the gender.
_FR_CLASSES = dict(
    zip(
        CLASSES,
        (
            ("cercle", "m"),
            ("carré", "m"),
            ("triangle", "m"),
            ("étoile", "f"),
            ("croix", "f"),
            ("anneau", "m"),
            ("cœur", "m"),
            ("flèche", "f"),
            ("croissant", "m"),
            ("hexagone", "m"),
        ),
        strict=True,
    )
)
_FR_COLOURS = dict(
    zip(
        COLOURS,
        (
            ("rouge", "rouge"),
            ("orange", "orange"),
            ("jaune", "jaune"),
            ("vert", "verte"),
            ("bleu", "bleue"),
            ("violet", "violette"),
            ("rose", "rose"),
            ("marron", "marron"),
            ("noir", "noire"),
            ("blanc", "blanche"),
        ),
        strict=True,
    )
)
_FR_TEMPLATES = (
    "{art} {cls} {adj}",
    "une photo {de} {cls} {adj}",
    "{art} {cls}",
    "dessin {de} {cls} {adj}",
    "image {de} {cls}",
)
_ES_CLASSES = dict(
    zip(
        CLASSES,
        (
            ("círculo", "m"),
            ("cuadrado", "m"),
            ("triángulo", "m"),
            ("estrella", "f"),
            ("cruz", "f"),
            ("anillo", "m"),
            ("corazón", "m"),
            ("flecha", "f"),
            ("media luna", "f"),
            ("hexágono", "m"),
        ),
        strict=True,
    )
)
_ES_COLOURS = dict(
    zip(
        COLOURS,
        (
            ("rojo", "roja"),
            ("naranja", "naranja"),
            ("amarillo", "amarilla"),
            ("verde", "verde"),
            ("azul", "azul"),
            ("morado", "morada"),
            ("rosa", "rosa"),
            ("marrón", "marrón"),
            ("negro", "negra"),
            ("blanco", "blanca"),
        ),
        strict=True,
    )
)
_ES_TEMPLATES = (
    "{art} {cls} {adj}",
    "una foto de {art} {cls} {adj}",
    "{art} {cls} de color {colour}",
    "dibujo de {art} {cls}",
    "{art} {cls}",
)

_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiou])")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def caption_for(
    rng: np.random.Generator,
    cls: str,
    colour: str,
    *,
    size: str | None = None,
    background: str | None = None,
    language: str = "en",
) -> str:
    """A caption naming ``cls`` (always) and maybe ``colour``, ``size`` and a solid
    ``background`` colour, in ``language`` (one of :data:`LANGUAGES`)."""
    if language == "en":
        templates = list(_EN_TEMPLATES)
        if size is not None:
            templates += _EN_SIZE_TEMPLATES
        if background is not None:
            templates += _EN_BG_TEMPLATES
        text = _pick(rng, templates).format(cls=cls, colour=colour, size=size, bg=background)
        return _A_BEFORE_VOWEL.sub(r"\1n ", text)
    if language == "de":
        return _pick(rng, _DE_TEMPLATES).format(cls=_DE_CLASSES[cls], colour=_DE_COLOURS[colour])
    if language == "fr":
        noun, gender = _FR_CLASSES[cls]
        masc, fem = _FR_COLOURS[colour]
        feminine = gender == "f"
        de = "d'une" if feminine else "d'un"
        return _pick(rng, _FR_TEMPLATES).format(
            art="une" if feminine else "un", de=de, cls=noun, adj=fem if feminine else masc
        )
    if language == "es":
        noun, gender = _ES_CLASSES[cls]
        masc, fem = _ES_COLOURS[colour]
        feminine = gender == "f"
        return _pick(rng, _ES_TEMPLATES).format(
            art="una" if feminine else "un", cls=noun, adj=fem if feminine else masc, colour=masc
        )
    raise ValueError(f"Unknown language {language!r}. Available: {list(LANGUAGES)}")


def colour_words(colour: str, language: str = "en") -> tuple[str, ...]:
    """The words a caption in ``language`` may use for ``colour`` (all genders)."""
    if language == "en":
        return (colour,)
    if language == "de":
        return (_DE_COLOURS[colour],)
    if language == "fr":
        return _FR_COLOURS[colour]
    if language == "es":
        return _ES_COLOURS[colour]
    raise ValueError(f"Unknown language {language!r}. Available: {list(LANGUAGES)}")


def scene_caption(rng: np.random.Generator, scene: Scene, language: str = "en") -> str:
    """A caption that matches ``scene``."""
    return caption_for(
        rng, scene.cls, scene.colour, size=scene.size, background=scene.background_colour, language=language
    )


def photo_jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A photo-like JPEG: smooth colour fields at three scales, a dozen shapes with sharp
    edges, sensor-like noise; quality 90."""
    canvas = np.zeros((h, w, 3), np.float32)
    for cells, weight in ((4, 0.6), (16, 0.3), (64, 0.1)):
        low = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        canvas += weight * np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32)
    canvas += rng.normal(0, 6, canvas.shape)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(min(w, h) // 40, min(w, h) // 5))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=fill)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()
