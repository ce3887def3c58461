"""A small pool in DataComp's metadata layout, and DataComp's selection rules in plain numpy.

The pool mirrors what DataComp ships (``NNNNNNNN.parquet`` + ``NNNNNNNN.npz`` per shard);
the reference functions follow DataComp's ``baselines/apply_filter.py`` line by line
(pandas reads, ``-np.sort(-scores)[int(N * f)]``, ``int(uid, 16)`` per row), so tests
compare poolsift against DataComp's own arithmetic, not against poolsift's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filtering.sample.datacomp import write_shard

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "small",
    "red",
    "blue",
    "dog",
    "cat",
    "car",
    "tree",
    "house",
    "on",
    "in",
    "with",
    "at",
    "night",
    "beach",
    "city",
    "old",
    "new",
]


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def make_datacomp_pool(
    root: Path, shards: int = 3, rows: int = 120, seed: int = 0, with_key: bool = True, dims=(16, 24)
) -> Path:
    """Write ``shards`` shards of ``rows`` rows under ``root`` (the layout by the library's
    :func:`filtering.sample.datacomp.write_shard`, the values drawn here for the tests:
    small embeddings, captions of 1-7 words, scores rounded to 0.01 so that many samples
    tie, including at every top-fraction threshold). ``poolsift make-sample --datacomp``
    writes a pool with DataComp's own embedding sizes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    b32_dim, l14_dim = dims
    for s in range(shards):
        n = rows + s  # uneven shard sizes
        halves = rng.integers(0, 2**64, size=(n, 2), dtype=np.uint64).tolist()  # high bits set too
        uids = [f"{hi:016x}{lo:016x}" for hi, lo in halves]
        text = [" ".join(rng.choice(WORDS, size=rng.integers(1, 8))) for _ in range(n)]
        faces = [[[float(x) for x in rng.random(4)] for _ in range(rng.integers(0, 3))] for _ in range(n)]
        cols = {
            "uid": pa.array(uids, pa.string()),
            "url": pa.array([f"https://example.com/{s}/{i}.jpg" for i in range(n)], pa.string()),
            "text": pa.array(text, pa.string()),
            "original_width": pa.array(rng.integers(50, 2000, n), pa.int64()),
            "original_height": pa.array(rng.integers(50, 2000, n), pa.int64()),
            # b32 in float32 and l14 in float64: thresholds must hold in either native dtype
            "clip_b32_similarity_score": pa.array(np.round(rng.uniform(0.1, 0.4, n), 2).astype(np.float32)),
            "clip_l14_similarity_score": pa.array(np.round(rng.uniform(0.1, 0.4, n), 2)),
            "face_bboxes": pa.array(faces, pa.list_(pa.list_(pa.float64()))),
            "sha256": pa.array([f"{rng.integers(0, 2**63):064x}" for _ in range(n)], pa.string()),
        }
        if with_key:
            cols["key"] = pa.array([f"{s:04d}{i:05d}" for i in range(n)], pa.string())
        embeddings = {
            "b32_img": _unit(rng, n, b32_dim),
            "b32_txt": _unit(rng, n, b32_dim),
            "l14_img": _unit(rng, n, l14_dim),
            "l14_txt": _unit(rng, n, l14_dim),
        }
        write_shard(root, s, pa.table(cols), embeddings)
    return root


def _parquets(root: Path) -> list[Path]:
    return sorted(root.glob("*.parquet"))


def uids_u8u8(uids) -> np.ndarray:
    """DataComp's uid conversion, one Python int per row."""
    return np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))


def datacomp_threshold(root: Path, key: str, fraction: float):
    """``get_threshold``: the value at ``int(N * fraction)`` of all scores sorted descending."""
    import pandas as pd

    df = pd.concat([pd.read_parquet(p, columns=[key]) for p in _parquets(root)])
    n = int(len(df) * fraction)
    return -np.sort(-df[key].values)[n]


def datacomp_clip_score_uids(root: Path, key: str, threshold=None, fraction=None) -> np.ndarray:
    """``load_uids_with_clip_score``: keep ``score >= threshold``; sorted ``u8,u8`` uids."""
    import pandas as pd

    if threshold is None:
        threshold = datacomp_threshold(root, key, fraction)
    parts = []
    for p in _parquets(root):
        df = pd.read_parquet(p, columns=["uid", key])
        parts.append(uids_u8u8(df[df[key] >= threshold]["uid"].values))
    uids = np.concatenate(parts)
    uids.sort()
    return uids


