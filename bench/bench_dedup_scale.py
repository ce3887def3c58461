"""Exact + perceptual dedup over a growing pool: memory of the whole process tree (issue 16).

Generates DataComp-like parquet shards (``--shard-rows`` rows each: uid, sha256, 64-bit
``phash``, ``clip_score`` rounded to 2 decimals so scores tie), with 10% exact copies
(the sha256 of another row), 15% near copies (the phash of another row with 1 to 4 bits
flipped, some of them copies of copies: chains), cached under ``--dir``. Then runs, each
in its own process tree, exact dedup (``keep: highest_clip_score``) and perceptual dedup
(``max_distance: 6``) of the exact survivors, two ways:

- ``in-memory`` (the search as it was before it was partitioned, what the ``dedup``
  filter did inside ``apply``): the driver reads the four columns of every shard, groups
  sha256 strings (``groups.exact_groups``), searches the hashes (``hamming.near_pairs``)
  and applies the survivor rule (``partitioned.components_of``, ``groups.survivors``).
- ``partitioned`` (``filtering/dedup/partitioned.py``): ``--workers`` processes write
  partition spill files per shard and reduce them per partition; the driver holds only
  integer arrays (labels, components, survivors) and, for the survivor rule
  (``groups.survivors``, as the shard plan's dedup phase), each alive row's uid halves and
  score.

Printed per size: wall and CPU seconds (children included), peak RSS of the whole
process tree (sum over its processes, sampled every 20 ms; ``bench_scale.timed``), peak
RSS per row, the growth in bytes per added row between the sizes, the spill files the
partitioned contender wrote (all four steps, counted as each spill folder is removed),
and whether both contenders chose the same survivor for every row (both steps).

    .venv/bin/python bench/bench_dedup_scale.py --dir /tmp/poolsift-dedup-scale --sizes 250k 1M
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.bench_scale import parse_size, timed  # noqa: E402

MAX_DISTANCE = 6


def generate(root: Path, rows: int, shard_rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (root / "done").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    uid_bytes = rng.bytes(16 * rows)
    uids = np.asarray([uid_bytes[16 * k : 16 * k + 16].hex() for k in range(rows)], object)
    sha = rng.integers(0, 2**63, (rows, 4), dtype=np.int64)
    copies = np.flatnonzero(rng.random(rows) < 0.10)
    sha[copies] = sha[rng.integers(0, rows, len(copies))]
    sha_hex = np.asarray([row.tobytes().hex() for row in sha], object)
    phash = rng.integers(0, 2**63, rows, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    near = np.flatnonzero(rng.random(rows) < 0.15)
    src = rng.integers(0, rows, len(near))
    flips = np.zeros(len(near), np.uint64)
    for _ in range(4):
        on = rng.random(len(near)) < 0.6
        flips[on] |= np.uint64(1) << rng.integers(0, 64, int(on.sum())).astype(np.uint64)
    phash[near] = phash[src] ^ flips  # src may itself be a near copy: chains
    score = np.round(rng.random(rows) * 0.4, 2).astype(np.float32)
    for k, lo in enumerate(range(0, rows, shard_rows)):
        hi = min(rows, lo + shard_rows)
        table = pa.table(
            {
                "uid": pa.array(uids[lo:hi], pa.string()),
                "sha256": pa.array(sha_hex[lo:hi], pa.string()),
                "phash": pa.array(phash[lo:hi], pa.uint64()),
                "clip_score": pa.array(score[lo:hi], pa.float32()),
            }
        )
        pq.write_table(table, root / f"{k:05d}.parquet")
    (root / "done").write_text(str(rows))


def shard_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in root.glob("*.parquet"))


def run_in_memory(root: Path, out: Path) -> None:
    """The dedup filter's search as it was: every column of the pool in the driver."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from filtering.dedup import groups
    from filtering.dedup.hamming import near_pairs
    from filtering.dedup.partitioned import components_of
    from filtering.uid import uids_to_u8u8

    table = pa.concat_tables(pq.read_table(p) for p in shard_paths(root))
    n = table.num_rows
    uids_all = table.column("uid").to_numpy(zero_copy_only=False)
    scores_all = table.column("clip_score").to_numpy()
    results = []
    alive = np.ones(n, dtype=bool)
    for method in ("exact", "perceptual"):
        rows = np.flatnonzero(alive)
        rows = rows[np.argsort(np.asarray(uids_all[rows], dtype=str), kind="stable")]
        if method == "exact":
            keys = [table.column("sha256").to_numpy(zero_copy_only=False)[rows]]
            labels = groups.exact_groups(keys)
            _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
            first_of = first[inverse]
            linked = first_of != np.arange(len(rows))
            i, j = first_of[linked], np.flatnonzero(linked)
        else:
            hashes = np.asarray(table.column("phash").to_numpy(), np.uint64)
            i, j = near_pairs(hashes[rows], MAX_DISTANCE)
        u = uids_to_u8u8(uids_all[rows])
        comp = components_of(np.arange(len(rows)), i, j)
        drop, best = groups.survivors(comp, -scores_all[rows].astype(np.float64), u["f0"], u["f1"])
        survivor = np.full(n, -1, np.int64)
        survivor[rows] = rows
        survivor[rows[drop]] = rows[best]
        results.append(survivor)
        alive = survivor == np.arange(n)
    np.savez(out, exact=results[0], perceptual=results[1])


