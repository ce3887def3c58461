"""Finding 5: the report decodes under scoring's limits, so a bomb scoring refused stays undecoded."""

from __future__ import annotations

import io

from PIL import Image

from filtering.report.thumbs import thumbnail_uri
from filtering.stages.image_decode import decode_image, reference_plan


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_an_image_scoring_refuses_gets_no_thumbnail(monkeypatch):
    # Between PIL's limit and twice it, PIL only warns: scoring refuses, the report decoded it.
    # A small limit stands in for 89.5 MP, the same rule on a 12000x12000 bomb.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    bomb = _png(120, 120)  # 14,400 pixels
    plan = reference_plan(lambda img: img.convert("RGB"))
    assert decode_image(bomb, plan.required, plan).error.startswith("corrupt_image:")
    assert thumbnail_uri(bomb) is None
    fine = _png(90, 90)
    assert decode_image(fine, plan.required, plan).error is None
    assert thumbnail_uri(fine).startswith("data:image/jpeg;base64,")
