"""Re-filtering a cached WebDataset pool at scale (issue 16): memory of the streaming plan.

Generates WebDataset shards of 10,000 samples (a tiny 8x8 JPEG and a ``.json`` with the
uid, caption, url and original size per sample; about 2 KB of tar per sample), then
writes every shard's caches with synthetic scores through the source stage's own cache
API (``WebDatasetStage.cache`` and ``scorer_cache``: the same fingerprints and source
stamps a scoring run writes), so ``poolsift run`` finds every shard cached and never
loads the model. The smaller pool is the first shards of the larger one (one set of tars
on disk); each size has its own output folder and cache.

Per size and plan it times ``poolsift run`` as a whole process tree (bench_scale.py's
sampler: wall, CPU, peak summed RSS and PSS) with ``caption: {min_words: 2}``,
``image_size: {min_side: 64}`` and ``clip_score: {top_fraction: 0.3}``, writing the
subset, subset.npy, the dropped rows and the manifest, and checks that both plans'
subset.npy are identical.

    .venv/bin/python bench/bench_refilter.py --dir /tmp/poolsift-refilter --sizes 250k 1M
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.bench_scale import parse_size, timed  # noqa: E402

SHARD_ROWS = 10_000
FILTERS = [{"caption": {"min_words": 2}}, {"image_size": {"min_side": 64}}, {"clip_score": {"top_fraction": 0.3}}]
MODEL = {
    "arch": "poolsift-tiny",
    "pretrained": str(REPO / "sample_data" / "tiny_clip" / "poolsift-tiny.safetensors"),
    "device": "cpu",
}
WORDS = np.array(
    [
        "a",
        "photo",
        "of",
        "the",
        "red",
        "dog",
        "cat",
        "on",
        "sea",
        "tree",
        "house",
        "blue",
        "car",
        "in",
        "small",
        "big",
        "old",
    ]
)


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def shard_samples(s: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Shard ``s``'s samples: uids (distinct: the shard number in the high bits), captions,
    original sizes, clip scores (float32, with ties) and phashes."""
    rng = np.random.default_rng([seed, s])
    hi = (np.uint64(s) << np.uint64(40)) | rng.integers(0, 1 << 40, n, dtype=np.uint64)
    lo = rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)
    words = rng.integers(1, 6, n)
    return {
        "uid": np.array([f"{a:016x}{b:016x}" for a, b in zip(hi, lo, strict=True)]),
        "caption": np.array([" ".join(WORDS[(i + np.arange(w)) % len(WORDS)]) for i, w in enumerate(words)]),
        "width": rng.integers(32, 512, n).astype(np.int32),
        "height": rng.integers(32, 512, n).astype(np.int32),
        "clip_score": np.round(rng.normal(0.3, 0.05, n), 3).astype(np.float32),  # rounded: ties
        "phash": rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True),
    }


