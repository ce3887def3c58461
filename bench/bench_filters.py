"""Filter throughput: poolsift's column-wise filters vs straightforward per-row Python.

Builds a synthetic pool of ``--n`` rows (captions of 0-15 words drawn from a vocabulary
that includes ImageNet class words, some multi-word class names and plurals; original
sizes; uids) and times, in one run, each filter's ``apply`` against the per-row code a
DataComp-style script would write (``df.text.apply(lambda x: len(x.split()))``, a Python
loop over word n-grams, a Python set of uid tuples). Checks that both give the same mask
and prints the times and ratios.

    .venv/bin/python bench/bench_filters.py              # 1,000,000 rows
    .venv/bin/python bench/bench_filters.py --n 100000
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

import numpy as np
import pandas  # noqa: F401  (pyarrow imports it on the first pa.array(list): paid here, by neither side)
import pyarrow as pa

from filtering.filters.base import InputInfo
from filtering.filters.caption import Caption, CaptionParams
from filtering.filters.image_size import ImageSize, ImageSizeParams
from filtering.filters.text_entities import TextEntities, TextEntitiesParams, imagenet_classes, plurals
from filtering.filters.uids import Uids, UidsParams
from filtering.filters.wordnet_synsets import WordNetSynsets, WordNetSynsetsParams, first_synset, imagenet21k_offsets
from filtering.pool import Pool
from filtering.uid import sort_u8u8, uids_to_u8u8

FILLER = [
    "a",
    "the",
    "photo",
    "of",
    "on",
    "in",
    "with",
    "and",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "my",
    "new",
    "old",
    "best",
    "view",
    "sale",
    "free",
    "home",
    "day",
]


def make_pool(n: int, seed: int) -> Pool:
    rng = np.random.default_rng(seed)
    names = [c.lower() for c in imagenet_classes()]
    words = FILLER * 20 + [w for c in names for w in c.split()][:3000] + [c + "s" for c in names[:200]]
    lengths = rng.integers(0, 16, n)
    flat = rng.choice(np.array(words, dtype=object), int(lengths.sum()))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    captions = [" ".join(flat[bounds[i] : bounds[i + 1]]) for i in range(n)]
    phrase = rng.random(n) < 0.05  # some captions name a whole multi-word class
    for i in np.flatnonzero(phrase):
        captions[i] += " " + names[int(rng.integers(len(names)))].replace(" ", rng.choice([" ", "-"]))
    uids = [f"{int(h):016x}{int(lo):016x}" for h, lo in rng.integers(0, 2**63, (n, 2), dtype=np.int64)]
    return Pool(
        pa.table(
            {
                "uid": uids,
                "caption": captions,
                "original_width": pa.array(rng.integers(20, 2000, n), pa.int32()),
                "original_height": pa.array(rng.integers(20, 2000, n), pa.int32()),
            }
        ),
        parts=[],
    )


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def naive_caption(captions):
    return np.array([len(t.split()) > 2 and len(t) > 5 for t in captions])


def naive_caption_fasttext(captions):
    """DataComp's image_based pre-filter words (apply_filter.py:67): fastText's own tokenizer per row."""
    import fasttext

    return np.array([len(fasttext.tokenize(t)) > 1 and len(t) > 5 for t in captions])


def naive_image_size(w, h):
    return np.array([min(a, b) >= 200 and max(a, b) / min(a, b) <= 3.0 for a, b in zip(w, h, strict=True)])


def naive_entities(captions):
    spellings = set()
    for name in imagenet_classes():
        words = re.findall(r"[^\W_]+", name.lower())
        spellings |= {" ".join([*words[:-1], last]) for last in plurals(words[-1])}
    longest = max(len(s.split()) for s in spellings)
    out = []
    for text in captions:
        words = re.findall(r"[^\W_]+", text.lower())
        out.append(
            any(
                " ".join(words[i : i + k]) in spellings
                for k in range(1, longest + 1)
                for i in range(len(words) - k + 1)
            )
        )
    return np.array(out)


def naive_uids(uids, listed):
    keep = {(int(u[:16], 16), int(u[16:], 16)) for u in listed}
    return np.array([(int(u[:16], 16), int(u[16:], 16)) in keep for u in uids])


def naive_synsets(captions: list) -> np.ndarray:
    """DataComp's does_contain_text_entity loop, with the bundled table standing in for NLTK."""
    lookup, in21k = first_synset(), set(imagenet21k_offsets().tolist())
    return np.array([any(lookup(w) in in21k for w in c.split()) for c in captions])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    pool, t_gen = timed(lambda: make_pool(args.n, args.seed))
    first_synset()  # the WordNet table loads once per process (~1 s), paid by neither side
    print(f"pool: {args.n:,} rows (generated in {t_gen:.1f}s), {os.cpu_count()} CPUs")
    alive = np.ones(pool.n, bool)
    info = InputInfo("webdataset")
    captions = pool.column("caption").tolist()
    w, h = pool.column("original_width").tolist(), pool.column("original_height").tolist()
    uids = pool.column("uid").tolist()
    with tempfile.TemporaryDirectory() as tmp:
        listed_path = os.path.join(tmp, "listed.npy")
        listed = uids[::3]
        np.save(listed_path, sort_u8u8(uids_to_u8u8(listed)))  # as subset.npy holds them
        cases = [
            (
                "caption {min_words: 3, min_chars: 6}",
                Caption(CaptionParams(min_words=3, min_chars=6), info),
                lambda: naive_caption(captions),
            ),
            (
                "caption {min_words: 2, min_chars: 6, tokenizer: fasttext}",
                Caption(CaptionParams(min_words=2, min_chars=6, tokenizer="fasttext"), info),
                lambda: naive_caption_fasttext(captions),
            ),
            (
                "image_size {min_side: 200, max_aspect_ratio: 3}",
                ImageSize(ImageSizeParams(min_side=200, max_aspect_ratio=3.0), info),
                lambda: naive_image_size(w, h),
            ),
            ("text_entities (ImageNet-1k)", TextEntities(TextEntitiesParams(), info), lambda: naive_entities(captions)),
            (
                "wordnet_synsets (ImageNet-21k)",
                WordNetSynsets(WordNetSynsetsParams(), info),
                lambda: naive_synsets(captions),
            ),
            ("uids {mode: keep}", Uids(UidsParams(path=listed_path), info), lambda: naive_uids(uids, listed)),
        ]
        print(f"{'filter':<48} {'poolsift':>10} {'per-row':>10} {'ratio':>8}  same mask  kept")
        try:
            import fasttext  # noqa: F401
        except ImportError:  # the per-row side needs fastText; poolsift's side does not
            cases = [c for c in cases if "tokenizer: fasttext" not in c[0]]
        for name, f, naive in cases:
            ours, t_ours = timed(lambda f=f: f.apply(pool, alive).keep)
            base, t_base = timed(naive)
            same = np.array_equal(ours, base)
            print(
                f"{name:<48} {t_ours:>9.2f}s {t_base:>9.2f}s {t_base / t_ours:>7.1f}x  {str(same):<9}  {ours.mean():.1%}"
            )


if __name__ == "__main__":
    main()