def run_partitioned(root: Path, out: Path, workers: int) -> None:
    """Integer arrays in the driver; the search and the survivor rule per partition."""
    import pyarrow.parquet as pq

    from filtering.dedup import partitioned as pt

    paths = shard_paths(root)
    shards, start = [], 0
    for p in paths:
        rows = pq.ParquetFile(p).metadata.num_rows
        shards.append(pt.ShardKeys(start, rows, path=p))
        start += rows
    n = start
    work = str(out.parent)
    files = count_spill_files(pt)
    import multiprocessing as mp

    from filtering.procpool import ProcessPool

    alive = None
    with ProcessPool(workers, mp_context=mp.get_context("spawn")) as pool:  # one pool for all four steps
        run = dict(workers=workers, work_dir=work, executor=pool)
        for method, settings in (
            ("exact", pt.SearchSettings("exact")),
            ("perceptual", pt.SearchSettings("perceptual", max_distance=MAX_DISTANCE, key_column="phash")),
        ):
            labels, a, b = pt.search_keys(shards, n, settings, **run)
            comp = pt.components_of(labels, a, b, alive)
            del labels, a, b
            survivor = survivors(paths, comp)
            np.save(out.parent / f"{out.stem}-{method}.npy", survivor)
            alive = survivor == np.arange(n)
            del survivor
    (out.parent / f"{out.stem}-files.txt").write_text(str(sum(files)))
    (out.parent / f"{out.stem}.done").write_text("ok")


def survivors(paths: list[str], comp: np.ndarray) -> np.ndarray:
    """Per row its survivor (-1: not alive), by the shard plan's rule (``groups.survivors``)
    over the alive rows' scores and uid halves, read shard by shard: two uint64 and a
    float64 per row in the driver, as ``dedup_phase.py`` holds them."""
    import pyarrow.parquet as pq

    from filtering.dedup import groups
    from filtering.uid import uids_to_u8u8

    his, los, negs = [], [], []
    for p in paths:
        t = pq.read_table(p, columns=["uid", "clip_score"])
        u = uids_to_u8u8(t.column("uid"))
        his.append(u["f0"])
        los.append(u["f1"])
        negs.append(-t.column("clip_score").to_numpy().astype(np.float64))
    rows = np.flatnonzero(comp >= 0)
    hi, lo, neg = (np.concatenate(x)[rows] for x in (his, los, negs))
    drop, best = groups.survivors(comp[rows], neg, hi, lo)
    out = np.full(len(comp), -1, np.int64)
    out[rows] = rows
    out[rows[drop]] = rows[best]
    return out


def count_spill_files(pt) -> list[int]:
    """The files in each spill folder, counted as the search removes it."""
    import os
    import shutil

    counts: list[int] = []
    rmtree = shutil.rmtree

    def counting(path, *args, **kwargs):
        counts.append(sum(len(f) for _, _, f in os.walk(path)))
        rmtree(path, *args, **kwargs)

    pt.shutil = type("counted", (), {"rmtree": staticmethod(counting)})
    return counts


def load(out: Path, contender: str) -> dict[str, np.ndarray]:
    if contender == "in-memory":
        with np.load(out) as z:
            return {k: z[k] for k in ("exact", "perceptual")}
    return {k: np.load(out.parent / f"{out.stem}-{k}.npy") for k in ("exact", "perceptual")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/poolsift-dedup-scale")
    ap.add_argument("--sizes", nargs="+", default=["250k", "1M"])
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--contenders", nargs="+", default=["in-memory", "partitioned"])
    ap.add_argument("--child", nargs=3, metavar=("CONTENDER", "POOL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        contender, pool, out = args.child
        if contender == "in-memory":
            run_in_memory(Path(pool), Path(out))
        else:
            run_partitioned(Path(pool), Path(out), args.workers)
        return
    base = Path(args.dir)
    table = []
    for size in args.sizes:
        rows = parse_size(size)
        pool = base / f"pool-{rows}"
        generate(pool, rows, args.shard_rows)
        results = {}
        for contender in args.contenders:
            out = base / f"result-{rows}-{contender}.npz"
            cmd = [sys.executable, __file__, "--workers", str(args.workers), "--child", contender, str(pool), str(out)]
            (out.parent / f"{out.stem}-files.txt").unlink(missing_ok=True)
            wall, cpu, rss, _pss = timed(cmd)
            results[contender] = load(out, contender)
            files_txt = out.parent / f"{out.stem}-files.txt"
            files = int(files_txt.read_text()) if contender == "partitioned" and files_txt.exists() else None
            table.append((rows, contender, wall, cpu, rss))
            print(
                f"{rows:>9} {contender:<12} wall {wall:6.1f} s  cpu {cpu:6.1f} s  peak RSS {rss / 1e6:7.0f} MB"
                + (f"  spill files {files:,}" if files is not None else ""),
                flush=True,
            )
        if len(results) == 2:
            a, b = results.values()
            same = all(np.array_equal(a[k], b[k]) for k in ("exact", "perceptual"))
            dropped = [int((a[k] >= 0).sum() - (a[k] == np.arange(rows)).sum()) for k in ("exact", "perceptual")]
            print(f"{rows:>9} same survivors: {same} (dropped: exact {dropped[0]:,}, perceptual {dropped[1]:,})")
    print()
    print(f"{'rows':>9} {'contender':<12}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}{'B/row':>7}{'growth B/row':>14}")
    first = {}
    for rows, contender, wall, cpu, rss in table:
        growth = ""
        if contender in first and rows != first[contender][0]:
            r0, m0 = first[contender]
            growth = f"{(rss - m0) / (rows - r0):.0f}"
        first.setdefault(contender, (rows, rss))
        print(f"{rows:>9} {contender:<12}{wall:>8.1f}{cpu:>8.1f}{rss / 1e6:>13.0f}{rss / rows:>7.0f}{growth:>14}")


if __name__ == "__main__":
    main()
