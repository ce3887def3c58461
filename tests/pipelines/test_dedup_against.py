"""``dedup: {against: [...]}`` end to end (issue 25): a second pool holding exact, near
and semantic copies of rows a first run kept, and clean rows. Every planted copy is
dropped as ``duplicate_of_reference`` naming the reference row it copies (exact,
perceptual, perceptual with ``min_similarity``, semantic), no clean row is dropped, on
DataComp-metadata input and on WebDataset input; decontamination against an output
(perceptual, semantic)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filtering.errors import InputError
from filtering.sample.datacomp import make_datacomp_sample
from pipelines.config import parse_config
from pipelines.runner import run
from tests.against_pools import datacomp_second_pool, kept_rows, webdataset_second_pool
from tests.conftest import REPO
from tests.pipelines.test_streaming import assert_recorded_outputs

pytestmark = pytest.mark.slow  # runs the whole pipeline


def dropped(out: Path) -> dict[str, tuple[str, str]]:
    t = pa.concat_tables([pq.read_table(p) for p in sorted((out / "dropped").glob("part-*.parquet"))])
    return {
        u: (r, d)
        for u, r, d in zip(t["uid"].to_pylist(), t["reason"].to_pylist(), t["duplicate_of"].to_pylist(), strict=True)
    }


def check_planted(out: Path, truth: dict, kinds: tuple[str, ...]) -> None:
    got = dropped(out)
    for kind in kinds:
        want = list(zip(truth[f"{kind}_uid"], truth[f"{kind}_of"], strict=True))
        hit = sum(got.get(u) == ("duplicate_of_reference", of) for u, of in want)
        assert hit >= 0.99 * len(want), (kind, hit, len(want))
    assert not set(truth["clean_uid"]) & set(got), "a clean row was dropped"


@pytest.fixture(scope="module")
def datacomp_first(tmp_path_factory):
    root = tmp_path_factory.mktemp("against-dc")
    make_datacomp_sample(root / "pool1", rows=1200, shards=3, phash=True)
    out = root / "out1"
    cfg = {
        "input": {"datacomp_metadata": str(root / "pool1")},
        "filters": [{"dedup": {"method": "exact"}}],
        "output": {"dir": str(out)},
    }
    run(parse_config(cfg), progress=False, log=lambda _m: None)
    return root, out


@pytest.mark.parametrize("method", ["exact", "perceptual"])
def test_datacomp_planted_copies(tmp_path, datacomp_first, method):
    root, out1 = datacomp_first
    truth = datacomp_second_pool(tmp_path / "pool2", kept_rows(out1), exact=40, near=40, clean=200)
    filters = [{"dedup": {"method": method, "against": [str(out1)]}}]
    m = assert_recorded_outputs(tmp_path / "pool2", tmp_path, filters)
    check_planted(tmp_path / "run", truth, ("exact", "near") if method == "perceptual" else ("exact",))
    if method == "exact":  # near copies have other bytes
        assert not set(truth["near_uid"]) & set(dropped(tmp_path / "run"))
    step = m["counts"]["filters"][0]
    assert step["reasons"] == {"duplicate_of_reference": 80 if method == "perceptual" else 40}
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    (record,) = [r for k, r in stages["dedup"].items() if k.startswith("dedup_ref_")]
    assert record["against"][0]["path"] == str(out1) and record["against"][0]["matched"] == step["dropped"]


def test_an_output_without_an_index_gets_one_built_with_a_line(tmp_path, datacomp_first):
    _, out1 = datacomp_first
    old = tmp_path / "old"
    shutil.copytree(out1, old)
    shutil.rmtree(old / "index")
    truth = datacomp_second_pool(tmp_path / "pool2", kept_rows(out1), exact=20, near=0, clean=50)
    lines: list[str] = []
    cfg = {
        "input": {"datacomp_metadata": str(tmp_path / "pool2")},
        "filters": [{"dedup": {"method": "exact", "against": [str(old)]}}],
        "output": {"dir": str(tmp_path / "out2")},
    }
    run(parse_config(cfg), progress=False, log=lines.append)
    assert len([line for line in lines if "has no index" in line]) == 1
    check_planted(tmp_path / "out2", truth, ("exact",))
    # an index built from subset parts says nowhere where a row's embedding is: semantic stops
    cfg["filters"] = [{"dedup": {"method": "semantic", "against": [str(old)]}}]
    with pytest.raises(InputError, match="built from the subset parts"):
        run(parse_config(cfg), progress=False, log=lambda _m: None)


def test_datacomp_planted_semantic_copies_and_lookalikes(tmp_path, datacomp_first):
    """The shard plan, one run of two dedups against the first output:

    - ``perceptual`` with ``min_similarity``: a hash match with a reference row counts
      only when the two rows' embeddings agree (cosine), as within the pool: exact and
      near copies (the reference's embedding, or one at cosine ~0.999) are dropped naming
      their row; look-alikes (a near hash, an unrelated embedding) are kept;
    - then ``semantic``: semantic copies (an embedding at cosine ~0.999, new bytes, a far
      hash) are dropped naming their row.

    No clean row is dropped."""
    root, out1 = datacomp_first
    truth = datacomp_second_pool(
        tmp_path / "pool2",
        kept_rows(out1),
        exact=20,
        near=20,
        clean=100,
        semantic=40,
        lookalike=20,
        first_pool=root / "pool1",
    )
    cfg = {
        "input": {"datacomp_metadata": str(tmp_path / "pool2")},
        "filters": [
            {"dedup": {"method": "perceptual", "min_similarity": 0.9, "against": [str(out1)]}},
            {"dedup": {"method": "semantic", "against": [str(out1)]}},
        ],
        "output": {"dir": str(tmp_path / "out2")},
    }
    m = run(parse_config(cfg), progress=False, log=lambda _m: None).manifest
    check_planted(tmp_path / "out2", truth, ("exact", "near", "semantic"))
    assert not set(truth["lookalike_uid"]) & set(dropped(tmp_path / "out2"))
    steps = m["counts"]["filters"]
    assert [s["reasons"] for s in steps] == [{"duplicate_of_reference": 40}, {"duplicate_of_reference": 40}]
    records = m["stages"]["dedup"]
    (perceptual,) = [r for k, r in records.items() if k.startswith("dedup_ref_phash")]
    assert perceptual["min_similarity"] == {"confirmed": 40, "not_confirmed": 20}
    (semantic,) = [r for k, r in records.items() if k.startswith("dedup_ref_semantic")]
    assert semantic["against"][0]["path"] == str(out1) and semantic["against"][0]["matched"] == 40


def test_semantic_against_embeddings_of_another_width_is_an_error(tmp_path, datacomp_first):
    _, out1 = datacomp_first  # l14_img of 768 floats; the new pool's are 24
    datacomp_second_pool(tmp_path / "pool2", kept_rows(out1), exact=0, near=0, clean=30)
    cfg = {
        "input": {"datacomp_metadata": str(tmp_path / "pool2")},
        "filters": [{"dedup": {"method": "semantic", "against": [str(out1)]}}],
        "output": {"dir": str(tmp_path / "out2")},
    }
    with pytest.raises(InputError, match="have dimension 768, the pool's 24"):
        run(parse_config(cfg), progress=False, log=lambda _m: None)


def test_semantic_against_matching_nothing_dedups_the_pool_as_without(tmp_path, datacomp_first, monkeypatch):
    """A semantic search against a reference that matches no row leaves the in-pool step
    its centroids and assignment (the same k and sample): the outputs equal a run without
    ``against``. The pool repeats one shard's embeddings under new uids (in-pool copies)."""
    import shutil

    root, out1 = datacomp_first
    pool2 = tmp_path / "pool2"
    datacomp_second_pool(pool2, kept_rows(out1), exact=10, near=10, clean=40, semantic=10, first_pool=root / "pool1")
    copy = pq.read_table(pool2 / "00000000.parquet")
    uids = [f"{int(u, 16) ^ 1:032x}" for u in copy.column("uid").to_pylist()]
    copy = copy.set_column(copy.schema.get_field_index("uid"), "uid", pa.array(uids, pa.string()))
    pq.write_table(copy, pool2 / "00000003.parquet")
    shutil.copy(pool2 / "00000000.npz", pool2 / "00000003.npz")
    make_datacomp_sample(tmp_path / "other", rows=60, shards=1, seed=9)  # 768-d, unrelated
    other = {"input": {"datacomp_metadata": str(tmp_path / "other")}, "output": {"dir": str(tmp_path / "out-other")}}
    run(parse_config({**other, "filters": [{"caption": {"min_words": 1}}]}), progress=False, log=lambda _m: None)
    from pipelines.executors import dedup_phase

    trained = []  # k-means trainings (in the driver)
    train = dedup_phase._train_centroids
    monkeypatch.setattr(dedup_phase, "_train_centroids", lambda *a: trained.append(1) or train(*a))
    outs = []
    for name, extra in (("with", {"against": [str(tmp_path / "out-other")]}), ("without", {})):
        cfg = {
            "input": {"datacomp_metadata": str(pool2)},
            "filters": [{"dedup": {"method": "semantic", **extra}}],
            "output": {"dir": str(tmp_path / name)},
        }
        outs.append(run(parse_config(cfg), progress=False, log=lambda _m: None).manifest)
    assert len(trained) == 2  # one a run: the in-pool step took the search's
    assert outs[0]["counts"]["filters"] == outs[1]["counts"]["filters"]
    assert outs[1]["counts"]["filters"][0]["reasons"] == {"duplicate_semantic": len(uids)}
    assert (tmp_path / "with" / "subset.npy").read_bytes() == (tmp_path / "without" / "subset.npy").read_bytes()
    assert dropped(tmp_path / "with") == dropped(tmp_path / "without")


MODEL = {"arch": "poolsift-tiny", "pretrained": str(REPO / "sample_data" / "tiny_clip" / "poolsift-tiny.safetensors")}


@pytest.fixture(scope="module")
def webdataset_first(tmp_path_factory):
    root = tmp_path_factory.mktemp("against-wds")
    first = {
        "input": {"shards": str(REPO / "sample_data" / "pool" / "{00000..00001}.tar")},
        "model": MODEL,
        "filters": [{"dedup": {"method": "perceptual"}}],
        "output": {"dir": str(root / "out1")},
    }
    run(parse_config(first), progress=False, log=lambda _m: None)
    return root / "out1"


def test_webdataset_planted_copies(tmp_path, webdataset_first):
    out1 = webdataset_first
    index = json.loads((out1 / "index" / "index.json").read_text())
    assert index["rows"] == json.loads((out1 / "manifest.json").read_text())["counts"]["kept"]
    truth = webdataset_second_pool(tmp_path / "pool2" / "00000.tar", out1, exact=20, near=20, clean=20)
    second = {
        "input": {"shards": str(tmp_path / "pool2" / "00000.tar")},
        "model": MODEL,
        "filters": [{"dedup": {"method": "perceptual", "against": [str(out1)]}}],
        "output": {"dir": str(tmp_path / "out2")},
    }
    run(parse_config(second), progress=False, log=lambda _m: None)
    check_planted(tmp_path / "out2", truth, ("exact", "near"))


def test_webdataset_planted_semantic_copies(tmp_path, webdataset_first):
    """``method: semantic`` against an earlier WebDataset output (its embeddings from its
    cache). The oracle is the embeddings themselves: a planted copy (exact, resized, or
    mirrored) whose image embedding has cosine >= the threshold with its reference row's is
    a semantic copy; at least 99% of those are dropped naming that row; every row dropped
    as ``duplicate_of_reference`` is within the threshold of the row it names; no clean
    row is dropped as one."""
    from filtering.clustering import normalize
    from filtering.dedup import index as ix

    out1 = webdataset_first
    pool2 = tmp_path / "pool2" / "00000.tar"
    truth = webdataset_second_pool(pool2, out1, exact=10, near=10, clean=20, semantic=20)
    second = {
        "input": {"shards": str(pool2)},
        "model": MODEL,
        "filters": [{"dedup": {"method": "semantic", "threshold": 0.95, "against": [str(out1)]}}],
        "output": {"dir": str(tmp_path / "out2")},
    }
    run(parse_config(second), progress=False, log=lambda _m: None)
    ref = ix.read_reference(str(out1), str(out1 / "index"))
    table = pa.concat_tables(pa.ipc.open_file(url).read_all() for url, _ in ref.files)
    at = {
        f"{h:016x}{lo:016x}": k
        for k, (h, lo) in enumerate(zip(table["uid_hi"].to_pylist(), table["uid_lo"].to_pylist(), strict=True))
    }
    shard, row = table["shard"].to_numpy(), table["row"].to_numpy()
    ref_emb = np.zeros((len(row), 0), np.float32)
    for s in np.unique(shard):  # the reference rows' embeddings, where its run cached them
        part = normalize(ix.embedding_rows(ref, int(s), "image", row[shard == s]))
        ref_emb = np.zeros((len(row), part.shape[1]), np.float32) if ref_emb.shape[1] == 0 else ref_emb
        ref_emb[shard == s] = part
    (cached,) = (tmp_path / "out2" / "cache").glob("*/*.image.npy")
    new_emb = normalize(np.load(cached))  # the second run's, in the shard's sample order
    import tarfile

    with tarfile.open(pool2) as tf:  # the sample order: key j is row j
        row_of = {json.loads(tf.extractfile(m).read())["uid"]: int(m.name[:9]) for m in tf if m.name.endswith(".json")}
    got = dropped(tmp_path / "out2")
    copies = [
        (u, of)
        for kind in ("exact", "near", "semantic")
        for u, of in zip(truth[f"{kind}_uid"], truth[f"{kind}_of"], strict=True)
        if new_emb[row_of[u]] @ ref_emb[at[of]] >= 0.95
    ]
    assert len(copies) >= 25, len(copies)  # every exact copy, most resized and mirrored ones
    hit = sum(got.get(u) == ("duplicate_of_reference", of) for u, of in copies)
    assert hit >= 0.99 * len(copies), (hit, len(copies))
    for u, (reason, of) in got.items():
        if reason == "duplicate_of_reference":
            assert new_emb[row_of[u]] @ ref_emb[at[of]] >= 0.95 - 1e-3
    assert not [u for u in truth["clean_uid"] if got.get(u, ("",))[0] == "duplicate_of_reference"]


def test_decontaminate_against_an_earlier_output(tmp_path, datacomp_first):
    """``decontaminate: {reference: DIR}`` with an earlier output: its kept rows' hashes from
    its index; copies dropped as contaminated, ``duplicate_of`` naming the reference row."""
    _, out1 = datacomp_first
    truth = datacomp_second_pool(tmp_path / "pool2", kept_rows(out1), exact=30, near=30, clean=100)
    filters = [{"decontaminate": {"reference": str(out1), "method": "perceptual", "max_distance": 6}}]
    m = assert_recorded_outputs(tmp_path / "pool2", tmp_path, filters)
    assert m["counts"]["filters"][0]["reasons"] == {"contaminated_perceptual": 60}
    got = dropped(tmp_path / "run")
    for kind in ("exact", "near"):
        for uid, of in zip(truth[f"{kind}_uid"], truth[f"{kind}_of"], strict=True):
            assert got[uid] == ("contaminated_perceptual", of)
    assert not set(truth["clean_uid"]) & set(got)


def test_semantic_decontaminate_against_an_earlier_output(tmp_path, datacomp_first):
    """``decontaminate: {reference: DIR, method: semantic}``: the earlier output's kept rows'
    embeddings read where its run found them (its index names each row's shard and
    position); copies whose embedding is within the threshold are dropped, naming the row."""
    root, out1 = datacomp_first
    truth = datacomp_second_pool(
        tmp_path / "pool2", kept_rows(out1), exact=10, near=10, clean=100, semantic=20, first_pool=root / "pool1"
    )
    cfg = {
        "input": {"datacomp_metadata": str(tmp_path / "pool2")},
        "filters": [{"decontaminate": {"reference": str(out1), "method": "semantic", "threshold": 0.95}}],
        "output": {"dir": str(tmp_path / "out2")},
    }
    m = run(parse_config(cfg), progress=False, log=lambda _m: None).manifest
    assert m["counts"]["filters"][0]["reasons"] == {"contaminated_semantic": 40}
    got = dropped(tmp_path / "out2")
    for kind in ("exact", "near", "semantic"):
        for uid, of in zip(truth[f"{kind}_uid"], truth[f"{kind}_of"], strict=True):
            assert got[uid] == ("contaminated_semantic", of)
    assert not set(truth["clean_uid"]) & set(got)


def test_poolsift_index_builds_one_for_an_old_output(tmp_path, datacomp_first):
    """``poolsift index DIR``: an output written before indexes gets ``DIR/index/``, listed in
    its manifest (the folder still verifies); a second call finds it there."""
    from filtering.writers.commit import verify
    from tests.conftest import run_cli

    _, out1 = datacomp_first
    old = tmp_path / "old"
    shutil.copytree(out1, old)
    shutil.rmtree(old / "index")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("index/")}
    manifest["outputs"].pop("index")
    (old / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run_cli("index", old)
    assert code == 0, err
    assert f"({manifest['counts']['kept']:,} kept rows)" in out
    after = json.loads((old / "manifest.json").read_text())
    assert "index/index.json" in after["files"] and "index/part-00000.arrow" in after["files"]
    verify(str(old), after)
    code, out, _ = run_cli("index", old)
    assert code == 0 and "already there" in out
    code, _, err = run_cli("index", tmp_path / "nothing")
    assert code == 2 and "no manifest.json" in err