def datacomp_image_cluster_uids(root: Path, centroids: np.ndarray, reference: np.ndarray, key: str, fraction: float):
    """``load_uids_with_image_filter`` (with ``arch``/``fraction``, without its fastText
    caption pre-filter): target clusters = unique argmax of reference @ centroids; per
    shard, rows over the CLIP-score threshold, nearest centroid of their ``l14_img``
    embedding by inner product in float32, kept when it is a target."""
    import pandas as pd

    centroids = centroids.astype(np.float32)
    targets = np.unique(np.argmax(reference.astype(np.float32) @ centroids.T, axis=1))
    threshold = datacomp_threshold(root, key, fraction)
    parts = []
    for p in _parquets(root):
        df = pd.read_parquet(p, columns=["uid", "text", key])
        index = (df[key] >= threshold).values
        emb = np.load(p.with_suffix(".npz"))["l14_img"][index].astype(np.float32)
        labels = np.argmax(emb @ centroids.T, axis=1)
        parts.append(uids_u8u8(df.uid[index].values[np.isin(labels, targets)]))
    uids = np.concatenate(parts)
    uids.sort()
    return uids


def set_captions(root: Path, captions) -> None:
    """Replace the ``text`` column of every shard under ``root``, in shard order, with the
    next captions from the iterable ``captions``."""
    it = iter(captions)
    for p in _parquets(root):
        table = pq.read_table(p)
        text = pa.array([next(it) for _ in range(table.num_rows)], pa.string())
        pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", text), p)


def datacomp_text_entity_uids(root: Path, wordnet, imagenet21k_ids: list[str]) -> np.ndarray:
    """``load_uids_with_text_entity`` without its fastText English test: per shard, keep a
    row when ``does_contain_text_entity`` holds (mlfoundations/datacomp @4a8df19,
    baselines/apply_filter.py: lines 237-260, 263-295 without ``english_mask``, 481-503). ``wordnet`` is an NLTK
    WordNetCorpusReader, ``imagenet21k_ids`` the lines of ``imagenet21k_wordnet_ids.txt``."""
    import pandas as pd

    entity_ids = [x.strip() for x in imagenet21k_ids]
    entity_ids = [int(x[1:]) for x in entity_ids]
    entity_set = set(entity_ids)  # DataComp passes the list; membership is the same

    def does_contain_text_entity(text: str) -> bool:
        for word in text.split():
            synsets = wordnet.synsets(word)
            if len(synsets) == 0:
                continue
            if synsets[0].offset() in entity_set:
                return True
        return False

    parts = []
    for p in _parquets(root):
        df = pd.read_parquet(p, columns=["uid", "text"])
        mask = df.text.apply(does_contain_text_entity) == True  # noqa: E712 (DataComp's `== True`)
        parts.append(uids_u8u8(df.uid[mask.values].values))
    uids = np.concatenate(parts)
    uids.sort()
    return uids


# --- Edge cases for DataComp's text rules and NaN scores (issue 13) -------------------------

ENGLISH = [
    "a photo of a dog on the beach",
    "the red car in the city at night",
    "a small cat with a blue house",
    "an old tree near the river",
    "view of the mountains in winter",
    "white flowers in a garden",
]
FOREIGN = [
    "ein Hund am Strand",
    "das rote Auto in der Stadt bei Nacht",
    "un chien sur la plage",
    "la voiture rouge dans la ville la nuit",
    "weiße Blumen im Garten",
    "des fleurs blanches au jardin",
]
# Captions on which Python's split, fastText's tokenizer, len() and the identifiers disagree.
ODD_CAPTIONS = [
    "",
    " ",
    "\n",
    "\n\n\n\n\n\n",
    "Watch\n",
    "Watches",
    "1178\xa0city",
    "dog",
    "a b c",
    "ab cd",
    "ab cd e",
    "\xa0\xa0\xa0 \xa0\xa0\xa0",
    "two\u3000words here",
    "x\0y\0z",
    "\tdog\ton\tsand\t",
]
_SPACES = [" ", "\xa0", "\u3000", "\u2009", "\t", "\n", "  ", "\r\n"]


def edge_caption(rng: np.random.Generator) -> str:
    """English, German/French or odd captions; words joined by any kind of space, with
    leading/trailing whitespace and newlines mixed in."""
    kind = rng.random()
    if kind < 0.2:
        return str(rng.choice(ODD_CAPTIONS))
    words = str(rng.choice(ENGLISH if kind < 0.65 else FOREIGN)).split()[: rng.integers(1, 8)]
    sep = [str(rng.choice(_SPACES)) if rng.random() < 0.3 else " " for _ in words]
    text = "".join(w + s for w, s in zip(words, sep, strict=True))[: -1 if rng.random() < 0.5 else None]
    if rng.random() < 0.15:
        text = str(rng.choice(_SPACES)) + text
    return text


