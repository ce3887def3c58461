"""Reference images decode through the pool's path (``decode_image`` under ``reference_plan``),
in order, in this process or in workers with a bounded window (``decode_in_order``)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from filtering.stages import image_decode
from filtering.stages.image_decode import decode_image, decode_in_order, reference_plan


def _jpeg(seed: int, w: int = 40, h: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _crop(img):
    return img.convert("RGB").resize((8, 8))


def _items(n: int) -> list[tuple[str, bytes | None]]:
    bad = {3: b"not an image", 7: None, 11: _jpeg(11)[:300]}
    return [(f"k{i}", bad.get(i, _jpeg(i))) for i in range(n)]


def test_reference_plan_requires_the_hash_and_the_transform():
    plan = reference_plan(_crop, 64)
    assert plan.required == {"phash", "clip"} and plan.draft == 64
    assert reference_plan().required == {"phash"} and reference_plan().transforms == {}
    d = decode_image(_jpeg(1), plan.required, plan)
    assert d.error is None and d.pixels["clip"].shape == (8, 8, 3) and isinstance(d.values["phash"]["phash"], np.uint64)


def test_failures_keep_the_pool_reasons():
    plan = reference_plan(_crop)
    reasons = {k: d.error for k, d in decode_in_order(_items(12), plan, workers=0) if d.error is not None}
    assert reasons["k3"] == "corrupt_image: cannot identify image file"
    assert reasons["k7"] == "missing_image: no jpg/jpeg/png/webp member"
    assert reasons["k11"].startswith("corrupt_image: ")
    assert len(reasons) == 3

    def odd(img):
        return np.zeros((4, 4), np.uint8)  # a transform giving the wrong shape fails the image, sized

    shaped = reference_plan(odd)
    d = decode_image(_jpeg(0), shaped.required, shaped)
    assert (d.error, d.width, d.height) == ("corrupt_image: unexpected shape (4, 4)", 40, 30)


def test_workers_give_what_this_process_gives_in_order_with_a_bounded_window(monkeypatch):
    monkeypatch.setattr(image_decode, "REFERENCE_WINDOW", 2)
    plan = reference_plan(_crop)
    local = list(decode_in_order(_items(40), plan, workers=0, chunk=4))
    pulled = 0

    def source():
        nonlocal pulled
        for item in _items(40):
            pulled += 1
            yield item

    out = decode_in_order(source(), plan, workers=1, chunk=4)
    first = next(out)
    # window: 2 chunks per worker in flight, one more submitted before the first is awaited
    assert pulled <= (2 * 1 + 1) * 4
    remote = [first, *out]
    assert [k for k, _ in remote] == [k for k, _ in local] == [f"k{i}" for i in range(40)]
    for (_, a), (_, b) in zip(local, remote, strict=True):
        assert (a.error, a.width, a.height) == (b.error, b.width, b.height)
        assert a.values.keys() == b.values.keys() and all(a.values[n] == b.values[n] for n in a.values)
        if a.error is None:
            np.testing.assert_array_equal(a.pixels["clip"], b.pixels["clip"])
