"""Subset and audit parts: streamed in order, fixed part sizes, hex columns stored plain."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filtering.writers.parquet import HEX_COLUMNS, META_KEY, _PartWriter, part_format

SCHEMA = pa.schema([("uid", pa.string()), ("caption", pa.string()), ("n", pa.int64())])


def write_parts(dir_url, tables, schema, rows_per_part, provenance) -> list[str]:
    """``tables`` written as the plan's filter pass writes one shard's parts
    (``pipelines/executors/streaming.py: _write_folder``); the parts' paths."""
    schema, options = part_format(schema, provenance, HEX_COLUMNS)
    with _PartWriter(dir_url, schema, rows_per_part, options) as parts:
        for table in tables:
            parts.add(table)
    return parts.paths


def _table(start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n)
    return pa.table(
        {"uid": [f"{i:032x}" for i in ids], "caption": [f"caption {i}" for i in ids], "n": ids}, schema=SCHEMA
    )


@pytest.mark.parametrize("rows_per_part", [1, 7, 50, 1000])
def test_streamed_tables_become_parts_of_fixed_size_in_order(tmp_path, rows_per_part):
    sizes = [0, 3, 11, 0, 5, 20, 1]  # empty and uneven pieces, as per-shard subsets are
    starts = np.cumsum([0, *sizes[:-1]])
    tables = [_table(int(s), n) for s, n in zip(starts, sizes, strict=True)]
    paths = write_parts(str(tmp_path / "subset"), iter(tables), tables[0].schema, rows_per_part, {"run": 1})
    total = sum(sizes)
    assert [p.rsplit("/", 1)[-1] for p in paths] == [f"part-{i:05d}.parquet" for i in range(-(-total // rows_per_part))]
    counts = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    assert counts == [rows_per_part] * (len(paths) - 1) + [total - rows_per_part * (len(paths) - 1)]
    back = pq.read_table(tmp_path / "subset")
    assert back.column("n").to_pylist() == list(range(total))
    for p in paths:
        assert json.loads(pq.read_schema(p).metadata[META_KEY]) == {"run": 1}
    assert not list((tmp_path / "subset").glob(".tmp-*"))


def test_no_rows_still_write_one_part_with_the_schema(tmp_path):
    paths = write_parts(str(tmp_path / "d"), [_table(0, 0)], _table(0, 0).schema, 10, {})
    assert len(paths) == 1
    t = pq.read_table(paths[0])
    assert t.num_rows == 0 and t.column_names == ["uid", "caption", "n"]


def test_hex_digests_are_stored_plain_and_uncompressed(tmp_path):
    (path,) = write_parts(str(tmp_path / "d"), [_table(0, 100)], _table(0, 100).schema, 1000, {})
    rg = pq.ParquetFile(path).metadata.row_group(0)
    columns = {rg.column(i).path_in_schema: rg.column(i) for i in range(rg.num_columns)}
    assert columns["uid"].compression == "UNCOMPRESSED"
    assert "RLE_DICTIONARY" not in columns["uid"].encodings
    assert columns["caption"].compression == "SNAPPY"


def test_a_failing_stream_leaves_only_complete_parts(tmp_path, monkeypatch):
    import filtering.writers.parquet as parquet

    monkeypatch.setattr(parquet, "ROW_GROUP_ROWS", 2)  # part 1 is open, two row groups in, when the source fails

    def tables():
        yield _table(0, 15)
        raise RuntimeError("source vanished")

    with pytest.raises(RuntimeError, match="vanished"):
        write_parts(str(tmp_path / "d"), tables(), SCHEMA, 10, {})
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["part-00000.parquet"]
    assert pq.read_table(tmp_path / "d" / "part-00000.parquet").num_rows == 10
