"""Build ``filtering/data/wordnet_first_synsets.npz``, the table behind the
``wordnet_synsets`` filter (DataComp's ``text_based`` rule), from packaged sources:

- WordNet 3.0's database files, as Debian's ``wordnet-base`` installs them under
  ``/usr/share/wordnet`` (the same Princeton files NLTK's ``wordnet`` corpus holds):
  ``index.{noun,verb,adj,adv}`` and ``{noun,verb,adj,adv}.exc``;
- the ImageNet-21k synset list, ``imagenet21k_goog_synsets.txt`` from timm's
  ``timm/data/_info/``, which is byte for byte DataComp's ``imagenet21k_wordnet_ids.txt``
  (checked here against the sha256 DataComp's ``baselines/utils.py`` pins for it).

The table holds exactly what NLTK's ``WordNetCorpusReader`` reads for
``wordnet.synsets(word)``: every index lemma with the offset of its first synset per
part of speech (``_lemma_pos_offset_map[lemma][pos][0]``), the four exception lists
(``_exception_map``), and the ImageNet-21k offsets as DataComp compares them
(``int(wnid[1:])``). Run::

    python -m filtering.data.build_wordnet_table [--wordnet /usr/share/wordnet] [--imagenet21k FILE]

The output is deterministic (same sources, same bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import zipfile
from pathlib import Path

import numpy as np

POS = ("n", "v", "a", "r")  # NLTK's POS_LIST order: the first synset comes from the first POS with a form
FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
# baselines/utils.py, cloud_checkpoints["imagenet21k_wordnet_ids"]["sha256"] (mlfoundations/datacomp)
DATACOMP_IN21K_SHA256 = "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"
DEFAULT_WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).with_name("wordnet_first_synsets.npz")


def read_index(path: Path) -> dict[str, int]:
    """lemma -> offset of its first synset, parsed as NLTK's ``_load_lemma_pos_offset_map``
    does (lines starting with a space are the licence header)."""
    first: dict[str, int] = {}
    for line in path.read_text("utf-8").splitlines():
        if line.startswith(" ") or not line.strip():
            continue
        tok = line.split()
        lemma, n_synsets, n_pointers = tok[0], int(tok[2]), int(tok[3])
        offsets = tok[4 + n_pointers + 2 :]
        if n_synsets <= 0 or len(offsets) != n_synsets:
            raise ValueError(f"{path}: malformed line for {lemma!r}")
        first[lemma] = int(offsets[0])
    return first


def read_exceptions(path: Path) -> dict[str, list[str]]:
    """``{inflected: [base, ...]}`` as NLTK's ``_load_exception_map`` reads an ``.exc`` file."""
    out: dict[str, list[str]] = {}
    for line in path.read_text("utf-8").splitlines():
        terms = line.split()
        if terms:
            out[terms[0]] = terms[1:]
    return out


def check_offsets(data_file: Path, offsets: set[int]) -> None:
    """Every offset must start a line of ``data_file`` that begins with that offset, as
    NLTK's ``synset_from_pos_and_offset`` requires."""
    data = data_file.read_bytes()
    bad = [o for o in offsets if data[o : o + 8] != b"%08d" % o or (o > 0 and data[o - 1 : o] != b"\n")]
    if bad:
        raise ValueError(f"{data_file}: {len(bad)} index offsets do not start a synset line, e.g. {bad[:3]}")


def imagenet21k_file() -> Path:
    spec = importlib.util.find_spec("timm")  # not imported: that would load torch
    if spec is None or spec.origin is None:
        raise SystemExit("timm is not installed: pass --imagenet21k imagenet21k_wordnet_ids.txt")
    return Path(spec.origin).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"


def build(wordnet: Path, in21k: Path) -> dict[str, np.ndarray]:
    raw = in21k.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != DATACOMP_IN21K_SHA256:
        raise ValueError(f"{in21k} is not DataComp's imagenet21k_wordnet_ids.txt (sha256 {digest})")
    in21k_offsets = np.array(sorted({int(x.strip()[1:]) for x in raw.decode().splitlines()}), np.int32)

    firsts = {pos: read_index(wordnet / f"index.{FILES[pos]}") for pos in POS}
    for pos in POS:
        check_offsets(wordnet / f"data.{FILES[pos]}", set(firsts[pos].values()))
    check_offsets(wordnet / "data.noun", set(in21k_offsets.tolist()))
    lemmas = sorted(set().union(*firsts.values()))
    first_offset = np.full((len(lemmas), len(POS)), -1, np.int32)
    for j, pos in enumerate(POS):
        for i, lemma in enumerate(lemmas):
            first_offset[i, j] = firsts[pos].get(lemma, -1)

    exc_lines = []
    for pos in POS:
        for key, forms in sorted(read_exceptions(wordnet / f"{FILES[pos]}.exc").items()):
            exc_lines.append("\t".join([pos, key, " ".join(forms)]))
    sources = {
        name: hashlib.sha256((wordnet / name).read_bytes()).hexdigest()
        for name in [f"index.{s}" for s in FILES.values()] + [f"{s}.exc" for s in FILES.values()]
    }
    meta = {
        "wordnet": "WordNet 3.0 (Princeton), files from Debian wordnet-base",
        "wordnet_sha256": sources,
        "imagenet21k": "DataComp imagenet21k_wordnet_ids.txt = timm imagenet21k_goog_synsets.txt",
        "imagenet21k_sha256": digest,
        "nltk_rules": "nltk 3.8.1 (DataComp's requirements.txt pin)",
    }
    return {
        "lemmas": np.frombuffer("\n".join(lemmas).encode("utf-8"), np.uint8),
        "first_offset": first_offset,
        "exceptions": np.frombuffer("\n".join(exc_lines).encode("utf-8"), np.uint8),
        "imagenet21k": in21k_offsets,
        "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8),
    }


def write(arrays: dict[str, np.ndarray], path: Path) -> None:
    """An ``.npz`` (zip of ``.npy``) with fixed timestamps, so rebuilding gives the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as zf:  # np.load reads LZMA members
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_LZMA
            zf.writestr(info, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet", type=Path, default=DEFAULT_WORDNET, help="WordNet 3.0 dict directory")
    ap.add_argument(
        "--imagenet21k", type=Path, default=None, help="DataComp's imagenet21k_wordnet_ids.txt (default: timm's copy)"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    arrays = build(args.wordnet, args.imagenet21k or imagenet21k_file())
    write(arrays, args.out)
    print(
        f"{args.out}: {len(arrays['first_offset'])} lemmas, {len(arrays['imagenet21k'])} ImageNet-21k synsets, "
        f"{args.out.stat().st_size / 1e6:.2f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
