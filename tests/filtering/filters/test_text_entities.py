"""text_entities: the caption names an ImageNet class (DataComp's text-based baseline)."""

import numpy as np
import pyarrow as pa
import pytest

from filtering.errors import InputError
from filtering.filters.base import InputInfo
from filtering.filters.text_entities import TextEntities, TextEntitiesParams, imagenet_classes


def decide(captions, **params):
    from filtering.pool import Pool

    pool = Pool(pa.table({"caption": pa.array(captions, pa.string())}), parts=[])
    d = TextEntities(TextEntitiesParams(**params), InputInfo("webdataset")).apply(pool, np.ones(pool.n, bool))
    return d.keep.tolist(), d.reasons_for(~d.keep).tolist()


def test_bundled_list_is_imagenet_1k():
    names = imagenet_classes()
    assert len(names) == 1000
    assert names[0] == "tench" and names[207] == "Golden Retriever" and names[-1] == "toilet paper"


@pytest.mark.parametrize(
    "caption, found",
    [
        ("A Golden Retriever playing on grass", True),  # phrase, case-insensitive
        ("my golden retrievers", True),  # plural of the last word
        ("two go karts racing", True),  # hyphenated name written with a space
        ("Go-Karts!", True),
        ("a box of band-aids", True),
        ("three ladybugs on a leaf", True),
        ("a tench.", True),  # punctuation is a word boundary
        ("sunglasses at the beach", True),
        ("golden. retriever", True),
        ("tenches in a pond", True),
        ("tenchy", False),  # whole words only
        ("retriever golden", False),  # words in order
        ("a golden sunset over the lake", False),
        ("", False),
        (None, False),
    ],
)
def test_matching(caption, found):
    keep, reasons = decide([caption])
    assert keep == [found]
    assert reasons == ([] if found else ["caption_no_entity"])


def test_plural_rules(tmp_path):
    (tmp_path / "classes.txt").write_text("# my classes\n\npuppy\nfireman\nwolf\nbox\nknife\n")
    captions = ["puppies", "firemen", "wolves", "boxes", "knives", "puppys", "puppie"]
    keep, _ = decide(captions, classes_file=str(tmp_path / "classes.txt"))
    assert keep == [True, True, True, True, True, True, False]


def test_user_classes_file(tmp_path):
    (tmp_path / "classes.txt").write_text("red circle\nsquare\n")
    keep, reasons = decide(
        ["a red circle", "a red square", "a circle", "a triangle"], classes_file=str(tmp_path / "classes.txt")
    )
    assert keep == [True, True, False, False]
    assert reasons == ["caption_no_entity"] * 2
    with pytest.raises(InputError, match="classes_file"):
        decide(["x"], classes_file=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InputError, match="no class names"):
        decide(["x"], classes_file=str(tmp_path / "empty.txt"))


def test_long_columns_are_chunked(monkeypatch):
    from filtering.filters import text_entities

    monkeypatch.setattr(text_entities, "CHUNK_ROWS", 3)
    captions = ["a tench", "nothing", "golden", "retriever", "a golden retriever", "x"] * 3
    keep, _ = decide(captions)
    assert keep == [True, False, False, False, True, False] * 3


def test_params_rejected():
    with pytest.raises(ValueError):
        TextEntitiesParams(classes="imagenet")
