import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from filtering.errors import PoolsiftError
from filtering.pool import Pool, ShardPart
from filtering.writers.webdataset import write_shards


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tf.addfile(info, io.BytesIO(data))


def _members(path):
    """{key: [(ext, bytes), ...] in stored order} and the member names, straight from the tar."""
    out, names = {}, []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            names.append(m.name)
            key, ext = m.name.split(".", 1)
            out.setdefault(key, []).append((ext, tf.extractfile(m).read()))
    return out, names


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    shards, rows = [], []
    for s in range(3):
        samples = []
        for i in range(7):
            key = f"{s:05d}{i:04d}"
            members = {
                "jpg": rng.bytes(int(rng.integers(10, 300))),
                "txt": f"caption {s} {i}".encode(),
                "json": json.dumps({"i": i}).encode(),
            }
            if i % 3 == 0:
                members["npy"] = rng.bytes(16)  # members beyond image/text travel too
            samples.append((key, members))
        path = tmp_path / "src" / f"{s:05d}.tar"
        path.parent.mkdir(exist_ok=True)
        _write_tar(path, samples)
        shards.append(str(path))
        rows += [(key, str(path)) for key, _ in samples]
    table = pa.table({"key": [k for k, _ in rows], "source_shard": [u for _, u in rows]})
    parts = [ShardPart(u, f"s{i}", 7 * i, 7 * i + 7) for i, u in enumerate(shards)]
    return Pool(table=table, parts=parts), {k: m for u in shards for k, m in _members(u)[0].items()}


def _span(keys: list[str]) -> dict:
    return {"count": len(keys), "first_key": keys[0], "last_key": keys[-1]}


def reshard(pool, keep, out, samples_per_shard):
    """The kept samples as tars (what the plan's filter pass writes per source shard): the
    tars' paths, and their records."""
    records, sizes = write_shards(pool, keep, out, samples_per_shard)
    assert sizes == [Path(r["path"]).stat().st_size for r in records]
    return [r["path"] for r in records], records


def test_kept_samples_are_copied_byte_for_byte_into_tars_per_source_shard(tmp_path, source):
    pool, original = source
    keep = np.zeros(pool.n, dtype=bool)
    keep[[0, 2, 3, 6, 7, 13, 15, 16, 20]] = True  # 4, 2 and 3 of the three source shards
    out = tmp_path / "out" / "shards"
    paths, smap = reshard(pool, keep, str(out), 3)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    kept_keys = [k for k, m in zip(pool.column("key"), keep, strict=True) if m]
    copied = {}
    for p in paths:
        members, names = _members(p)
        copied.update(members)
        assert len(names) == len(set(names))
    assert list(copied) == kept_keys  # pool order, nothing else
    for key in kept_keys:
        assert copied[key] == original[key]  # same names, same bytes, same member order
    assert [s["count"] for s in smap] == [3, 1, 2, 3]  # at most 3 each, every tar of one source shard
    # one source each, named by its count and first and last key: a record of fixed size, never
    # a list of keys (the driver holds the map until the manifest is written: O(tars), not O(kept))
    assert smap[0]["sources"] == {pool.parts[0].url: _span(kept_keys[:3])}
    assert smap[1]["sources"] == {pool.parts[0].url: _span(kept_keys[3:4])}
    assert smap[2]["sources"] == {pool.parts[1].url: _span(kept_keys[4:6])}
    assert smap[3]["sources"] == {pool.parts[2].url: _span(kept_keys[6:])}
    with tarfile.open(paths[0]) as tf:
        m = tf.getmembers()[0]
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)

    first = [Path(p).read_bytes() for p in paths]
    paths2, _ = reshard(pool, keep, str(out), 3)
    assert [Path(p).read_bytes() for p in paths2] == first  # deterministic bytes


def test_webdataset_reads_the_new_shards(tmp_path, source):
    import webdataset as wds

    pool, original = source
    keep = np.ones(pool.n, dtype=bool)
    paths, _ = reshard(pool, keep, str(tmp_path / "shards"), 10)
    seen = [s for p in paths for s in wds.WebDataset(p, shardshuffle=False)]
    assert [s["__key__"] for s in seen] == list(pool.column("key"))
    assert all(s["jpg"] == original[s["__key__"]][0][1] for s in seen)


