"""The scoring stage's fast paths give the results of the plain ones, and fail cleanly.

- trimmed text encoding equals open_clip's padded ``encode_text`` (tiny model, ViT-B-32);
- decode workers are gone after an encoder error or a KeyboardInterrupt, and a worker
  that dies is a PoolsiftError, not a hang;
- deferred (CUDA-style) encoding and worker decoding give the in-process results, and a
  model batch never spans two shards;
- DCT-domain JPEG downscaling (``jpeg_draft``, opt-in) only applies to large JPEGs.

bf16 against fp32, and the scores against open_clip's own pipeline, are pinned in
tests/filtering/scorers/test_clip_reference.py.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest

from filtering.errors import PoolsiftError
from filtering.models.transforms import draft_target
from filtering.scorers.base import InputInfo
from filtering.scorers.clip import ClipParams, ClipScorer, encode_text_bucketed, encode_text_trimmed
from filtering.scorers.phash import PhashScorer
from filtering.stages.image_decode import DecodePlan, decode_image, reference_plan
from filtering.stages.webdataset import score_stream

REPO = Path(__file__).resolve().parents[3]
CAPTIONS = [
    "",
    "a dog",
    "a red circle on a blue background",
    "ein roter Kreis auf blauem Hintergrund, gezeichnet mit einem dicken Pinsel",
    " ".join(["word"] * 120),  # longer than any context: truncated, ends at the last position
    "a photo of a cat sitting on a wooden table next to a window at night",
]


@pytest.fixture(scope="module")
def tiny_clip():
    import torch

    from filtering.models.clip import load_clip

    ckpt = REPO / "sample_data/tiny_clip/poolsift-tiny.safetensors"
    torch.manual_seed(0)
    return load_clip("poolsift-tiny", str(ckpt) if ckpt.is_file() else None, "cpu", "fp32")


def _jpeg(rng, w: int, h: int) -> bytes:
    from PIL import Image

    low = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Two shards of 40 small JPEGs with captions; the second holds a corrupt image."""
    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    urls = []
    for s in range(2):
        path = out / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(40):
                image = _jpeg(rng, 96, 80) if (s, i) != (1, 3) else b"\xff\xd8 not a jpeg"
                members = {"jpg": image, "txt": CAPTIONS[i % len(CAPTIONS)].encode(), "json": json.dumps({}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{s}{i:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


# --- trimmed text ------------------------------------------------------------------


def _assert_trimmed_equals_padded(model, tokenizer) -> None:
    import torch
    from torch.nn.functional import normalize

    for captions in (CAPTIONS[:4], CAPTIONS):  # a batch that is trimmed, one that fills the context
        tokens = tokenizer(captions)
        with torch.inference_mode():
            padded = model.encode_text(tokens, normalize=True)
            trimmed = encode_text_trimmed(model, tokens)
        assert trimmed.shape == padded.shape
        torch.testing.assert_close(trimmed, padded, atol=1e-5, rtol=0)
    # Length buckets: 7 groups of 3 captions, each trimmed to its own longest, rows in input order.
    captions = [CAPTIONS[i % len(CAPTIONS)] + " x" * (i % 5) for i in range(21)]
    tokens = tokenizer(captions)
    with torch.inference_mode():
        padded = model.encode_text(tokens, normalize=True)
        bucketed = normalize(encode_text_bucketed(model, tokens, buckets=7, min_rows=3), dim=-1)
    torch.testing.assert_close(bucketed, padded, atol=1e-5, rtol=0)


def test_trimmed_text_equals_padded_on_tiny_model(tiny_clip):
    assert int((tiny_clip.tokenizer(CAPTIONS[:4]) != 0).sum(1).max()) < 30  # really trimmed (context: 32)
    _assert_trimmed_equals_padded(tiny_clip.model, tiny_clip.tokenizer)


def test_trimmed_text_equals_padded_on_vit_b32():
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()  # random weights: no download
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    assert int((tokenizer(CAPTIONS[:4]) != 0).sum(1).max()) < 30  # the short batch really is trimmed
    _assert_trimmed_equals_padded(model, tokenizer)


# --- worker shutdown -----------------------------------------------------------------


def _scorer(clip, cls=ClipScorer) -> ClipScorer:
    """The CLIP scorer on the already loaded tiny model (fp32, CPU)."""
    scorer = cls(ClipParams(arch="poolsift-tiny", device="cpu", precision="fp32"), InputInfo("webdataset"), "model")
    scorer.attach(clip)
    return scorer


def _decode(data: bytes, transform, draft: int | None = None):
    """One image as reference images are decoded (phash and the CLIP transform required)."""
    plan = reference_plan(transform, draft)
    return decode_image(data, plan.required, plan)


def _plan(clip) -> DecodePlan:
    """As the source plans it: CLIP and phash are its own (``required``: a CLIP failure stops the run)."""
    phash = PhashScorer(PhashScorer.Params(), InputInfo("webdataset"))
    return DecodePlan(None, [phash], {"clip": clip.pil_transform}, required=frozenset({"clip", "phash"}))


class _Failing(ClipScorer):
    """The real CLIP scorer, raising ``exc`` on its ``fail_at``-th batch, noting live workers."""

    exc: BaseException | None = None
    fail_at, kill, calls = 2, False, 0

    def submit(self, batch):
        self.calls += 1
        self.worker_pids = getattr(self, "worker_pids", set()) | {p.pid for p in multiprocessing.active_children()}
        if self.kill and self.calls == 1:
            for pid in self.worker_pids:
                os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
        if self.exc is not None and self.calls == self.fail_at:
            raise self.exc
        return super().submit(batch)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("exc", [RuntimeError("model exploded"), KeyboardInterrupt()])
def test_workers_gone_after_scorer_error(tiny_clip, shards, exc):
    scorer = _scorer(tiny_clip, _Failing)
    scorer.exc = exc
    with pytest.raises(type(exc)):
        for _ in score_stream(shards, _plan(tiny_clip), [scorer], 8, 1, chunk=8):
            pass
    assert scorer.worker_pids, "the decode worker should have been running"
    assert multiprocessing.active_children() == []
    assert not any(_alive(p) for p in scorer.worker_pids)


def test_dead_worker_is_a_clear_error(tiny_clip, shards):
    scorer = _scorer(tiny_clip, _Failing)
    scorer.kill = True
    with pytest.raises(PoolsiftError, match="decode worker process died"):
        for _ in score_stream(shards, _plan(tiny_clip), [scorer], 8, 1, chunk=8):
            pass
    assert multiprocessing.active_children() == []


# --- deferred encoding, workers, shard boundaries ---------------------------------------


class _Deferred(ClipScorer):
    """Scores on ``result()``, like the CUDA path whose copies finish later; records batch sizes."""

    def submit(self, batch):
        self.sizes = getattr(self, "sizes", []) + [batch.rows]
        self.outstanding = getattr(self, "outstanding", 0) + 1
        scorer = self

        class Pending:
            def result(self):
                scorer.outstanding -= 1
                return ClipScorer.score(scorer, batch)

        return Pending()


def test_deferred_encoding_and_workers_match_in_process(tiny_clip, shards):
    plain = _scorer(tiny_clip)
    plan = _plan(tiny_clip)
    [phash] = plan.scorers
    ref = list(score_stream(shards, plan, [plain], 16, 0))
    deferred = _scorer(tiny_clip, _Deferred)
    got = list(score_stream(shards, plan, [deferred], 16, 1, chunk=8))
    assert [a.url for a in got] == shards
    # 40 samples per shard, the corrupt one skipped by the model: batches never span shards.
    assert deferred.sizes == [16, 16, 8, 15, 16, 8]
    assert deferred.outstanding == 0
    for a, b in zip(ref, got, strict=True):
        assert [r["key"] for r in a.rows] == [r["key"] for r in b.rows]
        n = len(a.rows)
        (ca, ea), (cb, eb) = a.results(plain, n, []), b.results(deferred, n, [])
        assert ca["clip_score"].equals(cb["clip_score"]) and ca["clip_score"].null_count <= 1
        np.testing.assert_array_equal(ea["image"], eb["image"])
        assert a.results(phash, n, [])[0]["phash"].equals(b.results(phash, n, [])[0]["phash"])
    errors = [r["error"] for r in got[1].rows if r["error"]]
    assert len(errors) == 1 and errors[0].startswith("corrupt_image")


# --- DCT-domain downscaling ------------------------------------------------------------


def test_draft_target_is_the_models_resize(tiny_clip):
    import open_clip

    assert draft_target(tiny_clip.pil_transform) == 64
    _, _, preprocess = open_clip.create_model_and_transforms("poolsift-tiny")
    assert draft_target(preprocess) == 64


def test_draft_decodes_large_jpegs_close_to_full(tiny_clip):
    from PIL import Image

    data = _jpeg(np.random.default_rng(1), 1024, 768)
    full = _decode(data, tiny_clip.pil_transform).pixels["clip"]
    draft = _decode(data, tiny_clip.pil_transform, 64)
    assert (draft.width, draft.height) == (1024, 768)  # original size reported
    draft = draft.pixels["clip"]
    assert draft.shape == full.shape == (64, 64, 3)
    diff = np.abs(draft.astype(int) - full.astype(int))
    assert 0 < diff.mean() < 4.0  # of 255; the effect on scores is in the bench
    # A JPEG under twice the target is decoded at full size: identical pixels.
    small = _jpeg(np.random.default_rng(2), 120, 100)
    np.testing.assert_array_equal(
        _decode(small, tiny_clip.pil_transform, 64).pixels["clip"],
        _decode(small, tiny_clip.pil_transform).pixels["clip"],
    )
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (64, 64))
    assert min(img.size) >= 64  # libjpeg's scale never undershoots the target


def test_contiguous_attention_gives_the_same_embeddings():
    import open_clip
    import torch

    from filtering.models.clip import register_bundled_configs
    from filtering.scorers.clip import contiguous_attention

    register_bundled_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("poolsift-tiny").eval()
    tokens = open_clip.get_tokenizer("poolsift-tiny")(CAPTIONS)
    images = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        before = model.encode_image(images), model.encode_text(tokens)
        contiguous_attention(model)
        patched = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention) and "forward" in vars(m)]
        batch_first = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention) and m.batch_first]
        assert len(patched) == len(batch_first) == len(model.transformer.resblocks)  # the text tower's layers
        after = model.encode_image(images), model.encode_text(tokens)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
