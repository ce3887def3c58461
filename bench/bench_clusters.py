"""Image-cluster membership at scale: k-means + exact assignment vs straightforward baselines.

Generates ``--n`` synthetic 768-d unit-norm float16 embeddings drawn around random
centres, written as per-shard ``.npy`` files (like the scoring cache) in a temporary
folder by a child process, so this process's peak memory is the clustering's own. Then:

- ours: spherical k-means into ``--k`` centroids trained on ``--max-training-points``
  sampled rows (``filtering.clustering.train_kmeans``), then every row assigned to its
  nearest centroid, shard by shard from memory-mapped files (``assign``);
- baselines on a ``--baseline-n`` subset, extrapolated to ``--n``: numpy
  ``argmax(x @ C.T)`` in 10k-row chunks, and faiss ``IndexFlatIP.search`` (exact fp32);
  and faiss's own ``Kmeans(spherical=True)`` for ``--baseline-iters`` iterations (default:
  as many as ours) on the same training sample: time per iteration and quality (mean
  similarity of the training points to their nearest centroid, higher is better).

Prints wall times, peak RSS (``getrusage``), the ratios, and whether our assignment of
the subset equals numpy's argmax.

``--agreement``: exactness next to speed at DataComp's cluster count instead. ``--agree-n``
embeddings and ``--agree-k`` centroids (768-d, drawn the same clustered way, centroid norms
0.9-1 like L2 k-means means) are assigned by every backend poolsift's auto rule can pick
(faiss, bf16-screen native where the CPU has it, bf16-screen emulated, faiss-gpu where
installed); ``--agree-thin`` draws both near a 3-d subspace instead, where rows have many
near-best centroids (the screens' hard case, and where float32 ties happen) and by the plain float32 argmax DataComp computes (faiss k=1, numpy); each
line gives rows/s and how many rows equal the float64 argmax (ties to the lowest id).

    .venv/bin/python bench/bench_clusters.py                   # 1,000,000 x 768 -> 10,000
    .venv/bin/python bench/bench_clusters.py --n 100000 --k 1000
    .venv/bin/python bench/bench_clusters.py --agreement       # 5,000 rows x 100,000 centroids
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(out: str, n: int, d: int, shard_size: int, centers: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    for i, lo in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - lo)
        x = c[rng.integers(0, centers, m)] + 0.6 / np.sqrt(d) * rng.standard_normal((m, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(Path(out) / f"{i:05d}.image.npy", x.astype(np.float16))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process: with other jobs on the machine, wall time alone misleads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def float64_argmax(x: np.ndarray, centroids: np.ndarray, chunk: int = 250) -> np.ndarray:
    """The float64 argmax of ``x @ centroids.T``; scores within 1e-12 of the best count as
    tied (float64 rounding, not the data) and go to the lowest id."""
    c64 = centroids.astype(np.float64)
    out = np.empty(len(x), np.int64)
    for lo in range(0, len(x), chunk):
        s = x[lo : lo + chunk].astype(np.float64) @ c64.T
        out[lo : lo + chunk] = np.argmax(s >= s.max(axis=1, keepdims=True) - 1e-12, axis=1)
    return out


def agreement(args) -> None:
    from filtering import clustering

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((max(2, args.agree_k // 50), args.d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        if args.agree_thin:  # near a 3-d subspace: many near-best centroids per row
            x = 0.25 / np.sqrt(args.d) * rng.standard_normal((m, args.d), dtype=np.float32)
            x[:, :3] = rng.standard_normal((m, 3))
        else:
            x = centres[rng.integers(0, len(centres), m)] + 0.6 / np.sqrt(args.d) * rng.standard_normal(
                (m, args.d), dtype=np.float32
            )
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    x = draw(args.agree_n).astype(np.float16).astype(np.float32)  # as the pool stores them
    centroids = (draw(args.agree_k) * rng.uniform(0.9, 1.0, (args.agree_k, 1))).astype(np.float32)
    t = time.perf_counter()
    truth = float64_argmax(x, centroids)
    print(
        f"{args.agree_n:,} rows x {args.agree_k:,} centroids, d={args.d}; float64 argmax in {time.perf_counter() - t:.1f} s"
    )

    def faiss_k1():
        import faiss

        index = faiss.IndexFlatIP(args.d)
        index.add(centroids)
        return lambda v: index.search(v, 1)[1][:, 0]

    def numpy_fp32():
        return lambda v: np.concatenate(
            [np.argmax(v[lo : lo + 1000] @ centroids.T, axis=1) for lo in range(0, len(v), 1000)]
        )

    def ours(backend: str, native: bool | None):
        def setup():
            a = clustering.Assigner(centroids, backend)
            a.native_bf16 = native
            a(x[:1])  # builds the index / the bf16 copy of the centroids
            return lambda v: clustering.assign(v, a)[0]

        return setup

    cases = [
        ("faiss IndexFlatIP k=1 (fp32 argmax)", faiss_k1),
        ("numpy fp32 argmax", numpy_fp32),
        ("poolsift faiss", ours("faiss", None)),
    ]
    if clustering.native_bf16():
        cases.append(("poolsift bf16-screen native", ours("bf16-screen", True)))
    cases.append(("poolsift bf16-screen emulated", ours("bf16-screen", False)))
    if clustering.faiss_gpus() > 0:
        cases.append(("poolsift faiss-gpu", ours("faiss-gpu", None)))
    print(f"auto backend here: {clustering.default_backend(args.agree_k)}; timings exclude building the index")
    base = None
    for name, setup in cases:
        fn = setup()
        t, c = time.perf_counter(), cpu_seconds()
        ids = fn(x)
        wall, cpu = time.perf_counter() - t, cpu_seconds() - c
        base = base or cpu
        same = int((ids == truth).sum())
        print(
            f"{name:36s} {args.agree_n / wall:7.0f} rows/s wall, {args.agree_n / cpu:7.0f} rows/CPU-s "
            f"(x{base / cpu:4.2f} vs faiss k=1)  = float64 argmax: {same:,} of {args.agree_n:,}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--k", type=int, default=10_000)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--max-training-points", type=int, default=50_000)
    p.add_argument("--niter", type=int, default=10)
    p.add_argument("--baseline-n", type=int, default=50_000)
    p.add_argument("--baseline-iters", type=int, default=None, help="faiss.Kmeans iterations (default: --niter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--agreement", action="store_true", help="only the exactness-and-speed comparison at --agree-k centroids"
    )
    p.add_argument("--agree-n", type=int, default=5000)
    p.add_argument("--agree-k", type=int, default=100_000)
    p.add_argument(
        "--agree-thin",
        action="store_true",
        help="embeddings and centroids near a 3-d subspace (the screens' hard case)",
    )
    args = p.parse_args()
    if args.agreement:
        agreement(args)
        return

    from filtering import clustering

    tmp = tempfile.mkdtemp(prefix="bench_clusters_")
    try:
        t = time.perf_counter()
        child = mp.get_context("spawn").Process(
            target=generate, args=(tmp, args.n, args.d, args.shard_size, max(2, args.k // 2), args.seed)
        )
        child.start()
        child.join()
        shards = sorted(Path(tmp).glob("*.image.npy"))
        print(
            f"generated {args.n:,} x {args.d} float16 embeddings in {len(shards)} shards "
            f"({sum(s.stat().st_size for s in shards) / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s"
        )
        backend = clustering.default_backend(args.k)
        print(f"assignment backend: {backend}; rss before: {peak_rss_mib():.0f} MiB")

        # --- ours: sample, train, assign everything shard by shard ---
        t0 = time.perf_counter()
        c0 = cpu_seconds()
        arrays = [np.load(s, mmap_mode="r") for s in shards]
        sizes = np.array([len(a) for a in arrays])
        offsets = np.r_[0, np.cumsum(sizes)]
        m = clustering.training_size(args.n, args.k, max_training_points=args.max_training_points)
        rows = clustering.sample_indices(args.n, m, args.seed)
        which = np.searchsorted(offsets, rows, side="right") - 1
        sample = np.concatenate(
            [np.asarray(arrays[s][rows[which == s] - offsets[s]], np.float32) for s in np.unique(which)]
        )
        del arrays
        t1, k1 = time.perf_counter(), cpu_seconds()
        centroids = clustering.train_kmeans(sample, args.k, niter=args.niter, seed=args.seed)
        t2, ours_km_cpu = time.perf_counter(), cpu_seconds() - k1
        assigner = clustering.Assigner(centroids)
        ids = np.empty(args.n, np.int64)
        sims = np.empty(args.n, np.float32)
        for s, path in enumerate(shards):
            emb = np.load(path, mmap_mode="r")
            ids[offsets[s] : offsets[s + 1]], sims[offsets[s] : offsets[s + 1]] = clustering.assign(emb, assigner)
            del emb
        t3 = time.perf_counter()
        ours_total = t3 - t0
        ours_cpu = cpu_seconds() - c0
        ours_rss = peak_rss_mib()
        print(
            f"ours: sample {m:,} rows {t1 - t0:.1f} s, k-means {args.niter} iters {t2 - t1:.1f} s "
            f"({(t2 - t1) / args.niter:.2f} s/iter), assign {args.n:,} rows {t3 - t2:.1f} s; "
            f"total {ours_total:.1f} s wall ({ours_cpu:.0f} CPU s), peak RSS {ours_rss:.0f} MiB"
        )

        # --- baselines on a subset ---
        nb = min(args.baseline_n, args.n)
        sub = np.concatenate([np.load(s)[: args.shard_size] for s in shards[: -(-nb // args.shard_size)]])[:nb]
        sub32 = sub.astype(np.float32)
        t = time.perf_counter()
        ref = np.concatenate([np.argmax(sub32[i : i + 10_000] @ centroids.T, axis=1) for i in range(0, nb, 10_000)])
        t_numpy = time.perf_counter() - t
        t = time.perf_counter()
        f_ids, _ = clustering.assign(sub32, clustering.Assigner(centroids, "faiss"))
        t_faiss = time.perf_counter() - t
        t = time.perf_counter()
        o_ids, _ = clustering.assign(sub, assigner)
        t_ours_sub = time.perf_counter() - t
        scale = args.n / nb
        print(
            f"assign {nb:,} rows: numpy argmax {t_numpy:.1f} s, faiss IndexFlatIP {t_faiss:.1f} s, ours {t_ours_sub:.1f} s; "
            f"ours == numpy argmax: {np.array_equal(o_ids, ref)} (faiss == numpy: {np.array_equal(f_ids, ref)})"
        )
        print(
            f"extrapolated to {args.n:,} rows: numpy {t_numpy * scale:.0f} s, faiss {t_faiss * scale:.0f} s, "
            f"ours {t3 - t2:.0f} s  -> ratio numpy/ours {t_numpy * scale / (t3 - t2):.2f}x, "
            f"faiss/ours {t_faiss * scale / (t3 - t2):.2f}x"
        )

        iters = args.niter if args.baseline_iters is None else args.baseline_iters
        if iters > 0:
            import faiss

            km = faiss.Kmeans(
                args.d,
                args.k,
                niter=iters,
                seed=args.seed,
                spherical=True,
                max_points_per_centroid=1 << 30,
                min_points_per_centroid=1,
                verbose=False,
            )
            t, k1 = time.perf_counter(), cpu_seconds()
            km.train(sample)
            per_iter, cpu_iter = (time.perf_counter() - t) / iters, (cpu_seconds() - k1) / iters
            ours_iter, ours_cpu_iter = (t2 - t1) / args.niter, ours_km_cpu / args.niter
            print(
                f"k-means per iteration on {m:,} points: faiss.Kmeans {per_iter:.2f} s ({cpu_iter:.2f} CPU s), "
                f"ours {ours_iter:.2f} s ({ours_cpu_iter:.2f} CPU s) -> ratio faiss/ours {per_iter / ours_iter:.2f}x wall, "
                f"{cpu_iter / ours_cpu_iter:.2f}x CPU"
            )
            unit = clustering.normalize(sample)
            q_faiss = float(clustering.assign(unit, clustering.normalize(km.centroids))[1].mean())
            q_ours = float(clustering.assign(unit, centroids)[1].mean())
            print(
                f"k-means quality (mean similarity to the nearest centroid, {iters} vs {args.niter} iterations): "
                f"faiss.Kmeans {q_faiss:.5f}, ours {q_ours:.5f}"
            )
        target = "OK" if ours_total <= 300 and ours_rss <= 4096 else "MISSED"
        print(f"target (<= 300 s, <= 4096 MiB): {target}  ({ours_total:.0f} s, {ours_rss:.0f} MiB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
