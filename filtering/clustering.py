"""Spherical k-means and exact nearest-centroid assignment by inner product.

DataComp's image-based baseline (Gadre et al. 2023, §3.4; ``baselines/apply_filter.py``)
assigns every pool image embedding to the centroid with the largest inner product
(argmax, ties to the lowest id) and keeps the clusters nearest to at least one
ImageNet embedding. This module is that machinery, kept generic (any ``(n, d)``
embeddings, any centroids) so that other steps (semantic dedup) reuse it:

- :func:`assign` / :class:`Assigner`: batched exact argmax of ``x @ centroids.T``: the
  float64 argmax of the float32 inputs, ties to the lowest id, on every backend. A screen
  (faiss ``IndexFlatIP`` in fp32, on the GPU when faiss's GPU build and a GPU are present;
  on CPUs with native bf16 (AVX512-BF16 / AMX) a bf16 matmul, several times faster) keeps
  every centroid within a rigorous error bound of the row's screened maximum, and those
  candidates are rescored in float64.
- :func:`train_kmeans`: spherical Lloyd iterations as in faiss's ``Clustering`` (init on
  a seeded sample of the points, means renormalised to unit length, empty clusters
  re-seeded by splitting large ones), each assignment done by :class:`Assigner`.
  Seeded and deterministic on CPU.
- :func:`target_clusters`: the sorted unique argmax centroid of each reference embedding.
- Loaders for centroids and reference embeddings: ``.npy``, or DataComp's torch-saved
  ``.pt`` files (a tensor or numpy array of centroids; a dict with ``image_features``),
  read by :mod:`filtering.io.safe_pickle`, which runs no code from the file.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable

import numpy as np

from filtering.io.paths import open_file

BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits
TF32_UNIT_ROUNDOFF = 2.0**-11  # 11 significant bits: what a GPU GEMM may round fp32 inputs to
FP32_UNIT_ROUNDOFF = 2.0**-24
DEFAULT_BATCH = 4096
MAX_POINTS_PER_CENTROID = 256  # faiss's default cap on training points when none is given
SCREEN_MIN_CENTROIDS = 4096
SCREEN_TOP = 16  # candidates per row taken from the screen's top list before the full-row fallback
SCREEN_ELEMENTS = 1 << 26  # rows x centroids scored at once by a full-matrix screen (bf16: 128 MiB)
RESCORE_ELEMENTS = 1 << 21  # float64 values gathered at once to rescore candidates (16 MiB)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@functools.cache
def faiss_gpus() -> int:
    """GPUs usable by faiss: > 0 only with the faiss GPU build and a visible GPU."""
    try:
        import faiss
    except ImportError:
        return 0
    if not hasattr(faiss, "GpuIndexFlatIP"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except (AttributeError, RuntimeError):
        return 0


def native_bf16() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    from filtering.models.clip import cpu_supports_bf16

    return cpu_supports_bf16()


def default_backend(k: int = SCREEN_MIN_CENTROIDS) -> str:
    """faiss on a GPU when possible; the bf16 screen on CPUs with native bf16 when there are
    enough centroids for the matmul to dominate (below that faiss's fp32 search is faster)."""
    if faiss_gpus() > 0:
        return "faiss-gpu"
    return "bf16-screen" if k >= SCREEN_MIN_CENTROIDS and native_bf16() else "faiss"


BACKENDS = ("auto", "faiss", "faiss-gpu", "bf16-screen")

# Per backend, the bound on |screened score - exact score| in units of |x| * max|c|:
# fp32 inputs and accumulation: gamma_d <= 2 d u32 (any summation order, FMA or not);
# a GPU GEMM may round the inputs to TF32 (2 u_tf32 + u_tf32^2 < 3 u_tf32), then as fp32;
# bf16: inputs rounded (2u + u^2), the bf16 output rounded (u (1 + 2u + u^2)), fp32 accumulation.
_EPS_UNITS = {
    "faiss": lambda d: 2 * d * FP32_UNIT_ROUNDOFF,
    "faiss-gpu": lambda d: 3 * TF32_UNIT_ROUNDOFF + 2 * d * FP32_UNIT_ROUNDOFF,
    "bf16-screen": lambda d: 3 * BF16_UNIT_ROUNDOFF + 3 * BF16_UNIT_ROUNDOFF**2 + 2 * d * FP32_UNIT_ROUNDOFF,
}


class Assigner:
    """Exact nearest centroid by inner product: the float64 argmax of ``x @ centroids.T``
    over the float32 inputs, ties (equal float64 scores) to the lowest id.

    Every backend screens, then decides in float64. The screen gives approximate scores
    with a rigorous per-row error bound ``eps``: ``faiss`` (IndexFlatIP, fp32, top 16),
    ``faiss-gpu`` (the same on a GPU; bounded as if its GEMM used TF32), ``bf16-screen``
    (a bf16 matmul: native on CPUs with AVX512-BF16/AMX, elsewhere the same rounding
    emulated with an fp32 matmul of the bf16-rounded inputs). Every centroid whose screened
    score is within ``2 eps`` of the row's screened maximum is a candidate (when the top 16
    do not hold them all, the row's full screened scores are thresholded) and candidates
    are rescored in float64, so the answer is the float64 argmax whatever the backend.
    ``auto``: faiss-gpu, else bf16-screen on CPUs with native bf16 for >= 4096 centroids,
    else faiss. Centroids are used as given (not renormalised): DataComp assigns with its
    published centroids as they are. Rows that are all zero get centroid 0 (every score
    is 0), rows with a NaN or infinity get centroid 0 and a NaN similarity.
    """

    def __init__(self, centroids: np.ndarray, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown assignment backend {backend!r}; choose one of {list(BACKENDS)}")
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if self.centroids.ndim != 2 or len(self.centroids) == 0:
            raise ValueError(f"centroids must be a non-empty (k, d) matrix, got shape {self.centroids.shape}")
        if not np.isfinite(self.centroids).all():
            raise ValueError("centroids contain NaN or infinite values")
        self.k, self.d = self.centroids.shape
        self.backend = default_backend(self.k) if backend == "auto" else backend
        # bf16-screen: the CPU's own bf16 matmul, or the emulation (None: decided on first use).
        self.native_bf16: bool | None = None
        self._eps_units = _EPS_UNITS[self.backend](self.d)
        self._cmax = float(np.sqrt(np.einsum("ij,ij->i", self.centroids, self.centroids, dtype=np.float64).max()))
        self._index = None
        self._bf16 = None

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64, sims float32)`` for the rows of ``x`` (any float dtype)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"embeddings of shape {x.shape} do not match centroids of dimension {self.d}")
        n = len(x)
        ids = np.zeros(n, np.int64)
        sims = np.zeros(n, np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
        sims[~np.isfinite(norms)] = np.nan
        live = np.flatnonzero(np.isfinite(norms) & (norms > 0))
        if len(live) < n:
            x = x[live]
        eps = self._eps_units * self._cmax * norms[live]
        step = len(x) if self.backend != "bf16-screen" else max(1, SCREEN_ELEMENTS // self.k)
        for lo in range(0, len(x), step):
            xs = x[lo : lo + step]
            rows, cols = self._candidates(xs, eps[lo : lo + step])
            ids[live[lo : lo + step]], sims[live[lo : lo + step]] = self._rescore(xs, rows, cols)
        return ids, sims

    def _candidates(self, x: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, centroid) pairs, grouped by row, that hold every row's exact argmax."""
        top = min(SCREEN_TOP, self.k)
        if self.backend == "bf16-screen":
            approx = self._bf16_scores(x)
            vals, idx = approx.topk(top, dim=1)
            vals, idx = vals.float().numpy(), idx.numpy()

            def full_rows(r: np.ndarray) -> np.ndarray:
                return approx[r].float().numpy()
        else:
            vals, idx = self._faiss_index().search(x, top)

            def full_rows(r: np.ndarray) -> np.ndarray:
                return x[r] @ self.centroids.T  # fp32 on the CPU: within the same bound

        # The exact argmax j* of a row satisfies screened[j*] >= exact[j*] - eps >=
        # exact[top1] - eps >= screened[top1] - 2 eps, so it passes the threshold.
        threshold = vals[:, 0].astype(np.float64) - 2 * eps
        candidate = vals >= threshold[:, None]
        # Rows whose candidates may extend past the top list take their full row. A copy:
        # a view of the last column would be cleared with the rows on the next line.
        overflow = candidate[:, -1].copy() if self.k > top else np.zeros(len(x), bool)
        candidate[overflow] = False
        rows, slots = np.nonzero(candidate)
        cols = idx[rows, slots]
        over = np.flatnonzero(overflow)
        if len(over):
            more_rows, more_cols = [rows], [cols]
            step = max(1, SCREEN_ELEMENTS // self.k)
            for lo in range(0, len(over), step):
                r = over[lo : lo + step]
                sub, c = np.nonzero(full_rows(r) >= threshold[r, None])
                more_rows.append(r[sub])
                more_cols.append(c)
            rows, cols = np.concatenate(more_rows), np.concatenate(more_cols)
            order = np.argsort(rows, kind="stable")
            rows, cols = rows[order], cols[order]
        return rows, cols.astype(np.int64)

    def _rescore(self, x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float64 scores of the candidate pairs; per row the best, ties to the lowest id."""
        x64 = x.astype(np.float64)
        vals = np.empty(len(rows), np.float64)
        step = max(1, RESCORE_ELEMENTS // self.d)
        for lo in range(0, len(rows), step):
            r, c = rows[lo : lo + step], cols[lo : lo + step]
            vals[lo : lo + step] = np.einsum("ij,ij->i", x64[r], self.centroids[c].astype(np.float64))
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # every row has a candidate: its top 1
        row_max = np.maximum.reduceat(vals, starts)
        is_best = vals == np.repeat(row_max, np.diff(np.r_[starts, len(rows)]))
        best = np.minimum.reduceat(np.where(is_best, cols, self.k), starts)
        return best, row_max.astype(np.float32)

    def _faiss_index(self):
        import faiss

        if self._index is None:
            if self.backend == "faiss-gpu":
                self._res = faiss.StandardGpuResources()
                self._index = faiss.GpuIndexFlatIP(self._res, self.d)
            else:
                self._index = faiss.IndexFlatIP(self.d)
            self._index.add(self.centroids)
        return self._index

    def _bf16_scores(self, x: np.ndarray):
        """``x @ centroids.T`` with both sides rounded to bf16, fp32 accumulation, bf16 out."""
        import torch

        if self._bf16 is None:
            if self.native_bf16 is None:
                self.native_bf16 = native_bf16()
            self._bf16 = torch.from_numpy(self.centroids).bfloat16()
            if not self.native_bf16:
                self._bf16 = self._bf16.float()  # bf16 values held in fp32
        xb = torch.from_numpy(x).bfloat16()
        with torch.inference_mode():
            if self.native_bf16:
                return xb @ self._bf16.T
            # Products of two bf16 values are exact in fp32, so an fp32 matmul of the rounded
            # inputs is the native kernel's arithmetic (up to summation order, inside eps).
            return (xb.float() @ self._bf16.T).bfloat16()


def assign(
    x: np.ndarray, centroids: np.ndarray | Assigner, batch: int = DEFAULT_BATCH, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product for every row of ``x``, ``batch`` rows at a time.

    ``x`` may be a memory-mapped float16 array: only one batch is converted at a time.
    """
    assigner = centroids if isinstance(centroids, Assigner) else Assigner(centroids, backend)
    n = len(x)
    ids = np.empty(n, np.int64)
    sims = np.empty(n, np.float32)
    for lo in range(0, n, batch):
        ids[lo : lo + batch], sims[lo : lo + batch] = assigner(np.asarray(x[lo : lo + batch], dtype=np.float32))
    return ids, sims


def training_size(n: int, k: int, sample_fraction: float | None = None, max_training_points: int | None = None) -> int:
    """How many of ``n`` points train ``k`` centroids.

    ``sample_fraction`` (DataComp's ``sample_ratio``) and ``max_training_points`` both cap
    it; with neither, faiss's default cap of 256 points per centroid applies.
    """
    m = n
    if sample_fraction is not None:
        m = min(m, max(1, math.ceil(n * sample_fraction)))
    if max_training_points is not None:
        m = min(m, max_training_points)
    if sample_fraction is None and max_training_points is None:
        m = min(m, MAX_POINTS_PER_CENTROID * k)
    return m


def sample_indices(n: int, m: int, seed: int) -> np.ndarray:
    """``m`` distinct indices of ``range(n)``, sorted, chosen by ``seed``."""
    if m >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 1]).choice(n, size=m, replace=False))


def train_kmeans(
    x: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    max_training_points: int | None = None,
    sample_fraction: float | None = None,
    backend: str = "auto",
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int, float], None] | None = None,
) -> np.ndarray:
    """Spherical k-means centroids ``(k, d)`` float32, unit norm, of the rows of ``x``.

    Follows faiss's ``Clustering`` with ``spherical=True``: centroids start as ``k``
    distinct training points chosen by ``seed``; each iteration assigns every training
    point to its nearest centroid (inner product), sets each centroid to the mean of its
    points renormalised, and re-seeds an empty centroid by splitting a populated one
    (chosen with probability proportional to its size minus one) into two slightly
    perturbed copies. ``x`` is subsampled first to :func:`training_size` rows.
    ``progress(iteration, objective)`` is called after each iteration (objective: the
    sum of the similarities to the assigned centroids).

    Not ``faiss.Kmeans``: it is faster for the same quality, but seeds differently and so
    changes the bundled sample's cluster outputs (docs/config.md, "clusters"; ``bench/bench_clusters.py``).
    """
    n = len(x)
    m = training_size(n, k, sample_fraction, max_training_points)
    if m < k:
        raise ValueError(f"k-means needs at least num_clusters={k} training points, got {m} (of {n})")
    idx = sample_indices(n, m, seed)
    data = normalize(np.asarray(x[idx]) if m < n else np.asarray(x))
    rng = np.random.default_rng([seed, 2])
    centroids = data[np.sort(rng.choice(m, size=k, replace=False))].copy()
    d = data.shape[1]
    for it in range(niter):
        ids, sims = assign(data, centroids, batch=batch, backend=backend)
        counts = np.bincount(ids, minlength=k)
        order = np.argsort(ids, kind="stable")
        populated = np.flatnonzero(counts)
        starts = np.r_[0, np.cumsum(counts[populated])[:-1]]
        sums = np.zeros((k, d), np.float64)
        sums[populated] = _segment_sums(data, order, starts)
        centroids = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        _split_empty(centroids, counts, rng)
        centroids = normalize(centroids)
        if progress is not None:
            progress(it, float(sims.sum(dtype=np.float64)))
    return centroids


