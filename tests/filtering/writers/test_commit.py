"""The switch from one result to the next (filtering/writers/commit.py): a run killed at
any rename of the switch is rolled forward at the next start, one killed before the
journal leaves the old result, and in every case the folder ends as one whole result
(issue 23, finding 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from filtering.writers import commit

OLD = {
    "manifest.json": b'{"run": "old"}',
    "report.html": b"<html>old</html>",
    "subset.npy": b"old uids",
    "subset/part-00000.parquet": b"old 0",
    "subset/part-00001.parquet": b"old 1",
    "subset/part-00002.parquet": b"old 2",
    "shards/00000.tar": b"old tar",
}
NEW = {
    "manifest.json": b'{"run": "new"}',
    "subset.npy": b"new uids",
    "subset/part-00000.parquet": b"new 0",
    "dropped/part-00000.parquet": b"new dropped",
}
BESIDE = {"cache/source-1/00000.parquet": b"cache", ".poolsift.lock": b"123"}  # not part of a result


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler cleans up."""


def files(root: Path) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = Path(d) / n
            if p.is_symlink():  # the staged result's view of the run's cache
                continue
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def put(root: Path, content: dict[str, bytes]) -> None:
    for rel, data in content.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def staged(tmp_path: Path) -> tuple[Path, commit.Staged]:
    out = tmp_path / "out"
    put(out, {**OLD, **BESIDE})
    stage = commit.Staged(str(out))
    stage.begin()
    put(Path(stage.dir), NEW)
    return out, stage


def switch_killed_after(monkeypatch, stage: commit.Staged, moves: int) -> None:
    done = []
    real = commit._move

    def move(src, dst):
        if len(done) == moves:
            raise Killed
        done.append(src)
        real(src, dst)

    monkeypatch.setattr(commit, "_move", move)
    with pytest.raises(Killed):
        stage.switch()
    monkeypatch.setattr(commit, "_move", real)


def test_a_switch_replaces_the_whole_result(tmp_path):
    out, stage = staged(tmp_path)
    assert files(out) == {**OLD, **BESIDE, **{f"{commit.NEXT}/{k}": v for k, v in NEW.items()}}
    stage.switch()
    assert files(out) == {**NEW, **BESIDE}  # no old part, shard or report left beside the new manifest
    assert sorted(os.listdir(out)) == sorted(
        ["cache", ".poolsift.lock", "manifest.json", "subset.npy", "subset", "dropped"]
    )
    assert stage.final(stage.url("subset", "part-00000.parquet")) == str(out / "subset" / "part-00000.parquet")


@pytest.mark.parametrize("moves", range(5 + 4))  # 5 old entries out, 4 new in
def test_a_switch_killed_at_any_rename_is_finished_at_the_next_start(tmp_path, monkeypatch, moves):
    out, stage = staged(tmp_path)
    switch_killed_after(monkeypatch, stage, moves)
    journal = json.loads((out / commit.JOURNAL).read_text())
    assert journal == {
        "old": ["manifest.json", "report.html", "subset.npy", "subset", "shards"],
        "new": ["manifest.json", "subset.npy", "subset", "dropped"],
    }
    assert not (out / "manifest.json").exists() or moves == 0  # the old manifest leaves first
    note = commit.recover(str(out))
    assert note == f"finished switching {out} to the result a killed run had committed"
    assert files(out) == {**NEW, **BESIDE}
    assert commit.recover(str(out)) is None  # nothing left to do


def test_a_recovery_killed_in_turn_is_finished_by_the_next(tmp_path, monkeypatch):
    out, stage = staged(tmp_path)
    switch_killed_after(monkeypatch, stage, 3)
    real = commit._move
    calls = []

    def move(src, dst):
        if calls:
            raise Killed
        calls.append(src)
        real(src, dst)

    monkeypatch.setattr(commit, "_move", move)
    with pytest.raises(Killed):
        commit.recover(str(out))
    monkeypatch.setattr(commit, "_move", real)
    commit.recover(str(out))
    assert files(out) == {**NEW, **BESIDE}


def test_killed_before_the_journal_keeps_the_old_result(tmp_path, monkeypatch):
    out, stage = staged(tmp_path)

    def killed(*_a, **_k):
        raise Killed

    monkeypatch.setattr(commit, "atomic_write_text", killed)
    with pytest.raises(Killed):
        stage.switch()
    assert not (out / commit.JOURNAL).exists()
    assert commit.recover(str(out)) == f"removed the unfinished outputs a killed run left in {out}"
    assert files(out) == {**OLD, **BESIDE}


def test_a_failure_before_the_switch_keeps_the_old_result_and_says_so(tmp_path):
    out = tmp_path / "out"
    put(out, {**OLD, **BESIDE})
    lines = []
    with pytest.raises(OSError), commit.staged_result(str(out), lines.append) as stage:
        put(Path(stage.dir), {"subset/part-00000.parquet": b"half"})
        raise OSError(28, "No space left on device")
    assert files(out) == {**OLD, **BESIDE}
    assert lines == [f"the previous result in {out} is kept as it was"]


def test_a_first_run_that_fails_claims_no_previous_result(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lines = []
    with pytest.raises(OSError), commit.staged_result(str(out), lines.append):
        raise OSError(28, "No space left on device")
    assert lines == [] and os.listdir(out) == []


def test_an_unreadable_journal_is_named(tmp_path):
    out = tmp_path / "out"
    put(out, {**OLD, commit.JOURNAL: b'{"old": ["../elsewhere"], "new": []}'})
    with pytest.raises(commit.OutputMismatchError, match="names entries that are not outputs"):
        commit.recover(str(out))
    (out / commit.JOURNAL).write_bytes(b"{")
    with pytest.raises(commit.OutputMismatchError, match="unreadable commit journal"):
        commit.recover(str(out))
