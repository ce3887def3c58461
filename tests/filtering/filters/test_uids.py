"""uids: keep or drop the entries of a subset list (a DataComp u8,u8 .npy, Parquet, CSV or
text), matched by uid, sha256 or url, with the match report."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filtering.errors import InputError
from filtering.filters.base import InputInfo, add_tally
from filtering.filters.uids import Uids, UidsParams
from filtering.pool import Pool
from filtering.uid import sort_u8u8, uids_to_u8u8

UIDS = [f"{i:032x}" for i in (1, 2, 3, 2**64 + 5, 2**127 + 7)]


def write_uids(path, uids):
    """A uid list as ``subset.npy`` holds them: DataComp's ``u8,u8``, sorted."""
    np.save(path, sort_u8u8(uids_to_u8u8(uids)))


def decide(path, mode="keep"):
    pool = Pool(pa.table({"uid": pa.array(UIDS)}), parts=[])
    d = Uids(UidsParams(path=str(path), mode=mode), InputInfo("webdataset")).apply(pool, np.ones(pool.n, bool))
    return d.keep.tolist(), d.reasons_for(~d.keep).tolist()


def test_keep_and_drop_listed(tmp_path):
    listed = tmp_path / "subset.npy"
    write_uids(str(listed), [UIDS[1], UIDS[3], "f" * 32])  # as poolsift's subset.npy holds them
    assert decide(listed) == ([False, True, False, True, False], ["uid_not_listed"] * 3)
    assert decide(listed, mode="drop") == ([True, False, True, False, True], ["uid_listed"] * 2)


