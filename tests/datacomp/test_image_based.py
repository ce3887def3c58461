"""image_based and image_based ∩ clip_score at DataComp's cluster counts, uid for uid
against DataComp's own logic, through ``poolsift run`` with the presets as a user runs them.

The reference below reimplements ``baselines/apply_filter.py`` (mlfoundations/datacomp
@ 4a8df19) with torch on the CPU, line numbers cited: the ImageNet embeddings are the
concatenated ``image_features`` of five ``torch.load``-ed files, the centroids a numpy
array ``torch.load``-ed and wrapped by ``torch.from_numpy``, both assigned with
``einsum`` + ``argmax`` in float32. Its files are written as DataComp writes them
(``baselines/image_based_clustering.py:213``: ``torch.save(centroids, path,
pickle_protocol=4)``, a float32 numpy array; L2 k-means centroids, so not unit norm) and
poolsift reads them with its restricted unpickler. Both sides run the same language
identifier (a fastText model trained in the test, ``tests/fasttext_lid.py``).

poolsift assigns by the float64 argmax, DataComp by its float32 one: they can differ only
where two centroids' float32 scores tie exactly; the test checks that its pools hold no
such row, so the uid sets must be identical.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.datacomp_pool import _parquets, make_datacomp_edge_pool, run_preset, uids_u8u8

pytestmark = pytest.mark.slow  # runs the CLI

torch = pytest.importorskip("torch")
fasttext = pytest.importorskip("fasttext")

DIM = 32
L14 = "clip_l14_similarity_score"


# --- DataComp's image_based, from baselines/apply_filter.py ------------------------------


def get_centroid_ids(features, centroids, batch_size: int = 1024):
    """``get_centroid_ids_gpu`` (lines 80-108) on the CPU: per batch of 1024 (``baselines.py``
    line 155, the default ``--batch_size``), ``einsum("ik, jk -> ij", features.float(),
    centroids)`` then ``argmax(dim=1)``."""
    labels = torch.zeros(features.shape[0], dtype=torch.long)
    with torch.no_grad():
        for i in range(0, features.shape[0], batch_size):
            similarity = torch.einsum("ik, jk -> ij", features[i : i + batch_size, :].float(), centroids)
            labels[i : i + batch_size] = torch.argmax(similarity, dim=1).long()
    return labels


def caption_filter(df, lang_detect_model) -> np.ndarray:
    """``caption_filter`` (lines 57-77): fastText tokens > 1, characters > 5, fastText English
    (``predict`` on the newline-free list, k=1)."""
    caption_num_words = df.text.apply(lambda x: len(fasttext.tokenize(x)))
    caption_num_chars = df.text.apply(len)
    lang_preds, _ = lang_detect_model.predict([x.replace("\n", " ") for x in df.text.values], k=1)
    fasttext_en = [x[0].replace("__label__", "") == "en" for x in lang_preds]
    mask = np.array(fasttext_en) & (caption_num_words > 1) & (caption_num_chars > 5)
    return mask.to_numpy()


def get_threshold(root, key: str, fraction: float):
    """``get_threshold`` (lines 375-394): the value at ``int(N * fraction)`` of every score
    sorted in descending order (NaN last, counted in N)."""
    import pandas as pd

    df = pd.concat([pd.read_parquet(p, columns=[key]) for p in _parquets(root)])
    n = int(len(df) * fraction)
    return -np.sort(-df[key].values)[n]


def load_uids_with_image_filter(root, centroids_path, in1k_paths, lang_detect_model, fraction=None):
    """``load_uids_with_image_filter`` (lines 506-634) with ``image_filter_helper``
    (lines 111-197) run shard by shard in this process; ``arch="l14"`` and ``fraction``
    as ``baselines.py --name image_based_intersect_clip_score --arch l14 --fraction 0.3``."""
    import pandas as pd

    # lines 537-543: the ImageNet-1k ViT-L/14 embeddings, five files concatenated
    target_embedding = torch.cat([torch.load(p, weights_only=False)["image_features"] for p in in1k_paths], dim=0)
    # lines 547-549: the pool centroids, a numpy array in a torch file
    pool_centroids = torch.from_numpy(torch.load(centroids_path, weights_only=False))
    # lines 551-554: target clusters, the unique nearest centroid of each ImageNet embedding
    target_centroid_ids = torch.unique(get_centroid_ids(target_embedding, pool_centroids))
    threshold = get_threshold(root, L14, fraction) if fraction is not None else None  # lines 568-573
    all_uids = []
    for parquet in _parquets(root):
        # lines 149-162: with an arch, rows at or over the threshold only
        if fraction is not None:
            df = pd.read_parquet(parquet, columns=["uid", "text", L14])
            df_index = df[L14] >= threshold
            df = df[df_index]
        else:
            df = pd.read_parquet(parquet, columns=["uid", "text"])
            df_index = None
        # lines 164-169: the pool's own l14_img embeddings, the same rows
        candidate_embedding = torch.from_numpy(np.load(parquet.with_suffix(".npz"))["l14_img"])
        if df_index is not None:
            candidate_embedding = candidate_embedding[torch.from_numpy(df_index.to_numpy())]
        mask = caption_filter(df, lang_detect_model)  # lines 171-174
        uids = df.uid[mask]
        candidate_centroid_ids = get_centroid_ids(candidate_embedding[torch.from_numpy(mask)], pool_centroids)
        # lines 183-190: keep the uids whose centroid is a target
        centroid_id_to_uids: dict[int, list[str]] = {}
        for uid, label in zip(uids, candidate_centroid_ids, strict=True):
            centroid_id_to_uids.setdefault(label.item(), []).append(uid)
        uids_to_keep = []
        for i in target_centroid_ids:
            if i.item() in centroid_id_to_uids:
                uids_to_keep.extend(centroid_id_to_uids[i.item()])
        all_uids.append(uids_u8u8(uids_to_keep))  # lines 192-197
    uids = np.concatenate(all_uids)
    uids.sort()  # lines 708-709
    return uids


# --- generated pool, centroids and ImageNet stand-in --------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _embeddings(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit vectors close to a 3-d subspace: like CLIP's, they fill a thin part of the
    sphere, so a row has many centroids with nearly its best score (at 8,192 centroids
    about a fifth of the rows have more than 16 inside the bf16 screen's bound)."""
    z = np.concatenate([rng.standard_normal((n, 3)), 0.05 * rng.standard_normal((n, DIM - 3))], axis=1)
    return _unit(z)


