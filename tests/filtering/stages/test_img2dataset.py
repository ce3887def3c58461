"""img2dataset pools as input (issue 17): shards built by img2dataset itself, downloading
from a loopback HTTP server, with dead links, corrupt images and a shard with no successes.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tests.conftest import SAMPLE, run_cli

PER_SHARD = 5
MODEL = {
    "arch": "poolsift-tiny",
    "pretrained": str(SAMPLE / "tiny_clip" / "poolsift-tiny.safetensors"),
    "precision": "fp32",
    "batch_size": 8,
    "num_workers": 0,
}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    rng = np.random.default_rng(0)
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40 + i, 56, 3), dtype=np.uint8)).save(buf, "PNG")
        (root / f"img{i}.png").write_bytes(buf.getvalue())
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 4)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


def _rows(base: str) -> list[dict]:
    """15 URLs, 5 per shard: shard 0 has a dead link, shard 1 a corrupt image, shard 2 only dead
    links. Their uids sit in a column named ``id`` (img2dataset's default has none at all)."""
    uid = [f"{i:032x}" for i in range(15)]
    uid[1] = uid[1].upper()  # upper-case hex
    uid[2] = "8A6E0804-2BD0-4672-B79D-D97027F9071A"  # a dashed UUID
    urls = [f"{base}/img{i}.png" for i in range(4)] + [f"{base}/missing0.png"]
    urls += [f"{base}/img{i}.png" for i in range(4, 8)] + [f"{base}/corrupt.jpg"]
    urls += [f"{base}/gone{i}.png" for i in range(5)]
    return [{"url": u, "caption": f"a picture number {i}", "id": uid[i], "batch": f"b{i}"} for i, u in enumerate(urls)]


@pytest.fixture(scope="module")
def pool_dir(server, tmp_path_factory):
    """img2dataset's own shards: NNNNN.tar, NNNNN.parquet and NNNNN_stats.json."""
    pytest.importorskip("img2dataset")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI on import
    from img2dataset import download

    tmp = tmp_path_factory.mktemp("i2d")
    listing = tmp / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(server)), listing)
    out = tmp / "pool"
    download(
        url_list=str(listing),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["id", "batch"],
        output_format="webdataset",
        output_folder=str(out),
        number_sample_per_shard=PER_SHARD,
        processes_count=1,
        thread_count=4,
        image_size=32,
        timeout=5,
        retries=0,
        enable_wandb=False,
        distributor="multiprocessing",
    )
    return str(out)


def _config(tmp_path, pool: str, **input_extra) -> str:
    cfg = {
        "input": {"shards": f"{pool}/{{00000..00002}}.tar", **input_extra},
        "model": MODEL,
        "filters": [{"clip_score": {"min": -1.0}}],
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
def test_img2dataset_shards_failures_columns_and_uids(pool_dir, tmp_path):
    side = pa.concat_tables([pq.read_table(f"{pool_dir}/{i:05d}.parquet") for i in range(3)]).to_pylist()
    by_batch = {r["batch"]: r for r in side}  # batch bN: the N-th URL of the listing
    assert len(side) == 15 and sum(r["status"] == "success" for r in side) == 8  # 1 dead + 1 corrupt + 5 dead
    assert by_batch["b9"]["status"] == "failed_to_resize" and by_batch["b4"]["status"] == "failed_to_download"

    code, _, err = run_cli("run", _config(tmp_path, pool_dir, uid={"field": "id"}), "--quiet")
    assert code == 0, err
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input"] == 15  # attempted, not only what reached the tars
    assert counts["kept"] == 8 and counts["failed"] == 7
    assert counts["failed_reasons"] == {"failed_upstream": 7}
    assert counts["input"] == counts["kept"] + counts["failed"] + sum(f["dropped"] for f in counts["filters"])
    upstream = manifest["stages"]["img2dataset"]
    assert upstream["shards_with_parquet"] == 3 and upstream["count"] == 15 and upstream["successes"] == 8
    assert manifest["uids"]["source"] == "json:id" and manifest["uids"]["derived"] == 0
    assert manifest["uids"]["duplicates"]["rows"] == 0

    subset = {r["batch"]: r for r in pq.read_table(out / "subset").to_pylist()}
    assert sorted(subset) == sorted(b for b, r in by_batch.items() if r["status"] == "success")
    # uids: upper-case hex lowered, the dashed UUID becomes its 32 hex digits
    assert subset["b1"]["uid"] == f"{1:032x}"
    assert subset["b2"]["uid"] == "8a6e08042bd04672b79dd97027f9071a"
    assert subset["b0"]["uid"] == f"{0:032x}"
    stored = {}
    for i in range(3):
        with tarfile.open(f"{pool_dir}/{i:05d}.tar") as tf:
            stored.update(
                {m.name.split(".")[0]: tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")}
            )
    for batch, row in subset.items():
        src = by_batch[batch]
        assert row["key"] == src["key"] and row["status"] == "success" and row["error_message"] is None
        assert isinstance(row["exif"], str)  # save_additional_columns and exif, under their own names
        assert row["sha256"] == src["sha256"]  # img2dataset's hash of the downloaded file
        assert row["image_sha256"] == hashlib.sha256(stored[row["key"]]).hexdigest()  # poolsift's, of the stored bytes
        assert row["image_sha256"] != row["sha256"]  # img2dataset resized and re-encoded it

    dropped = pq.read_table(out / "dropped").to_pylist()
    assert len(dropped) == 7 and {r["filter"] for r in dropped} == {"failed"}
    for r in dropped:
        src = by_batch[r["batch"]]
        assert r["key"] == src["key"] and r["status"] == src["status"] != "success"
        assert (
            r["reason"].startswith(f"failed_upstream: {src['status']}: ") and r["error_message"] == src["error_message"]
        )
        assert r["uid"] == f"{int(r['batch'][1:]):032x}"
    assert {r["source_shard"].rsplit("/", 1)[-1] for r in dropped} == {"00000.tar", "00001.tar", "00002.tar"}


@pytest.mark.slow
def test_img2dataset_pool_without_the_uid_field_errors_or_derives_when_told(pool_dir, tmp_path):
    cfg = _config(tmp_path, pool_dir)  # input.uid.field: uid, which img2dataset did not write
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 2
    assert "input.uid" in err and "missing .json field 'uid'" in err and "Traceback" not in err

    code, _, err = run_cli("run", cfg, "--quiet", "--set", "input.uid.source=derive", "--set", "input.uid.derive=url")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["uids"]["source"] == "derived:url" and manifest["uids"]["derived"] == 8
    assert manifest["counts"]["input"] == 15 and manifest["counts"]["failed"] == 7
    assert "8 uid(s) derived" in err
    subset = pq.read_table(tmp_path / "out" / "subset").to_pylist()
    assert len(subset) == 8
    assert all(r["uid"] == hashlib.sha256(r["url"].encode()).hexdigest()[:32] for r in subset)