SUM_ROWS = 8192  # training rows gathered at a time for the centroid sums


def _segment_sums(data: np.ndarray, order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``np.add.reduceat(data[order], starts, axis=0, dtype=np.float64)``, the same sums bit
    for bit (each segment is summed alone, row after row), but whole segments of about
    SUM_ROWS rows at a time: the one-shot call holds ``data[order]`` and a float64 copy of
    it (at 64,000 points of 768 dimensions, 590 MB)."""
    n, d = len(order), data.shape[1]
    bounds = np.r_[starts, n]
    out = np.empty((len(starts), d), np.float64)
    i = 0
    while i < len(starts):
        j = max(i + 1, int(np.searchsorted(bounds, bounds[i] + SUM_ROWS, side="right")) - 1)
        j = min(j, len(starts))
        a, b = bounds[i], bounds[j]
        out[i:j] = np.add.reduceat(data[order[a:b]], starts[i:j] - a, axis=0, dtype=np.float64)
        i = j
    return out


def _split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> None:
    """faiss's rule: each empty centroid takes half of a large one, both nudged apart."""
    empty = np.flatnonzero(counts == 0)
    if len(empty) == 0:
        return
    counts = counts.copy()
    fac = np.ones(centroids.shape[1], np.float32)
    fac[::2] += 1 / 1024
    fac[1::2] -= 1 / 1024
    for ci in empty:
        p = np.maximum(counts - 1, 0).astype(np.float64)
        if p.sum() == 0:
            break
        cj = int(rng.choice(len(counts), p=p / p.sum()))
        centroids[ci] = centroids[cj] * fac
        centroids[cj] = centroids[cj] / fac
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]


