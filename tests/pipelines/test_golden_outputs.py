"""Golden outputs: every shipped sample config on the bundled sample and every DataComp
baseline on a generated pool give the outputs commit 6302ebc gave (its in-memory plan ran
most of them), recorded in ``golden_outputs.json``: ``subset.npy``'s sha256, a digest of the
subset and dropped rows in (source shard, row) order, and the manifest's counts. The
oracle does not depend on ``execution.mode: memory``.

The row digest does not depend on part boundaries or Parquet metadata: each folder's parts
are read in name order, concatenated, and every row is hashed as ``repr`` of its
(column, value) pairs, per source shard. Pool paths (``source_shard``) are written relative
to the pool's folder.

To record again (from a checkout of the reference commit at OLD)::

    PYTHONPATH=$PWD python -m tests.pipelines.test_golden_outputs --record OLD
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.golden import digests, pool_digest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden_outputs.json")

POOL = {"rows": 2000, "shards": 4, "seed": 7}  # poolsift make-sample --datacomp --phash
SAMPLE_MODEL = ["model.precision=fp32", "model.jpeg_draft=false"]  # the same scores on both sides
PY3LANGID = "py3langid"  # DataComp's fastText lid.176.bin cannot be fetched offline

# name -> (config, pool: "sample" | "datacomp", --set overrides; {pool}/{refs}/{sample} filled in)
CASES: dict[str, tuple[str, str, list[str]]] = {
    "sample": ("sample", "sample", SAMPLE_MODEL),
    "sample_basic": ("sample_basic", "sample", SAMPLE_MODEL),
    "sample_dedup": ("sample_dedup", "sample", SAMPLE_MODEL),
    "sample_image_clusters": ("sample_image_clusters", "sample", SAMPLE_MODEL),
    "sample_quality": ("sample_quality", "sample", SAMPLE_MODEL),
    "dedup_web": (
        "dedup_web",
        "sample",
        [
            "input.shards={sample}/pool/{{00000..00003}}.tar",
            "model.arch=poolsift-tiny",
            "model.pretrained={sample}/tiny_clip/poolsift-tiny.safetensors",
            *SAMPLE_MODEL,
            "filters[2].decontaminate.reference={sample}/reference",
        ],
    ),
    "no_filter": ("no_filter", "datacomp", []),
    "basic_filter": ("basic_filter", "datacomp", [f"filters[2].language.backend={PY3LANGID}"]),
    "text_based": ("text_based", "datacomp", [f"filters[1].language.backend={PY3LANGID}"]),
    "image_based": (
        "image_based",
        "datacomp",
        [
            f"filters[1].language.backend={PY3LANGID}",
            "clusters.reference={refs}/reference.npy",
            "clusters.centroids={refs}/centroids.npy",
        ],
    ),
    "image_based_intersect_clip_score": (
        "image_based_intersect_clip_score",
        "datacomp",
        [
            f"filters[2].language.backend={PY3LANGID}",
            "clusters.reference={refs}/reference.npy",
            "clusters.centroids={refs}/centroids.npy",
        ],
    ),
    "clip_score_l14_30pct": ("clip_score_l14_30pct", "datacomp", []),
    "laion2b": (
        "laion2b",
        "datacomp",
        [f"filters[1].language.backend={PY3LANGID}", "filters[1].language.fallback=null"],
    ),
    "dedup_semantic_datacomp": (
        "dedup_semantic_datacomp",
        "datacomp",
        ["filters[2].decontaminate.reference={refs}/eval_l14_img.npy"],
    ),
}
SAMPLE_CASES = [n for n, (_, pool, _) in CASES.items() if pool == "sample"]
DATACOMP_CASES = [n for n, (_, pool, _) in CASES.items() if pool == "datacomp"]


def make_pool(root: Path, python_path: Path = REPO) -> Path:
    """The generated DataComp pool (with phash) under ``root/pool``."""
    pool = root / "pool"
    if not pool.is_dir():
        args = [f"--{k}={v}" for k, v in POOL.items()]
        _cli(python_path, "make-sample", "--datacomp", pool, *args, "--phash")
    return pool


def make_references(root: Path) -> Path:
    """Small deterministic references for the DataComp presets: k-means centroids and
    reference embeddings for image_based (L/14 width, 768), and evaluation-set
    embeddings for decontamination, some of them copies of pool embeddings (so it bites)."""
    import numpy as np

    refs = root / "refs"
    if refs.is_dir():
        return refs
    refs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((16, 768)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    np.save(refs / "centroids.npy", centroids)
    np.save(refs / "reference.npy", rng.standard_normal((6, 768)).astype(np.float32))
    pool_img = np.load(root / "pool" / "00000001.npz")["l14_img"][:40:4].astype(np.float32)
    noise = rng.standard_normal((10, 768)).astype(np.float32)
    np.save(refs / "eval_l14_img.npy", np.concatenate([pool_img, noise]))
    return refs


def _cli(python_path: Path, *args) -> subprocess.CompletedProcess:
    """``poolsift ARGS`` with the code at ``python_path``: in this process for this
    checkout's code, else in a child process whose PYTHONPATH is ``python_path``."""
    if python_path == REPO:
        from tests.conftest import run_cli

        code, stdout, stderr = run_cli(*args)
        assert code == 0, f"poolsift {' '.join(map(str, args))}\n{stderr}"
        return subprocess.CompletedProcess(args, code, stdout, stderr)
    env = {**os.environ, "PYTHONPATH": str(python_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *map(str, args)],
        cwd=python_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"poolsift {' '.join(map(str, args))}\n{proc.stderr}"
    return proc


def run_case(
    name: str, out: Path, root: Path, python_path: Path = REPO, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run case ``name`` with the code at ``python_path`` into ``out`` (its config and
    sample read from ``python_path``'s checkout; the DataComp pool from ``root``)."""
    config, pool, sets = CASES[name]
    fill = {"sample": python_path / "sample_data", "refs": root / "refs", "pool": root / "pool"}
    sets = [s.format(**fill) for s in sets]
    if pool == "datacomp":
        sets.append(f"input.datacomp_metadata={root / 'pool'}")
    sets += [f"output.dir={out}", *extra]
    args = [a for s in sets for a in ("--set", s)]
    return _cli(python_path, "run", python_path / "configs" / f"{config}.yaml", *args, "--quiet")


def record(old: Path, root: Path, mode: str | None = None) -> dict:
    """Run every case with the checkout at ``old`` (``execution.mode: mode`` if given) and
    return the golden record."""
    make_pool(root, old)
    make_references(root)
    cases = {}
    extra = (f"execution.mode={mode}",) if mode else ()
    for name in CASES:
        out = root / f"runs-{mode}" / name if mode else root / "runs" / name
        if not (out / "manifest.json").is_file():  # an earlier, interrupted recording's runs are kept
            shutil.rmtree(out, ignore_errors=True)
            run_case(name, out, root, old, extra)
        cases[name] = digests(out)
        print(name, cases[name]["subset.npy"][:12], cases[name]["counts"]["kept"], file=sys.stderr)
    commit = subprocess.run(["git", "-C", old, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "_comment": (
            f"Recorded from commit {commit.stdout.strip()} (default execution.mode) by "
            "`PYTHONPATH=$PWD python -m tests.pipelines.test_golden_outputs --record OLD` with OLD a checkout "
            "of that commit: each case is `poolsift run configs/<config>.yaml --set ... --quiet` with the --set "
            "overrides in CASES (sample configs: model.precision=fp32, model.jpeg_draft=false; DataComp "
            "baselines: the language filter on py3langid, the pool from `poolsift make-sample --datacomp "
            f"--rows {POOL['rows']} --shards {POOL['shards']} --seed {POOL['seed']} --phash`, references from "
            "make_references). The same commit with --mode memory (execution.mode=memory, its in-memory plan) "
            "gave the same digests for every case."
        ),
        "pool": pool_digest(root / "pool"),
        "cases": cases,
    }


def _compare(name: str, got: dict, want: dict) -> None:
    for folder in ("subset", "dropped"):
        g, w = got[folder], want[folder]
        assert g["columns"] == w["columns"], f"{name} {folder}: columns {g['columns']} != {w['columns']}"
        bad = [s for s in w["shards"] if g["shards"].get(s) != w["shards"][s]]
        assert g["sha256"] == w["sha256"], f"{name} {folder}: rows differ in source shards {bad}"
    assert got["counts"] == want["counts"], name
    assert got["thresholds"] == want["thresholds"], name
    assert got["cache"] == want["cache"], f"{name}: the cache layout changed: migrate it, saying so in one line"
    assert got["subset.npy"] == want["subset.npy"], f"{name}: subset.npy"


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def datacomp_root(tmp_path_factory, golden) -> Path:
    root = tmp_path_factory.mktemp("golden")
    make_pool(root)
    assert pool_digest(root / "pool") == golden["pool"], "make-sample --datacomp writes another pool than recorded"
    make_references(root)
    return root


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", DATACOMP_CASES)
def test_datacomp_baseline_equals_golden(name, tmp_path, datacomp_root, golden):
    out = tmp_path / "run"
    run_case(name, out, datacomp_root)
    _compare(name, digests(out), golden["cases"][name])
    assert _manifest(out)["execution"]["plan"] == "streaming"


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLE_CASES)
def test_sample_config_equals_golden(name, tmp_path, scored_sample, golden):
    out = tmp_path / "run"
    out.mkdir()
    if _manifest(scored_sample)["model"]["precision"] == "fp32":  # auto's choice here: its scores are fp32's
        shutil.copytree(scored_sample / "cache", out / "cache")
    run_case(name, out, tmp_path)
    _compare(name, digests(out), golden["cases"][name])
    assert _manifest(out)["execution"]["plan"] == "streaming"


def test_every_shipped_config_has_a_golden_case(golden):
    """A new configs/*.yaml fails here until it has a case (recorded with --record)."""
    shipped = {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert {config for config, _, _ in CASES.values()} == shipped
    assert set(golden["cases"]) == set(CASES)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--record", type=Path, required=True, help="a checkout of the reference commit")
    parser.add_argument("--work", type=Path, default=Path("/tmp/golden-record"))
    parser.add_argument("--mode", help="execution.mode to set; the record goes to stdout, not to the golden file")
    args = parser.parse_args()
    result = record(args.record.resolve(), args.work.resolve(), args.mode)
    if args.mode:
        print(json.dumps(result, indent=1))
    else:
        GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
