"""Spherical k-means and exact nearest-centroid assignment by inner product.

DataComp's image-based baseline (Gadre et al. 2023, §3.4; ``baselines/apply_filter.py``)
assigns every pool image embedding to the centroid with the largest inner product
(argmax, ties to the lowest id) and keeps the clusters nearest to at least one
ImageNet embedding. This module is that machinery, kept generic (any ``(n, d)``
embeddings, any centroids) so that other steps (semantic dedup) reuse it:

- :func:`assign` / :class:`Assigner`: batched exact argmax of ``x @ centroids.T``.
  faiss ``IndexFlatIP`` (the GPU build when installed and a GPU is present); on CPUs
  with native bf16 (AVX512-BF16 / AMX), a bf16 matmul screens candidates and the
  candidates are rescored in fp32: the screen keeps every centroid within a rigorous
  bound of the bf16 maximum, so the winner is the fp32 argmax, several times faster.
- :func:`train_kmeans`: spherical Lloyd iterations as in faiss's ``Clustering`` (init on
  a seeded sample of the points, means renormalised to unit length, empty clusters
  re-seeded by splitting large ones), each assignment done by :class:`Assigner`.
  Seeded and deterministic on CPU.
- :func:`target_clusters`: the sorted unique argmax centroid of each reference embedding.
- Loaders for centroids and reference embeddings: ``.npy``, or DataComp's torch-saved
  ``.pt`` files (a tensor or numpy array of centroids; a dict with ``image_features``).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable

import numpy as np

from filtering.io.paths import open_file

BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits
FP32_UNIT_ROUNDOFF = 2.0**-24
DEFAULT_BATCH = 4096
MAX_POINTS_PER_CENTROID = 256  # faiss's default cap on training points when none is given
PAIR_CHUNK = 1 << 15  # candidate (row, centroid) pairs rescored at a time
SCREEN_MIN_CENTROIDS = 4096
SCREEN_TOP = 16  # candidates kept per row by the bf16 screen before the full-row fallback


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


def default_backend(k: int = SCREEN_MIN_CENTROIDS) -> str:
    """faiss on a GPU when possible; the bf16 screen on CPUs with native bf16 when there are
    enough centroids for the matmul to dominate (below that faiss's fp32 search is faster)."""
    from filtering.models.clip import cpu_supports_bf16

    if faiss_gpus() > 0:
        return "faiss-gpu"
    return "bf16-screen" if k >= SCREEN_MIN_CENTROIDS and cpu_supports_bf16() else "faiss"


BACKENDS = ("auto", "faiss", "faiss-gpu", "bf16-screen")


class Assigner:
    """Exact argmax inner product of query rows against fixed centroids.

    ``backend``: ``faiss`` (IndexFlatIP, fp32), ``faiss-gpu``, ``bf16-screen`` (bf16 screen
    then fp32 rescoring; exact), or ``auto`` (faiss-gpu, else bf16-screen on CPUs with
    native bf16 for >= 4096 centroids, else faiss). Centroids are used as given (not
    renormalised): DataComp assigns with its published centroids as they are.
    """

    def __init__(self, centroids: np.ndarray, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown assignment backend {backend!r}; choose one of {list(BACKENDS)}")
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if self.centroids.ndim != 2 or len(self.centroids) == 0:
            raise ValueError(f"centroids must be a non-empty (k, d) matrix, got shape {self.centroids.shape}")
        self.k, self.d = self.centroids.shape
        self.backend = default_backend(self.k) if backend == "auto" else backend
        self._index = None
        self._bf16 = None

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64, sims float32)`` for the rows of ``x`` (any float dtype)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"embeddings of shape {x.shape} do not match centroids of dimension {self.d}")
        if len(x) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.backend == "bf16-screen":
            return self._screened(x)
        return self._faiss(x)

    def _faiss(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self._index is None:
            if self.backend == "faiss-gpu":
                self._res = faiss.StandardGpuResources()
                self._index = faiss.GpuIndexFlatIP(self._res, self.d)
            else:
                self._index = faiss.IndexFlatIP(self.d)
            self._index.add(self.centroids)
        sims, ids = self._index.search(x, 1)
        # faiss answers -1 for a row with no finite score (NaN); numpy's argmax says 0.
        return np.maximum(ids[:, 0], 0).astype(np.int64), sims[:, 0].astype(np.float32)

    def _screened(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        if self._bf16 is None:
            self._c32 = torch.from_numpy(self.centroids)
            self._bf16 = self._c32.bfloat16()
            self._cmax = float(np.linalg.norm(self.centroids, axis=1).max())
        n = len(x)
        xt = torch.from_numpy(x)
        if self.k == 1:
            return np.zeros(n, np.int64), (xt @ self._c32[0]).numpy()
        norms = torch.linalg.vector_norm(xt, dim=1)
        with torch.inference_mode():
            approx = xt.bfloat16() @ self._bf16.T
            top = approx.topk(min(SCREEN_TOP, self.k), dim=1)
        # |approx - exact| <= eps * |x| * |c|: inputs rounded to bf16 (2u), the bf16 output
        # (u), fp32 accumulation on both sides (2 d u32). A centroid can only be the fp32
        # argmax if its screened score is within 2 eps of the screened maximum.
        u = BF16_UNIT_ROUNDOFF
        eps = (3 * u + 3 * u * u + 2 * self.d * FP32_UNIT_ROUNDOFF) * self._cmax * norms
        screened = top.values.float()
        threshold = screened[:, 0] - 2 * eps
        candidate = screened >= threshold[:, None]
        zero = norms == 0  # every score is 0: the argmax is centroid 0
        candidate[zero] = False
        # Rows whose candidates may extend past the screen's top list: take the full row.
        # (A copy: a view of the last column would be cleared with it on the next line.)
        overflow = candidate[:, -1].clone() if self.k > SCREEN_TOP else torch.zeros(n, dtype=torch.bool)
        candidate[overflow] = False
        rows, slots = candidate.nonzero(as_tuple=True)
        cols = top.indices[rows, slots]
        if overflow.any():
            rows_ov = overflow.nonzero().flatten()
            full = approx[rows_ov].float() >= threshold[rows_ov][:, None]
            sub_rows, ov_cols = full.nonzero(as_tuple=True)
            rows, cols = torch.cat([rows, rows_ov[sub_rows]]), torch.cat([cols, ov_cols])
            order = torch.argsort(rows, stable=True)
            rows, cols = rows[order], cols[order]
        del approx
        vals = torch.empty(len(rows), dtype=torch.float32)
        for lo in range(0, len(rows), PAIR_CHUNK):
            r, c = rows[lo : lo + PAIR_CHUNK], cols[lo : lo + PAIR_CHUNK]
            vals[lo : lo + PAIR_CHUNK] = (xt[r] * self._c32[c]).sum(dim=1)
        ids = np.zeros(n, np.int64)
        sims = np.zeros(n, np.float32)
        if len(rows):
            rows, cols, vals = rows.numpy(), cols.numpy(), vals.numpy()
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # pairs are grouped by row
            row_max = np.maximum.reduceat(vals, starts)
            is_best = vals == np.repeat(row_max, np.diff(np.r_[starts, len(rows)]))
            ids[rows[starts]] = np.minimum.reduceat(np.where(is_best, cols, self.k), starts)  # ties: lowest id
            sims[rows[starts]] = row_max
        return ids, sims


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
        sums[populated] = np.add.reduceat(data[order], starts, axis=0, dtype=np.float64)
        centroids = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        _split_empty(centroids, counts, rng)
        centroids = normalize(centroids)
        if progress is not None:
            progress(it, float(sims.sum(dtype=np.float64)))
    return centroids


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


def _torch_load(path: str):
    """``torch.load`` without arbitrary unpickling: tensors, dicts, and numpy arrays only."""
    import pickle

    import torch

    with open_file(path) as f:
        data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    # DataComp's centroid files hold a pickled numpy array: allow numpy's array globals only.
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int64", "int32")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


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
        value = _torch_load(path)
        if isinstance(value, dict):
            if dict_key is None or dict_key not in value:
                raise ValueError(f"{path}: expected a {what} tensor{f' or a dict with {dict_key!r}' if dict_key else ''}; found keys {sorted(value)}")
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
