"""A watermark-like overlay for the bundled sample's quality shard.

Stock-photo watermarks are light, half-transparent text repeated across the picture.
This draws the same with a built-in 5x7 bitmap font (no font files, no FreeType: the
pixels are the same on every machine), so a head over image embeddings has a visual
property to learn: ``truth.watermark`` in the quality shard's ``.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# 5x7 glyphs, one string of 7 rows of 5 bits per character.
_FONT: dict[str, tuple[str, ...]] = {
    "S": ("01111", "10000", "10000", "01110", "00001", "00001", "11110"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "O": ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    "C": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    "K": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "I": ("01110", "00100", "00100", "00100", "00100", "00100", "01110"),
    "F": ("11111", "10000", "10000", "11110", "10000", "10000", "10000"),
    "©": ("01110", "10001", "10111", "10101", "10111", "10001", "01110"),
    " ": ("00000",) * 7,
}
TEXTS = ("STOCK", "© POOLSIFT", "SPLOTS", "© STOCK")


@dataclass(frozen=True)
class Watermark:
    """Every random choice behind one overlay, so it can be drawn at any image size."""

    text: str
    glyph_frac: float  # glyph height over the image's shorter side
    opacity: float
    shade: int  # 255 = white text, 0 = black
    row_gap: float  # vertical period of the repeated rows, in glyph heights
    offset: float  # horizontal phase of the rows (0..1)


def random_watermark(rng: np.random.Generator) -> Watermark:
    return Watermark(
        text=TEXTS[int(rng.integers(len(TEXTS)))],
        glyph_frac=float(rng.uniform(0.12, 0.2)),
        opacity=float(rng.uniform(0.55, 0.8)),
        shade=255 if rng.random() < 0.7 else 0,
        row_gap=float(rng.uniform(1.8, 2.6)),
        offset=float(rng.uniform(0.0, 1.0)),
    )


def _text_bitmap(text: str) -> np.ndarray:
    cols = []
    for ch in text:
        glyph = np.array([[c == "1" for c in row] for row in _FONT[ch]], dtype=bool)
        cols += [glyph, np.zeros((7, 1), dtype=bool)]
    return np.concatenate(cols, axis=1)


def overlay(img: Image.Image, wm: Watermark) -> Image.Image:
    """``img`` with rows of ``wm.text`` blended over it (deterministic)."""
    w, h = img.size
    cell = max(1, round(min(w, h) * wm.glyph_frac / 7))
    bitmap = np.repeat(np.repeat(_text_bitmap(wm.text + " "), cell, axis=0), cell, axis=1)
    bh, bw = bitmap.shape
    mask = np.zeros((h, w), dtype=bool)
    period = max(bh + 1, round(bh * wm.row_gap))
    for n, top in enumerate(range(round(period * 0.3), h, period)):
        shift = round(((wm.offset + 0.5 * n) % 1.0) * bw)
        reps = -(-(w + shift) // bw) + 1
        row = np.tile(bitmap, (1, reps))[:, shift : shift + w]
        rows = min(bh, h - top)
        mask[top : top + rows] |= row[:rows]
    out = np.asarray(img, dtype=np.float32)
    alpha = mask[..., None] * wm.opacity
    out = out * (1.0 - alpha) + float(wm.shade) * alpha
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")
