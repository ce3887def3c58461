"""Source stages own what depends on the input kind; the manifest records it (``source``)."""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from filtering.sources import source_info
from tests.conftest import run_cli
from tests.datacomp_pool import make_datacomp_pool

pytestmark = pytest.mark.slow  # runs the CLI (make test-fast leaves these out)


def test_datacomp_source_record_model_and_hex_key(tmp_path):
    metadata = make_datacomp_pool(tmp_path / "metadata", shards=2, rows=20)
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "input": {"datacomp_metadata": str(metadata)},
                "filters": [{"clip_score": {"top_fraction": 0.5}}],
                "output": {"dir": str(out)},
            }
        )
    )
    code, _, err = run_cli("run", str(cfg), "--quiet")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == source_info("datacomp").to_dict()
    assert manifest["source"]["caption_column"] == "text" and manifest["source"]["images"] is False
    assert manifest["model"] == source_info("datacomp").model
    assert set(manifest["thresholds"]) == {"clip_l14_similarity_score"}  # the source's default score field
    schema = pq.read_schema(next((out / "subset").glob("*.parquet")))
    assert str(schema.field("key").type) == str(schema.field("uid").type)  # DataComp's key stored as hex, as uid

    cfg.write_text(
        yaml.safe_dump(
            {
                "input": {"datacomp_metadata": str(metadata)},
                "filters": [],
                "output": {"dir": str(out), "webdataset": True},
            }
        )
    )
    code, _, err = run_cli("validate", str(cfg))
    assert code == 2 and "output.webdataset" in err and "no images" in err
