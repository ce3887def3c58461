"""Two generated pools for ``dedup: {against: [...]}`` (issue 25): the second holds copies
of rows the first run kept (exact: the same bytes' sha256; near: a re-encoded or resized
copy, another sha256 and a perceptual hash a few bits off) and clean rows, each planted
row's truth in the returned arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filtering.sample.datacomp import metadata_table, unit_f16, write_shard


def kept_rows(out_dir: Path) -> pa.Table:
    parts = sorted((out_dir / "subset").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p, columns=["uid", "sha256", "phash"]) for p in parts])


def far_hashes(rng: np.random.Generator, n: int, avoid: np.ndarray, min_distance: int) -> np.ndarray:
    """``n`` random 64-bit hashes at least ``min_distance`` bits from every hash in ``avoid``."""
    from filtering.dedup.hamming import popcount64

    out = rng.integers(0, 2**64, n, dtype=np.uint64)
    for k in range(n):
        while (popcount64(avoid ^ out[k]) < min_distance).any():
            out[k] = rng.integers(0, 2**64, dtype=np.uint64)
    return out


def first_embeddings(first_pool: Path, uids: np.ndarray, kind: str) -> np.ndarray:
    """The embeddings ``kind`` of the first pool's rows ``uids``, from its npz files."""
    found = {}
    for parquet in sorted(first_pool.glob("*.parquet")):
        u = pq.read_table(parquet, columns=["uid"]).column("uid").to_pylist()
        with np.load(parquet.with_suffix(".npz")) as z:
            emb = z[kind]
        found.update(zip(u, emb, strict=True))
    return np.stack([found[u] for u in uids])


def near_unit(rng: np.random.Generator, x: np.ndarray, cosine: float) -> np.ndarray:
    """Each row of ``x`` (unit norm) moved by Gaussian noise to about ``cosine`` from where it
    was, scaled to unit norm: an embedding near-duplicate, as float16."""
    noise = np.sqrt(1 / cosine**2 - 1) / np.sqrt(x.shape[1])
    y = np.asarray(x, np.float32) + noise * rng.standard_normal(x.shape, dtype=np.float32)
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float16)


def datacomp_second_pool(
    root: Path,
    first_kept: pa.Table,
    exact: int,
    near: int,
    clean: int,
    shards: int = 3,
    seed: int = 7,
    flips: int = 3,
    semantic: int = 0,
    first_pool: Path | None = None,
    lookalike: int = 0,
) -> dict[str, np.ndarray]:
    """The second pool in DataComp's layout. Returns the uids of the planted rows and of the
    reference rows they copy: ``exact_uid``/``exact_of``, ``near_uid``/``near_of``,
    ``semantic_uid``/``semantic_of``, ``clean_uid``. With ``first_pool`` (the first run's
    input), the copies carry embeddings as an image's copies would: an exact copy its
    reference row's, a near copy and a semantic copy one a little off (cosine about 0.999);
    a semantic copy has new bytes and a hash far from every kept row's. A ``lookalike``
    (``lookalike_uid``/``lookalike_of``) has a hash as near a kept row's as a near copy's
    and an unrelated embedding: what ``min_similarity`` is there to keep."""
    rng = np.random.default_rng(seed)
    n = exact + near + semantic + lookalike + clean
    table = metadata_table(rng, n, mixed=False)
    sha = np.asarray(table.column("sha256").to_pylist(), dtype=object)
    ref_uid = np.asarray(first_kept.column("uid").to_pylist(), dtype=object)
    ref_sha = np.asarray(first_kept.column("sha256").to_pylist(), dtype=object)
    ref_ph = np.asarray(first_kept.column("phash").to_numpy(), np.uint64)
    copies = exact + near + semantic
    pick = rng.choice(len(ref_uid), copies + lookalike, replace=False)
    e, nr, sm, lk = pick[:exact], pick[exact : exact + near], pick[exact + near : copies], pick[copies:]
    sha[:exact] = ref_sha[e]
    phash = np.empty(n, np.uint64)
    phash[:exact] = ref_ph[e]
    flip = np.zeros(near, np.uint64)
    for _ in range(flips):
        flip |= np.uint64(1) << rng.integers(0, 64, near).astype(np.uint64)
    phash[exact : exact + near] = ref_ph[nr] ^ flip
    # clean rows: new bytes, hashes far from every kept row and every planted one
    phash[exact + near :] = far_hashes(rng, semantic + lookalike + clean, np.r_[ref_ph, phash[: exact + near]], 16)
    if lookalike:
        flip = np.zeros(lookalike, np.uint64)
        for _ in range(flips):
            flip |= np.uint64(1) << rng.integers(0, 64, lookalike).astype(np.uint64)
        phash[copies : copies + lookalike] = ref_ph[lk] ^ flip
    table = table.set_column(table.schema.get_field_index("sha256"), "sha256", pa.array(sha.tolist(), pa.string()))
    table = table.append_column("phash", pa.array(phash, pa.uint64()))
    order = rng.permutation(n)  # planted rows spread over the shards
    uid = np.asarray(table.column("uid").to_pylist(), dtype=object)
    truth = {
        "exact_uid": uid[:exact],
        "exact_of": ref_uid[e],
        "near_uid": uid[exact : exact + near],
        "near_of": ref_uid[nr],
        "semantic_uid": uid[exact + near : copies],
        "semantic_of": ref_uid[sm],
        "lookalike_uid": uid[copies : copies + lookalike],
        "lookalike_of": ref_uid[lk],
        "clean_uid": uid[copies + lookalike :],
    }
    planted = {}
    if first_pool is not None:
        for kind in ("b32_img", "l14_img"):
            ref = first_embeddings(first_pool, ref_uid[pick[:copies]], kind)
            planted[kind] = np.concatenate([ref[:exact], near_unit(rng, ref[exact:], 0.999)])
    table = table.take(pa.array(order))
    at = np.argsort(order)  # where each generated row went
    bounds = np.linspace(0, n, shards + 1).astype(int)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        part = table.slice(bounds[s], bounds[s + 1] - bounds[s])
        dims = {k: v.shape[1] for k, v in planted.items()} or {"b32_img": 16, "l14_img": 24}
        emb = {k: unit_f16(rng, part.num_rows, dim) for k, dim in dims.items()}
        for kind, values in planted.items():
            rows = at[: len(values)] - bounds[s]
            mine = (rows >= 0) & (rows < part.num_rows)
            emb[kind][rows[mine]] = values[mine]
        write_shard(root, s, part, emb)
    return truth


