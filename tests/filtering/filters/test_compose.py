"""Filter algebra: a list is an intersection in order; all / any / not nest to any depth."""

import numpy as np
import pyarrow as pa
import pytest

from filtering.errors import ConfigError
from filtering.filters.compose import apply_filters
from filtering.pool import Pool
from filtering.registry import parse_filters

# caption words, shorter side, names an ImageNet class?
ROWS = [
    ("a golden retriever on grass", 300, True),
    ("a golden retriever", 50, True),
    ("a red circle", 300, False),
    ("a red circle", 50, False),
    ("retriever", 300, False),
    ("a tench", 50, True),
    ("some tench fish", 300, True),
    ("x", 50, False),
]


@pytest.fixture
def pool():
    captions = [c for c, _, _ in ROWS]
    side = [s for _, s, _ in ROWS]
    table = pa.table(
        {
            "uid": [f"{i:032x}" for i in range(len(ROWS))],
            "caption": captions,
            "original_width": pa.array(side, pa.int32()),
            "original_height": pa.array(side, pa.int32()),
            "error": pa.array([None] * (len(ROWS) - 1) + ["decode_error: truncated"], pa.string()),
        }
    )
    return Pool(table, parts=[])


def masks():
    words = np.array([len(c.split()) for c, _, _ in ROWS])
    big = np.array([s >= 100 for _, s, _ in ROWS])
    entity = np.array([e for _, _, e in ROWS])
    ok = np.array([True] * (len(ROWS) - 1) + [False])
    return words, big, entity, ok


def run(specs, pool):
    return apply_filters(parse_filters(specs), pool)


def test_not_inside_any_inside_a_list(pool):
    specs = [
        {"caption": {"min_words": 2}},
        {"any": [{"image_size": {"min_side": 100}}, {"not": {"text_entities": {}}}]},
    ]
    out = run(specs, pool)
    words, big, entity, ok = masks()
    first = ok & (words >= 2)
    expect = first & (big | ~entity)
    assert out.keep.tolist() == expect.tolist()
    dropped_by_any = first & ~expect
    assert set(out.drop_reason[dropped_by_any]) == {"image_too_small|not_text_entities"}
    assert set(out.drop_filter[dropped_by_any]) == {"any(image_size, not(text_entities))"}
    assert [f["name"] for f in out.funnel] == ["caption", "any(image_size, not(text_entities))"]
    assert out.funnel[0] == {
        "name": "caption",
        "in": int(ok.sum()),
        "kept": int(first.sum()),
        "dropped": int((ok & ~first).sum()),
        "reasons": {"caption_too_few_words": int((ok & ~first).sum())},
    }
    assert out.funnel[1]["in"] == int(first.sum()) and out.funnel[1]["kept"] == int(expect.sum())


def test_all_nested_in_any_and_not_of_a_combinator(pool):
    words, big, entity, ok = masks()
    specs = [
        {
            "any": [
                {"all": [{"image_size": {"min_side": 100}}, {"text_entities": {}}]},
                {"not": [{"any": [{"caption": {"min_words": 3}}, {"image_size": {"min_side": 100}}]}]},
            ]
        }
    ]
    out = run(specs, pool)
    expect = ok & ((big & entity) | ~((words >= 3) | big))
    assert out.keep.tolist() == expect.tolist()
    assert out.funnel[0]["name"] == "any(all(image_size, text_entities), not(any(caption, image_size)))"
    reasons = set(out.drop_reason[ok & ~expect])
    assert reasons <= {"image_too_small|not_any(caption, image_size)", "caption_no_entity|not_any(caption, image_size)"}


def test_top_level_all_equals_the_flat_list(pool):
    flat = [{"caption": {"min_words": 2}}, {"image_size": {"min_side": 100}}, {"text_entities": {}}]
    a = run(flat, pool)
    b = run([{"all": flat}], pool)
    assert a.keep.tolist() == b.keep.tolist()
    dropped = ~a.keep & ~pool.failed
    assert a.drop_reason[dropped].tolist() == b.drop_reason[dropped].tolist()
    assert b.funnel[0]["reasons"] == {k: v for f in a.funnel for k, v in f["reasons"].items()}


def test_funnel_adds_up_and_counts_are_the_filters_own(pool):
    specs = [{"text_entities": {}}, {"not": {"image_size": {"min_side": 100}}}, {"caption": {"min_chars": 1}}]
    out = run(specs, pool)
    failed = int(pool.failed.sum())
    assert pool.n == int(out.keep.sum()) + failed + sum(f["dropped"] for f in out.funnel)
    for f in out.funnel:
        assert f["in"] - f["dropped"] == f["kept"]
        assert sum(f["reasons"].values()) == f["dropped"]
        assert int((out.drop_filter == f["name"]).sum()) == f["dropped"]
    for before, after in zip(out.funnel, out.funnel[1:], strict=False):
        assert after["in"] == before["kept"]
    assert out.funnel[1]["reasons"] == {"not_image_size": out.funnel[1]["dropped"]}


def test_repeated_entries_get_distinct_funnel_names(pool):
    specs = [{"caption": {"min_words": 2}}, {"image_size": {"min_side": 100}}, {"caption": {"min_chars": 13}}]
    out = run(specs, pool)
    names = [f["name"] for f in out.funnel]
    assert names == ["caption (filters[0])", "image_size", "caption (filters[2])"]
    for f in out.funnel:
        assert int((out.drop_filter == f["name"]).sum()) == f["dropped"]
    assert out.funnel[2]["reasons"] == {"caption_too_short": out.funnel[2]["dropped"]} and out.funnel[2]["dropped"] > 0


@pytest.mark.parametrize(
    "specs, message",
    [
        (
            [{"any": [{"caption": {"min_wrds": 3}}]}],
            "filters[0].any[0].caption.min_wrds: unknown key; did you mean min_words?",
        ),
        (
            [{"caption": {"min_words": 1}}, {"any": [{"not": {"captio": {}}}]}],
            "filters[1].any[0].not: unknown filter 'captio'; did you mean caption?",
        ),
        ([{"any": []}], "filters[0].any: expects a non-empty list of filters"),
        (
            [{"not": [{"caption": {"min_words": 1}}, {"caption": {"min_words": 2}}]}],
            "filters[0].not: expects one filter",
        ),
        (
            [{"caption": {"min_words": 1}, "language": {"languages": ["en"]}}],
            "filters[0]: each filter is a mapping with exactly one key",
        ),
        (["caption"], "filters[0]: each filter is a mapping with exactly one key"),
        (
            [{"all": [{"image_size": {"min_side": 0}}]}],
            "filters[0].all[0].image_size.min_side: Input should be greater than or equal to 1",
        ),
    ],
)
def test_parse_errors_name_the_nested_key(specs, message):
    with pytest.raises(ConfigError) as e:
        parse_filters(specs)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_thresholds_travel_in_decisions_through_combinators(pool):
    pool.add_column("q", pa.array(np.arange(pool.n, dtype=np.float32)))
    out = run(
        [
            {"any": [{"not": {"score": {"column": "q", "min": 2.0}}}, {"caption": {"min_words": 3}}]},
            {"score": {"column": "q", "max": 100.0}},
        ],
        pool,
    )
    assert out.thresholds == {"q": 100.0}  # a later entry's threshold for the same column wins, as it is applied last
    out = run([{"all": [{"score": {"column": "q", "top_fraction": 0.5}}]}], pool)
    assert list(out.thresholds) == ["q"] and out.thresholds["q"] is not None
    assert "thresholds" not in pool.artifacts
