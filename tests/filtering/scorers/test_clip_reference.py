"""poolsift's CLIP scores are open_clip's own (issue 26).

The reference is open_clip's pipeline as its README runs it: ``create_model_and_transforms``
with the bundled tiny checkpoint, its ``preprocess`` on each image as PIL opens the stored
bytes, ``encode_image`` / ``encode_text`` (padded to the full context) at fp32, and the dot
product of the normalised embeddings. poolsift's scores come from the WebDataset source
stage as a run drives it (``score_local``: decode workers, the rows' and CLIP's caches),
with the shipped ``model:`` defaults apart from ``precision``.

- fp32: equal to the reference (max |d| <= 1e-5) on the bundled sample and on large
  photo-like JPEGs (500 to 2,000 px, several times the model's input, where JPEG draft
  decoding would change the pixels);
- bf16 (forced, whatever the CPU): the top 30% of the sample is the reference's to 99%;
- a cache written with ``model.jpeg_draft: true`` is not reused by a run without it.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from filtering.sample.synth import photo_jpeg

REPO = Path(__file__).resolve().parents[3]
CKPT = REPO / "sample_data/tiny_clip/poolsift-tiny.safetensors"
SAMPLE = [str(REPO / f"sample_data/pool/{i:05d}.tar") for i in range(4)]
TOLERANCE = 1e-5  # fp32: the same arithmetic, so only summation order may differ
MIN_TOP30_OVERLAP_BF16 = 0.99
MAX_ABS_DIFF_BF16 = 0.02

pytestmark = pytest.mark.skipif(not CKPT.is_file(), reason="bundled tiny checkpoint not generated")


# --- open_clip's own pipeline ---------------------------------------------------------


@pytest.fixture(scope="module")
def reference_model():
    import open_clip
    import torch

    open_clip.add_model_config(REPO / "filtering/models/configs")  # poolsift-tiny.json
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("poolsift-tiny", pretrained=str(CKPT))
    return model.eval(), preprocess, open_clip.get_tokenizer("poolsift-tiny")


def _samples(urls: list[str]) -> list[tuple[str, bytes, str]]:
    """(uid, image bytes, caption) of every sample with an image, read with ``tarfile``."""
    out = []
    for url in urls:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for parts in members.values():
            image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            if image is not None and "json" in parts:
                out.append((json.loads(parts["json"])["uid"], image, parts.get("txt", b"").decode("utf-8")))
    return out


def reference_scores(reference_model, urls: list[str], batch: int = 128) -> dict[str, float]:
    """uid -> open_clip's fp32 CLIP score, for every image PIL can open."""
    import torch
    from PIL import Image

    model, preprocess, tokenizer = reference_model
    readable = []
    for uid, data, caption in _samples(urls):
        try:
            readable.append((uid, preprocess(Image.open(io.BytesIO(data))), caption))
        except Exception:  # noqa: BLE001 — an image open_clip cannot read has no reference score
            continue
    scores = {}
    with torch.inference_mode():
        for i in range(0, len(readable), batch):
            uids, images, captions = zip(*readable[i : i + batch], strict=True)
            img = model.encode_image(torch.stack(images))
            txt = model.encode_text(tokenizer(list(captions)))
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            scores.update(zip(uids, (img * txt).sum(-1).tolist(), strict=True))
    return scores


@pytest.fixture(scope="module")
def sample_reference(reference_model) -> dict[str, float]:
    return reference_scores(reference_model, SAMPLE)


# --- poolsift's scoring stage ---------------------------------------------------------


def _config(urls: list[str], out: Path, **model):
    from pipelines.config import parse_config

    return parse_config(
        {
            "input": {"shards": urls},
            "model": {"arch": "poolsift-tiny", "pretrained": str(CKPT), **model},
            "filters": [],
            "output": {"dir": str(out)},
        }
    )


class _CountingLoads:
    """``load_clip``, counting its calls: a rescore loads the model, a cache hit does not."""

    def __init__(self):
        from filtering.models import clip

        self.load, self.calls = clip.load_clip, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.load(*args, **kwargs)


def poolsift_scores(urls: list[str], out: Path, **model) -> dict[str, float]:
    """uid -> poolsift's CLIP score for every readable sample, scored by the source stage
    (what is not cached in ``out``) with the shipped defaults and ``model`` set."""
    from filtering.stages.base import RunContext
    from pipelines.runner import plan

    cfg = _config(urls, out, **model)
    cache = str(out / "cache")
    source = plan(cfg, cache).source
    ctx = RunContext(model=cfg.model, out_dir=str(out), cache_dir=cache, log=lambda msg: None)
    todo = {u: m for u in source.urls if (m := source.missing(u))}
    if todo:
        source.score_local(todo, ctx)
    scores = {}
    for url in source.urls:
        rows = source.cache.read_table(url, ["uid", "error"]).to_pylist()
        clip = source.scorer_cache(source.clip).read_table(url, ["clip_score"]).column("clip_score").to_pylist()
        scores.update((r["uid"], s) for r, s in zip(rows, clip, strict=True) if r["error"] is None)
    return scores


