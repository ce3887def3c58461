"""A first, uncached ``poolsift run`` over a generated WebDataset pool (issue 27): memory and speed.

Generates an img2dataset-like WebDataset pool (``KEY.jpg``, ``KEY.txt``, ``KEY.json``) of
small synthetic JPEGs with bench_scoring.py's generator (smooth random scenes, mixed-length
captions), written once; the smaller pools are the first shards of the largest. Per size
it runs ``poolsift run`` from an empty output folder and cache, so every shard is read,
decoded and scored with the bundled tiny CLIP on the CPU (configs/sample.yaml's model
section), and prints the process tree's wall, CPU, peak summed RSS and PSS
(bench_scale.py's sampler), samples/s and the plan that ran (the manifest's
``execution`` record). With two or more sizes it prints issue 27's memory rule: peak at
the largest size <= 1.2 x peak at the smallest + 16 bytes per kept row.

``--recipe``: ``clip`` (``clip_score: {top_fraction: 0.3}``, the default) or one of
bench_refilter.py's (``basic``; ``issue27``: top_fraction, image_clusters, exact and
perceptual dedup, output.webdataset).

    .venv/bin/python bench/bench_first_run.py --dir /tmp/poolsift-first-run --sizes 50k 200k
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.bench_refilter import RECIPES, print_rules, run_mode  # noqa: E402
from bench.bench_scale import parse_size  # noqa: E402
from bench.bench_scoring import synthetic_shards  # noqa: E402

MODEL = {  # configs/sample.yaml's, on the CPU
    "arch": "poolsift-tiny",
    "pretrained": str(REPO / "sample_data" / "tiny_clip" / "poolsift-tiny.safetensors"),
    "device": "cpu",
    "precision": "auto",
    "batch_size": 256,
}
FIRST_RUN_RECIPES = {"clip": {"filters": [{"clip_score": {"top_fraction": 0.3}}]}, **RECIPES}
IMAGE_SIZE = (64, 64)


def raw_config(shards: str, out: Path, recipe: str) -> dict:
    r = FIRST_RUN_RECIPES[recipe]
    raw = {"input": {"shards": shards}, "model": MODEL, "filters": r["filters"]}
    if "clusters" in r:
        raw["clusters"] = r["clusters"]
    return {**raw, "output": {"dir": str(out), **r.get("output", {})}}


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="the pool and the runs are written under this folder")
    ap.add_argument("--sizes", nargs="+", default=["2k", "8k"], help="samples per run (full: 50k 200k)")
    ap.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: 10,000, at most size/2)")
    ap.add_argument("--recipe", choices=sorted(FIRST_RUN_RECIPES), default="clip", help="the filters")
    args = ap.parse_args()
    work = Path(args.dir)
    sizes = [parse_size(s) for s in args.sizes]
    per_shard = args.shard_size or min(10_000, max(1, min(sizes) // 2))
    t = time.perf_counter()
    urls = synthetic_shards(work / "pool", -(-max(sizes) // per_shard), per_shard, IMAGE_SIZE)
    print(f"pool ready: {len(urls)} shards of {per_shard} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    w, h = IMAGE_SIZE
    results = []
    for size, rows in zip(args.sizes, sizes, strict=True):
        count = -(-rows // per_shard)
        rows = count * per_shard
        pattern = str(work / "pool" / f"{w}x{h}-{per_shard}-{{00000..{count - 1:05d}}}.tar")
        if count == 1:
            pattern = urls[0]
        out = work / f"out-{args.recipe}-{rows}"
        shutil.rmtree(out, ignore_errors=True)  # uncached: no cache, no earlier run
        cfg = work / f"run-{args.recipe}-{rows}.yaml"
        cfg.write_text(yaml.safe_dump(raw_config(pattern, out, args.recipe), sort_keys=False))
        measured, plan = run_mode(cfg, out)
        print(f"{size}: {plan} {measured}", file=sys.stderr)
        if measured is None:
            raise SystemExit(f"{size}: {plan}")
        kept = len(np.load(out / "subset.npy"))
        results.append((size, rows, measured, plan, kept))
        print_table(results, args, per_shard)


def print_table(results, args, per_shard: int) -> None:
    filters = json.dumps(FIRST_RUN_RECIPES[args.recipe]["filters"], separators=(",", ":"))
    print(
        f"\nfirst, uncached run over a generated WebDataset pool ({IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEGs, "
        f"{per_shard} per shard), tiny CLIP on the CPU, recipe {args.recipe} {filters}; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}"
    )
    head = f"{'samples':>7} {'plan':<11}{'wall s':>8}{'cpu s':>8}{'samples/s':>10}"
    print(f"{head}{'peak RSS MB':>13}{'PSS MB':>9}{'B/row':>8}{'kept':>9}")
    for size, rows, (wall, cpu, rss, pss), plan, kept in results:
        print(
            f"{size:>7} {plan:<11}{wall:>8.1f}{cpu:>8.1f}{rows / wall:>10.0f}"
            f"{rss / 1e6:>13.0f}{pss / 1e6:>9.0f}{rss / rows:>8.0f}{kept:>9,}"
        )
    print_rules(results)


if __name__ == "__main__":
    main()