@pytest.fixture(scope="module")
def lid(tmp_path_factory):
    from tests.fasttext_lid import train_tiny_lid

    return train_tiny_lid(tmp_path_factory.mktemp("lid") / "tiny_lid.bin")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A pool of 3 x 1,000 rows (edge-case captions, tied and NaN scores, ``l14_img`` from
    :func:`_embeddings`) and ~1,000 "ImageNet" embeddings covering half of the pool's
    region, in five fp16 ``{"image_features": tensor}`` files."""
    root = tmp_path_factory.mktemp("dc")
    metadata = make_datacomp_edge_pool(root / "metadata", shards=3, rows=1000, seed=13)
    rng = np.random.default_rng(13)
    in1k = _embeddings(rng, 2000)
    in1k = in1k[in1k[:, 0] > 0].astype(np.float16)
    in1k_paths = []
    for i, part in enumerate(np.array_split(in1k, 5)):
        in1k_paths.append(root / f"in1k_clip_vit_l14_{i}.pt")
        torch.save({"image_features": torch.from_numpy(part), "labels": torch.arange(len(part))}, in1k_paths[-1])
    for parquet in _parquets(metadata):
        npz = dict(np.load(parquet.with_suffix(".npz")))
        npz["l14_img"] = _embeddings(rng, len(npz["l14_img"])).astype(np.float16)
        np.savez(parquet.with_suffix(".npz"), **npz)
    return root, metadata, len(in1k), in1k_paths


@pytest.fixture(scope="module", params=[8192, 100_000], ids=["8192", "100000"])
def centroids(request, world):
    """DataComp-style centroids: L2 k-means means (norms a little under 1) over the same
    region, saved with ``torch.save(centroids, path, pickle_protocol=4)``."""
    root = world[0]
    k = request.param
    rng = np.random.default_rng(k)
    c = (_embeddings(rng, k) * rng.uniform(0.9, 1.0, (k, 1))).astype(np.float32)
    path = root / f"centroids_{k}.pt"
    torch.save(c, path, pickle_protocol=4)
    return path, c


def _no_float32_ties(metadata, centroids: np.ndarray, in1k_paths) -> None:
    """Where DataComp's float32 argmax and the float64 one could part: exact float32 ties."""
    rows = [np.load(p.with_suffix(".npz"))["l14_img"] for p in _parquets(metadata)]
    rows += [torch.load(p)["image_features"].numpy() for p in in1k_paths]
    x = np.concatenate(rows).astype(np.float32)
    c64 = centroids.astype(np.float64)
    for lo in range(0, len(x), 500):
        s32 = x[lo : lo + 500] @ centroids.T
        s64 = x[lo : lo + 500].astype(np.float64) @ c64.T
        np.testing.assert_array_equal(np.argmax(s32, axis=1), np.argmax(s64, axis=1))


