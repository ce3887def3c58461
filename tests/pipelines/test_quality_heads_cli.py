"""Quality heads end to end: the bundled watermark head on the sample, public-head presets on DataComp pools."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.numpy import save_file

from tests.conftest import REPO, SAMPLE, run_cli, write_config
from tests.datacomp_pool import (
    AESTHETIC_SHAPES,
    NSFW_SHAPES,
    make_datacomp_pool,
    pool_embeddings,
    random_state_dict,
    reference_aesthetic,
    reference_nsfw,
    save_torch_state_dict,
)

pytestmark = pytest.mark.slow
PRESET = REPO / "configs" / "sample_quality.yaml"


def _watermark_truth() -> dict[str, bool]:
    out = {}
    with tarfile.open(SAMPLE / "quality" / "00004.tar") as tf:
        for m in tf.getmembers():
            if m.name.endswith(".json"):
                meta = json.load(tf.extractfile(m))
                out[meta["uid"]] = meta["truth"]["watermark"]
    return out


def _sample_config(path, out, **sections):
    return write_config(path, base=PRESET, output={"dir": str(out), "report": True}, **sections)


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("quality")
    cfg = _sample_config(base / "q.yaml", base / "run")
    code, _, stderr = run_cli("run", cfg, "--quiet")
    assert code == 0, stderr
    return base, cfg


def test_sample_quality_drops_the_watermarked_and_keeps_the_clean(quality_run):
    base, _ = quality_run
    truth = _watermark_truth()
    kept = set(pq.read_table(base / "run" / "subset", columns=["uid"]).column("uid").to_pylist())
    marked = [u for u, w in truth.items() if w]
    clean = [u for u, w in truth.items() if not w]
    assert len(marked) == 75 and len(clean) == 175
    assert sum(u not in kept for u in marked) >= 0.90 * len(marked)
    assert sum(u in kept for u in clean) >= 0.95 * len(clean)
    dropped = pq.read_table(base / "run" / "dropped").to_pylist()
    assert {(r["filter"], r["reason"]) for r in dropped} == {("score", "watermark_score_above_max")}
    manifest = json.loads((base / "run" / "manifest.json").read_text())
    assert manifest["thresholds"] == {"watermark_score": 0.7}
    assert manifest["stages"]["scorers"]["watermark"]["cache"]["shards_scored"] == 1


def test_shipped_head_separates_planted_from_clean(quality_run, tmp_path):
    """ROC-AUC over every sample: a rerun without filters keeps all rows (and reuses every cache)."""
    base, cfg = quality_run
    out = tmp_path / "all"
    import shutil

    shutil.copytree(base / "run" / "cache", out / "cache")
    code, _, stderr = run_cli("run", cfg, "--quiet", "--set", "filters=[]", "--set", f"output.dir={out}")
    assert code == 0, stderr
    table = pq.read_table(out / "subset", columns=["uid", "watermark_score"])
    truth = _watermark_truth()
    y = np.array([truth[u] for u in table.column("uid").to_pylist()])
    s = table.column("watermark_score").to_numpy()
    auc = (s[y][:, None] > s[~y][None, :]).mean() + 0.5 * (s[y][:, None] == s[~y][None, :]).mean()
    assert auc >= 0.95
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["scorers"]["watermark"]["cache"] == {
        "dir": str(out / "cache" / next(p.name for p in (out / "cache").glob("scorer-watermark-*"))),
        "shards_scored": 0,
        "shards_cached": 1,
    }


def test_a_second_scorer_leaves_the_first_ones_cache_alone(quality_run, tmp_path):
    base, cfg = quality_run
    import shutil

    out = tmp_path / "two"
    shutil.copytree(base / "run" / "cache", out / "cache")
    raw = yaml.safe_load(cfg.read_text())
    second = dict(raw["scorers"][0]["embedding_head"], name="watermark_t", backend="torch")
    raw["scorers"].append({"embedding_head": second})
    raw["output"]["dir"] = str(out)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw))
    code, _, stderr = run_cli("run", tmp_path / "two.yaml", "--quiet")
    assert code == 0, stderr
    scorers = json.loads((out / "manifest.json").read_text())["stages"]["scorers"]
    assert scorers["watermark"]["cache"]["shards_cached"] == 1
    assert scorers["watermark_t"]["cache"]["shards_scored"] == 1
    t = pq.read_table(out / "subset", columns=["watermark_score", "watermark_t_score"])
    np.testing.assert_allclose(
        t.column("watermark_t_score").to_numpy(), t.column("watermark_score").to_numpy(), atol=1e-5
    )


def test_head_and_embedding_size_mismatch_fails_validate(tmp_path):
    save_torch_state_dict(random_state_dict(AESTHETIC_SHAPES), tmp_path / "aesthetic.pth")
    scorers = [
        {
            "embedding_head": {
                "name": "aesthetic",
                "preset": "laion_aesthetic",
                "weights": str(tmp_path / "aesthetic.pth"),
            }
        }
    ]
    cfg = _sample_config(tmp_path / "c.yaml", tmp_path / "run")
    raw = yaml.safe_load(cfg.read_text())
    raw["scorers"] = scorers
    cfg.write_text(yaml.safe_dump(raw))
    code, _, stderr = run_cli("validate", cfg)
    assert code == 2
    assert "768-dimensional" in stderr and "embedding 'image' has 64 dimensions" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_filter_on_a_column_nothing_provides_fails_validate(tmp_path):
    cfg = write_config(
        tmp_path / "c.yaml",
        filters=[{"score": {"column": "aesthetic_score", "min": 5}}],
        output={"dir": str(tmp_path / "run")},
    )
    code, _, stderr = run_cli("validate", cfg)
    assert code == 2 and "score needs ['aesthetic_score']" in stderr


# --- DataComp-format pools ---------------------------------------------------------------


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    return make_datacomp_pool(tmp_path_factory.mktemp("dc") / "metadata", shards=3, rows=80, dims=(512, 768))


def _dc_config(path, metadata, out, scorers, filters):
    cfg = {
        "input": {"datacomp_metadata": str(metadata)},
        "scorers": scorers,
        "filters": filters,
        "output": {"dir": str(out)},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_public_aesthetic_architecture_from_a_torch_state_dict_scores_a_datacomp_pool(tmp_path, metadata):
    sd = random_state_dict(AESTHETIC_SHAPES, seed=7)
    weights = save_torch_state_dict(sd, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    scorers = [
        {
            "embedding_head": {
                "name": "aesthetic",
                "preset": "laion_aesthetic",
                "weights": str(weights),
                "embedding": "l14_img",
            }
        }
    ]
    out = tmp_path / "run"
    cfg = _dc_config(
        tmp_path / "c.yaml", metadata, out, scorers, [{"score": {"column": "aesthetic_score", "top_fraction": 0.5}}]
    )
    code, _, stderr = run_cli("run", cfg, "--quiet")
    assert code == 0, stderr
    uids, emb = pool_embeddings(metadata, "l14_img")
    expected = dict(zip(uids, reference_aesthetic(emb, sd), strict=True))
    t = pq.read_table(out / "subset", columns=["uid", "aesthetic_score"]).to_pydict()
    assert len(t["uid"]) >= len(uids) // 2
    np.testing.assert_allclose(t["aesthetic_score"], [expected[u] for u in t["uid"]], atol=1e-5, rtol=0)
    ref = np.array(list(expected.values()))
    assert min(t["aesthetic_score"]) >= np.sort(ref)[::-1][int(len(ref) * 0.5)] - 1e-5
    from filtering.report import gather

    [col] = gather(str(out)).score_columns  # the report reads every row's score from the scorer's cache
    assert (col.column, col.scope, col.scorer) == ("aesthetic_score", "pool", "aesthetic")
    assert (int(col.histogram.kept.sum()), int(col.histogram.dropped.sum())) == (
        len(t["uid"]),
        len(uids) - len(t["uid"]),
    )
    assert col.best[0].score == pytest.approx(ref.max(), abs=1e-5) and col.worst[0].score == pytest.approx(
        ref.min(), abs=1e-5
    )


def test_numpy_head_reads_only_its_npz_array_imports_no_torch_and_equals_reference(tmp_path, metadata):
    sd = random_state_dict(NSFW_SHAPES, seed=8, norm=768)
    save_file(sd, str(tmp_path / "nsfw.safetensors"))
    scorers = [
        {"embedding_head": {"name": "nsfw", "preset": "nemo_nsfw", "weights": str(tmp_path / "nsfw.safetensors")}}
    ]
    out = tmp_path / "run"
    cfg = _dc_config(tmp_path / "c.yaml", metadata, out, scorers, [{"score": {"column": "nsfw_score", "max": 0.5}}])
    # The head scores in the streaming plan's workers (forked: the spies go with them); each
    # process appends what it read and, after scoring a shard, the heavy modules it holds.
    seen = tmp_path / "seen.txt"
    code = (
        "import sys\n"
        "import filtering.stages.datacomp as dc\n"
        "import filtering.stages.scorer_stage as ss\n"
        "HEAVY = ('torch', 'open_clip', 'torchvision')\n"
        "def note(line):\n"
        f"    with open({str(seen)!r}, 'a') as f: f.write(line + '\\n')\n"
        "real = dc.load_npz_array\n"
        "def spy(path, kind, part):\n"
        "    note(f'kind {kind}')\n"
        "    return real(path, kind, part)\n"
        "dc.load_npz_array = spy\n"
        "compute = ss.ScorerStage._compute\n"
        "def scored(self, *args):\n"
        "    out = compute(self, *args)\n"
        "    note(f'heavy {sorted(m for m in HEAVY if m in sys.modules)}')\n"
        "    return out\n"
        "ss.ScorerStage._compute = scored\n"
        "from pipelines.cli import main\n"
        f"rc = main(['run', {str(cfg)!r}, '--quiet'])\n"
        "print(rc, sorted(m for m in HEAVY if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 []"
    assert set(seen.read_text().splitlines()) == {"kind l14_img", "heavy []"}
    uids, emb = pool_embeddings(metadata, "l14_img")
    expected = reference_nsfw(emb, sd)
    kept = set(pq.read_table(out / "subset", columns=["uid"]).column("uid").to_pylist())
    assert kept == {u for u, s in zip(uids, expected, strict=True) if s <= 0.5}
    t = pq.read_table(out / "subset", columns=["uid", "nsfw_score"]).to_pydict()
    by_uid = dict(zip(uids, expected, strict=True))
    np.testing.assert_allclose(t["nsfw_score"], [by_uid[u] for u in t["uid"]], atol=1e-5, rtol=0)


def test_report_shows_the_score_column_with_its_threshold_and_best_and_worst(quality_run):
    from filtering.report import gather

    base, _ = quality_run
    data = gather(str(base / "run"))
    [col] = data.score_columns
    assert (col.column, col.scope, col.scorer) == ("watermark_score", "pool", "watermark")
    assert col.histogram.thresholds == [0.7]
    assert int(col.histogram.kept.sum()) == json.loads((base / "run" / "manifest.json").read_text())["counts"]["kept"]
    assert int(col.histogram.kept.sum() + col.histogram.dropped.sum()) == 250
    truth = _watermark_truth()
    assert sum(truth[s.uid] for s in col.best) >= 10 and not any(truth[s.uid] for s in col.worst)
    assert col.best[0].score >= col.best[-1].score > col.worst[-1].score >= col.worst[0].score
    html = (base / "run" / "report.html").read_text()
    assert 'id="score-watermark_score"' in html and "threshold 0.7000" in html
    assert "Highest watermark_score" in html and "Lowest watermark_score" in html


def test_sweep_over_a_score_threshold(quality_run, tmp_path):
    base, cfg = quality_run
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(base / "run" / "cache", out / "cache")
    code, stdout, stderr = run_cli(
        "sweep", cfg, "--param", "filters[0].score.max=0.1,0.9", "--set", f"output.dir={out}", "--quiet"
    )
    assert code == 0, stderr
    results = json.loads((out / "sweep.json").read_text())["results"]
    assert [r["thresholds"] for r in results] == [{"watermark_score": 0.1}, {"watermark_score": 0.9}]
    assert results[0]["kept"] < results[1]["kept"]


def test_weights_path_resolves_against_the_config_folder(tmp_path, metadata):
    (tmp_path / "heads").mkdir()
    save_file(random_state_dict({"layers.0": (1, 768)}), str(tmp_path / "heads" / "w.safetensors"))
    scorers = [{"embedding_head": {"name": "q", "preset": "linear", "weights": "heads/w.safetensors"}}]
    cfg = _dc_config(tmp_path / "c.yaml", metadata, tmp_path / "run", scorers, [])
    code, _, stderr = run_cli("validate", cfg)  # the tests run from the repository root, not tmp_path
    assert code == 0, stderr
    (tmp_path / "heads" / "w.safetensors").unlink()
    code, _, stderr = run_cli("validate", cfg)
    assert code == 2 and "scorers[0].embedding_head.weights" in stderr and "w.safetensors" in stderr
