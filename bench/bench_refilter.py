"""Re-filtering a cached WebDataset pool at scale (issues 16 and 27): memory and speed.

Generates WebDataset shards of 10,000 samples (a tiny 8x8 JPEG and a ``.json`` with the
uid, caption, url and original size per sample; about 2 KB of tar per sample), then
writes every shard's caches with synthetic scores through the source stage's own cache
API (``WebDatasetStage.cache`` and ``scorer_cache``: the same fingerprints and source
stamps a scoring run writes), so ``poolsift run`` finds every shard cached and never
loads the model. The smaller pool is the first shards of the larger one (one set of tars
on disk); each size has its own output folder and cache.

Per size it times ``poolsift run`` as a whole process tree (bench_scale.py's sampler:
wall, CPU, peak summed RSS and PSS), writing the subset, subset.npy, the dropped rows and
the manifest, and says which plan ran (the manifest's ``execution`` record). ``--recipe``:

- ``basic``: ``caption: {min_words: 2}``, ``image_size: {min_side: 64}``,
  ``clip_score: {top_fraction: 0.3}``;
- ``issue27``: issue 27's re-filter: ``clip_score: {top_fraction: 0.3}``,
  ``image_clusters`` (32 clusters, the bundled reference set), exact and perceptual
  ``dedup`` and ``output.webdataset`` resharding. The cached columns then carry planted
  copies (``DUP_EVERY``: every 50th row repeats the previous row's image sha256, every
  50th, offset by 25, is its phash with two bits flipped) and random unit image
  embeddings, so dedup and k-means have real work.
- ``head``: a configured scorer and a global step over its column: the bundled watermark
  head (``embedding_head`` over the cached ``image`` embeddings, as
  ``configs/sample_quality.yaml``) and ``score: {column: watermark_score, top_fraction:
  0.5}``; on the streaming plan the scan pass scores (or reads) each shard.

``--column-caches cold`` (the default) removes the column stages' caches (clusters,
dedup search, reference embeddings, the head's scores) before every timed run, so every run does the same
work; ``warm`` makes one untimed run first and times re-filters that read them too.

With two or more sizes it prints issue 27's memory rule: peak at the largest
size <= 1.2 x peak at the smallest + 16 bytes per kept row (for RSS and PSS).

    .venv/bin/python bench/bench_refilter.py --dir /tmp/poolsift-refilter --sizes 250k 1M --recipe issue27
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
ISSUE27_FILTERS = [
    {"clip_score": {"top_fraction": 0.3}},
    {"image_clusters": {}},
    {"dedup": {"method": "exact"}},
    {"dedup": {"method": "perceptual", "max_distance": 4}},
]
RECIPES = {
    "basic": {"filters": FILTERS},
    "issue27": {
        "filters": ISSUE27_FILTERS,
        "clusters": {"num_clusters": 32, "reference": str(REPO / "sample_data" / "reference"), "seed": 0},
        "output": {"webdataset": True},
    },
    "head": {
        "scorers": [
            {
                "embedding_head": {
                    "name": "watermark",
                    "preset": "mlp",
                    "activation": "relu",
                    "output": "sigmoid",
                    "weights": str(REPO / "sample_data" / "heads" / "poolsift-watermark.safetensors"),
                    "embedding": "image",
                }
            }
        ],
        "filters": [{"score": {"column": "watermark_score", "top_fraction": 0.5}}],
    },
}
DUP_EVERY = 50
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
    synthetic, embeddings random unit vectors, planted copies: ``planted``), through the
    source stage's cache API."""
    import pyarrow as pa

    from filtering.stages.img2dataset import source_stamp
    from filtering.stages.webdataset import ROW_SCHEMA
    from pipelines.runner import plan

    stage = plan(cfg, os.path.join(cfg.output.dir, "cache")).source
    by_name = {type(sc).__name__.lower(): sc for sc in stage.scorers}
    clip = next(sc for n, sc in by_name.items() if "clip" in n)
    phash = next(sc for n, sc in by_name.items() if "phash" in n)
    dims = {k: int(d) for k, d in (clip.input.embedding_dims or {}).items()} or {"image": 64, "text": 64}
    for url in stage.urls:
        if not stage.missing(url):
            continue
        s = int(Path(url).stem)
        smp = planted(shard_samples(s, _rows_in(url), seed))
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
                "image_sha256": pa.array(smp["image_sha256"]),
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
        rng = np.random.default_rng([seed, s, 1])
        embeddings = {k: _unit(rng, n, dims.get(k, 64)) for k in clip.embeddings()}
        stage.scorer_cache(clip).write(url, pa.table({"clip_score": smp["clip_score"]}), embeddings, source=stamp)
        stage.cache.write(url, rows, {}, source=stamp)  # last: the shard is complete


