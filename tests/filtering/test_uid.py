import numpy as np

from filtering.uid import derive_uid, is_uid, sample_uid, u8u8_to_uids, uids_to_u8u8


def test_uid_from_json_is_used_and_normalised():
    uid = "0123456789ABCDEF0123456789abcdef"
    assert sample_uid({"uid": uid}, "00000.tar", "k") == uid.lower()


def test_missing_or_malformed_uid_is_derived_stably():
    derived = sample_uid(None, "00000.tar", "000000001")
    assert is_uid(derived)
    assert derived == derive_uid("00000.tar", "000000001")  # stable across calls and runs
    assert derived == "5e76bbe2d6746a65f80e0078c2485518"  # pinned: changing the rule would orphan old outputs
    assert sample_uid({"uid": "not-a-uid"}, "00000.tar", "000000001") == derived
    assert sample_uid({}, "00001.tar", "000000001") != derived  # the shard name is part of it
    assert sample_uid({}, "00000.tar", "000000002") != derived


def test_u8u8_round_trip_matches_datacomp_construction():
    uids = ["ffffffffffffffff0000000000000001", "00000000000000010000000000000000", "0123456789abcdef0fedcba987654321"]
    arr = uids_to_u8u8(uids)
    expected = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    np.testing.assert_array_equal(arr, expected)
    assert u8u8_to_uids(arr) == uids


def test_vectorised_u8u8_equals_python_ints_for_every_input_form():
    import pyarrow as pa
    import pytest

    rng = np.random.default_rng(0)
    uids = [f"{hi:016x}{lo:016x}" for hi, lo in rng.integers(0, 2**64, size=(500, 2), dtype=np.uint64).tolist()]
    uids[7] = uids[7].upper()  # DataComp's int(uid, 16) accepts either case
    expected = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    np.testing.assert_array_equal(uids_to_u8u8(uids), expected)
    np.testing.assert_array_equal(uids_to_u8u8(np.array(uids, dtype=object)), expected)
    chunked = pa.chunked_array([pa.array(uids[:100]), pa.array(uids[100:])])
    np.testing.assert_array_equal(uids_to_u8u8(chunked), expected)
    np.testing.assert_array_equal(uids_to_u8u8(pa.array(uids).slice(3, 10)), expected[3:13])
    assert uids_to_u8u8([]).shape == (0,)
    for bad in (["g" * 32], ["a" * 31], ["a" * 33], [None]):
        with pytest.raises(ValueError, match="32 hex digits"):
            uids_to_u8u8(bad)


def test_sort_u8u8_is_numpys_record_order_with_and_without_ties():
    from filtering.uid import UID_DTYPE, sort_u8u8

    rng = np.random.default_rng(0)
    arr = np.empty(1000, dtype=UID_DTYPE)
    arr["f0"], arr["f1"] = rng.integers(0, 2**64, 1000, dtype=np.uint64), rng.integers(0, 2**64, 1000, dtype=np.uint64)
    np.testing.assert_array_equal(sort_u8u8(arr), np.sort(arr))
    arr["f0"][::3] = arr["f0"][0]  # ties in the high half: the low half decides
    arr["f0"][1::7] = 5
    np.testing.assert_array_equal(sort_u8u8(arr), np.sort(arr))
    assert len(sort_u8u8(arr[:0])) == 0 and sort_u8u8(arr[:1])[0] == arr[0]


def test_normalize_uids_lowercases_and_undashes_only_exact_forms():
    import pyarrow as pa

    from filtering.uid import normalize_uids

    raw = pa.array(
        [
            "AB" * 16,
            "8a6e0804-2bd0-4672-b79d-d97027f9071a",
            "8A6E0804-2BD0-4672-B79D-D97027F9071A",
            "8a6e08042bd0-4672-b79d-d97027f9071a",  # dashes in the wrong places
            "ab" * 15,
            "ab" * 17,
            "zz" * 16,
            None,
            "",
        ]
    )
    assert normalize_uids(raw).to_pylist() == [
        "ab" * 16,
        "8a6e08042bd04672b79dd97027f9071a",
        "8a6e08042bd04672b79dd97027f9071a",
        None,
        None,
        None,
        None,
        None,
        None,
    ]


def test_count_invalid_uids_is_what_resolve_uids_stops_on():
    """The shard plan's pool-wide count (one shard at a time) and first example are the
    in-memory ``on_invalid: error`` message's: failed rows left out, odd forms alike."""
    import pyarrow as pa
    import pytest

    from filtering.uid import UidError, count_invalid_uids, invalid_uids_error, resolve_uids

    raw = ["AB" * 16, "8A6E0804-2BD0-4672-B79D-D97027F9071A", "8a6e08042bd0-4672-b79d-d97027f9071a"]
    raw += ["ab" * 17, None, "", "zz" * 16, "\u212a" * 32, "ab" * 16 + "\n"]
    n = len(raw)
    error = [None] * n
    error[4] = "decode_error"  # failed already: not counted
    table = pa.table(
        {
            "uid": pa.array(raw, pa.string()),
            "key": [f"{i:04d}" for i in range(n)],
            "source_shard": ["s0.tar"] * n,
            "url": ["http://x"] * n,
            "error": pa.array(error, pa.string()),
        }
    )
    with pytest.raises(UidError) as e:
        resolve_uids(
            table, source="json", field="uid", derive="key", on_invalid="error", failed=[x is not None for x in error]
        )
    count, first = count_invalid_uids(table, "uid")
    assert (count, first["key"]) == (6, "0002")
    assert str(invalid_uids_error(count, first, "uid")) == str(e.value)
    assert count_invalid_uids(table.slice(0, 2), "uid") == (0, None)


def test_repeated_uids_marks_later_copies_in_pool_order():
    import numpy as np

    from filtering.uid import duplicate_examples, repeated_uids

    a, b, c = "0" * 31 + "1", "f" * 32, "1" + "0" * 31
    pairs = uids_to_u8u8([b, a, b, c, a.upper(), b])
    keys = np.array([10, 11, 12, 13, 14, 2])  # the pool's order: the last entry comes first
    found = repeated_uids(pairs, keys)
    assert sorted(found["later"].tolist()) == [0, 2, 4] and found["rows"] == 3 and found["uids"] == 2
    assert found["copies"][(2**64 - 1, 2**64 - 1)] == (3, [2, 10, 12])
    assert duplicate_examples([found]) == [(b, 3, [2, 10, 12]), (a, 2, [11, 14])]
    assert repeated_uids(uids_to_u8u8([a, b, c]), np.arange(3)) is None


def test_every_pair_of_characters_decodes_as_int_does():
    """The two-digit lookup table against Python's ``int(_, 16)`` for all 65,536 byte pairs,
    each pair placed in a uid between valid digits."""
    import pytest

    from filtering.uid import _PAIR_VALUE

    hexdigits = set(b"0123456789abcdefABCDEF")
    for a in range(256):
        for b in range(256):
            expected = int(bytes([a, b]), 16) if a in hexdigits and b in hexdigits else 0xFFFF
            assert _PAIR_VALUE[a | b << 8] == expected, (a, b)
    uid = "0" * 14 + "fF" + "a" * 16
    assert uids_to_u8u8([uid])[0].tolist() == (0xFF, int("a" * 16, 16))
    with pytest.raises(ValueError, match="32 hex digits"):
        uids_to_u8u8(["0" * 15 + "x" + "a" * 16])
