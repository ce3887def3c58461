"""Finding 4: a huge caption is tokenized only as far as the context holds, to the same tokens."""

from __future__ import annotations

import random
import string

import open_clip
import pytest
import torch

from filtering.models.clip import BoundedTokenizer, load_clip, resolve_arch
from tests.conftest import REPO, read_truth

TINY = str(REPO / "sample_data" / "tiny_clip" / "poolsift-tiny.safetensors")


def _captions() -> list[str]:
    rng = random.Random(0)
    words = [
        "dog",
        "beach",
        "a",
        "photo",
        "of",
        "the",
        "running",
        "&amp;",
        "&lt;b&gt;",
        "Ã©",
        "Ã\xa0",
        "é",
        "中文",
        "!!",
        "42",
        "don't",
        "\t",
        "\n",
        "\u200b",
        "x" * 40,
    ]
    out = [m.get("caption", "") for m in read_truth().values()]
    out += [" ".join(rng.choice(words) for _ in range(rng.randint(0, 150))) for _ in range(300)]
    out += [
        "a dog" + " " * 60_000 + "on a beach",  # fits the context, 60 KB of whitespace
        "a cat" + "\x01" * 30_000 + " on a mat",  # control characters ftfy removes
        "&amp;" * 5000 + " a bird",
        "".join(rng.choice(string.ascii_lowercase) for _ in range(2000)),  # one long word
        "ab" * 3000,
        "",
        "   ",
    ]
    return out


@pytest.mark.parametrize("arch", ["poolsift-tiny", "ViT-B-32"])  # contexts of 32 and 77 tokens
def test_bounded_tokens_equal_open_clips(arch):
    plain = open_clip.get_tokenizer(resolve_arch(arch))
    bounded = BoundedTokenizer(plain)
    captions = _captions()
    assert torch.equal(bounded(captions), plain(captions))
    assert torch.equal(bounded(captions[0]), plain(captions[0]))


def test_a_long_caption_encodes_only_the_words_the_context_holds(monkeypatch):
    tokenizer = load_clip("poolsift-tiny", TINY, device="cpu").tokenizer
    calls = []
    bpe = open_clip.tokenizer.SimpleTokenizer.bpe
    monkeypatch.setattr(open_clip.tokenizer.SimpleTokenizer, "bpe", lambda self, t: calls.append(t) or bpe(self, t))
    rng = random.Random(1)
    caption = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(5)) for _ in range(50_000))
    tokens = tokenizer([caption])
    assert tokens.shape == (1, tokenizer.context_length) and int(tokens[0, -1]) != 0  # cut to the context
    assert len(calls) <= tokenizer.context_length  # one BPE call per word read, not 50,000
