"""Perceptual hash of each image: imagehash's 64-bit DCT ``phash``, as an unsigned int.

Computed where the decoded image already is (the source's decode workers), from the
image as decoded (JPEG DCT-downscaled when ``model.jpeg_draft`` is on, so a few bits
may differ from a full-size decode): one pass over pixels in memory, no second decode.
The WebDataset source always runs it (``phash`` is one of its columns, read by the
``dedup`` filter's image hashes and by decontamination).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from filtering.scorers.base import Batch, Needs, Scorer, register

if TYPE_CHECKING:
    import pyarrow as pa


def phash64(img) -> int:
    """imagehash's 8x8 DCT phash of ``img`` (converted to RGB first, as imagehash expects)."""
    import imagehash

    bits = imagehash.phash(img if img.mode == "RGB" else img.convert("RGB")).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0])


@register
class PhashScorer(Scorer):
    kind: ClassVar[str] = "phash"

    def provides(self) -> tuple[str, ...]:
        return ("phash",)

    def needs(self) -> Needs:
        return Needs(images=True)

    def column_types(self) -> dict[str, pa.DataType]:
        import pyarrow as pa  # here, not at the top: the decode workers that run this scorer never need it

        return {"phash": pa.uint64()}

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        return {"phash": np.array([phash64(img) for img in batch.images], dtype=np.uint64)}
