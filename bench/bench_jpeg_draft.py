"""JPEG draft decoding (``model.jpeg_draft: true``, opt-in) against the default full decode.

For each model, on the same photo-like JPEGs of 500 to 2,000 px (generated here: smooth
colour fields at three scales, shapes with sharp edges, sensor-like noise, quality 90,
aspect ratios of photos), side by side:

- decode rate: the decode workers' work per image (decode, perceptual hash, the model's
  resize and crop), one core, in this process, full vs draft;
- end to end: poolsift's ``score_stream`` (one decode worker, fp32) full vs draft;
- scores: draft vs full CLIP scores at fp32: mean and max |d|, the top-30% selection
  overlap, and the lowest cosine between an image's two embeddings.

A JPEG is draft-decoded only when its shorter side is at least twice the model's input,
so how many of the images it touches depends on the model (printed). Real weights are
not available offline: ViT-B-32 (224 px), ViT-L-14 (224 px) and ViT-L-14-336 are open_clip
models with random weights (``torch.manual_seed(0)``); ``tiny`` is the bundled checkpoint
(64 px). Random weights give scores that say how far the pixels move the embeddings, not
how a trained model ranks captions. ViT-L on a CPU costs seconds per image: keep
``--images`` small there.

    .venv/bin/python bench/bench_jpeg_draft.py --models tiny,ViT-B-32 --images 64
    .venv/bin/python bench/bench_jpeg_draft.py --models ViT-L-14,ViT-L-14-336 --images 24
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.bench_scoring import WORDS, compare  # noqa: E402
from filtering.sample.synth import photo_jpeg  # noqa: E402

ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3)


def photo_shard(out: Path, n: int, seed: int = 0) -> str:
    """One shard of ``n`` photo-like JPEGs, the longer side uniform in 500..2,000 px, with
    random captions (cached by name)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"photos-{n}-{seed}.tar"
    if path.exists():
        return str(path)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tf:
        for i in range(n):
            long, aspect = int(rng.integers(500, 2001)), ASPECTS[int(rng.integers(len(ASPECTS)))]
            w, h = (long, max(1, round(long / aspect))) if aspect >= 1 else (max(1, round(long * aspect)), long)
            caption = " ".join(rng.choice(WORDS, rng.integers(3, 20)))
            members = {"jpg": photo_jpeg(rng, w, h), "txt": caption.encode(), "json": json.dumps({"uid": f"{i:032x}"})}
            for ext, data in members.items():
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    tmp.rename(path)
    return str(path)


def decode_rate(images: list[bytes], transform, draft: int | None, repeat: int = 2) -> float:
    """Images per second through the decode workers' per-image work, in this process."""
    from filtering.stages.image_decode import decode_image, reference_plan

    plan = reference_plan(transform, draft)
    decode_image(images[0], plan.required, plan)  # imports, first-call costs
    t0 = time.perf_counter()
    for _ in range(repeat):
        for data in images:
            decode_image(data, plan.required, plan)
    return repeat * len(images) / (time.perf_counter() - t0)


def stream(url: str, clip, batch_size: int, workers: int, draft: int | None) -> tuple[float, np.ndarray, np.ndarray]:
    """poolsift's ``score_stream`` over ``url`` (the run's path: CLIP and phash scorers, decode
    workers): samples/s, the CLIP scores and the unit-norm image embeddings."""
    from filtering.scorers.base import InputInfo
    from filtering.scorers.clip import ClipParams, ClipScorer
    from filtering.scorers.phash import PhashScorer
    from filtering.stages.image_decode import DecodePlan
    from filtering.stages.webdataset import score_stream

    info = InputInfo("webdataset")
    scorer = ClipScorer(ClipParams(arch=clip.info["arch"], precision=clip.precision), info)
    scorer.attach(clip)
    phash = PhashScorer(PhashScorer.Params(), info)
    plan = DecodePlan(draft, [phash], {scorer.name: clip.pil_transform}, required=frozenset({scorer.name, phash.name}))
    scores, images = [], []
    t0 = time.perf_counter()
    for shard in score_stream([url], plan, [scorer], batch_size, workers):
        columns, arrays = shard.results(scorer, len(shard.rows), [])
        scores += columns["clip_score"].to_pylist()
        images.append(np.asarray(arrays["image"], np.float32))
    rate = len(scores) / (time.perf_counter() - t0)
    return rate, np.array(scores, np.float64), np.concatenate(images)


def bench(name: str, url: str, batch_size: int, workers: int) -> None:
    import torch
    from PIL import Image

    from filtering.io.reader import iter_shard
    from filtering.models.clip import load_clip
    from filtering.models.transforms import draft_target

    torch.manual_seed(0)
    if name == "tiny":
        clip = load_clip("poolsift-tiny", str(REPO / "sample_data/tiny_clip/poolsift-tiny.safetensors"), "cpu", "fp32")
    else:
        clip = load_clip(name, None, "cpu", "fp32")
    draft = draft_target(clip.pil_transform)
    images = [s.image for s in iter_shard(url)]
    sizes = [Image.open(io.BytesIO(d)).size for d in images]
    touched = sum(min(s) >= 2 * draft for s in sizes)
    print(
        f"\n== {name} ({draft} px input, {'bundled weights' if name == 'tiny' else 'random weights, seed 0'}): "
        f"{len(images)} JPEGs, {touched} of them at least twice the input (draft-decoded)",
        flush=True,
    )
    full_dec, draft_dec = decode_rate(images, clip.pil_transform, None), decode_rate(images, clip.pil_transform, draft)
    print(
        f"decode per image, one core      full {full_dec:7.1f}/s   draft {draft_dec:7.1f}/s   {draft_dec / full_dec:5.2f}x"
    )
    full_rate, s_full, e_full = stream(url, clip, batch_size, workers, None)
    draft_rate, s_draft, e_draft = stream(url, clip, batch_size, workers, draft)
    print(
        f"score_stream end to end (fp32)  full {full_rate:7.2f}/s   draft {draft_rate:7.2f}/s   "
        f"{draft_rate / full_rate:5.2f}x"
    )
    print(f"draft vs full CLIP scores        {compare(s_draft, s_full)}")
    cos = (e_full.astype(np.float64) * e_draft).sum(1) / (
        np.linalg.norm(e_full, axis=1) * np.linalg.norm(e_draft, axis=1)
    )
    print(f"image embedding cosine           min {cos.min():.4f}  mean {cos.mean():.5f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,ViT-B-32", help="comma-separated: tiny, ViT-B-32, ViT-L-14, ViT-L-14-336")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tmp", default="/tmp/poolsift_bench")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    print(
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    url = photo_shard(Path(args.tmp), args.images)
    for name in args.models.split(","):
        bench(name.strip(), url, args.batch_size, args.workers)
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
