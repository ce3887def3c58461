"""img2dataset's per-shard parquet merged into a shard's scored rows (fast; no download)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filtering.errors import PoolsiftError
from filtering.stages.img2dataset import merge_side_parquet, source_stamp
from filtering.stages.webdataset import SCORE_SCHEMA


def _scored(url: str, keys: list[str]) -> pa.Table:
    rows = [
        {"uid": f"{int(k):032x}", "key": k, "source_shard": url, "caption": f"c{k}", "exif": '{"a": 1}'} for k in keys
    ]
    return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)


def test_attempted_urls_missing_from_the_tar_become_failure_rows_with_their_columns(tmp_path):
    url = str(tmp_path / "00000.tar")
    (tmp_path / "00000.tar").write_bytes(b"")
    side = pa.table(
        {
            "key": ["0", "1", "2", "3"],
            "url": ["u0", "u1", "u2", "u3"],
            "caption": ["c0", "c1", "c2", "c3"],
            "uid": [f"{i:032x}" for i in range(4)],
            "status": ["success", "failed_to_download", "success", "success"],
            "error_message": [None, "404 Not Found", None, None],
            "exif": [None, None, '{"b": 2}', None],
            "batch": [7, 8, 9, 10],
        }
    )
    pq.write_table(side, tmp_path / "00000.parquet")
    table, added = merge_side_parquet(_scored(url, ["0", "2"]), url, "uid")
    assert added == 2 and table.num_rows == 4
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["0"]["error"] is None and rows["0"]["batch"] == 7 and rows["0"]["status"] == "success"
    assert rows["0"]["exif"] == '{"a": 1}'  # the parquet has none: the .json's stays
    assert rows["2"]["exif"] == '{"b": 2}'
    assert rows["1"]["error"] == "failed_upstream: failed_to_download: 404 Not Found"
    assert rows["1"]["uid"] == f"{1:032x}" and rows["1"]["url"] == "u1" and rows["1"]["batch"] == 8
    assert rows["3"]["error"].startswith("missing_from_shard:")  # a success the tar does not hold
    assert "parquet" in source_stamp(url)  # a changed parquet rescores the shard


def test_a_shard_without_a_parquet_is_left_as_it_is(tmp_path):
    url = str(tmp_path / "00000.tar")
    table = _scored(url, ["0"])
    assert merge_side_parquet(table, url, "uid") == (table, 0)


def test_an_unreadable_parquet_is_one_line_naming_the_file(tmp_path):
    url = str(tmp_path / "00000.tar")
    (tmp_path / "00000.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PoolsiftError, match=r"00000\.parquet: cannot read img2dataset's parquet") as e:
        merge_side_parquet(_scored(url, ["0"]), url, "uid")
    assert "\n" not in str(e.value)
