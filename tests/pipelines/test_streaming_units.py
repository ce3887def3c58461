"""The shard plan's reductions against independent oracles (DataComp's own formulas)."""

from __future__ import annotations

import numpy as np
import pytest

from filtering.filters import top_fraction
from filtering.filters.top_fraction import KEY_BITS, key_value, keys_under, score_keys, select_threshold
from pipelines.executors import streaming


def datacomp_threshold(scores: np.ndarray, fraction: float):
    """DataComp's ``get_threshold`` (``baselines/apply_filter.py:390-392``): ``-np.sort(-s)[n]``
    with ``n = int(N * fraction)``, NaN sorted last; None where DataComp's index is past the end."""
    n = int(len(scores) * fraction)
    return None if n >= len(scores) else -np.sort(-scores)[n]


def test_score_keys_order_like_the_values():
    v = np.array([-np.inf, -3.5, -1e-300, -0.0, 0.0, 1e-300, 0.25, 7.0, np.inf])
    keys = score_keys(v)
    assert (np.diff(keys.astype(np.float64)) >= 0).all() and keys[3] == keys[4]  # -0.0 == 0.0
    assert (np.argsort(keys, kind="stable") == np.argsort(v, kind="stable")).all()
    back = [key_value(int(k), np.dtype(np.float64)) for k in keys]
    assert back[:3] == list(v[:3]) and back[4:] == list(v[4:])


def _threshold(scores: np.ndarray, fraction: float, shards: int = 5):
    """The reduction over "shards" of one array: per-shard histograms, refined, then one bin's values."""
    parts = np.array_split(scores, shards)
    nan = sum(int(np.isnan(p).sum()) for p in parts)
    hist = sum(
        np.bincount((score_keys(p[~np.isnan(p)]) >> np.uint64(64 - KEY_BITS)).astype(np.int64), minlength=1 << KEY_BITS)
        for p in parts
    )

    def refine(prefix, bits):
        shift = np.uint64(64 - bits - KEY_BITS)
        return sum(
            np.bincount(
                ((keys_under(p, prefix, bits)[1] >> shift) & np.uint64(0xFFFF)).astype(np.int64),
                minlength=1 << KEY_BITS,
            )
            for p in parts
        )

    def gather(prefix, bits):
        return np.concatenate([keys_under(p, prefix, bits)[0] for p in parts])

    return select_threshold(hist, nan, len(scores), fraction, scores.dtype, refine, gather)


@pytest.fixture(params=["gather", "refine"])
def gather_limit(request, monkeypatch):
    """Both paths: the bin's scores gathered at once, and refined bit by bit first (forced)."""
    if request.param == "refine":
        monkeypatch.setattr(top_fraction, "GATHER_LIMIT", 3)
    return request.param


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_threshold_is_datacomps(dtype, fraction, gather_limit):
    rng = np.random.default_rng(7)
    for scores in (
        np.round(rng.uniform(0.1, 0.4, 5000), 2).astype(dtype),  # many ties
        rng.normal(0, 1, 5000).astype(dtype),  # negatives
        np.where(rng.random(5000) < 0.3, np.nan, rng.uniform(0, 1, 5000)).astype(dtype),  # NaN counted in N
        np.full(1000, 0.25, dtype),  # one value: refined to all 64 bits, nothing gathered
        np.concatenate([np.full(500, -0.5, dtype), np.full(500, 0.5, dtype), np.linspace(-1, 1, 300).astype(dtype)]),
        np.full(10, np.nan, dtype),
    ):
        want = datacomp_threshold(scores, fraction)
        for got in (_threshold(scores, fraction), top_fraction.threshold(scores, fraction)):  # 5 shards, 1
            if want is None:
                assert got is None
            elif np.isnan(want):
                assert np.isnan(got) and got.dtype == scores.dtype
            else:
                assert got == want and got.dtype == want.dtype