def test_a_changed_source_shard_is_an_error_and_leaves_no_partial_shard(tmp_path, source):
    pool, _ = source
    _write_tar(pool.parts[1].url, [(f"other{i}", {"txt": b"other"}) for i in range(7)])
    keep = np.ones(pool.n, dtype=bool)
    out = tmp_path / "shards"
    with pytest.raises(PoolsiftError, match="changed since it was scored"):
        reshard(pool, keep, str(out), 5)
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())


@pytest.mark.slow
def test_reshard_round_trip_on_the_sample(rerun_dir, tmp_path):
    """The kept samples of the bundled sample, resharded: every member's bytes are the
    source's, and webdataset and open_clip's training data pipeline read the shards."""
    import pandas as pd
    import webdataset as wds

    from tests.conftest import run_cli, write_config

    cfg = write_config(tmp_path / "sample.yaml", output={"dir": str(rerun_dir)})
    code, _, stderr = run_cli(
        "run", cfg, "--quiet", "--set", "output.webdataset=true", "--set", "output.samples_per_shard=64"
    )
    assert code == 0, stderr
    manifest = json.loads((rerun_dir / "manifest.json").read_text())
    kept = pd.read_parquet(rerun_dir / "subset")
    assert len(kept) == manifest["counts"]["kept"] > 64

    source = {}
    for url in dict.fromkeys(kept["source_shard"]):
        members, _ = _members(url)
        source.update({(url, k): m for k, m in members.items()})
    paths = sorted(str(p) for p in (rerun_dir / "shards").glob("*.tar"))
    assert [s["path"] for s in manifest["shards"]] == paths
    per_source = kept.groupby("source_shard", sort=False).size()  # kept samples per source shard, in pool order
    expected = [min(64, n - j) for n in per_source for j in range(0, n, 64)]  # each source shard cut at 64
    assert [s["count"] for s in manifest["shards"]] == expected and sum(expected) == len(kept)
    assert all(len(s["sources"]) == 1 for s in manifest["shards"])

    copied = []
    for shard in manifest["shards"]:
        members, _ = _members(shard["path"])
        ((url, src),) = shard["sources"].items()
        assert src == _span(list(members))  # its count, first and last key
        for key in members:
            assert members[key] == source[(url, key)]  # same names, same order, same bytes
            copied.append((url, key))
    assert copied == list(zip(kept["source_shard"], kept["key"], strict=True))  # the subset's rows, in order

    read = [(s["__key__"], s["jpg"]) for s in wds.WebDataset(paths, shardshuffle=False)]
    assert [k for k, _ in read] == list(kept["key"])
    pairs = list(wds.WebDataset(paths, shardshuffle=False).decode("pil").to_tuple("jpg;png", "txt"))
    assert len(pairs) == len(kept) and all(img.size[0] > 0 and isinstance(txt, str) for img, txt in pairs)


@pytest.mark.slow
def test_open_clip_training_loader_reads_the_resharded_sample(rerun_dir, tmp_path):
    import argparse

    import open_clip
    from open_clip_train.data import get_wds_dataset

    from tests.conftest import run_cli, write_config

    cfg = write_config(tmp_path / "sample.yaml", output={"dir": str(rerun_dir)})
    code, _, stderr = run_cli(
        "run", cfg, "--quiet", "--set", "output.webdataset=true", "--set", "output.samples_per_shard=100"
    )
    assert code == 0, stderr
    manifest = json.loads((rerun_dir / "manifest.json").read_text())
    n = len(manifest["shards"])
    args = argparse.Namespace(
        val_data=str(rerun_dir / "shards" / f"{{00000..{n - 1:05d}}}.tar"),
        val_num_samples=manifest["counts"]["kept"],
        batch_size=32,
        workers=0,
        world_size=1,
        seed=0,
        train_data_upsampling_factors=None,
    )
    preprocess = open_clip.image_transform(64, is_train=False)  # open_clip's own eval transform
    info = get_wds_dataset(args, preprocess, is_train=False, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    seen = 0
    for images, texts in info.dataloader:
        assert images.shape[1:] == (3, 64, 64) and texts.shape[0] == images.shape[0]
        seen += images.shape[0]
    assert seen == manifest["counts"]["kept"]
