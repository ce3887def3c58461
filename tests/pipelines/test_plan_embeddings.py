"""The planner checks every embedding a filter or stage reads before any data is read:
a semantic dedup on DataComp metadata without npz files fails at ``poolsift validate``."""

import numpy as np
import pytest
import yaml

from filtering.stages.datacomp import DataCompStage
from tests.conftest import run_cli
from tests.datacomp_pool import make_datacomp_pool

pytestmark = pytest.mark.slow  # runs the CLI (make test-fast leaves these out)


@pytest.fixture(scope="module")
def no_npz(tmp_path_factory):
    root = make_datacomp_pool(tmp_path_factory.mktemp("dc") / "metadata", shards=2, rows=20)
    for npz in root.glob("*.npz"):
        npz.unlink()
    return root


def _config(tmp_path, metadata, filters, **sections):
    cfg = {
        "input": {"datacomp_metadata": str(metadata)},
        "filters": filters,
        "output": {"dir": str(tmp_path / "out")},
        **sections,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_semantic_dedup_without_npz_fails_at_validate_naming_the_key(tmp_path, no_npz, monkeypatch):
    read = []
    for method in ("stream_prepare", "shard_pool"):  # the footers, the shards' rows
        monkeypatch.setattr(DataCompStage, method, lambda self, *_a: read.append(1))
    cfg = _config(tmp_path, no_npz, [{"dedup": {"method": "semantic", "threshold": 0.95}}])
    code, _, err = run_cli("validate", str(cfg))
    assert code == 2, err
    assert "filters: dedup.embedding" in err and ".npz" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli("run", str(cfg), "--quiet")
    assert code == 2 and "filters: dedup.embedding" in err
    assert not read  # no metadata was read


def test_an_embedding_kind_the_input_lacks_names_what_it_has(tmp_path):
    metadata = make_datacomp_pool(tmp_path / "metadata", shards=1, rows=10)
    cfg = _config(tmp_path, metadata, [{"dedup": {"method": "semantic", "threshold": 0.95, "embedding": "l14_txt2"}}])
    code, _, err = run_cli("validate", str(cfg))
    assert code == 2 and "filters: dedup.embedding" in err and "'l14_txt2'" in err and "l14_img" in err
    cfg = _config(tmp_path, metadata, [{"dedup": {"method": "semantic", "threshold": 0.95, "embedding": "l14_txt"}}])
    code, _, err = run_cli("validate", str(cfg))
    assert code == 0, err


def test_filters_without_embeddings_validate_without_npz(tmp_path, no_npz):
    cfg = _config(tmp_path, no_npz, [{"clip_score": {"top_fraction": 0.3}}, {"dedup": {"method": "exact"}}])
    code, _, err = run_cli("validate", str(cfg))
    assert code == 0, err


def test_image_clusters_without_npz_fails_at_validate(tmp_path, no_npz):
    ref = tmp_path / "ref.npy"
    np.save(ref, np.ones((3, 24), np.float32))
    cfg = _config(tmp_path, no_npz, [{"image_clusters": {}}], clusters={"reference": str(ref), "num_clusters": 4})
    code, _, err = run_cli("validate", str(cfg))
    assert code == 2 and "clusters.embedding" in err, err