def _compare(ours: dict[str, float], ref: dict[str, float]) -> tuple[float, float]:
    """max |d| and the top-30% overlap of two score sets over the same samples."""
    assert sorted(ours) == sorted(ref)  # the same images readable, none lost
    uids = sorted(ref)
    a = np.array([ours[u] for u in uids], dtype=np.float64)
    b = np.array([ref[u] for u in uids], dtype=np.float64)
    k = int(len(uids) * 0.3)
    overlap = len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k
    return float(np.abs(a - b).max()), overlap


# --- large JPEGs ------------------------------------------------------------------------

SIZES = [(2000, 1500), (1500, 2000), (1280, 960), (1000, 1000), (800, 600), (500, 700)]
CAPTIONS = ["a red circle", "a blue square on grass", "a dog on a beach", "a star", "a city at night", "leaves"]


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory) -> list[str]:
    """One shard of photo-like JPEGs of 500 to 2,000 px with captions and uids."""
    path = tmp_path_factory.mktemp("large") / "00000.tar"
    rng = np.random.default_rng(26)
    with tarfile.open(path, "w") as tf:
        for i, ((w, h), caption) in enumerate(zip(SIZES, CAPTIONS, strict=True)):
            members = {
                "jpg": photo_jpeg(rng, w, h),
                "txt": caption.encode(),
                "json": json.dumps({"uid": f"{i:032x}"}).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return [str(path)]


# --- the tests --------------------------------------------------------------------------


def test_shipped_configs_leave_jpeg_draft_off():
    from pipelines.config import ModelConfig

    assert ModelConfig().jpeg_draft is False
    for path in sorted((REPO / "configs").glob("*.yaml")):
        model = yaml.safe_load(path.read_text()).get("model") or {}
        assert not model.get("jpeg_draft", False), path.name


def test_fp32_scores_equal_open_clip_on_the_sample(tmp_path, sample_reference):
    ref = sample_reference
    ours = poolsift_scores(SAMPLE, tmp_path / "out", precision="fp32")
    assert len(ref) > 900
    max_d, overlap = _compare(ours, ref)
    assert max_d <= TOLERANCE and overlap == 1.0


def test_fp32_scores_equal_open_clip_on_large_jpegs(tmp_path, reference_model, large_jpegs):
    ref = reference_scores(reference_model, large_jpegs)
    assert len(ref) == len(SIZES)
    max_d, _ = _compare(poolsift_scores(large_jpegs, tmp_path / "out", precision="fp32"), ref)
    assert max_d <= TOLERANCE
    # The test sees what draft decoding does: these JPEGs are 8 to 31 times the input.
    draft_d, _ = _compare(poolsift_scores(large_jpegs, tmp_path / "draft", precision="fp32", jpeg_draft=True), ref)
    assert draft_d > 100 * TOLERANCE


def test_bf16_keeps_the_top_30_percent_of_the_sample(tmp_path, sample_reference):
    max_d, overlap = _compare(poolsift_scores(SAMPLE, tmp_path / "out", precision="bf16"), sample_reference)
    assert max_d <= MAX_ABS_DIFF_BF16
    assert overlap >= MIN_TOP30_OVERLAP_BF16


def test_a_draft_cache_is_rescored_by_a_run_without_draft(tmp_path, monkeypatch, reference_model, large_jpegs):
    out = tmp_path / "out"
    loads = _CountingLoads()
    monkeypatch.setattr("filtering.models.clip.load_clip", loads)
    drafted = poolsift_scores(large_jpegs, out, precision="fp32", jpeg_draft=True)
    assert loads.calls == 1
    assert poolsift_scores(large_jpegs, out, precision="fp32", jpeg_draft=True) == drafted
    assert loads.calls == 1  # the same settings: the cache is reused, no model loaded

    full = poolsift_scores(large_jpegs, out, precision="fp32")
    assert loads.calls == 2  # rescored: the model was loaded again
    ref = reference_scores(reference_model, large_jpegs)
    assert _compare(full, ref)[0] <= TOLERANCE
    assert _compare(drafted, ref)[0] > 100 * TOLERANCE
