"""Errors are one line naming the key or file and the cause (issue 14, finding 9):
refused pickles, wrong checkpoints, empty files, corrupt DataComp parquet, disk full."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from filtering.errors import PoolsiftError
from filtering.io.atomic import WriteError, atomic_open
from tests.conftest import SAMPLE, run_cli, write_config
from tests.datacomp_pool import make_datacomp_pool

pytestmark = pytest.mark.slow  # runs the CLI or loads the model

TINY = SAMPLE / "tiny_clip" / "poolsift-tiny.safetensors"


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _evil_pt(path):
    import torch

    torch.save({"state_dict": Payload()}, path)


def _wrong_shape(path):
    from safetensors.torch import load_file, save_file

    sd = load_file(TINY)
    name = next(k for k, v in sd.items() if k.endswith("c_fc.weight"))
    sd[name] = sd[name][:, :-1].contiguous()
    save_file(sd, path)


def _missing_key(path):
    from safetensors.torch import load_file, save_file

    sd = load_file(TINY)
    sd.pop(sorted(sd)[0])
    save_file(sd, path)


CASES = [
    ("evil.pt", _evil_pt, "refused: the checkpoint is a pickle holding a reference to posix.system"),
    ("empty.pt", lambda p: p.write_bytes(b""), "the file is empty or cut short"),
    ("empty.safetensors", lambda p: p.write_bytes(b""), "the file is empty or cut short"),
    ("shape.safetensors", _wrong_shape, "cannot load: state dict for CLIP: size mismatch for "),
    ("missing.safetensors", _missing_key, "cannot load: state dict for CLIP: Missing key(s) in state_dict: "),
]


@pytest.mark.parametrize(("name", "make", "cause"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_checkpoint_is_one_line_naming_it(tmp_path, name, make, cause):
    from filtering.models.clip import load_clip

    path = tmp_path / name
    make(path)
    with pytest.raises(PoolsiftError) as info:
        load_clip("poolsift-tiny", str(path), device="cpu", precision="fp32")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"model.pretrained: {path}: {cause}"), msg
    assert "weights_only" not in msg and "http" not in msg


def test_run_with_a_refused_pickle_is_one_line(tmp_path):
    path = tmp_path / "evil.pt"
    _evil_pt(path)
    cfg = write_config(
        tmp_path / "c.yaml",
        model={"arch": "poolsift-tiny", "pretrained": str(path), "device": "cpu"},
        output={"dir": str(tmp_path / "out")},
    )
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 1
    lines = [line for line in err.strip().splitlines() if line.startswith("poolsift: error:")]
    assert len(lines) == 1 and len(err.strip().splitlines()) <= 2, err  # at most the "scoring N shards" note
    assert f"model.pretrained: {path}: refused" in lines[0]
    assert "weights_only" not in err


def test_a_corrupt_datacomp_parquet_is_named(tmp_path):
    root = make_datacomp_pool(tmp_path / "meta", shards=2, rows=20)
    victim = sorted(root.glob("*.parquet"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] + b"\0" * 64 + data[-8:])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"input: {{datacomp_metadata: {root}}}\nfilters: [{{clip_score: {{top_fraction: 0.5}}}}]\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"poolsift: error: input.datacomp_metadata: cannot read {victim}: "), err
    assert len([line for line in lines if "error" in line]) == 1


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (
            OSError("16000 requested and 8128 written"),
            "short write (16000 requested and 8128 written); is the disk full?",
        ),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device (errno 28)"),
    ],
)
def test_disk_full_names_the_file(tmp_path, error, cause):
    path = tmp_path / "x.npy"
    with pytest.raises(WriteError) as info, atomic_open(str(path)) as f:
        f.write(b"half")
        raise error
    assert str(info.value) == f"cannot write {path}: {cause}"
    assert os.listdir(tmp_path) == []  # the temporary file is gone too


def test_disk_full_while_caching_is_one_line(tmp_path, monkeypatch):
    real_save = np.save

    def short_save(f, arr, *args, **kwargs):
        if getattr(f, "name", "").find("/cache/") >= 0:
            f.write(b"\0" * 8128)
            raise OSError(f"{arr.nbytes} requested and 8128 written")
        return real_save(f, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", short_save)
    cfg = write_config(tmp_path / "c.yaml", output={"dir": str(tmp_path / "out")})
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"poolsift: error: cannot write {tmp_path}/out/cache/"), err
    assert last.endswith("written); is the disk full?"), err
