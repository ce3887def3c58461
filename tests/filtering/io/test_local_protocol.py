"""An fsspec URL backed by folders (``local://``) as ``output.dir``: the writers never make
parent folders themselves (an object store has none), so the file system must make them."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.slow
def test_run_into_a_local_protocol_url_writes_what_a_plain_path_does(tmp_path):
    from pipelines.config import parse_config
    from pipelines.runner import run
    from tests.datacomp_pool import make_datacomp_pool

    metadata = make_datacomp_pool(tmp_path / "metadata", shards=2, rows=40)

    def go(out: str):
        raw = {
            "input": {"datacomp_metadata": str(metadata)},
            "filters": [{"clip_score": {"top_fraction": 0.5}}, {"dedup": {"method": "exact"}}],
            "output": {"dir": out},
        }
        return run(parse_config(raw), progress=False, log=lambda _m: None)

    url = go(f"local://{tmp_path / 'via-url'}")
    plain = go(str(tmp_path / "plain"))
    assert url.manifest["counts"] == plain.manifest["counts"]
    assert np.array_equal(np.load(tmp_path / "via-url" / "subset.npy"), np.load(tmp_path / "plain" / "subset.npy"))
