"""``poolsift report`` on a big metadata-only pool vs a straightforward pandas version.

Generates a DataComp-format pool (parquet only, default 2,000,000 rows in 16 shards;
no npz: the report needs no embeddings), runs ``poolsift run`` with DataComp's "CLIP
score (L/14 30%)" baseline (untimed), then times, each as a whole process:

- ``poolsift report DIR``: streams the columns it needs in record batches (fine
  histogram, top-k candidate lists, seeded reservoir, subset.npy membership);
- pandas, straightforward: read the pool's parquet, subset and dropped rows whole, mark
  kept rows with ``isin``, ``np.histogram``, sort for the highest/lowest kept and highest
  dropped, sample failures (what one writes in a notebook).

Prints wall time, CPU time and peak RSS of each process, the ratios, and whether both
count the same kept and dropped rows in the histogram.

    .venv/bin/python bench/bench_report.py                  # full scale
    .venv/bin/python bench/bench_report.py --rows 200000 --shards 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_datacomp import REPO, captions, face_bboxes, hex_strings, timed  # noqa: E402

KEY = "clip_l14_similarity_score"


def generate(root: Path, rows: int, shards: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    sizes = np.full(shards, rows // shards)
    sizes[: rows % shards] += 1
    for s, n in enumerate(sizes):
        rng = np.random.default_rng([seed, s])
        l14 = rng.normal(0.28, 0.05, n).astype(np.float32)
        pq.write_table(
            pa.table(
                {
                    "uid": hex_strings(rng.integers(0, 256, (n, 16), dtype=np.uint8)),
                    "text": captions(rng, n),
                    "original_width": pa.array(rng.integers(64, 4000, n)),
                    "original_height": pa.array(rng.integers(64, 4000, n)),
                    "clip_b32_similarity_score": pa.array(
                        np.round(l14 * 0.9 + rng.normal(0, 0.02, n).astype(np.float32), 4)
                    ),
                    KEY: pa.array(np.round(l14, 4)),
                    "face_bboxes": face_bboxes(rng, n),
                    "sha256": hex_strings(rng.integers(0, 256, (n, 32), dtype=np.uint8)),
                }
            ),
            root / f"{s:08d}.parquet",
        )


PANDAS = """
import glob, json, sys
import numpy as np, pandas as pd
meta, out, key = sys.argv[1], sys.argv[2], sys.argv[3]
pool = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(meta + "/*.parquet"))], ignore_index=True)
subset = pd.read_parquet(out + "/subset")
dropped = pd.read_parquet(out + "/dropped")
pool["kept"] = pool["uid"].isin(subset["uid"])
edges = np.linspace(pool[key].min(), pool[key].max(), 61)
hk, _ = np.histogram(pool.loc[pool["kept"], key], edges)
hd, _ = np.histogram(pool.loc[~pool["kept"], key], edges)
ranked = pool.sort_values(key, ascending=False)
best = ranked[ranked["kept"]].head(12)
weakest = ranked[ranked["kept"]].tail(12)
below = ranked[~ranked["kept"]].head(12)
failures = dropped[dropped["filter"] == "failed"].sample(frac=1, random_state=0).head(12)
print(json.dumps({"kept": int(hk.sum()), "dropped": int(hd.sum())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="poolsift-bench-report-", dir=args.tmp))
    meta, out = work / "metadata", work / "run"
    try:
        t = time.perf_counter()
        generate(meta, args.rows, args.shards)
        cfg = work / "bench.yaml"
        cfg.write_text(
            f"input: {{datacomp_metadata: '{meta}'}}\n"
            f"filters:\n  - clip_score: {{top_fraction: 0.3, field: {KEY}}}\n"
            f"output: {{dir: '{out}'}}\n"
        )
        timed([sys.executable, "-m", "pipelines.cli", "run", str(cfg), "--quiet"])
        print(f"pool of {args.rows:,} rows generated and filtered in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        for p in meta.glob("*.parquet"):
            p.read_bytes()  # warm the page cache for both contenders
        results = {
            "poolsift report": timed([sys.executable, "-m", "pipelines.cli", "report", str(out)]),
            "pandas, whole tables": timed([sys.executable, "-c", PANDAS, str(meta), str(out), KEY]),
        }
        from filtering.report import gather

        data = gather(str(out))
        ours = {"kept": int(data.histogram.kept.sum()), "dropped": int(data.histogram.dropped.sum())}
        import subprocess

        theirs = json.loads(
            subprocess.run(
                [sys.executable, "-c", PANDAS, str(meta), str(out), KEY],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        base_wall, base_cpu, base_rss = results["poolsift report"]
        print(
            f"\nreport of a DataComp-format pool: {args.rows:,} rows, {args.shards} shards; "
            f"report.html {(out / 'report.html').stat().st_size / 1024:.0f} KiB"
        )
        print(f"{'':<22}{'wall s':>9}{'cpu s':>9}{'peak RSS MiB':>15}{'wall vs ours':>14}{'RSS vs ours':>13}")
        for name, (wall, cpu, rss) in results.items():
            print(f"{name:<22}{wall:>9.2f}{cpu:>9.2f}{rss:>15.0f}{wall / base_wall:>13.2f}x{rss / base_rss:>12.2f}x")
        print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(
            f"histogram rows kept/dropped: poolsift {ours['kept']:,}/{ours['dropped']:,}, "
            f"pandas {theirs['kept']:,}/{theirs['dropped']:,}; equal: {ours == theirs}"
        )
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
