"""Defensive image decoding, run in worker processes.

Each image is decoded with PIL, checked, hashed perceptually, then put through the
PIL part of the model's own transform (resize, center crop, RGB) and returned as a
uint8 HWC array: the float conversion and normalization happen on the model's device.
A corrupt image becomes a reason string; it never raises.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

_TRANSFORM = None


@dataclass
class Decoded:
    pixels: np.ndarray | None  # HxWx3 uint8 after the model's PIL transform
    width: int | None
    height: int | None
    phash: int | None  # 64-bit DCT perceptual hash (imagehash.phash) as an unsigned int
    error: str | None


def init_worker(transform) -> None:
    """Pool initializer: keep the PIL transform per process instead of pickling it per task."""
    global _TRANSFORM
    _TRANSFORM = transform
    import torch

    torch.set_num_threads(1)


def phash64(img) -> int:
    import imagehash

    bits = imagehash.phash(img).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0])


def decode_one(data: bytes | None, transform=None) -> Decoded:
    from PIL import Image

    transform = transform or _TRANSFORM
    if data is None:
        return Decoded(None, None, None, None, "missing_image: no jpg/jpeg/png/webp member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        width, height = img.size
        if width < 1 or height < 1:
            return Decoded(None, width, height, None, "corrupt_image: empty image")
        rgb = img.convert("RGB")
        ph = phash64(rgb)
        pixels = np.asarray(transform(img), dtype=np.uint8)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            return Decoded(None, width, height, ph, f"corrupt_image: unexpected shape {pixels.shape}")
        return Decoded(pixels, width, height, ph, None)
    except Exception as e:  # noqa: BLE001 — any decoder failure is a per-sample failure
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        return Decoded(None, None, None, None, f"corrupt_image: {msg}")


def decode_batch(items: list[bytes | None]) -> list[Decoded]:
    return [decode_one(d) for d in items]
