"""Groups from pairs and the survivor policies."""

import numpy as np

from filtering.dedup import groups


def test_components_are_transitive():
    labels = groups.components(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert labels[0] == labels[1] == labels[2]
    assert labels[4] == labels[5] != labels[0]
    assert len(set(labels.tolist())) == 3


def test_highest_score_survives_ties_by_uid():
    uids = np.array(["c", "a", "b", "d"], dtype=object)
    scores = np.array([0.5, 0.3, 0.5, np.nan])
    rank = groups.keep_rank(uids, scores, "highest_clip_score")
    keep, dup = groups.resolve(4, np.array([0, 1, 2]), np.array([1, 2, 3]), uids, rank)
    # c and b tie on score: b (smaller uid) survives; NaN ranks last.
    np.testing.assert_array_equal(keep, [False, False, True, False])
    assert dup.tolist() == ["b", "b", None, "b"]


def test_smallest_uid_survives():
    uids = np.array(["c", "a", "b"], dtype=object)
    rank = groups.keep_rank(uids, np.array([0.9, 0.1, 0.5]), "smallest_uid")
    keep, dup = groups.resolve(3, np.array([0, 1]), np.array([1, 2]), uids, rank)
    np.testing.assert_array_equal(keep, [False, True, False])
    assert dup.tolist() == ["a", None, "a"]


def test_singletons_survive():
    uids = np.array(["x", "y"], dtype=object)
    keep, dup = groups.resolve(
        2, np.zeros(0, int), np.zeros(0, int), uids, groups.keep_rank(uids, None, "smallest_uid")
    )
    assert keep.all() and dup.tolist() == [None, None]


def test_exact_groups_on_several_keys():
    labels = groups.exact_groups(
        [np.array(["h1", "h1", "h2", "h1"], dtype=object), np.array(["cap", "cap", "cap", "other"], dtype=object)]
    )
    assert labels[0] == labels[1]
    assert len({labels[0], labels[2], labels[3]}) == 3
