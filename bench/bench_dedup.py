"""Deduplication at scale: SemDeDup and perceptual near-duplicate search vs brute force.

Two workloads, each timed in its own child process (so peak RSS is the workload's own):

- semantic: ``--n`` synthetic 512-d unit-norm embeddings (float16) drawn around random
  centres, with ``--dup-fraction`` of the rows planted as near copies (cosine ~0.995) of
  others. Ours: SemDeDup as the plan's dedup phase runs it (:func:`semdedup_steps`: the
  steps of ``filtering.dedup.semantic`` in one process: spherical k-means into ~sqrt(n)
  clusters, rows spilled sorted by cluster, then all pairs with cosine >= 0.95 within
  each cluster) plus groups (connected components). Baseline: all pairs with numpy
  (``x @ x.T`` in blocks) on a ``--baseline-n`` subset, also extrapolated (x (n/m)^2).
- perceptual: ``--n`` random 64-bit hashes with planted near pairs (0..k flipped bits).
  Ours: multi-index hashing (``filtering.dedup.hamming.near_pairs``). Baseline: numpy
  all-pairs XOR + popcount on the subset, extrapolated the same way. Library
  alternative, on the same ``--n`` hashes: faiss's own multi-index hashing,
  ``IndexBinaryMultiHash(64, nhash, 64 // nhash)`` with ``nflip = k // nhash`` (exact by
  the same pigeonhole argument) and ``range_search``, over the same distinct values with
  the same repeat handling; its pairs must equal ours.

Prints wall time, peak RSS, recall of the planted pairs (same group), ours on the
subset vs the baseline on the subset (ratio), and whether ours equals the baseline
there (perceptual: exactly; semantic: the pairs found are a subset of the baseline's).

    .venv/bin/python bench/bench_dedup.py                  # 1,000,000 of each
    .venv/bin/python bench/bench_dedup.py --n 100000 --baseline-n 20000
    .venv/bin/python bench/bench_dedup.py --only perceptual --faiss-threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DIM = 512
THRESHOLD = 0.95
MAX_DISTANCE = 8


def make_embeddings(n: int, dup_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x float16 unit-norm, planted source rows, planted copy rows)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 500), DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, DIM), np.float16)
    for lo in range(0, n, 100_000):
        m = min(100_000, n - lo)
        v = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, DIM)).astype(np.float32) / np.sqrt(DIM)
        x[lo : lo + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    k = int(n * dup_fraction)
    copies = rng.choice(n, size=2 * k, replace=False)
    src, dst = copies[:k], copies[k:]
    v = x[src].astype(np.float32) + 0.1 * rng.standard_normal((k, DIM)).astype(np.float32) / np.sqrt(DIM)
    x[dst] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x, src, dst


def make_hashes(n: int, dup_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)
    k = int(n * dup_fraction)
    copies = rng.choice(n, size=2 * k, replace=False)
    src, dst = copies[:k], copies[k:]
    near = h[src].copy()
    flips = rng.integers(0, MAX_DISTANCE + 1, k)
    for f in range(1, MAX_DISTANCE + 1):
        rows = np.flatnonzero(flips >= f)
        # flip a distinct bit per round: bit positions drawn without repeats per row
        bits = (rng.permutation(64 * len(rows)).reshape(len(rows), 64)[:, 0] % 64) if len(rows) else []
        near[rows] ^= np.left_shift(np.uint64(1), np.asarray(bits, np.uint64))
    h[dst] = near
    return h, src, dst


def faiss_near_pairs(hashes: np.ndarray, max_distance: int, nhash: int) -> tuple[np.ndarray, np.ndarray]:
    """``hamming.near_pairs`` with faiss's ``IndexBinaryMultiHash.range_search`` doing the search."""
    import faiss

    uniq, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    rows = np.arange(len(hashes))
    star = rows != first[inverse]
    index = faiss.IndexBinaryMultiHash(64, nhash, 64 // nhash)
    index.nflip = max_distance // nhash
    codes = np.ascontiguousarray(uniq).view(np.uint8).reshape(-1, 8)
    index.add(codes)
    out_i, out_j = [], []
    for lo in range(0, len(codes), 65536):
        lims, _, found = index.range_search(codes[lo : lo + 65536], max_distance + 1)  # faiss: distance < radius
        q = np.repeat(np.arange(lo, lo + len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = q < found
        out_i.append(q[keep])
        out_j.append(found[keep])
    ui, uj = np.concatenate(out_i), np.concatenate(out_j)
    a = np.concatenate([first[inverse][star], first[ui]])
    b = np.concatenate([rows[star], first[uj]])
    return np.minimum(a, b), np.maximum(a, b)


def cpu_seconds() -> float:
    """CPU time of this process, all threads: with other jobs on the machine, wall time alone misleads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def recall(labels: np.ndarray, src: np.ndarray, dst: np.ndarray) -> float:
    return float((labels[src] == labels[dst]).mean()) if len(src) else 1.0


def semdedup_steps(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The steps of the plan's semantic dedup (pipelines/executors/dedup_phase.py:
    ``_semantic_pairs``) in this process, the pool as one shard and one partition."""
    import tempfile

    from filtering.clustering import train_kmeans
    from filtering.dedup import semantic

    n = len(x)
    k = min(semantic.default_num_clusters(n), n)
    m = min(n, semantic.TRAINING_POINTS_PER_CLUSTER * k)
    centroids = train_kmeans(x, k, niter=10, seed=0, max_training_points=m) if k > 1 else None
    rows = np.arange(n)
    with tempfile.TemporaryDirectory(prefix="semdedup-") as spill:
        prefix = f"{spill}/s0"
        sizes = semantic.spill_assigned(x, rows, rows, rows, centroids, k, prefix)
        a, b = semantic.spilled_partition_pairs([prefix], np.flatnonzero(sizes > 1), threshold)
    return np.minimum(a, b), np.maximum(a, b)


def job(kind: str, n: int, m: int, dup_fraction: float, nhash: int = 4, threads: int = 0) -> dict:
    from filtering.dedup import hamming, semantic
    from filtering.dedup.partitioned import components_of

    res: dict = {}
    if kind.startswith("semantic"):
        x, src, dst = make_embeddings(n, dup_fraction)
        if kind == "semantic-baseline":
            x, src, dst = subset(x, src, dst, m)
        t = time.perf_counter()
        if kind == "semantic":
            i, j = semdedup_steps(x, THRESHOLD)
        else:
            i, j = semantic.brute_force_pairs(x, THRESHOLD)
        labels = components_of(np.arange(len(x)), i, j)
        res["seconds"] = time.perf_counter() - t
        if kind == "semantic" and m:
            xs, ss, ds = subset(x, src, dst, m)
            t = time.perf_counter()
            si, sj = semdedup_steps(xs, THRESHOLD)
            components_of(np.arange(len(xs)), si, sj)
            res["subset_seconds"] = time.perf_counter() - t
            res["subset_pairs"] = sorted(map(list, zip(si.tolist(), sj.tolist(), strict=True)))
    else:
        h, src, dst = make_hashes(n, dup_fraction)
        if kind == "perceptual-baseline":
            h, src, dst = subset(h, src, dst, m)
        t, c = time.perf_counter(), cpu_seconds()
        if kind == "perceptual":
            i, j = hamming.near_pairs(h, MAX_DISTANCE)
        elif kind == "perceptual-faiss":
            import faiss

            if threads:
                faiss.omp_set_num_threads(threads)
            res["threads"] = faiss.omp_get_max_threads()
            t, c = time.perf_counter(), cpu_seconds()  # after the import
            i, j = faiss_near_pairs(h, MAX_DISTANCE, nhash)
        else:
            i, j = hamming.brute_force_pairs(h, MAX_DISTANCE)
        labels = components_of(np.arange(len(h)), i, j)
        res["seconds"] = time.perf_counter() - t
        res["cpu_seconds"] = cpu_seconds() - c
        if kind == "perceptual" and m:
            hs, ss, ds = subset(h, src, dst, m)
            t = time.perf_counter()
            si, sj = hamming.near_pairs(hs, MAX_DISTANCE)
            components_of(np.arange(len(hs)), si, sj)
            res["subset_seconds"] = time.perf_counter() - t
            res["subset_pairs"] = sorted(map(list, zip(si.tolist(), sj.tolist(), strict=True)))
    if kind in ("perceptual", "perceptual-faiss"):
        res["digest"] = hashlib.sha256(np.unique(i * n + j).tobytes()).hexdigest()  # the pair set, to compare
    if kind.endswith("baseline"):
        res["subset_pairs"] = sorted(map(list, zip(i.tolist(), j.tolist(), strict=True)))
    res["pairs"] = int(len(i))
    res["dropped"] = int(len(labels) - len(np.unique(labels)))
    res["recall"] = recall(labels, src, dst)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def subset(x, src, dst, m):
    """The first ``m`` rows, keeping only planted pairs wholly inside them."""
    inside = (src < m) & (dst < m)
    return x[:m], src[inside], dst[inside]


def child(kind: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--job",
        kind,
        "--n",
        str(args.n),
        "--baseline-n",
        str(args.baseline_n),
        "--dup-fraction",
        str(args.dup_fraction),
        "--faiss-nhash",
        str(args.faiss_nhash),
        "--faiss-threads",
        str(args.faiss_threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--baseline-n", type=int, default=50_000)
    ap.add_argument("--dup-fraction", type=float, default=0.05)
    ap.add_argument("--only", choices=["semantic", "perceptual"])
    ap.add_argument(
        "--faiss-nhash",
        type=int,
        default=4,
        choices=[2, 4, 8],
        help="faiss substrings (exact when they cover all 64 bits); 4 = 16-bit tables, nflip 2 at k=8",
    )
    ap.add_argument("--faiss-threads", type=int, default=0, help="faiss OpenMP threads (0 = its default, all cores)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        print(
            json.dumps(
                job(
                    args.job,
                    args.n,
                    min(args.baseline_n, args.n),
                    args.dup_fraction,
                    args.faiss_nhash,
                    args.faiss_threads,
                )
            )
        )
        return
    m = min(args.baseline_n, args.n)
    scale = (args.n / m) ** 2
    for kind in ("semantic", "perceptual"):
        if args.only and kind != args.only:
            continue
        ours = child(kind, args)
        base = child(f"{kind}-baseline", args)
        ours_pairs = {tuple(p) for p in ours.pop("subset_pairs")}
        base_pairs = {tuple(p) for p in base.pop("subset_pairs")}
        agree = ours_pairs == base_pairs if kind == "perceptual" else ours_pairs <= base_pairs
        found = len(ours_pairs & base_pairs) / max(1, len(base_pairs))
        what = (
            f"SemDeDup, {DIM}-d, cosine >= {THRESHOLD}"
            if kind == "semantic"
            else f"64-bit hashes, Hamming <= {MAX_DISTANCE}"
        )
        print(f"== {kind} dedup: {args.n:,} items ({what}), {args.dup_fraction:.0%} planted near copies")
        print(
            f"  ours      {args.n:>9,}: {ours['seconds']:8.1f} s   peak RSS {ours['peak_rss_mb']:7.0f} MB   "
            f"planted recall {ours['recall']:.4f}   dropped {ours['dropped']:,}"
        )
        print(f"  ours      {m:>9,}: {ours['subset_seconds']:8.2f} s")
        print(
            f"  baseline  {m:>9,}: {base['seconds']:8.2f} s   peak RSS {base['peak_rss_mb']:7.0f} MB   "
            f"planted recall {base['recall']:.4f}   (all pairs, numpy)"
        )
        print(
            f"  ratio on {m:,}: baseline / ours = {base['seconds'] / ours['subset_seconds']:.1f}x;   "
            f"baseline extrapolated to {args.n:,}: {base['seconds'] * scale:,.0f} s "
            f"= {base['seconds'] * scale / ours['seconds']:.0f}x ours"
        )
        print(
            f"  subset pairs: ours {len(ours_pairs):,}, baseline {len(base_pairs):,}, "
            f"{'identical' if kind == 'perceptual' and agree else 'ours within baseline' if agree else 'MISMATCH'}"
            f" ({found:.1%} of baseline pairs found)"
        )
        if kind == "perceptual":
            lib = child("perceptual-faiss", args)
            same = "identical pairs" if lib["digest"] == ours["digest"] else "PAIRS DIFFER"
            print(f"  ours      {args.n:>9,}: {ours['cpu_seconds']:8.1f} CPU s")
            print(
                f"  faiss     {args.n:>9,}: {lib['seconds']:8.1f} s ({lib['cpu_seconds']:.1f} CPU s)   peak RSS {lib['peak_rss_mb']:7.0f} MB   "
                f"(IndexBinaryMultiHash {args.faiss_nhash}x{64 // args.faiss_nhash} bits, "
                f"nflip {MAX_DISTANCE // args.faiss_nhash}, {lib['threads']} threads; ours: 1 thread)"
            )
            print(
                f"  ratio on {args.n:,}: faiss / ours = {lib['seconds'] / ours['seconds']:.2f}x wall, "
                f"{lib['cpu_seconds'] / ours['cpu_seconds']:.2f}x CPU;   {same}"
            )


if __name__ == "__main__":
    main()
