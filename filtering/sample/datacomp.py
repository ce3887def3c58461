"""A small pool in DataComp's metadata layout, made offline (``poolsift make-sample --datacomp``).

DataComp (Gadre et al. 2023) ships each pool shard as ``NNNNNNNN.parquet`` (uid, url,
text, original_width, original_height, clip_b32_similarity_score,
clip_l14_similarity_score, face_bboxes, sha256) and ``NNNNNNNN.npz`` (float16 CLIP
embeddings ``b32_img``, ``b32_txt`` (512-d) and ``l14_img``, ``l14_txt`` (768-d), rows
aligned with the parquet). This module writes the same columns, keys and dtypes from
seeded generators, so every ``input.datacomp_metadata`` preset runs on it:

- captions: mostly English of 1 to 9 words, with German, French and Spanish ones and a few
  empty ones (for the caption and language filters);
- sizes from 64 to 4,000 pixels a side (for ``image_size``), scores rounded to 1e-4 so
  that some tie, as real ones do; unit-norm embeddings;
- about 2% of rows copy an earlier row's sha256 (exact duplicates); with ``phash``, a
  ``phash`` column (uint64, not DataComp's: ``dedup: {method: perceptual}`` reads it)
  where those rows and as many again are within a few bits of an earlier row's hash.

Same arguments, same bytes: every draw comes from ``numpy.random.default_rng([seed,
shard])``, Parquet is written by pyarrow with fixed settings, and the ``.npz`` members
carry a fixed timestamp (``numpy.savez`` stamps the current time). pyarrow and numpy
only; no pandas.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EMBEDDING_DIMS = {"b32_img": 512, "b32_txt": 512, "l14_img": 768, "l14_txt": 768}
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip member can carry

ADJ = ["small", "large", "red", "blue", "green", "old", "new", "vintage", "modern", "cute", "happy", "dark"]
ADJ += ["bright", "wooden", "white", "black"]
NOUN = ["dog", "cat", "car", "house", "tree", "beach", "city", "mountain", "river", "bird", "flower", "table"]
NOUN += ["chair", "shoe", "dress", "cake"]
PREP = ["on", "in", "near", "under", "with", "by", "at", "behind"]
PLACE = ["the", "street", "a", "park", "the", "kitchen", "a", "table", "the", "sea", "a", "forest", "the"]
PLACE += ["snow", "a", "garden", "sunset", "night"]
FOREIGN = [
    "ein kleiner Hund am Strand",
    "das rote Auto in der Stadt bei Nacht",
    "eine Katze auf dem alten Stuhl",
    "un petit chien sur la plage",
    "la voiture rouge dans la ville la nuit",
    "un chat sur la vieille chaise",
    "un perro pequeño en la playa",
    "el coche rojo en la ciudad de noche",
    "un gato en la silla vieja",
]


def hex_strings(raw: np.ndarray) -> pa.StringArray:
    """(N, B) random bytes -> N lowercase hex strings of 2B characters, without a Python loop."""
    n, width = raw.shape
    digits = np.empty((n, 2 * width), dtype=np.uint8)
    digits[:, 0::2], digits[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 15]
    offsets = np.arange(0, n * 2 * width + 1, 2 * width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(digits.tobytes()))


def captions(rng: np.random.Generator, n: int) -> pa.Array:
    """ "a photo of a <adj> <noun> <prep> <place> no. <number>": English, nine words."""
    pick = [pa.array(words).take(pa.array(rng.integers(0, len(words), n))) for words in (ADJ, NOUN, PREP, PLACE)]
    number = pc.cast(pa.array(rng.integers(0, 10_000, n)), pa.string())
    return pc.binary_join_element_wise("a photo of a", *pick, "no.", number, " ")


def mixed_captions(rng: np.random.Generator, n: int) -> pa.Array:
    """:func:`captions` for 80% of rows; the rest short English (1-2 words), German, French
    or Spanish, or empty."""
    text = captions(rng, n)
    kind = rng.choice(4, size=n, p=[0.8, 0.08, 0.1, 0.02])
    adj = pa.array(ADJ).take(pa.array(rng.integers(0, len(ADJ), n)))
    noun = pa.array(NOUN).take(pa.array(rng.integers(0, len(NOUN), n)))
    short = pc.if_else(pa.array(rng.random(n) < 0.5), noun, pc.binary_join_element_wise(adj, noun, " "))
    foreign = pa.array(FOREIGN).take(pa.array(rng.integers(0, len(FOREIGN), n)))
    text = pc.if_else(pa.array(kind == 1), short, text)
    text = pc.if_else(pa.array(kind == 2), foreign, text)
    return pc.if_else(pa.array(kind == 3), pa.scalar("", pa.string()), text)


def face_bboxes(rng: np.random.Generator, n: int) -> pa.ListArray:
    """Most images have no face; some have one to three boxes of four floats."""
    faces = np.where(rng.random(n) < 0.25, rng.integers(1, 4, n), 0)
    outer = np.concatenate([[0], np.cumsum(faces)]).astype(np.int32)
    boxes = int(outer[-1])
    inner = pa.ListArray.from_arrays(np.arange(0, 4 * boxes + 1, 4, dtype=np.int32), pa.array(rng.random(4 * boxes)))
    return pa.ListArray.from_arrays(outer, inner)


def unit_f16(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """``n`` random unit vectors of ``dim`` floats, stored as float16 as DataComp stores them."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def metadata_table(
    rng: np.random.Generator, n: int, score_dtype=np.float32, faces: bool = True, mixed: bool = False
) -> pa.Table:
    """One shard of DataComp's metadata columns; scores rounded to 1e-4 make ties, as real
    scores have (DataComp ships float32). ``mixed``: :func:`mixed_captions` instead of
    nine-word English ones."""
    uid = hex_strings(rng.integers(0, 256, (n, 16), dtype=np.uint8))
    l14 = rng.normal(0.28, 0.05, n).astype(score_dtype)
    columns = {
        "uid": uid,
        "url": pc.binary_join_element_wise("https://img.example.com/", pc.utf8_slice_codeunits(uid, 0, 12), ".jpg", ""),
        "text": mixed_captions(rng, n) if mixed else captions(rng, n),
        "original_width": pa.array(rng.integers(64, 4000, n)),
        "original_height": pa.array(rng.integers(64, 4000, n)),
        "clip_b32_similarity_score": pa.array(np.round(l14 * 0.9 + rng.normal(0, 0.02, n).astype(score_dtype), 4)),
        "clip_l14_similarity_score": pa.array(np.round(l14, 4)),
    }
    if faces:
        columns["face_bboxes"] = face_bboxes(rng, n)
    columns["sha256"] = hex_strings(rng.integers(0, 256, (n, 32), dtype=np.uint8))
    return pa.table(columns)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """``numpy.savez`` with fixed member timestamps, so the same arrays give the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.external_attr = 0o600 << 16
            zf.writestr(info, buf.getvalue())


def write_shard(root: str | Path, index: int, table: pa.Table, embeddings: dict[str, np.ndarray]) -> Path:
    """``root/NNNNNNNN.parquet`` and ``root/NNNNNNNN.npz`` for shard ``index``; returns the parquet."""
    root = Path(root)
    parquet = root / f"{index:08d}.parquet"
    pq.write_table(table, parquet)
    save_npz(root / f"{index:08d}.npz", **embeddings)
    return parquet


def _duplicates(rng: np.random.Generator, table: pa.Table, phash: bool) -> pa.Table:
    """About 2% of rows take an earlier row's sha256; with ``phash``, those rows and as many
    again take an earlier row's hash with 0-3 bits flipped."""
    n = table.num_rows
    if n < 2:
        return table.append_column("phash", pa.array(rng.integers(0, 2**64, n, dtype=np.uint64))) if phash else table
    copies = np.flatnonzero(rng.random(n) < 0.02)
    copies = copies[copies > 0]
    of = (rng.random(len(copies)) * copies).astype(np.int64)  # an earlier row
    sha = np.asarray(table.column("sha256").to_pylist(), dtype=object)
    sha[copies] = sha[of]
    table = table.set_column(table.schema.get_field_index("sha256"), "sha256", pa.array(sha.tolist(), pa.string()))
    if not phash:
        return table
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64)
    near = np.flatnonzero(rng.random(n) < 0.02)
    near = np.union1d(copies, near[near > 0])
    src = (rng.random(len(near)) * near).astype(np.int64)
    flips = np.zeros(len(near), dtype=np.uint64)
    for _ in range(3):  # up to three distinct-or-not bits; XOR with 0 leaves the hash as it is
        bit = rng.integers(0, 64, len(near)).astype(np.uint64)
        flips ^= np.where(rng.random(len(near)) < 0.5, np.uint64(1) << bit, np.uint64(0))
    hashes[near] = hashes[src] ^ flips
    return table.append_column("phash", pa.array(hashes, pa.uint64()))