def test_uid_ranges_split_every_shard_at_the_same_bins(tmp_path):
    """The driver groups the fine ranges by their totals only; each range task finds
    every shard's rows for its group in the shard's ``starts`` file."""
    from pipelines.executors import uid_phase

    rng = np.random.default_rng(0)
    fine = 1 << uid_phase.FINE_BITS
    bins = [rng.integers(0, 5, fine) for _ in range(3)]
    for i, b in enumerate(bins):
        np.save(
            uid_phase.spill_paths(str(tmp_path), i)["starts"], np.concatenate([[0], np.cumsum(b)]).astype(np.uint32)
        )
        assert (uid_phase.bin_counts(str(tmp_path), i) == b).all()
    totals = np.sum(bins, axis=0)
    groups = streaming._bin_groups(totals, limit=400)
    assert len(groups) > 10 and groups[0][0] == 0 and groups[-1][1] == fine
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:], strict=False))  # contiguous, no bin twice
    for start, stop in groups[:-1]:
        assert int(totals[start:stop].sum()) >= 400
    for s, b in enumerate(bins):  # each shard's sorted rows, cut into consecutive ranges covering them all
        rows = [uid_phase.rows_in(str(tmp_path), s, start, stop) for start, stop in groups]
        assert rows[0][0] == 0 and rows[-1][1] == int(b.sum())
        assert all(x[1] == y[0] for x, y in zip(rows, rows[1:], strict=False))
        assert all(hi - lo == int(b[start:stop].sum()) for (lo, hi), (start, stop) in zip(rows, groups, strict=True))


def test_kept_counts_per_uid_range(tmp_path):
    """A shard's kept count per fine range, from its keep flags in spill order."""
    from pipelines.executors import uid_phase

    fine = 1 << uid_phase.FINE_BITS
    counts = np.zeros(fine, np.int64)
    counts[[0, 5, fine - 1]] = [3, 2, 4]
    np.save(
        uid_phase.spill_paths(str(tmp_path), 0)["starts"], np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
    )
    uid_phase.spill_kept(str(tmp_path), 0, np.array([1, 0, 1, 0, 0, 1, 1, 1, 0], bool))
    want = np.zeros(fine, np.int64)
    want[[0, 5, fine - 1]] = [2, 0, 3]
    assert (uid_phase.bin_counts(str(tmp_path), 0, "kept_bins") == want).all()


def test_uid_range_finds_repeats_and_their_first_copies(tmp_path):
    """Equal high halves with different low halves are distinct uids (kept, sorted by the
    low half); an equal pair in both halves is a repeat: its first copy in (shard, row)
    order stays, each later one is marked in its shard's ``later`` file and counted."""
    from filtering.uid import UID_DTYPE
    from pipelines.executors import uid_phase

    def spill(i, pairs, rows, keep):
        paths = uid_phase.spill_paths(str(tmp_path), i)
        np.save(paths["uids"], np.array(pairs, UID_DTYPE))
        np.save(paths["rows"], np.array(rows, np.uint32))
        np.save(paths["kept"], np.array(keep))
        np.save(paths["later"], np.zeros(len(pairs), bool))
        starts = np.zeros((1 << uid_phase.FINE_BITS) + 1, np.uint32)
        starts[1:] = len(pairs)  # one range holds every uid
        np.save(paths["starts"], starts)

    spill(0, [(7, 9), (3, 1)], [0, 1], [True, True])
    spill(1, [(7, 2), (5, 5)], [0, 1], [True, False])
    target = tmp_path / "subset.npy"
    np.lib.format.open_memmap(target, mode="w+", dtype=UID_DTYPE, shape=(3,)).flush()
    assert uid_phase.check_range((str(tmp_path), 2, (0, 1), True, True, str(target), 0)) is None
    assert np.load(target).tolist() == [(3, 1), (7, 2), (7, 9)]
    # shard 2: (7, 9) at rows 4 and 8 (rows 0-3 failed), shard 0 had it first
    spill(2, [(7, 9), (1, 1), (7, 9)], [4, 6, 8], [False, True, False])
    found = uid_phase.check_range((str(tmp_path), 3, (0, 1), True, True, None, 0))
    assert found["rows"] == 2 and found["uids"] == 1 and "later" not in found
    assert found["copies"] == {(7, 9): (3, [0, 2 << 32 | 4, 2 << 32 | 8])}
    assert uid_phase.later_rows(str(tmp_path), 2).tolist() == [4, 8]
    assert not uid_phase.later_rows(str(tmp_path), 0).size


