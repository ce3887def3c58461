"""open_clip's own training script trains on poolsift's resharded output (issue 17).

The evaluation loader (``is_train=False``) takes another path through webdataset than
training does; only ``open_clip_train.main`` with ``--dataset-type webdataset`` shows
whether the pinned webdataset release and the shards work together.
"""

from __future__ import annotations

import json
import logging
import math
import re

import pytest

from tests.conftest import SAMPLE, run_cli, write_config

pytestmark = pytest.mark.slow  # runs the CLI (make test-fast leaves these out)


def test_open_clip_train_main_trains_on_the_resharded_sample(rerun_dir, tmp_path, monkeypatch):
    pytest.importorskip("open_clip_train.main", reason="open_clip_torch[training] is not installed")
    from open_clip_train.main import main as train_main

    from filtering.models.clip import register_bundled_configs

    cfg = write_config(tmp_path / "sample.yaml", output={"dir": str(rerun_dir)})
    code, _, stderr = run_cli(
        "run", cfg, "--quiet", "--set", "output.webdataset=true", "--set", "output.samples_per_shard=64"
    )
    assert code == 0, stderr
    manifest = json.loads((rerun_dir / "manifest.json").read_text())
    n_shards, kept = len(manifest["shards"]), manifest["counts"]["kept"]

    register_bundled_configs()  # arch poolsift-tiny, as poolsift itself registers it
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"
    batch = 16
    # open_clip_train sets every logger to INFO and adds root handlers; left so, torch
    # logs its compile metrics at interpreter exit, after pytest's summary line.
    loggers = [logging.root, *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    for logger in loggers:
        monkeypatch.setattr(logger, "level", logger.level)
    train_main(
        [
            "--dataset-type",
            "webdataset",
            "--train-data",
            str(rerun_dir / "shards" / f"{{00000..{n_shards - 1:05d}}}.tar"),
            "--train-num-samples",
            str(kept),
            "--model",
            "poolsift-tiny",
            "--pretrained",
            str(SAMPLE / "tiny_clip" / "poolsift-tiny.safetensors"),
            "--batch-size",
            str(batch),
            "--epochs",
            "1",
            "--workers",
            "0",
            "--lr",
            "1e-4",
            "--warmup",
            "1",
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "--log-every-n-steps",
            "1",
            "--save-frequency",
            "1",
            "--seed",
            "0",
            "--logs",
            str(logs),
            "--name",
            "tiny",
            "--report-to",
            "",
        ]
    )

    run = logs / "tiny"
    assert (run / "checkpoints" / "epoch_1.pt").is_file()
    log = (run / "out.log").read_text()
    losses = [float(v) for v in re.findall(r"Loss: ([-+0-9.eE]+|nan|inf)", log)]
    steps = kept // batch  # webdataset training: whole batches of the epoch's samples
    assert len(losses) >= steps > 0, log[-2000:]
    assert all(math.isfinite(v) for v in losses)
