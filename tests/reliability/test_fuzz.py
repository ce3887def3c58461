"""Randomly damaged copies of the bundled shards, run through ``poolsift run``.

Each case is a few samples of a bundled shard, repacked, then damaged one way: cut
anywhere, one bit flipped in a member's header or in its bytes, a member repeated, two
neighbouring members swapped. Every case must leave: exit 0, the manifest's
``input == kept + failed + sum(dropped)``, every sample that lies wholly before the
damage present (kept, dropped by a filter, or failed for its own reason), and no file
written outside the output directory. Seeded: the same cases every run. Samples whose
``.json`` the damage removed have no uid: ``input.uid.on_invalid: fail`` (first run) makes
each of those a failure row, ``derive`` (second run) derives one (by default a missing
uid stops the run, exit 2). Every output is then read by its readers: the manifest
matches the files beside it (``filtering.writers.commit.verify``, each file's size and
sha256), and ``poolsift report`` and ``poolsift sweep`` exit 0 on it (issue 23).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from filtering.writers.commit import verify
from tests.conftest import SAMPLE, run_cli
from tests.reliability.hostile import accounted, bundled_members, rows, run_pool, tar_bytes

SAMPLES_PER_CASE = 8
CASES_PER_RUN = 10
RUNS = 2
ON_INVALID = ("fail", "derive")  # per run

pytestmark = pytest.mark.slow  # runs the CLI
KINDS = ("truncate", "header_bit", "payload_bit", "duplicate", "swap")


def _members_and_layout(members):
    data = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return data, tf.getmembers()


def _damage(rng: random.Random, kind: str, members) -> tuple[bytes, list[str]]:
    """The damaged shard, and the keys of the samples wholly before the damage."""
    data, layout = _members_and_layout(members)
    keys = [m.name.split(".", 1)[0] for m in layout]
    point: int | None = None  # byte offset of the damage in ``data``; None: nothing structural
    if kind == "truncate":
        point = rng.randrange(len(data))
        data = data[:point]
    elif kind == "header_bit":
        m = rng.choice(layout)
        point = m.offset
        flipped = bytearray(data)
        flipped[m.offset + rng.randrange(512)] ^= 1 << rng.randrange(8)
        data = bytes(flipped)
    elif kind == "payload_bit":
        m = rng.choice([m for m in layout if m.size])
        flipped = bytearray(data)
        flipped[m.offset_data + rng.randrange(m.size)] ^= 1 << rng.randrange(8)
        data = bytes(flipped)
    elif kind == "duplicate":
        i = rng.randrange(len(members))
        data, _ = _members_and_layout(members[: i + 1] + [members[i]] + members[i + 1 :])
    else:  # swap
        i = rng.randrange(len(members) - 1)
        point = layout[i].offset
        swapped = list(members)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        data, _ = _members_and_layout(swapped)
    if point is None:
        return data, list(dict.fromkeys(keys))
    ends: dict[str, int] = {}
    for key, m in zip(keys, layout, strict=True):
        ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
    return data, [k for k, end in ends.items() if end <= point]


def _files(root: Path, skip: Path) -> set[Path]:
    return {p for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.mark.parametrize("run", range(RUNS))
def test_damaged_shards_never_fail_the_run_or_lose_complete_samples(tmp_path, run):
    rng = random.Random(1400 + run)
    pool = sorted((SAMPLE / "pool").glob("*.tar"))
    shards, expected, kinds = [], {}, {}
    (tmp_path / "in").mkdir()
    for case in range(CASES_PER_RUN):
        kind = KINDS[(run * CASES_PER_RUN + case) % len(KINDS)]
        members = bundled_members(SAMPLES_PER_CASE, rng.choice(pool), skip=rng.randrange(200))
        data, before = _damage(rng, kind, members)
        shard = tmp_path / "in" / f"{case:02d}-{kind}.tar"
        shard.write_bytes(data)
        shards.append(shard)
        expected[str(shard)], kinds[str(shard)] = before, kind
    before_run = _files(tmp_path, tmp_path / "out")

    # A sample split by damage can lack its .json: fail it alone, or derive its uid (the
    # default, a missing uid, stops the run by design: input.uid.on_invalid).
    code, err, manifest, out = run_pool(tmp_path, shards, uid={"on_invalid": ON_INVALID[run]}, webdataset=True)

    assert code == 0, err
    assert accounted(manifest), manifest["counts"]
    assert _files(tmp_path, tmp_path / "out") - before_run == {tmp_path / "config.yaml"} - before_run
    found: dict[str, set[str]] = {}
    for r in rows(out, "subset") + rows(out, "dropped"):
        if not (r.get("reason") or "").startswith("unreadable_shard"):
            found.setdefault(r["source_shard"], set()).add(r["key"])
    for shard, keys in expected.items():
        missing = set(keys) - found.get(shard, set())
        assert not missing, f"{kinds[shard]}: {shard} lost complete samples {sorted(missing)}"
    kept = {(r["source_shard"], r["key"]) for r in rows(out, "subset")}
    resharded = sum(s["count"] for s in manifest.get("shards", []))
    assert resharded == len(kept) == manifest["counts"]["kept"]
    _readers_succeed(tmp_path, out, manifest)


def _readers_succeed(tmp_path: Path, out: Path, manifest: dict) -> None:
    """The manifest matches the files beside it, before and after ``report`` and ``sweep``
    read the output, and both exit 0 (failed rows, derived uids and all)."""
    assert manifest.get("files"), "the manifest lists no files"
    verify(str(out), manifest, hashes=tuple(manifest["files"]))
    code, _, err = run_cli("report", out)
    assert code == 0, err
    assert (out / "report.html").stat().st_size > 0
    code, _, err = run_cli("sweep", tmp_path / "config.yaml", "--param", "filters[0].clip_score.min=0.3,0.6", "--quiet")
    assert code == 0, err
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["failed"] for r in sweep["results"]] == [manifest["counts"]["failed"]] * 2
    verify(str(out), manifest, hashes=tuple(manifest["files"]))