def make_shards(root: Path, rows: int, shard_rows: int = SHARD_ROWS, seed: int = 0) -> str:
    """The tars (once: existing ones are kept); returns the ``input.shards`` pattern."""
    root.mkdir(parents=True, exist_ok=True)
    jpeg = _jpeg()
    count = -(-rows // shard_rows)
    for s in range(count):
        path = root / f"{s:05d}.tar"
        if path.exists():
            continue
        n = min(shard_rows, rows - s * shard_rows)
        smp = shard_samples(s, n, seed)
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(n):
                key = f"{s:05d}{i:05d}"
                meta = {
                    "uid": str(smp["uid"][i]),
                    "caption": str(smp["caption"][i]),
                    "url": f"https://example.com/{key}.jpg",
                    "original_width": int(smp["width"][i]),
                    "original_height": int(smp["height"][i]),
                }
                _member(tf, f"{key}.jpg", jpeg)
                _member(tf, f"{key}.json", json.dumps(meta).encode())
        tmp.rename(path)
    return str(root / (f"{{00000..{count - 1:05d}}}.tar" if count > 1 else "00000.tar"))


def write_caches(cfg, shard_rows: int = SHARD_ROWS, seed: int = 0) -> None:
    """Every shard's rows, CLIP and phash pieces, as a scoring run would cache them (scores
    synthetic, embeddings zero), through the source stage's cache API."""
    import hashlib

    import pyarrow as pa

    from filtering.stages.img2dataset import source_stamp
    from filtering.stages.webdataset import ROW_SCHEMA
    from pipelines.runner import plan

    stage = plan(cfg, os.path.join(cfg.output.dir, "cache")).source
    clip, phash = stage.scorers[:2]
    image_sha = hashlib.sha256(_jpeg()).hexdigest()
    dims = {k: int(d) for k, d in (clip.input.embedding_dims or {}).items()} or {"image": 64, "text": 64}
    for url in stage.urls:
        if not stage.missing(url):
            continue
        s = int(Path(url).stem)
        smp = shard_samples(s, _rows_in(url), seed)
        n = len(smp["uid"])
        keys = [f"{s:05d}{i:05d}" for i in range(n)]
        null = pa.nulls(n, pa.string())
        rows = pa.table(
            {
                "uid": pa.array(smp["uid"]),
                "key": pa.array(keys),
                "source_shard": pa.array([url] * n),
                "caption": pa.array(smp["caption"]),
                "url": pa.array([f"https://example.com/{k}.jpg" for k in keys]),
                "original_width": pa.array(smp["width"]),
                "original_height": pa.array(smp["height"]),
                "width": pa.array(np.full(n, 8, np.int32)),
                "height": pa.array(np.full(n, 8, np.int32)),
                "sha256": null,
                "image_sha256": pa.array([image_sha] * n),
                "image_ext": pa.array(["jpg"] * n),
                "status": null,
                "error_message": null,
                "exif": null,
                "error": null,
            },
            schema=ROW_SCHEMA,
        )
        stamp = source_stamp(url)
        stage.scorer_cache(phash).write(url, pa.table({"phash": pa.array(smp["phash"])}), {}, source=stamp)
        embeddings = {k: np.zeros((n, dims.get(k, 64)), np.float16) for k in clip.embeddings()}
        stage.scorer_cache(clip).write(url, pa.table({"clip_score": smp["clip_score"]}), embeddings, source=stamp)
        stage.cache.write(url, rows, {}, source=stamp)  # last: the shard is complete


def _rows_in(url: str) -> int:
    with tarfile.open(url) as tf:
        return sum(1 for m in tf if m.name.endswith(".json"))


def raw_config(shards: str, out: Path, mode: str, filters=FILTERS) -> dict:
    return {
        "input": {"shards": shards},
        "model": MODEL,
        "filters": filters,
        "output": {"dir": str(out)},
        "execution": {"mode": mode},
    }


def config(shards: str, out: Path, mode: str, filters=FILTERS):
    from pipelines.config import parse_config

    return parse_config(raw_config(shards, out, mode, filters))


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="shards, caches and runs are written under this folder")
    ap.add_argument("--sizes", nargs="+", default=["250k", "1M"])
    ap.add_argument("--repeat", type=int, default=1, help="runs of each plan, interleaved; the fastest is reported")
    args = ap.parse_args()
    work = Path(args.dir)
    sizes = [parse_size(s) for s in args.sizes]
    t = time.perf_counter()
    make_shards(work / "shards", max(sizes))
    print(f"shards ready ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    results = []
    for size, rows in zip(args.sizes, sizes, strict=True):
        pattern = str(work / "shards" / f"{{00000..{-(-rows // SHARD_ROWS) - 1:05d}}}.tar")
        out = work / f"out-{rows}"
        t = time.perf_counter()
        write_caches(config(pattern, out, "auto"))
        print(f"{size}: caches ready ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        runs: dict[str, list] = {"streaming": [], "memory": []}
        for _ in range(args.repeat):
            for mode in runs:
                cfg = work / f"run-{rows}-{mode}.yaml"
                cfg.write_text(yaml.safe_dump(raw_config(pattern, out, mode), sort_keys=False))
                runs[mode].append(timed([sys.executable, "-m", "pipelines.cli", "run", str(cfg), "--quiet"]))
                shutil.copy(out / "subset.npy", work / f"subset-{rows}-{mode}.npy")
        same = (work / f"subset-{rows}-streaming.npy").read_bytes() == (work / f"subset-{rows}-memory.npy").read_bytes()
        kept = len(np.load(work / f"subset-{rows}-streaming.npy"))
        results.append((size, rows, {m: min(r) for m, r in runs.items()}, same, kept))
        print_table(results, args)


def print_table(results, args) -> None:
    print(
        f"\nre-filter of a cached WebDataset pool ({', '.join(next(iter(f)) for f in FILTERS)} top 30%); "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; best of {args.repeat}"
    )
    print(
        f"{'rows':>7} {'plan':<10}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}{'PSS MB':>9}{'B/row':>7}  same subset.npy"
    )
    for size, rows, best, same, kept in results:
        for mode, (wall, cpu, rss, pss) in best.items():
            print(
                f"{size:>7} {mode:<10}{wall:>8.1f}{cpu:>8.1f}{rss / 1e6:>13.0f}{pss / 1e6:>9.0f}{rss / rows:>7.0f}"
                f"  {same if mode == 'streaming' else ''}"
            )
        print(f"{'':>7} kept {kept:,} rows")
    if len(results) >= 2:
        (_, _, small, _, _), (_, _, large, _, kept) = results[0], results[-1]
        limit = 1.2 * small["streaming"][2] + 16 * kept
        print(
            f"flat memory (streaming): peak {large['streaming'][2] / 1e6:.0f} MB <= 1.2 x {small['streaming'][2] / 1e6:.0f} MB"
            f" + 16 B x {kept:,} kept = {limit / 1e6:.0f} MB: {large['streaming'][2] <= limit}"
        )


if __name__ == "__main__":
    main()