def _tar_member(tar_path: str, name: str) -> bytes:
    import tarfile

    with tarfile.open(tar_path) as tf:
        return tf.extractfile(name).read()


def webdataset_second_pool(
    path: Path,
    first_out: Path,
    exact: int,
    near: int,
    clean: int,
    seed: int = 7,
    max_distance: int = 6,
    semantic: int = 0,
) -> dict[str, np.ndarray]:
    """The second pool as one WebDataset shard: exact copies (the same image bytes), near
    copies (the image resized by 7/8 and re-encoded as JPEG quality 75: another sha256;
    only copies whose perceptual hash stays within ``max_distance`` are planted, the rest
    are no copies a hash search is asked to find), ``semantic`` copies (the image mirrored
    left to right, its hash more than ``max_distance`` off: the same picture to a person,
    another to a hash; whether its embedding is near is the model's, so a test checks it
    from the embeddings) and clean photo-like images at least 16 bits from every kept
    row's hash. Returns the truth as :func:`datacomp_second_pool`."""
    import io
    import json
    import tarfile

    from PIL import Image

    from filtering.dedup.hamming import popcount64
    from filtering.sample.synth import photo_jpeg
    from filtering.scorers.phash import phash64

    rng = np.random.default_rng(seed)
    parts = sorted((first_out / "subset").glob("part-*.parquet"))
    kept = pa.concat_tables(
        [pq.read_table(p, columns=["uid", "key", "source_shard", "caption", "phash"]) for p in parts]
    )
    ref_ph = np.asarray(kept.column("phash").to_numpy(), np.uint64)
    order = rng.permutation(kept.num_rows)
    names = ("exact_uid", "exact_of", "near_uid", "near_of", "semantic_uid", "semantic_of", "clean_uid")
    samples, truth = [], {k: [] for k in names}

    def new_uid() -> str:
        return "".join(f"{b:02x}" for b in rng.integers(0, 256, 16))

    def image_of(k: int) -> bytes:
        row = kept.slice(k, 1).to_pylist()[0]
        return _tar_member(row["source_shard"], f"{row['key']}.jpg")

    for k in order[:exact]:
        uid = new_uid()
        samples.append((uid, image_of(k), kept.column("caption")[k].as_py()))
        truth["exact_uid"].append(uid)
        truth["exact_of"].append(kept.column("uid")[k].as_py())
    for k in order[exact:]:
        if len(truth["near_uid"]) == near:
            break
        img = Image.open(io.BytesIO(image_of(k))).convert("RGB")
        img = img.resize((max(8, img.width * 7 // 8), max(8, img.height * 7 // 8)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75)
        if popcount64(np.uint64(phash64(Image.open(io.BytesIO(buf.getvalue())))) ^ ref_ph[k]) > max_distance:
            continue
        uid = new_uid()
        samples.append((uid, buf.getvalue(), kept.column("caption")[k].as_py()))
        truth["near_uid"].append(uid)
        truth["near_of"].append(kept.column("uid")[k].as_py())
    assert len(truth["near_uid"]) == near, "too few resized copies stay within the radius"
    taken = set(truth["exact_of"]) | set(truth["near_of"])
    for k in order[::-1]:  # from the other end
        if len(truth["semantic_uid"]) == semantic:
            break
        if kept.column("uid")[k].as_py() in taken:
            continue
        img = Image.open(io.BytesIO(image_of(k))).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        if popcount64(np.uint64(phash64(Image.open(io.BytesIO(buf.getvalue())))) ^ ref_ph[k]) <= max_distance:
            continue
        uid = new_uid()
        samples.append((uid, buf.getvalue(), kept.column("caption")[k].as_py()))
        truth["semantic_uid"].append(uid)
        truth["semantic_of"].append(kept.column("uid")[k].as_py())
    while len(truth["clean_uid"]) < clean:
        data = photo_jpeg(rng, int(rng.integers(96, 200)), int(rng.integers(96, 200)))
        if (popcount64(ref_ph ^ np.uint64(phash64(Image.open(io.BytesIO(data))))) < 16).any():
            continue
        uid = new_uid()
        samples.append((uid, data, "a photo of a scene"))
        truth["clean_uid"].append(uid)
    shuffle = rng.permutation(len(samples))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for j, s in enumerate(shuffle):
            uid, data, caption = samples[s]
            key = f"{j:09d}"
            for ext, payload in (("jpg", data), ("txt", caption.encode()), ("json", json.dumps({"uid": uid}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return {k: np.asarray(v, dtype=object) for k, v in truth.items()}
