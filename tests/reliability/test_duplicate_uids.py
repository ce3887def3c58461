"""Duplicate uids (issue 14, finding 12): reported with count and examples in the manifest
and one warning line; ``input.uid.duplicates`` keeps them (report), drops the later copies
(keep_first, reason ``duplicate_uid``) or stops the run (error). WebDataset and DataComp input."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tests.conftest import run_cli
from tests.datacomp_pool import make_datacomp_pool

DUP = "ab" * 16


def _shard(path, uids: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tf:
        for i, uid in enumerate(uids):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
            for ext, data in (
                ("jpg", buf.getvalue()),
                ("txt", f"picture {i}".encode()),
                ("json", json.dumps({"uid": uid}).encode()),
            ):
                info = tarfile.TarInfo(f"{seed}{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def wds_config(tmp_path):
    # DUP three times: twice in shard 0 (once upper-case, so equal only after normalisation), once in shard 1
    _shard(tmp_path / "00000.tar", [f"{1:032x}", DUP, f"{2:032x}", DUP.upper()], 1)
    _shard(tmp_path / "00001.tar", [f"{3:032x}", DUP], 2)
    cfg = {
        "input": {"shards": str(tmp_path / "{00000..00001}.tar")},
        "model": {"arch": "poolsift-tiny", "pretrained": None, "precision": "fp32", "batch_size": 4, "num_workers": 0},
        "filters": [],
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _manifest(tmp_path):
    return json.loads((tmp_path / "out" / "manifest.json").read_text())


@pytest.mark.slow
def test_duplicates_are_reported_in_the_manifest_and_one_warning_line(wds_config, tmp_path):
    code, _, err = run_cli("run", wds_config, "--quiet")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "occur on more than one sample" in line]
    assert len(warnings) == 1 and DUP in warnings[0] and "input.uid.duplicates" in warnings[0]
    dup = _manifest(tmp_path)["uids"]["duplicates"]
    assert dup["policy"] == "report" and dup["rows"] == 2 and dup["uids"] == 1
    assert dup["examples"][0]["uid"] == DUP and dup["examples"][0]["count"] == 3
    assert [s["key"] for s in dup["examples"][0]["samples"]] == ["10001", "10003", "20001"]
    kept = np.load(tmp_path / "out" / "subset.npy")
    assert len(kept) == 6  # kept as they are, as asked, but no longer without a word


@pytest.mark.slow
def test_keep_first_drops_later_copies_with_a_reason_and_the_funnel_adds_up(wds_config, tmp_path):
    code, _, err = run_cli("run", wds_config, "--quiet", "--set", "input.uid.duplicates=keep_first")
    assert code == 0, err
    m = _manifest(tmp_path)
    c = m["counts"]
    assert c["filters"][0] == {
        "name": "uid_duplicates",
        "in": 6,
        "kept": 4,
        "dropped": 2,
        "reasons": {"duplicate_uid": 2},
    }
    assert c["input"] == 6 == c["kept"] + c["failed"] + sum(f["dropped"] for f in c["filters"])
    kept = np.load(tmp_path / "out" / "subset.npy")
    assert len(kept) == len(np.unique(kept)) == 4
    subset = pq.read_table(tmp_path / "out" / "subset").to_pydict()
    assert dict(zip(subset["uid"], subset["key"], strict=True))[DUP] == "10001"  # the first copy stays
    dropped = pq.read_table(tmp_path / "out" / "dropped").to_pylist()
    assert sorted((r["key"], r["reason"], r["uid"]) for r in dropped) == [
        ("10003", "duplicate_uid", DUP),
        ("20001", "duplicate_uid", DUP),
    ]


@pytest.mark.slow
def test_duplicates_error_stops_the_run_in_one_line(wds_config, tmp_path):
    code, _, err = run_cli("run", wds_config, "--quiet", "--set", "input.uid.duplicates=error")
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert "input.uid.duplicates" in last and DUP in last and "Traceback" not in err
    assert not (tmp_path / "out" / "subset.npy").exists()


@pytest.mark.slow
def test_datacomp_duplicates_across_shards(tmp_path):
    meta = make_datacomp_pool(tmp_path / "meta", shards=2, rows=20)
    first, second = sorted(meta.glob("*.parquet"))
    a, b = pq.read_table(first), pq.read_table(second)
    uid = a.column("uid")[3].as_py()
    uids = b.column("uid").to_pylist()
    uids[5] = uid
    import pyarrow as pa

    pq.write_table(b.set_column(b.column_names.index("uid"), "uid", pa.array(uids, pa.string())), second)
    cfg = {
        "input": {"datacomp_metadata": str(meta), "uid": {"duplicates": "keep_first"}},
        "filters": [],
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("run", path, "--quiet")
    assert code == 0, err
    m = _manifest(tmp_path)
    assert m["uids"]["duplicates"]["rows"] == 1 and m["uids"]["duplicates"]["examples"][0]["uid"] == uid
    assert m["counts"]["filters"][0]["dropped"] == 1
    kept = np.load(tmp_path / "out" / "subset.npy")
    assert len(kept) == len(np.unique(kept)) == 41 - 1