def _run(tmp_path, preset: str, metadata, centroids_path, in1k_paths, lid):
    language = {"image_based.yaml": 1, "image_based_intersect_clip_score.yaml": 2}[preset]
    reference = str(in1k_paths[0]).replace("_0.pt", "_{0..4}.pt")  # the preset's own brace form
    out = tmp_path / "run"
    code, err = run_preset(
        out,
        preset,
        metadata,
        f"clusters.centroids={centroids_path}",
        f"clusters.reference={reference}",
        f"filters[{language}].language.model_path={lid}",
    )
    assert code == 0, err
    return np.load(out / "subset.npy"), json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("fraction", [None, 0.3], ids=["image_based", "image_based_intersect_clip_score"])
def test_image_based_presets_equal_datacomp(tmp_path, world, centroids, lid, fraction):
    _, metadata, n_in1k, in1k_paths = world
    centroids_path, c = centroids
    _no_float32_ties(metadata, c, in1k_paths)
    preset = "image_based.yaml" if fraction is None else "image_based_intersect_clip_score.yaml"
    got, manifest = _run(tmp_path, preset, metadata, centroids_path, in1k_paths, lid)
    expected = load_uids_with_image_filter(
        metadata, centroids_path, in1k_paths, fasttext.load_model(str(lid)), fraction
    )
    assert 50 < len(expected) < 1500  # the clusters and the caption rules both bite
    np.testing.assert_array_equal(got, expected)
    info = manifest["stages"]["clusters"]
    assert info["num_clusters"] == len(c) and info["centroids"] == "loaded" and info["reference"] == "loaded"
    assert info["reference_count"] == n_in1k


def test_a_centroids_file_that_runs_code_is_refused(tmp_path, world, lid):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    _, metadata, _, in1k_paths = world
    bad = tmp_path / "centroids.pt"
    torch.save(Payload(), bad, pickle_protocol=4)
    out = tmp_path / "run"
    code, err = run_preset(
        out,
        "image_based.yaml",
        metadata,
        f"clusters.centroids={bad}",
        f"clusters.reference={in1k_paths[0]}",
        f"filters[1].language.model_path={lid}",
    )
    assert code == 2
    [line] = [ln for ln in err.splitlines() if "error" in ln]
    assert (
        line
        == f"poolsift: error: clusters.centroids: {bad}: refused to load posix.system: only arrays, tensors and plain containers are read"
    )
    assert not (tmp_path / "ran").exists()
