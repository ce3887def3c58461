"""The per-shard score cache: a rerun reuses it without building the model; a changed shard is rescored."""

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # runs the CLI (make test-fast leaves these out)


def write_shard(path, n, seed, corrupt=(), no_uid=()):
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            key = f"{seed:02d}{i:04d}"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (48, 72, 3), dtype=np.uint8)).save(buf, "JPEG")
            jpg = buf.getvalue()[:60] if i in corrupt else buf.getvalue()
            meta = {} if i in no_uid else {"uid": f"{seed:08x}{i:024x}"}
            for ext, data in (("jpg", jpg), ("txt", f"picture {i}".encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def tiny_pool(tmp_path):
    write_shard(tmp_path / "00000.tar", 12, 1, corrupt={3}, no_uid={5})
    write_shard(tmp_path / "00001.tar", 9, 2)
    cfg = {
        # sample 010005 has no uid: derived on purpose (the default is an exit-2 error)
        "input": {"shards": str(tmp_path / "{00000..00001}.tar"), "uid": {"on_invalid": "derive"}},
        "model": {"arch": "poolsift-tiny", "pretrained": None, "precision": "fp32", "batch_size": 4, "num_workers": 0},
        "filters": [{"clip_score": {"top_fraction": 0.5}}],
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_rerun_reuses_cache_without_building_the_model(tiny_pool, tmp_path, monkeypatch):
    import filtering.models.clip as clip_models

    calls = []
    real = clip_models.load_clip
    monkeypatch.setattr(clip_models, "load_clip", lambda *a, **k: calls.append(a) or real(*a, **k))
    code, out, err = run_cli("run", tiny_pool, "--quiet")
    assert code == 0, err
    assert len(calls) == 1
    first = pq.read_table(tmp_path / "out" / "subset")

    def boom(*a, **k):
        raise AssertionError("the model must not be built on a cached rerun")

    monkeypatch.setattr(clip_models, "load_clip", boom)
    code, out, err = run_cli("run", tiny_pool, "--quiet", "--set", "filters[0].clip_score.top_fraction=0.25")
    assert code == 0, err
    assert "cached" in err
    second = pq.read_table(tmp_path / "out" / "subset")
    assert second.num_rows < first.num_rows
    assert set(second.column("uid").to_pylist()) <= set(first.column("uid").to_pylist())

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["input"] == 21 and c["failed"] == 1
    assert c["input"] == c["kept"] + c["failed"] + sum(f["dropped"] for f in c["filters"])
    assert manifest["failures"][0]["reason"].startswith("corrupt_image")
    assert manifest["model"]["arch"] == "poolsift-tiny"  # recorded from the cache, not from a model load


def test_changed_shard_is_rescored_alone(tiny_pool, tmp_path, monkeypatch):
    import filtering.stages.webdataset as score

    assert run_cli("run", tiny_pool, "--quiet")[0] == 0
    write_shard(tmp_path / "00001.tar", 7, 3)  # replaced with different content
    scored = []
    real = score.score_stream
    monkeypatch.setattr(score, "score_stream", lambda urls, *a, **k: scored.extend(urls) or real(urls, *a, **k))
    code, _, err = run_cli("run", tiny_pool, "--quiet")
    assert code == 0, err
    assert [u.rsplit("/", 1)[-1] for u in scored] == ["00001.tar"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["input"] == 12 + 7


def test_uids_come_from_json_or_are_derived(tiny_pool, tmp_path):
    from filtering.uid import derive_uid

    assert run_cli("run", tiny_pool, "--quiet", "--set", "filters=[]")[0] == 0
    table = pq.read_table(tmp_path / "out" / "subset").to_pydict()
    by_key = dict(zip(table["key"], table["uid"], strict=True))
    assert by_key["010000"] == f"{1:08x}{0:024x}"
    assert by_key["010005"] == derive_uid("00000.tar", "010005")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["uids"]["derived"] == 1 and manifest["uids"]["invalid"] == 1
    kept = np.load(tmp_path / "out" / "subset.npy")
    assert kept.dtype == np.dtype("u8,u8") and len(kept) == 20
    np.testing.assert_array_equal(kept, np.sort(kept))


def test_a_missing_uid_is_an_exit_2_error_unless_the_config_says_how_to_derive(tiny_pool, tmp_path):
    code, _, err = run_cli("run", tiny_pool, "--quiet", "--set", "input.uid.on_invalid=error")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "input.uid" in line and "010005" in line and "missing .json field 'uid'" in line
    assert not (tmp_path / "out" / "subset.npy").exists()
