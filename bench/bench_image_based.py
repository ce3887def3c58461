"""Peak memory of DataComp's image_based baseline (image_clusters) (issue 16).

Generates DataComp-format pools (parquet as ``bench_scale.py`` makes them, plus an npz of
768-d float16 unit ``l14_img`` embeddings per shard of 50,000 rows; cached under
``--dir``), a centroids file (``--clusters`` random unit centroids, as DataComp ships its
own) and a reference set of 1,000 embeddings, then runs, from an empty
output folder (so centroids are loaded, targets found and every shard assigned), per size:

    caption: {min_words: 2, min_chars: 6}, image_clusters, and with --clip clip_score top 30% first

Printed per run: wall and CPU seconds (children included), peak RSS and PSS of the whole
process tree (``bench_scale.timed``), bytes of peak RSS per input row and rows kept.

    .venv/bin/python bench/bench_image_based.py --dir /tmp/poolsift-image-based --sizes 200K 800K
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.bench_datacomp import metadata_table  # noqa: E402
from bench.bench_scale import parse_size, timed, write_shards  # noqa: E402

SHARD_ROWS = 50_000
DIM = 768  # ViT-L/14


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(root: Path, rows: int, seed: int = 0) -> None:
    def shard(rng, s, start, n):
        np.savez(root / f"{s:08d}.npz", l14_img=_unit(rng, n).astype(np.float16))  # before the parquet: it marks done
        return metadata_table(rng, n, score_dtype=np.float64, faces=False)

    write_shards(root, rows, shard, seed, shard_rows=SHARD_ROWS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="pools are generated (once) and runs written under this folder")
    ap.add_argument("--sizes", nargs="+", default=["200K", "800K"])
    ap.add_argument("--clusters", type=int, default=1024, help="centroids in the generated centroids file")
    ap.add_argument("--clip", action="store_true", help="image_based_intersect_clip_score: clip_score top 30%% too")
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    centroids, reference = work / f"centroids-{args.clusters}.npy", work / "reference.npy"
    if not centroids.exists():
        np.save(centroids, _unit(rng, args.clusters))
        np.save(reference, _unit(rng, 1000))
    filters = "  - caption: {min_words: 2, min_chars: 6}\n  - image_clusters: {}\n"
    if args.clip:
        filters = "  - clip_score: {top_fraction: 0.3, field: clip_l14_similarity_score}\n" + filters
    print(
        f"image_based{' x clip_score' if args.clip else ''}, {args.clusters} centroids given, "
        f"{DIM}-d float16 npz; {os.cpu_count()} CPUs"
    )
    print(f"{'rows':>8} {'plan':<10}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}{'PSS MB':>9}{'B/row':>7}{'kept':>9}")
    for size in args.sizes:
        rows = parse_size(size)
        meta = work / f"pool-{rows}"
        generate(meta, rows)
        out = work / f"out-{rows}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = work / f"run-{rows}.yaml"
        cfg.write_text(
            f"input: {{datacomp_metadata: '{meta}'}}\n"
            f"clusters: {{centroids: '{centroids}', reference: '{reference}', embedding: l14_img}}\n"
            f"filters:\n{filters}"
            f"output: {{dir: '{out}'}}\n"
        )
        wall, cpu, rss, pss = timed([sys.executable, "-m", "pipelines.cli", "run", str(cfg), "--quiet"])
        kept = len(np.load(out / "subset.npy"))
        plan = json.loads((out / "manifest.json").read_text())["execution"]["plan"]
        print(
            f"{rows:>8,} {plan:<10}{wall:>8.1f}{cpu:>8.1f}{rss / 1e6:>13,.0f}{pss / 1e6:>9,.0f}"
            f"{rss / rows:>7,.0f}{kept:>9,}  load {os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