def make_datacomp_edge_pool(
    root: Path, shards: int = 3, rows: int = 150, seed: int = 0, nan_fraction: float = 0.1
) -> Path:
    """``make_datacomp_pool``, then captions from :func:`edge_caption`, image sizes at the
    basic filter's edges (shorter side 199/200, aspect exactly 3, zero) and CLIP scores
    rounded to 0.01 (ties at every threshold) with ``nan_fraction`` of them NaN."""
    make_datacomp_pool(root, shards=shards, rows=rows, seed=seed)
    rng = np.random.default_rng(seed + 1)
    sides = np.array([0, 1, 150, 199, 200, 201, 400, 600, 601, 1200])
    for p in _parquets(root):
        t = pq.read_table(p)
        n = t.num_rows
        w, h = rng.choice(sides, n), rng.choice(sides, n)
        cols = {
            "text": pa.array([edge_caption(rng) for _ in range(n)], pa.string()),
            "original_width": pa.array(w, pa.int64()),
            "original_height": pa.array(h, pa.int64()),
        }
        for name, dtype in (("clip_b32_similarity_score", np.float32), ("clip_l14_similarity_score", np.float64)):
            s = np.round(rng.uniform(0.1, 0.4, n), 2).astype(dtype)
            s[rng.random(n) < nan_fraction] = np.nan
            cols[name] = pa.array(s)
        for name, col in cols.items():
            t = t.set_column(t.schema.get_field_index(name), name, col)
        pq.write_table(t, p)
    return root


# --- DataComp's text rules, from baselines/apply_filter.py (mlfoundations/datacomp @ 4a8df19) ---


def _sorted_uids(parts: list[np.ndarray]) -> np.ndarray:
    uids = np.concatenate(parts) if parts else np.zeros(0, np.dtype("u8,u8"))
    uids.sort()
    return uids


def fasttext_language(text: str, model) -> str:
    """``get_fasttext_language`` (lines 24-37): ``model.predict(text)[0][0]`` on the text with
    newlines replaced. fasttext 0.9.2's single-string ``predict`` fails under numpy 2
    (``np.array(copy=False)``); the list form runs the same C++ prediction."""
    text = text.replace("\n", " ")
    return model.predict([text], k=1)[0][0][0].split("__label__")[1]


def datacomp_basic_filter_uids(root: Path, lang_model) -> np.ndarray:
    """``load_uids_with_basic_filter_helper`` (lines 200-234), per parquet."""
    import pandas as pd

    parts = []
    for p in _parquets(root):
        df = pd.read_parquet(p, columns=["uid", "text", "original_width", "original_height"])
        fasttext_lang_pred = df.text.apply(lambda x: fasttext_language(x, lang_model))
        caption_num_words = df.text.apply(lambda x: len(x.split()))
        caption_num_chars = df.text.apply(lambda x: len(x))
        english_mask = fasttext_lang_pred == "en"
        caption_mask = (caption_num_words > 2) & (caption_num_chars > 5)
        min_image_dim = np.minimum(df.original_width, df.original_height)
        max_image_dim = np.maximum(df.original_width, df.original_height)
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect_ratio = max_image_dim / min_image_dim
        image_mask = (min_image_dim >= 200) & (aspect_ratio <= 3.0)
        parts.append(uids_u8u8(df.uid[english_mask & caption_mask & image_mask].values))
    return _sorted_uids(parts)


def datacomp_caption_filter_uids(root: Path, lang_model) -> np.ndarray:
    """``caption_filter`` (lines 57-77), the image_based pre-filter, on every row: fastText
    tokens > 1, characters > 5, fastText English (``predict`` on the list, k=1)."""
    import fasttext
    import pandas as pd

    parts = []
    for p in _parquets(root):
        df = pd.read_parquet(p, columns=["uid", "text"])
        caption_num_words = df.text.apply(lambda x: len(fasttext.tokenize(x)))
        caption_num_chars = df.text.apply(len)
        lang_preds, _ = lang_model.predict([x.replace("\n", " ") for x in df.text.values], k=1)
        fasttext_en = [x[0].replace("__label__", "") == "en" for x in lang_preds]
        mask = np.array(fasttext_en) & (caption_num_words > 1) & (caption_num_chars > 5)  # DataComp: list & Series
        parts.append(uids_u8u8(df.uid[mask.to_numpy()].values))
    return _sorted_uids(parts)


def datacomp_laion2b_uids(root: Path, language) -> np.ndarray:
    """``load_uids_with_clip_score_helper`` with ``gcld3_en_filter`` (lines 312-334) as the
    ``laion2b`` branch calls it (lines 695-704: b32, threshold 0.28). ``language(text)``
    is the identifier: gcld3's (lines 51-52), or a stand-in."""
    import pandas as pd

    key = "clip_b32_similarity_score"
    parts = []
    for p in _parquets(root):
        df = pd.read_parquet(p, columns=["uid", "text", key])
        pred = df.text.apply(language)
        df = df[pred == "en"]
        parts.append(uids_u8u8(df[df[key] >= 0.28]["uid"].values))
    return _sorted_uids(parts)


