import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from filtering.sample import synth
from filtering.sample.make import (
    FAULT_COUNTS,
    NUM_EXACT_DUPS,
    NUM_NEAR_DUPS,
    NUM_SHARDS,
    REFERENCE_CLASSES,
    REFERENCE_PER_CLASS,
    SAMPLES_PER_SHARD,
    make_sample,
)

UID = re.compile(r"^[0-9a-f]{32}$")


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_pool(root: Path) -> list[dict]:
    """Every sample as {"shard", "key", "jpg", "txt", "json"}, in tar order."""
    samples = []
    for shard in sorted((root / "pool").glob("*.tar")):
        by_key: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                entry = by_key.setdefault(key, {"shard": shard.name, "key": key})
                entry[ext] = tar.extractfile(member).read()
        samples.extend(by_key.values())
    return samples


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    a = tmp_path_factory.mktemp("a")
    b = tmp_path_factory.mktemp("b")
    return make_sample(a, seed=0), a, b


def test_same_seed_gives_byte_identical_files(generated):
    _, a, b = generated
    make_sample(b, seed=0)
    da, db = digests(a), digests(b)
    assert da == db
    assert len(da) == NUM_SHARDS + 1 + len(REFERENCE_CLASSES) * REFERENCE_PER_CLASS + 1  # + quality shard, README


def test_regenerated_sample_is_the_shipped_one(generated):
    """``poolsift make-sample`` reproduces sample_data/ byte for byte (pool, quality shard, reference, README)."""
    _, a, _ = generated
    shipped = Path(__file__).resolve().parents[3] / "sample_data"
    ours = digests(a)
    assert ours == {name: digest for name, digest in digests(shipped).items() if name in ours}
    assert {n for n in digests(shipped) if n.startswith(("pool/", "quality/", "reference/"))} <= set(ours)


def test_quality_shard_plants_watermarks(generated):
    from filtering.sample.make import QUALITY_SAMPLES, WATERMARKED

    summary, a, _ = generated
    with tarfile.open(a / "quality/00004.tar") as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(metas) == QUALITY_SAMPLES == summary["quality"]["samples"]
    marked = [m for m in metas if m["truth"]["watermark"]]
    assert len(marked) == WATERMARKED
    assert {m["truth"]["fault"] for m in metas} == {"clean", "watermark"}
    assert all(m["key"].startswith("00004") and UID.match(m["uid"]) for m in metas)
    pool_uids = {json.loads(s["json"])["uid"] for s in read_pool(a)}
    assert pool_uids.isdisjoint(m["uid"] for m in metas)


def test_other_seed_differs(generated, tmp_path):
    _, a, _ = generated
    make_sample(tmp_path, seed=1)
    assert (a / "pool/00000.tar").read_bytes() != (tmp_path / "pool/00000.tar").read_bytes()


def test_shards_and_samples(generated):
    summary, a, _ = generated
    shards = sorted(p.name for p in (a / "pool").glob("*.tar"))
    assert shards == [f"{i:05d}.tar" for i in range(NUM_SHARDS)]
    samples = read_pool(a)
    assert len(samples) == NUM_SHARDS * SAMPLES_PER_SHARD == summary["samples"]
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys)
    uids = []
    for s in samples:
        assert {"jpg", "txt", "json"} <= s.keys()
        meta = json.loads(s["json"])
        assert UID.match(meta["uid"])
        assert meta["key"] == s["key"]
        assert s["key"][:5] == s["shard"][:5]  # img2dataset keys: shard digits first
        s["txt"].decode("utf-8")  # raises unless the caption is UTF-8
        uids.append(meta["uid"])
    assert len(set(uids)) == len(uids)
    # Tar members carry no timestamps or owners.
    with tarfile.open(a / "pool/00000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tar.getmembers()} == {(0, 0, 0, "", 0o644)}


def test_fault_counts(generated):
    summary, a, _ = generated
    samples = read_pool(a)
    truths = [json.loads(s["json"])["truth"] for s in samples]
    counts = Counter(t["fault"] for t in truths)
    assert dict(counts) == {k: v for k, v in summary["faults"].items() if v}
    for name, n in FAULT_COUNTS.items():
        assert counts[name] == n
    assert counts["exact_dup"] == NUM_EXACT_DUPS
    assert counts["near_dup"] == NUM_NEAR_DUPS
    assert 0.15 <= counts["mismatched"] / len(samples) <= 0.25
    assert counts["clean"] >= 0.5 * len(samples)
    # Booleans mirror the fault label.
    for t in truths:
        assert t["mismatched"] == (t["fault"] == "mismatched")
        assert t["corrupt"] == (t["fault"] == "corrupt")
        assert t["empty_caption"] == (t["fault"] == "empty_caption")
        assert t["class"] in synth.CLASSES and t["colour"] in synth.COLOURS


def test_planted_faults_are_real(generated):
    _, a, _ = generated
    samples = read_pool(a)
    metas = [json.loads(s["json"]) for s in samples]
    by_uid = {m["uid"]: (s, m) for s, m in zip(samples, metas, strict=True)}
    position = {m["uid"]: i for i, m in enumerate(metas)}
    cross_shard = 0
    for s, m in zip(samples, metas, strict=True):
        t = m["truth"]
        caption = s["txt"].decode("utf-8")
        if t["fault"] == "corrupt":
            with pytest.raises(OSError):  # PIL's UnidentifiedImageError is one too
                Image.open(io.BytesIO(s["jpg"])).load()
            continue
        img = Image.open(io.BytesIO(s["jpg"]))
        img.load()
        assert img.format == "JPEG"
        assert img.size == (m["original_width"], m["original_height"])
        short, long = sorted(img.size)
        if t["fault"] == "tiny":
            assert short < 64
        elif t["fault"] == "extreme_aspect":
            assert long / short > 4
        else:
            assert short >= 64 and long / short <= 2
        if t["fault"] == "empty_caption":
            assert caption == ""
        elif t["fault"] == "mismatched":
            assert t["caption_class"] != t["class"] and t["caption_class"] in caption
            assert t["caption_colour"] in (None, *[c for c in synth.COLOURS if c != t["colour"]])
        elif t["fault"] == "non_english":
            assert t["language"] in ("de", "fr", "es") and caption
        else:
            assert t["language"] == "en" and t["class"] in caption
        if t["duplicate_of"] is not None:
            orig, orig_meta = by_uid[t["duplicate_of"]]
            assert orig_meta["truth"]["fault"] == "clean"
            assert position[t["duplicate_of"]] < position[m["uid"]]
            assert s["txt"] == orig["txt"]
            if t["dup_kind"] == "exact":
                assert s["jpg"] == orig["jpg"]
            else:
                assert t["dup_kind"] == "near" and s["jpg"] != orig["jpg"]
            cross_shard += orig["shard"] != s["shard"]
    assert cross_shard >= 5


def test_reference_folder(generated):
    summary, a, _ = generated
    ref = a / "reference"
    assert sorted(p.name for p in ref.iterdir()) == sorted(REFERENCE_CLASSES)
    assert set(REFERENCE_CLASSES) < set(synth.CLASSES)
    for cls in REFERENCE_CLASSES:
        files = sorted((ref / cls).glob("*.jpg"))
        assert len(files) == REFERENCE_PER_CLASS == summary["reference"][cls]
        with Image.open(files[0]) as img:
            assert img.mode == "RGB" and min(img.size) >= 64
