"""The whole CLI run of exact + perceptual dedup on DataComp metadata (issue 16).

Generates DataComp-format parquet shards (``bench_scale.SHARD_ROWS`` rows each, no npz)
whose ``sha256`` repeats (10% exact copies of a random row of the pool, across shards)
and with a uint64 ``phash`` column (15% near copies: another row's hash with up to 4
bits flipped), then runs ``poolsift run`` with ``dedup: exact`` then ``dedup:
perceptual`` (``max_distance: 6``; ``keep: highest_clip_score``), writing every output,
in its own process tree from a fresh output folder (no dedup cache). Prints wall, CPU
and peak RSS of the process tree (``bench_scale.timed``).

    .venv/bin/python bench/bench_dedup_cli.py --dir /tmp/poolsift-dedup-cli --sizes 250k 1M

``--rerun``: then, in the run's output folder, reruns that change only ``keep``
(``smallest_uid`` on every dedup): with the candidate search's cache entries moved away
(it searches again, as before the cache) and with them (it reads them), interleaved
``--repeat`` times; prints both walls, their ratio, and whether ``subset.npy`` agrees.

    .venv/bin/python bench/bench_dedup_cli.py --dir /tmp/poolsift-dedup-cli --sizes 250k 1M --rerun

``--semantic``: ``dedup: {method: semantic, embedding: l14_img}`` (SemDeDup, default
``num_clusters`` about sqrt(N), ``threshold: 0.95``) instead, on the same shards plus an
npz each whose ``l14_img`` (768-d float16, as DataComp's L/14) holds points around 256
topic centres, 10% of them near copies (cosine about 0.999) of another row of their shard.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.bench_datacomp import metadata_table  # noqa: E402
from bench.bench_scale import parse_size, timed, write_shards  # noqa: E402


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a fixed pseudo-random uint64 per row number."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


EMB_DIM = 768


def generate(root: Path, rows: int, seed: int = 0, semantic: bool = False) -> None:
    make = functools.partial(_semantic_shard if semantic else _shard, rows=rows, root=root)
    write_shards(root, rows, make, seed)


def _semantic_shard(rng, s, start, n, rows, root):
    """The exact/perceptual shard, and its npz (written first: the parquet marks the shard done)."""
    topics = np.random.default_rng(12345).standard_normal((256, EMB_DIM)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    x = rng.standard_normal((n, EMB_DIM), dtype=np.float32) * np.float32(0.8 / np.sqrt(EMB_DIM))
    x += topics[rng.integers(0, len(topics), n)]
    near = np.flatnonzero(rng.random(n) < 0.10)
    x[near] = x[rng.integers(0, n, len(near))]
    x[near] += rng.standard_normal((len(near), EMB_DIM), dtype=np.float32) * np.float32(0.04 / np.sqrt(EMB_DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tmp = root / f"{s:08d}.tmp.npz"
    np.savez(tmp, l14_img=x.astype(np.float16))
    tmp.rename(root / f"{s:08d}.npz")
    return _shard(rng, s, start, n, rows)


def _shard(rng, s, start, n, rows, root=None, offset: int = 0):
    """10% exact copies (sha256 of another row) and 15% near copies (phash within a few bits),
    of rows ``0..rows``; the shard's own rows are numbered from ``start + offset``."""
    import pyarrow as pa

    table = metadata_table(rng, n, score_dtype=np.float64, faces=False)
    g = np.arange(start, start + n, dtype=np.uint64) + np.uint64(offset)
    src = g.copy()
    copy = rng.random(n) < 0.10
    src[copy] = rng.integers(0, rows, int(copy.sum())).astype(np.uint64)
    sha = [f"{a:016x}{b:016x}{a:016x}{b:016x}" for a, b in zip(mix(src), mix(src ^ np.uint64(1)), strict=True)]
    near_src = g.copy()
    near = rng.random(n) < 0.15
    near_src[near] = rng.integers(0, rows, int(near.sum())).astype(np.uint64)
    flips = np.zeros(n, np.uint64)
    for _ in range(4):
        on = rng.random(n) < 0.6
        flips[on] |= np.uint64(1) << rng.integers(0, 64, int(on.sum())).astype(np.uint64)
    phash = mix(near_src ^ np.uint64(0xABCDEF)) ^ np.where(near, flips, np.uint64(0))
    table = table.set_column(table.schema.get_field_index("sha256"), "sha256", pa.array(sha, pa.string()))
    table = table.append_column("phash", pa.array(phash, pa.uint64()))
    return table


