"""Dedup through the CLI on the bundled sample, checked against the planted truth."""

from __future__ import annotations

import json
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, SAMPLE, run_cli, write_config

PRESET = REPO / "configs" / "sample_dedup.yaml"
SHARDS = sorted(str(p) for p in (SAMPLE / "pool").glob("*.tar"))

pytestmark = pytest.mark.slow


def run_dedup(base, scored_sample, name: str, **sections) -> tuple[dict, dict]:
    """Run the preset's filters in a fresh dir holding the sample's score cache.
    Returns (manifest, dropped rows by uid)."""
    out = base / name
    out.mkdir()
    shutil.copytree(scored_sample / "cache", out / "cache")
    raw = yaml.safe_load(PRESET.read_text())
    cfg = write_config(
        base / f"{name}.yaml", filters=sections.pop("filters", raw["filters"]), output={"dir": str(out)}, **sections
    )
    code, _, stderr = run_cli("run", cfg, "--quiet")
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = pq.read_table(out / "dropped").to_pylist()
    return manifest, {r["uid"]: r for r in dropped}


@pytest.fixture(scope="module")
def dedup_run(tmp_path_factory, scored_sample):
    return run_dedup(tmp_path_factory.mktemp("dedup"), scored_sample, "run")


def survivor(uid: str, dropped: dict) -> str:
    """Follow duplicate_of links (one per dedup step) to the copy that was kept."""
    seen = set()
    while uid in dropped and dropped[uid]["duplicate_of"] and uid not in seen:
        seen.add(uid)
        uid = dropped[uid]["duplicate_of"]
    return uid


def planted(truth, fault):
    return {u: m["truth"]["duplicate_of"] for u, m in truth.items() if m["truth"]["fault"] == fault}


def test_exact_duplicates_all_found(dedup_run, truth):
    _, dropped = dedup_run
    pairs = planted(truth, "exact_dup")
    assert pairs
    found = [c for c, o in pairs.items() if survivor(c, dropped) == survivor(o, dropped)]
    assert len(found) == len(pairs)
    # identical bytes: the exact step is the one that catches them
    reasons = {u: r["reason"] for u, r in dropped.items()}
    assert all("duplicate_exact" in (reasons.get(c), reasons.get(o)) for c, o in pairs.items())


def test_near_duplicates_found(dedup_run, truth):
    _, dropped = dedup_run
    pairs = planted(truth, "near_dup")
    found = [c for c, o in pairs.items() if survivor(c, dropped) == survivor(o, dropped)]
    assert len(found) >= 0.9 * len(pairs), f"near-duplicate recall {len(found)}/{len(pairs)}"


def test_few_non_duplicates_dropped(dedup_run, truth):
    """A drop is wrong when the sample and its survivor are not copies of one original."""
    _, dropped = dedup_run

    def root(u):
        return truth[u]["truth"]["duplicate_of"] or u

    usable = [u for u, m in truth.items() if m["truth"]["fault"] not in ("exact_dup", "near_dup", "corrupt")]
    wrong = [
        u
        for u in usable
        if u in dropped and dropped[u]["reason"].startswith("duplicate_") and root(u) != root(survivor(u, dropped))
    ]
    assert len(wrong) < 0.02 * len(usable), f"{len(wrong)} of {len(usable)} non-duplicates dropped"


def test_funnel_and_dropped_records(dedup_run, truth):
    manifest, dropped = dedup_run
    steps = manifest["counts"]["filters"]
    methods = [f["dedup"]["method"] for f in yaml.safe_load(PRESET.read_text())["filters"]]
    assert len(steps) == len(methods) >= 2
    for step, method in zip(steps, methods, strict=True):
        assert step["name"].startswith("dedup")
        assert step["dropped"] > 0 and step["reasons"] == {f"duplicate_{method}": step["dropped"]}
    assert steps[0]["dropped"] >= len(planted(truth, "exact_dup"))
    dups = [r for r in dropped.values() if r["reason"] and r["reason"].startswith("duplicate_")]
    assert len(dups) == sum(s["dropped"] for s in steps)
    assert all(r["duplicate_of"] in truth and r["duplicate_of"] != r["uid"] for r in dups)
    assert manifest["counts"]["input"] == manifest["counts"]["kept"] + manifest["counts"]["failed"] + len(dups)