def make_datacomp_sample(
    root: str | Path,
    rows: int = 2_000,
    shards: int = 4,
    seed: int = 0,
    phash: bool = False,
    mixed: bool = True,
    score_dtype=np.float32,
    log: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Write ``rows`` rows over ``shards`` shards (sizes differ by at most one) under ``root``.
    ``mixed=False`` writes only nine-word English captions and no duplicates (the benches'
    pools). ``log(shard, rows)`` is called after each shard. Returns counts for a summary line."""
    if rows < 1 or shards < 1:
        raise ValueError("rows and shards must be at least 1")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sizes = np.full(shards, rows // shards)
    sizes[: rows % shards] += 1
    for s, n in enumerate(sizes.tolist()):
        rng = np.random.default_rng([seed, s])
        table = metadata_table(rng, n, score_dtype=score_dtype, mixed=mixed)
        embeddings = {name: unit_f16(rng, n, dim) for name, dim in EMBEDDING_DIMS.items()}
        if mixed:
            table = _duplicates(rng, table, phash)
        elif phash:
            table = table.append_column("phash", pa.array(rng.integers(0, 2**64, n, dtype=np.uint64)))
        write_shard(root, s, table, embeddings)
        if log:
            log(s, n)
    return {"rows": int(rows), "shards": int(shards)}