def gcld3_language(model):
    """``get_gcld3_language`` (lines 40-54) bound to ``model``."""
    return lambda text: model.FindLanguage(text=text.replace("\n", " ")).language


# --- embedding heads (issue 18): the public heads' forward passes in float64 numpy -------------

AESTHETIC_SHAPES = {
    "layers.0": (1024, 768),
    "layers.2": (128, 1024),
    "layers.4": (64, 128),
    "layers.6": (16, 64),
    "layers.7": (1, 16),
}
NSFW_SHAPES = {"linear_1": (64, 768), "linear_2": (512, 64), "linear_3": (256, 512), "linear_4": (1, 256)}


def random_state_dict(
    shapes: dict[str, tuple[int, int]], seed: int = 0, norm: int | None = None
) -> dict[str, np.ndarray]:
    """float32 weights with the given Linear shapes (and NeMo's ``norm`` buffers when ``norm``)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, (out, inp) in shapes.items():
        sd[f"{name}.weight"] = (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)
        sd[f"{name}.bias"] = (0.1 * rng.standard_normal(out)).astype(np.float32)
    if norm:
        sd["norm.mean"] = (0.01 * rng.standard_normal(norm)).astype(np.float32)
        sd["norm.variance"] = rng.uniform(0.0005, 0.002, norm).astype(np.float32)
    return sd


def save_torch_state_dict(sd: dict[str, np.ndarray], path: Path) -> Path:
    """As the public heads are saved: ``torch.save(model.state_dict(), path)`` (an OrderedDict of tensors)."""
    from collections import OrderedDict

    import torch

    torch.save(OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items()), path)
    return path


def reference_aesthetic(emb: np.ndarray, sd: dict[str, np.ndarray]) -> np.ndarray:
    """improved-aesthetic-predictor's ``simple_inference.py``: L2-normalise, then the five Linear layers."""
    x = emb.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    for name in AESTHETIC_SHAPES:
        x = x @ sd[f"{name}.weight"].astype(np.float64).T + sd[f"{name}.bias"]
    return x[:, 0]


def reference_nsfw(emb: np.ndarray, sd: dict[str, np.ndarray]) -> np.ndarray:
    """NeMo Curator's ``NSFWModel`` on L2-normalised embeddings: norm, 3 x (Linear, ReLU), Linear, sigmoid."""
    x = emb.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = (x - sd["norm.mean"]) / np.sqrt(sd["norm.variance"].astype(np.float64))
    for i, name in enumerate(NSFW_SHAPES):
        x = x @ sd[f"{name}.weight"].astype(np.float64).T + sd[f"{name}.bias"]
        x = np.maximum(x, 0) if i < 3 else 1 / (1 + np.exp(-x))
    return x[:, 0]


def pool_embeddings(root: Path, kind: str) -> tuple[list[str], np.ndarray]:
    """(uids, embeddings) of the whole pool in shard order, read with pandas and np.load."""
    import pandas as pd

    uids, emb = [], []
    for p in _parquets(root):
        uids += pd.read_parquet(p, columns=["uid"])["uid"].tolist()
        emb.append(np.load(p.with_suffix(".npz"))[kind])
    return uids, np.concatenate(emb)


def set_nan_scores(root: Path, field: str, fraction: float, seed: int = 1) -> None:
    """Set ``field`` to NaN on about ``fraction`` of the rows of every shard under ``root``
    (DataComp pools have samples without a score)."""
    rng = np.random.default_rng(seed)
    for p in _parquets(root):
        table = pq.read_table(p)
        scores = table.column(field).to_numpy().copy()
        scores[rng.random(len(scores)) < fraction] = np.nan
        i = table.column_names.index(field)
        pq.write_table(table.set_column(i, field, pa.array(scores, table.schema.field(field).type)), p)


def repeat_uid(root: Path) -> str:
    """Give the last row of the last shard the uid of the first row of the first shard; returns it."""
    parquets = _parquets(root)
    first = pq.read_table(parquets[0]).column("uid")[0].as_py()
    table = pq.read_table(parquets[-1])
    uids = table.column("uid").to_pylist()
    uids[-1] = first
    pq.write_table(table.set_column(table.column_names.index("uid"), "uid", pa.array(uids, pa.string())), parquets[-1])
    return first


def run_preset(out, preset: str, metadata, *sets: str, command: str = "run") -> tuple[int, str]:
    """``poolsift run configs/PRESET`` on ``metadata`` (its placeholder path replaced), with
    ``--set`` overrides; returns the exit code and stderr."""
    from tests.conftest import REPO, run_cli

    where = ["--output", out, "--quiet"] if command == "run" else []
    overrides = [f"input.datacomp_metadata={metadata}", *sets]
    code, _, err = run_cli(command, REPO / "configs" / preset, *where, *sum((["--set", s] for s in overrides), []))
    return code, err