def test_identical_across_reruns_and_shard_orders(dedup_run, tmp_path, scored_sample):
    _, first = dedup_run
    orders = {"rerun": SHARDS, "reversed": SHARDS[::-1], "shuffled": [SHARDS[i] for i in (2, 0, 3, 1)]}
    for name, shards in orders.items():
        manifest, dropped = run_dedup(tmp_path, scored_sample, name, input={"shards": shards})
        assert {u: r["duplicate_of"] for u, r in dropped.items()} == {u: r["duplicate_of"] for u, r in first.items()}, (
            name
        )
        assert manifest["counts"]["filters"] == dedup_run[0]["counts"]["filters"], name


def test_semantic_dedup_is_independent_of_shard_order(tmp_path, scored_sample, truth):
    """SemDeDup's k-means sees the rows in uid order, so listing the shards differently changes nothing."""
    spec = [{"dedup": {"method": "semantic", "threshold": 0.999, "num_clusters": 8}}]
    m1, d1 = run_dedup(tmp_path, scored_sample, "sem_a", filters=spec, input={"shards": SHARDS})
    m2, d2 = run_dedup(tmp_path, scored_sample, "sem_b", filters=spec, input={"shards": SHARDS[::-1]})
    assert {u: r["duplicate_of"] for u, r in d1.items()} == {u: r["duplicate_of"] for u, r in d2.items()}
    step = m1["counts"]["filters"][0]
    assert step["dropped"] > 0 and step["reasons"] == {"duplicate_semantic": step["dropped"]}
    # exact copies (identical embeddings) are among the groups found
    pairs = planted(truth, "exact_dup")
    assert sum(survivor(c, d1) == survivor(o, d1) for c, o in pairs.items()) == len(pairs)


def _pool_images(n: int) -> list[tuple[str, str, bytes]]:
    """(uid, key, jpg bytes) of the first ``n`` clean samples of shard 0."""
    out = []
    with tarfile.open(SHARDS[0]) as tf:
        members = {m.name: m for m in tf.getmembers()}
        for name in sorted(members):
            if name.endswith(".json"):
                meta = json.load(tf.extractfile(members[name]))
                if meta["truth"]["fault"] == "clean":
                    key = name[: -len(".json")]
                    out.append((meta["uid"], key, tf.extractfile(members[key + ".jpg"]).read()))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize(
    ("method", "params"), [("perceptual", {"max_distance": 0}), ("semantic", {"threshold": 0.9995})]
)
def test_decontaminate_against_an_image_folder(tmp_path, scored_sample, truth, method, params):
    """Evaluation images copied from the pool are found, with the matched file as duplicate_of."""
    ref = tmp_path / "evalset"
    (ref / "leaked").mkdir(parents=True)
    leaked = _pool_images(3)
    for _, key, data in leaked:
        (ref / "leaked" / f"{key}.jpg").write_bytes(data)
    for src in sorted((SAMPLE / "reference").rglob("*.jpg"))[:5]:
        shutil.copy(src, ref / src.name)
    spec = {"decontaminate": {"reference": str(ref), "method": method, **params}}
    manifest, dropped = run_dedup(tmp_path, scored_sample, f"decon_{method}", filters=[spec])
    for uid, key, _ in leaked:
        assert dropped[uid]["reason"] == f"contaminated_{method}"
        assert dropped[uid]["duplicate_of"] == f"leaked/{key}.jpg"
    # exact copies of a leaked image are contaminated too; nothing else is
    leaked_uids = {u for u, _, _ in leaked}
    for uid, row in dropped.items():
        if row["reason"] == f"contaminated_{method}":
            assert uid in leaked_uids or truth[uid]["truth"]["duplicate_of"] in leaked_uids
    assert (
        manifest["stages"]["decontaminate"][
            f"decontam_evalset_{'distance' if method == 'perceptual' else 'similarity'}"
        ]["reference_items"]
        == 8
    )
    # the cached reference set is reused by a rerun (no re-embedding)
    _, again = run_dedup(tmp_path, scored_sample, f"decon_{method}_2", filters=[spec])
    assert again == dropped


def test_preset_validates():
    code, out, err = run_cli("validate", PRESET)
    assert code == 0, err
    assert "2 filters" in out