def test_the_plan_reads_what_filters_declare():
    """A filter that declares no reduction is row-local and streams anywhere; a declared
    reduction is checked where it sits (streaming.why_not names no filter)."""
    import pydantic

    from filtering.filters.base import Decision, Filter, InputInfo, Survivors, TopFraction
    from filtering.filters.compose import AllOf, Leaf, Not
    from pipelines.executors.streaming import _reduction_why_not, decided_tree

    class Params(pydantic.BaseModel):
        reduction: str | None = None

    class NewFilter(Filter):
        name = "new_filter"

        def reduction(self):
            return {None: None, "top": TopFraction("s", 0.5), "dedup": Survivors(), "odd": object()}[
                self.params.reduction
            ]

        def decided(self, result):
            fixed = NewFilter(self.params, self.input)
            fixed.result = result
            return fixed

        def apply(self, pool, alive):
            return Decision(alive, "new_filter")

    info = InputInfo(kind="datacomp")
    row, top, dedup, odd = (NewFilter(Params(reduction=r), info) for r in (None, "top", "dedup", "odd"))
    tree = [Leaf(dedup), AllOf([Leaf(row), Not(Leaf(top))])]
    assert _reduction_why_not(row, set()) is None
    assert _reduction_why_not(top, {"s"}) is None
    assert "a column a whole-pool stage computes" in _reduction_why_not(top, set())
    assert _reduction_why_not(dedup, set()) is None  # anywhere in the tree: survivors among the rows that reach it
    assert "no step for its reduction" in _reduction_why_not(odd, set())
    fixed = decided_tree(tree, [0.25], {(0,): "survivors"})
    assert fixed[0].filter.result == "survivors"
    assert fixed[1].children[0].filter is row  # row-local: unchanged
    assert fixed[1].children[1].child.filter.result == 0.25


def test_remote_output_on_several_ray_nodes_needs_a_shared_spill_dir(tmp_path):
    """A remote output's arrays spill to a local folder: this machine's temporary one when
    every task runs here, ``execution.spill_dir`` otherwise; a Ray cluster of several nodes
    without it stops before any work, naming the key."""
    from filtering.errors import ConfigError
    from pipelines.config import parse_config

    class TwoNodes:
        def nodes(self) -> int:
            return 2

    raw = {"input": {"datacomp_metadata": str(tmp_path)}, "output": {"dir": "s3://bucket/run"}}
    with pytest.raises(ConfigError) as e:
        streaming._remote_spill_root(parse_config(raw), TwoNodes())
    assert str(e.value) == (
        "output.dir s3://bucket/run is remote and Ray runs on 2 nodes: set execution.spill_dir to a folder "
        "every node mounts (the plan spills scores, uids and subset.npy there between phases)"
    )
    assert streaming._remote_spill_root(parse_config(raw), None) is None  # the local pool: a temporary folder
    raw["execution"] = {"spill_dir": str(tmp_path / "shared")}
    assert streaming._remote_spill_root(parse_config(raw), TwoNodes()) == str(tmp_path / "shared")
    assert (tmp_path / "shared").is_dir()
    raw["execution"] = {"spill_dir": "s3://bucket/spill"}
    with pytest.raises(ConfigError, match=r"execution\.spill_dir.*must be a local folder"):
        parse_config(raw)
