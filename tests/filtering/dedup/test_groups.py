"""Groups from pairs and the survivor rule (``partitioned.components_of``, ``groups.survivors``:
the one implementation the filter and the shard plan's dedup phase share), against a
plain-Python union-find oracle."""

import numpy as np
import pytest

from filtering.dedup import groups
from filtering.dedup.partitioned import components_of
from filtering.uid import uids_to_u8u8


def survivor_oracle(n, i, j, uids, scores, keep):
    """Plain Python: union-find over the pairs, then in each group the row with the highest
    score (a missing one last; ``keep: smallest_uid`` ignores scores), then the smallest uid
    as a 128-bit number, then the first row. Per row, the row that survives its group."""
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i, j, strict=True):
        parent[find(int(a))] = find(int(b))

    def key(r):
        s = None if scores is None else float(scores[r])
        missing = s is None or s != s
        by_score = (missing, 0.0 if missing else -s) if keep == "highest_clip_score" else ()
        return (*by_score, int(uids[r], 16), r)

    best: dict[int, int] = {}
    for r in range(n):
        g = find(r)
        if g not in best or key(r) < key(best[g]):
            best[g] = r
    return [best[find(r)] for r in range(n)]


def decide(n, i, j, uids, scores, keep):
    """Per row the surviving row, by components_of + survivors."""
    comp = components_of(np.arange(n), np.asarray(i, np.int64), np.asarray(j, np.int64))
    u = uids_to_u8u8(np.asarray(uids, dtype=object))
    neg = -np.asarray(scores, np.float64) if keep == "highest_clip_score" else None
    drop, best = groups.survivors(comp, neg, u["f0"], u["f1"])
    out = np.arange(n)
    out[drop] = best
    return out.tolist()


def hexes(*values):
    return [f"{v:032x}" for v in values]


def test_components_are_transitive():
    labels = components_of(np.arange(6), np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert labels[0] == labels[1] == labels[2]
    assert labels[4] == labels[5] != labels[0]
    assert len(set(labels.tolist())) == 3


def test_highest_score_survives_ties_by_uid():
    uids = hexes(0xC, 0xA, 0xB, 0xD)
    scores = [0.5, 0.3, 0.5, np.nan]
    # c and b tie on score: b (smaller uid) survives; NaN ranks last.
    assert decide(4, [0, 1, 2], [1, 2, 3], uids, scores, "highest_clip_score") == [2, 2, 2, 2]


def test_smallest_uid_survives():
    assert decide(3, [0, 1], [1, 2], hexes(0xC, 0xA, 0xB), [0.9, 0.1, 0.5], "smallest_uid") == [1, 1, 1]


def test_singletons_survive():
    assert decide(2, [], [], hexes(1, 2), [0.1, 0.2], "smallest_uid") == [0, 1]


def test_uids_compare_as_numbers_whatever_their_case():
    uids = ["F" + "0" * 31, "a" + "0" * 31]  # 0xF0.. > 0xA0..: the second survives
    assert decide(2, [0], [1], uids, [0.5, 0.5], "highest_clip_score") == [1, 1]


@pytest.mark.parametrize("keep", ["highest_clip_score", "smallest_uid"])
def test_survivors_equal_the_oracle_with_chains_ties_and_missing_scores(keep):
    rng = np.random.default_rng(3)
    n = 400
    i = rng.integers(0, n, 300)
    j = rng.integers(0, n, 300)
    ok = i != j
    i, j = np.minimum(i[ok], j[ok]), np.maximum(i[ok], j[ok])
    uids = hexes(*(int(v) for v in rng.choice(1 << 40, n, replace=False)))
    scores = rng.choice([0.1, 0.2, 0.3, np.nan, -0.0, 0.0], n)
    got = decide(n, i, j, uids, scores, keep)
    assert sum(g != r for r, g in enumerate(got)) > 100  # many rows are dropped as copies
    assert got == survivor_oracle(n, i, j, uids, scores, keep)


def test_exact_groups_on_several_keys():
    labels = groups.exact_groups(
        [np.array(["h1", "h1", "h2", "h1"], dtype=object), np.array(["cap", "cap", "cap", "other"], dtype=object)]
    )
    assert labels[0] == labels[1]
    assert len({labels[0], labels[2], labels[3]}) == 3