def test_reads_datacomp_arrays_unsorted(tmp_path):
    # DataComp's baselines save the structured array with np.save, sorted or not.
    arr = uids_to_u8u8([UIDS[4], UIDS[0]])
    np.save(tmp_path / "dc.npy", arr)
    assert decide(tmp_path / "dc.npy")[0] == [True, False, False, False, True]


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="no file"):
        decide(tmp_path / "missing.npy")
    np.save(tmp_path / "ints.npy", np.arange(3))
    with pytest.raises(InputError, match="u8,u8"):
        decide(tmp_path / "ints.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(InputError, match="not a numpy"):
        decide(tmp_path / "text.npy")


@pytest.mark.parametrize("params", [{}, {"path": ""}, {"path": "x.npy", "mode": "only"}])
def test_params_rejected(params):
    with pytest.raises(ValueError):
        UidsParams(**params)


# --- match: uid | sha256 | url, and the match report (issue 25, "Portable subsets")

SHA = [f"{i:064x}" for i in range(1, 6)]
URLS = [f"https://example.com/{i}.jpg" for i in range(5)]


def pool_of(uids=UIDS, sha=SHA, urls=URLS) -> Pool:
    return Pool(pa.table({"uid": pa.array(uids), "sha256": pa.array(sha), "url": pa.array(urls)}), parts=[])


def run_filter(path, pool, **params):
    f = Uids(UidsParams(path=str(path), **params), InputInfo("webdataset"))
    f.check()
    d = f.apply(pool, np.ones(pool.n, bool))
    record, tables = f.report(add_tally(None, d.tally), log=lambda _m: None)
    return d, record, {k: t.to_pylist() for k, t in tables.items()}


def write_list(path, columns: dict) -> str:
    if str(path).endswith(".csv"):
        import pyarrow.csv as pcsv

        pcsv.write_csv(pa.table(columns), path)
    else:
        pq.write_table(pa.table(columns), path)
    return str(path)


def test_sha256_matches_another_copy(tmp_path):
    """The list's uids are not the pool's (re-keyed copy); its sha256 values, upper-case,
    find the rows; the entry whose image the copy lacks is reported with its uid and url."""
    listed = write_list(
        tmp_path / "subset.parquet",
        {
            "uid": ["A" * 32, "b" * 32, "c" * 32],
            "sha256": [SHA[3].upper(), SHA[0], "f" * 64],
            "url": ["u3", "u0", "https://gone.example/x.jpg"],
        },
    )
    d, record, tables = run_filter(listed, pool_of(), match="sha256")
    assert d.keep.tolist() == [True, False, False, True, False]
    assert {k: record[k] for k in ("entries", "found", "not_found", "found_by", "matched_more_than_one_row")} == {
        "entries": 3,
        "found": 2,
        "not_found": 1,
        "found_by": {"sha256": 2},
        "matched_more_than_one_row": 0,
    }
    assert tables["unmatched"] == [
        {"entry": 2, "uid": "c" * 32, "sha256": "f" * 64, "url": "https://gone.example/x.jpg"}
    ]
    assert tables["multiple"] == []
    by_uid, record, _ = run_filter(listed, pool_of(), match="uid")  # the same list by uid: nothing found
    assert not by_uid.keep.any() and record["not_found"] == 3


def test_url_normalised_and_keys_in_order(tmp_path):
    """``match: [uid, url]``: an entry is found by the first key that finds it; urls
    compare with scheme and host lower-cased, default port and fragment dropped."""
    listed = write_list(
        tmp_path / "subset.csv",
        {"uid": [UIDS[0].upper(), "d" * 32], "url": ["", " HTTPS://Example.com:443/4.jpg#top "]},
    )
    d, record, tables = run_filter(listed, pool_of(), match=["uid", "url"])
    assert d.keep.tolist() == [True, False, False, False, True]
    assert record["found_by"] == {"uid": 1, "url": 1} and record["not_found"] == 0


def test_entries_matched_by_more_than_one_row(tmp_path):
    """Two pool rows with one image: the entry is found, and listed as matched twice;
    two list entries of one image are each found (and each matched twice)."""
    pool = pool_of(sha=[SHA[0], SHA[1], SHA[0], SHA[3], SHA[4]])
    listed = write_list(tmp_path / "s.parquet", {"sha256": [SHA[0], SHA[0], SHA[4]]})
    d, record, tables = run_filter(listed, pool, match="sha256")
    assert d.keep.tolist() == [True, False, True, False, True]
    assert record["found"] == 3 and record["matched_more_than_one_row"] == 2
    assert [(r["entry"], r["found_by"], r["rows"]) for r in tables["multiple"]] == [(0, "sha256", 2), (1, "sha256", 2)]


def test_text_list_and_npy_report(tmp_path):
    (tmp_path / "urls.txt").write_text(f"{URLS[1]}\n\n{URLS[2]}\nhttps://missing/\n")
    d, record, tables = run_filter(tmp_path / "urls.txt", pool_of(), match="url", mode="drop")
    assert d.keep.tolist() == [True, False, False, True, True]
    assert tables["unmatched"] == [{"entry": 2, "url": "https://missing/"}]
    write_uids(str(tmp_path / "subset.npy"), [UIDS[1], "f" * 32])
    d, record, tables = run_filter(tmp_path / "subset.npy", pool_of())
    assert d.keep.tolist() == [False, True, False, False, False]
    assert tables["unmatched"] == [{"entry": 1, "uid": "f" * 32}]  # subset.npy is sorted


def test_tallies_add_up_over_shards(tmp_path):
    """Per-shard counts, added, give the report of the whole pool (the shard plan's sum)."""
    listed = write_list(tmp_path / "s.parquet", {"sha256": [SHA[0], SHA[2], "e" * 64]})
    pool = pool_of(sha=[SHA[0], SHA[2], SHA[0], SHA[3], SHA[4]])
    f = Uids(UidsParams(path=listed, match="sha256"), InputInfo("webdataset"))
    whole = f.apply(pool, np.ones(5, bool)).tally
    halves = [Pool(pool.table.slice(a, b - a), parts=[]) for a, b in ((0, 2), (2, 5))]
    summed = None
    for p in halves:
        summed = add_tally(summed, f.apply(p, np.ones(p.n, bool)).tally)
    log = lambda _m: None  # noqa: E731
    assert f.report(summed, log)[0] == f.report(add_tally(None, whole), log)[0]


@pytest.mark.parametrize(
    "columns, params, message",
    [
        ({"uid": UIDS[:1]}, {"match": "sha256"}, "uids.match: sha256, but .* has no sha256 column; it has: uid"),
        ({"sha256": ["xyz"]}, {"match": "sha256"}, "entry 0: sha256 'xyz' is not 64 hex digits"),
        ({"uid": ["not-a-uid"]}, {}, "entry 0: uid 'not-a-uid' is not 32 hex digits"),
    ],
)
def test_bad_lists(tmp_path, columns, params, message):
    listed = write_list(tmp_path / "s.parquet", columns)
    with pytest.raises(InputError, match=message):
        Uids(UidsParams(path=listed, **params), InputInfo("webdataset")).check()


def test_bad_list_kinds(tmp_path):
    write_uids(str(tmp_path / "subset.npy"), UIDS[:2])
    with pytest.raises(InputError, match=r"no url column \(a .npy holds uids only\)"):
        Uids(UidsParams(path=str(tmp_path / "subset.npy"), match="url"), InputInfo("webdataset")).check()
    (tmp_path / "l.txt").write_text(UIDS[0])
    with pytest.raises(InputError, match="one value per line"):
        Uids(UidsParams(path=str(tmp_path / "l.txt"), match=["uid", "url"]), InputInfo("webdataset")).check()
    (tmp_path / "l.json").write_text("{}")
    with pytest.raises(InputError, match="not a list poolsift reads"):
        Uids(UidsParams(path=str(tmp_path / "l.json")), InputInfo("webdataset")).check()


def test_pool_without_the_key(tmp_path):
    """A pool none of whose rows has a url cannot be matched by url: one line, not an empty subset."""
    listed = write_list(tmp_path / "s.parquet", {"url": URLS[:2]})
    with pytest.raises(InputError, match="no row of the pool has a url"):
        run_filter(listed, pool_of(urls=pa.nulls(5, pa.string())), match="url")


@pytest.mark.parametrize("match", ["md5", ["uid", "uid"], []])
def test_match_rejected(match):
    with pytest.raises(ValueError):
        UidsParams(path="x.npy", match=match)


def test_lists_read_once_per_process(tmp_path, monkeypatch):
    """Two uids filters in one run each keep their list (no re-read per shard); a list
    file that changes is read again."""
    import filtering.filters.subset_list as subset_list

    reads = []
    load = subset_list._load
    monkeypatch.setattr(subset_list, "_load", lambda *a: reads.append(a[0]) or load(*a))
    a = write_list(tmp_path / "a.parquet", {"sha256": SHA[:2]})
    b = write_list(tmp_path / "b.parquet", {"sha256": SHA[2:]})
    for _ in range(3):
        for path in (a, b):
            Uids(UidsParams(path=path, match="sha256"), InputInfo("webdataset")).check()
    assert reads == [a, b]
    write_list(tmp_path / "a.parquet", {"sha256": SHA[:1]})
    os.utime(a, ns=(1, 1))
    d, record, _ = run_filter(a, pool_of(), match="sha256")
    assert reads == [a, b, a] and record["entries"] == 1