def config(pool: Path, out: Path, semantic: bool = False, keep: str | None = None) -> str:
    import yaml

    filters = [{"dedup": {"method": "exact"}}, {"dedup": {"method": "perceptual", "max_distance": 6}}]
    if keep is not None:
        for f in filters:
            f["dedup"]["keep"] = keep
    if semantic:
        filters = [{"dedup": {"method": "semantic", "embedding": "l14_img"}}]
    raw = {
        "input": {"datacomp_metadata": str(pool)},
        "filters": filters,
        "output": {"dir": str(out)},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/poolsift-dedup-cli")
    ap.add_argument("--sizes", nargs="+", default=["250k", "1M"])
    ap.add_argument("--semantic", action="store_true", help="semantic dedup on generated embeddings (npz)")
    ap.add_argument("--rerun", action="store_true", help="reruns changing only keep, with and without the search cache")
    ap.add_argument("--repeat", type=int, default=2, help="--rerun: pairs of reruns, interleaved")
    args = ap.parse_args()
    if args.rerun and args.semantic:
        ap.error("--rerun: the semantic search is not cached (its k-means trains on the rows that reach it)")
    base = Path(args.dir)
    table, reruns = [], []
    for size in args.sizes:
        rows = parse_size(size)
        pool = base / (f"pool-{rows}-semantic" if args.semantic else f"pool-{rows}")
        generate(pool, rows, semantic=args.semantic)
        out = base / f"out-{rows}{'-semantic' if args.semantic else ''}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "pipelines.cli", "run", config(pool, out, args.semantic), "--quiet"]
        wall, cpu, rss, pss = timed(cmd)
        manifest = json.loads((out / "manifest.json").read_text())
        plan = manifest["execution"]["plan"]
        table.append((rows, plan, wall, cpu, rss, pss, manifest["counts"]["kept"]))
        print(
            f"{rows:>9} {plan:<10} wall {wall:6.1f} s  cpu {cpu:6.1f} s  peak RSS {rss / 1e6:7.0f} MB (PSS {pss / 1e6:.0f})",
            flush=True,
        )
        if args.rerun:
            reruns.extend(rerun(pool, out, rows, args.repeat))
    print()
    print(f"{'rows':>9} {'plan':<10}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}{'PSS MB':>8}{'B/row':>7}{'kept':>10}")
    for rows, plan, wall, cpu, rss, pss, kept in table:
        print(
            f"{rows:>9} {plan:<10}{wall:>8.1f}{cpu:>8.1f}{rss / 1e6:>13.0f}{pss / 1e6:>8.0f}{rss / rows:>7.0f}{kept:>10}"
        )
    if reruns:
        print()
        print(f"{'rows':>9} {'rerun, keep: smallest_uid':<28}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}")
        for rows, what, wall, cpu, rss in reruns:
            print(f"{rows:>9} {what:<28}{wall:>8.1f}{cpu:>8.1f}{rss / 1e6:>13.0f}")


def rerun(pool: Path, out: Path, rows: int, repeat: int) -> list[tuple]:
    """Reruns in ``out`` that change only ``keep``: without the search's cache entries
    (moved aside) and with them, interleaved; the walls' ratio."""
    cmd = [sys.executable, "-m", "pipelines.cli", "run", config(pool, out, keep="smallest_uid"), "--quiet"]
    aside = out.parent / f"{out.name}-dedup-aside"
    found, walls = [], {"searched": [], "cached": []}
    subsets = set()
    for _ in range(repeat):
        for what in ("searched", "cached"):
            if what == "searched":  # the entries moved away: it searches and writes them again
                aside.mkdir()
                for e in (out / "cache").glob("dedup-*"):
                    e.rename(aside / e.name)
            wall, cpu, rss, _ = timed(cmd)
            shutil.rmtree(aside, ignore_errors=True)
            manifest = json.loads((out / "manifest.json").read_text())
            states = {r["cache"] for r in manifest["stages"]["dedup"].values()}
            assert states == {"computed" if what == "searched" else "reused"}, (what, states)
            subsets.add((out / "subset.npy").read_bytes())
            walls[what].append(wall)
            found.append((rows, what, wall, cpu, rss))
            print(
                f"{rows:>9} rerun {what:<9} wall {wall:6.1f} s  cpu {cpu:6.1f} s  peak RSS {rss / 1e6:7.0f} MB",
                flush=True,
            )
    ratio = min(walls["searched"]) / min(walls["cached"])
    print(
        f"{rows:>9} rerun: searched / cached wall (best of {repeat}) {ratio:.2f}x; same subset.npy: {len(subsets) == 1}"
    )
    return found


if __name__ == "__main__":
    main()