def target_clusters(reference: np.ndarray, centroids: np.ndarray | Assigner, batch: int = DEFAULT_BATCH) -> np.ndarray:
    """DataComp's target set: the sorted unique nearest centroid of each reference embedding."""
    ids, _ = assign(reference, centroids, batch=batch)
    return np.unique(ids)


# --- loading ------------------------------------------------------------------------


def _to_numpy(value, path: str, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch tensor
        return value.detach().cpu().float().numpy()
    raise ValueError(f"{path}: expected a {what} array or tensor, found {type(value).__name__}")


def _load_matrix(path: str, what: str, dict_key: str | None) -> np.ndarray:
    lower = path.lower()
    if lower.endswith(".npy"):
        with open_file(path) as f:
            arr = np.load(io.BytesIO(f.read()), allow_pickle=False)
    elif lower.endswith((".pt", ".pth")):
        from filtering.io import safe_pickle

        value = safe_pickle.load(path)  # arrays only: no code from the file runs
        if isinstance(value, dict):
            if dict_key is None or dict_key not in value:
                raise ValueError(
                    f"{path}: expected a {what} tensor{f' or a dict with {dict_key!r}' if dict_key else ''}; found keys {sorted(value)}"
                )
            value = value[dict_key]
        arr = _to_numpy(value, path, what)
    else:
        raise ValueError(f"{path}: unsupported {what} file; use .npy or a torch-saved .pt")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{path}: {what} must be a non-empty (n, d) matrix, got shape {arr.shape}")
    return arr


def load_centroids(path: str) -> np.ndarray:
    """Centroids ``(k, d)`` from ``.npy`` or DataComp's torch-saved ``.pt`` (tensor or numpy array)."""
    return _load_matrix(path, "centroids", dict_key="centroids")


def load_reference_embeddings(path: str) -> np.ndarray:
    """Reference embeddings ``(n, d)`` from ``.npy`` or a torch-saved ``.pt``: a tensor, or
    DataComp's dict with an ``image_features`` tensor (``in1k_clip_vit_l14_*.pt``)."""
    return _load_matrix(path, "reference embeddings", dict_key="image_features")