def planted(smp: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``smp`` with an image sha256 per row (distinct, from the uid) and planted copies:
    every ``DUP_EVERY``-th row repeats the previous row's sha256 (an exact copy), and every
    ``DUP_EVERY``-th offset by half is the previous row's phash with two bits flipped."""
    import hashlib

    sha = np.array([hashlib.sha256(u.encode()).hexdigest() for u in smp["uid"]])
    exact = np.arange(DUP_EVERY, len(sha), DUP_EVERY)
    sha[exact] = sha[exact - 1]
    phash = smp["phash"].copy()
    near = np.arange(DUP_EVERY + DUP_EVERY // 2, len(phash), DUP_EVERY)
    phash[near] = phash[near - 1] ^ np.uint64(0b101)
    return {**smp, "image_sha256": sha, "phash": phash}


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _rows_in(url: str) -> int:
    with tarfile.open(url) as tf:
        return sum(1 for m in tf if m.name.endswith(".json"))


def raw_config(shards: str, out: Path, filters=FILTERS, recipe: str | None = None) -> dict:
    """The run's config."""
    r = RECIPES[recipe] if recipe else {"filters": filters}
    raw = {"input": {"shards": shards}, "model": MODEL, "filters": r["filters"]}
    for section in ("clusters", "scorers"):
        if section in r:
            raw[section] = r[section]
    raw["output"] = {"dir": str(out), **r.get("output", {})}
    return raw


def config(shards: str, out: Path, filters=FILTERS, recipe: str | None = None):
    from pipelines.config import parse_config

    return parse_config(raw_config(shards, out, filters, recipe))


SOURCE_CACHES = ("source-", "uids-", "scorer-clip-", "scorer-phash-")  # the shard caches a scoring run leaves


def clear_column_caches(cache: Path) -> None:
    """Remove every cache under ``cache`` but the source's and its scorers' (the column
    stages': centroids, clusters, dedup search, reference embeddings, a configured
    scorer's), so each timed run does the same work whichever mode ran before it."""
    for d in cache.iterdir() if cache.is_dir() else ():
        if d.is_dir() and not d.name.startswith(SOURCE_CACHES):
            shutil.rmtree(d)


def run_mode(cfg: Path, out: Path) -> tuple[tuple[float, float, float, float] | None, str]:
    """One ``poolsift run``: (wall, CPU, RSS, PSS) and the plan that ran, or None and why it
    was refused."""
    try:
        measured = timed([sys.executable, "-m", "pipelines.cli", "run", str(cfg), "--quiet"])
    except SystemExit as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return None, lines[-1].removeprefix("poolsift: error: ") if lines else "failed"
    manifest = json.loads((out / "manifest.json").read_text())
    return measured, manifest.get("execution", {}).get("plan", "memory")


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="shards, caches and runs are written under this folder")
    ap.add_argument("--sizes", nargs="+", default=["250k", "1M"])
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="basic", help="the filters (see the docstring)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each size; the fastest is reported")
    ap.add_argument(
        "--column-caches",
        choices=["cold", "warm"],
        default="cold",
        help="cold: every run computes the column stages (clusters, dedup search) from the source's and scorers' "
        "caches; warm: an untimed run first fills their caches",
    )
    args = ap.parse_args()
    work = Path(args.dir)
    sizes = [parse_size(s) for s in args.sizes]
    t = time.perf_counter()
    make_shards(work / "shards", max(sizes))
    print(f"shards ready ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    results = []
    for size, rows in zip(args.sizes, sizes, strict=True):
        pattern = str(work / "shards" / f"{{00000..{-(-rows // SHARD_ROWS) - 1:05d}}}.tar")
        out = work / f"out-{args.recipe}-{rows}"
        t = time.perf_counter()
        write_caches(config(pattern, out, recipe=args.recipe))
        print(f"{size}: caches ready ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        cfg = work / f"run-{args.recipe}-{rows}.yaml"
        cfg.write_text(yaml.safe_dump(raw_config(pattern, out, recipe=args.recipe), sort_keys=False))
        if args.column_caches == "warm" and run_mode(cfg, out)[0] is None:  # untimed: fills the column stages' caches
            raise SystemExit(f"{size}: the untimed run failed")
        runs, plan = [], ""
        for _ in range(args.repeat):
            if args.column_caches == "cold":
                clear_column_caches(out / "cache")
            measured, plan = run_mode(cfg, out)
            print(f"{size}: {plan} {measured}", file=sys.stderr)
            if measured is None:
                raise SystemExit(f"{size}: {plan}")
            runs.append(measured)
        kept = len(np.load(out / "subset.npy"))
        results.append((size, rows, min(runs), plan, kept))
        print_table(results, args)


def print_table(results, args) -> None:
    filters = RECIPES[args.recipe]["filters"]
    names = ", ".join(next(iter(f)) + ("(" + f["dedup"]["method"] + ")" if "dedup" in f else "") for f in filters)
    extra = " + output.webdataset" if RECIPES[args.recipe].get("output", {}).get("webdataset") else ""
    print(
        f"\nre-filter of a cached WebDataset pool, recipe {args.recipe} ({names}{extra}); "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; best of {args.repeat}; "
        f"column-stage caches {args.column_caches}"
    )
    print(f"{'rows':>7} {'plan':<11}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}{'PSS MB':>9}{'B/row':>8}{'kept':>10}")
    for size, rows, (wall, cpu, rss, pss), plan, kept in results:
        print(
            f"{size:>7} {plan:<11}{wall:>8.1f}{cpu:>8.1f}{rss / 1e6:>13.0f}{pss / 1e6:>9.0f}{rss / rows:>8.0f}"
            f"{kept:>10,}"
        )
    print_rules(results)


def print_rules(results) -> None:
    """Issue 27's memory rule for RSS and PSS between the smallest and largest size of
    ``results`` (``(size, rows, (wall, cpu, rss, pss), plan, kept)``), the growth per added
    row (the rule's 1.2x slack hides a few hundred MB at small sizes) and the wall ratio."""
    if len(results) < 2:
        return
    (small_size, small_rows, small, _, _), (large_size, large_rows, large, _, kept) = results[0], results[-1]
    for i, what in ((2, "RSS"), (3, "PSS")):
        print(rule(what, small_size, small[i], large_size, large[i], kept))
        grown = (large[i] - small[i]) / (large_rows - small_rows)
        print(f"  {what} growth: {grown:.0f} B per added row")
    print(f"wall {large_size} / {small_size}: {large[0] / small[0]:.2f}x for {large_rows / small_rows:.1f}x the rows")


def rule(label: str, small_size: str, small: float, large_size: str, large: float, kept: int) -> str:
    """Issue 27's memory rule, met or not: peak(large) <= 1.2 x peak(small) + 16 B x kept rows."""
    limit = 1.2 * small + 16 * kept
    return (
        f"memory rule, {label}: peak at {large_size} {large / 1e6:.0f} MB <= 1.2 x {small / 1e6:.0f} MB (at {small_size})"
        f" + 16 B x {kept:,} kept = {limit / 1e6:.0f} MB: {'met' if large <= limit else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
