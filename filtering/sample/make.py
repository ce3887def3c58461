"""Generate the bundled sample: a small WebDataset pool with planted faults, and a
reference image folder standing in for ImageNet.

Same ``seed`` -> byte-identical files: every random draw comes from generators
seeded from ``seed`` (pool, reference set and uids use separate streams), JPEGs are
encoded by PIL at fixed qualities with no metadata, and tar members carry fixed
mtime/uid/gid/mode/owner names in a fixed order.

Layout of ``out_dir``::

    pool/00000.tar .. 00003.tar   250 samples each, 1,000 in all
    quality/00004.tar              QUALITY_SAMPLES clean samples, WATERMARKED of them with a
                                   watermark-like text overlay (``truth.watermark``)
    reference/<class>/NNN.jpg      REFERENCE_PER_CLASS images of each REFERENCE_CLASSES class
    README.md                      what is here and the truth schema

A pool sample is ``KEY.jpg`` (JPEG bytes), ``KEY.txt`` (UTF-8 caption) and
``KEY.json``. Keys follow img2dataset: 5 digits of shard then 4 of index within it
("000010042" is sample 42 of shard 1). The ``.json`` holds ``uid`` (32 lowercase hex
digits), ``key``, ``original_width``/``original_height`` (the JPEG's
real size; for corrupt samples the size it was meant to have) and ``truth``:

``fault``
    One of :data:`FAULTS`. A sample has at most one fault; duplicates are copies of
    clean samples, so their fault is "exact_dup" or "near_dup".
``class``, ``colour``
    What the image shows (for duplicates: what the original shows).
``caption_class``, ``caption_colour``
    What the caption names: the other class/colour for "mismatched"; ``None`` for an
    empty caption; ``caption_colour`` is ``None`` too when the template omits colour.
``language``
    "en", "de", "fr" or "es"; ``None`` for an empty caption.
``mismatched``
    The caption describes a different class and a different colour than the image.
``duplicate_of``, ``dup_kind``, ``near_kind``
    For a duplicate, the original's uid, "exact" (identical jpg bytes and caption)
    or "near" (same picture and caption, the JPEG re-encoded), and for a near one
    how: "requality" (quality 55-70), "resize" (60-85% of each side, never below
    64 px) or "crop" (2-5% off each edge). ``None`` otherwise. A duplicate always comes after its
    original in pool order; some sit in another shard.
``empty_caption``, ``non_english``, ``tiny``, ``extreme_aspect``, ``corrupt``
    Booleans mirroring ``fault``. Tiny: both sides 24-48 px. Extreme aspect: long /
    short side 4.5-7, short side 64-90 px. Corrupt: the ``.jpg`` does not decode.
``corrupt_kind``
    "truncated" (first 30% of a JPEG), "random" (random bytes) or "bad_header" (a
    JPEG whose first 64 bytes are overwritten); ``None`` otherwise.
``background``, ``background_colour``
    Background kind (solid, gradient, noise, stripes) and a solid one's colour name.
``watermark``, ``watermark_text`` (quality shard only)
    Whether rows of semi-transparent text (:mod:`filtering.sample.watermark`) cover the
    image, and the text. The quality shard's samples have no other fault; its fault is
    "watermark" or "clean". It sits in its own folder, drawn from its own seed streams,
    so the pool's four shards and every config that reads them are unchanged by it.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from filtering.sample import synth, watermark

NUM_SHARDS = 4
SAMPLES_PER_SHARD = 250
NUM_EXACT_DUPS = 30
NUM_NEAR_DUPS = 30
# Planted faults among the non-duplicate samples; the rest of them are clean.
FAULT_COUNTS: dict[str, int] = {
    "mismatched": 200,
    "non_english": 40,
    "empty_caption": 20,
    "tiny": 20,
    "extreme_aspect": 20,
    "corrupt": 9,
}
FAULTS: tuple[str, ...] = ("clean", *FAULT_COUNTS, "exact_dup", "near_dup")
# The reference set covers only these classes, so image-cluster filtering has
# something to drop: pool samples of the other six classes.
REFERENCE_CLASSES: tuple[str, ...] = ("triangle", "star", "heart", "arrow")
REFERENCE_PER_CLASS = 20

QUALITY_SHARD = 4  # keys 00004NNNN: the fifth shard of the sample, in its own folder
QUALITY_SAMPLES = 250
WATERMARKED = 75

_POOL_STREAM, _REFERENCE_STREAM, _UID_STREAM, _QUALITY_STREAM, _QUALITY_UID_STREAM = 0, 1, 2, 3, 4
_SIZE_RANGE = (96, 224)
_QUALITY_RANGE = (80, 88)
_CORRUPT_KINDS = ("truncated", "random", "bad_header")
_NEAR_KINDS = ("requality", "resize", "crop")


@dataclass
class _Sample:
    jpg: bytes
    caption: str
    width: int
    height: int
    truth: dict
    order: float
    origin: int | None = None  # index of the original, for duplicates
    meta: dict = field(default_factory=dict)


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # No optimize/progressive: plain baseline encoding keeps bytes stable across runs.
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _normal_size(rng: np.random.Generator) -> tuple[int, int]:
    lo, hi = _SIZE_RANGE
    width = int(rng.integers(lo, hi + 1))
    aspect = float(np.exp(rng.uniform(np.log(0.7), np.log(1.43))))
    height = int(np.clip(round(width * aspect), lo, hi))
    return width, height


def _fault_size(rng: np.random.Generator, fault: str) -> tuple[int, int]:
    if fault == "tiny":
        return int(rng.integers(24, 49)), int(rng.integers(24, 49))
    if fault == "extreme_aspect":
        short = int(rng.integers(64, 91))
        ratio = float(rng.uniform(4.5, min(7.0, 480 / short)))
        long = round(short * ratio)
        return (long, short) if rng.random() < 0.5 else (short, long)
    return _normal_size(rng)


def _corrupt(rng: np.random.Generator, jpg: bytes, kind: str) -> bytes:
    if kind == "truncated":
        return jpg[: int(len(jpg) * 0.3)]
    if kind == "random":
        return rng.bytes(max(len(jpg) // 2, 512))
    # Keep the body, lose the SOI marker and headers: no decoder can identify it.
    return rng.bytes(64) + jpg[64:]


def _truth(scene: synth.Scene, width: int, height: int, fault: str) -> dict:
    return {
        "fault": fault,
        "class": scene.cls,
        "colour": scene.colour,
        "caption_class": scene.cls,
        "caption_colour": None,
        "language": "en",
        "mismatched": False,
        "duplicate_of": None,
        "dup_kind": None,
        "near_kind": None,
        "empty_caption": False,
        "non_english": False,
        "tiny": fault == "tiny",
        "extreme_aspect": fault == "extreme_aspect",
        "corrupt": False,
        "corrupt_kind": None,
        "background": scene.background,
        "background_colour": scene.background_colour,
    }


def _caption_colour(caption: str, language: str, colour: str) -> str | None:
    # Templates may omit colour; record it only when the caption names it.
    words = caption.split()
    return colour if any(w in words for w in synth.colour_words(colour, language)) else None


def _base_sample(rng: np.random.Generator, fault: str, index: int, corrupt_kind: str | None) -> _Sample:
    scene = synth.random_scene(rng)
    width, height = _fault_size(rng, fault)
    quality = int(rng.integers(_QUALITY_RANGE[0], _QUALITY_RANGE[1] + 1))
    jpg = _encode(synth.render_scene(scene, width, height), quality)
    truth = _truth(scene, width, height, fault)
    cls, colour, language = scene.cls, scene.colour, "en"
    if fault == "mismatched":
        cls = synth.CLASSES[int(rng.choice([i for i, c in enumerate(synth.CLASSES) if c != scene.cls]))]
        colour = list(synth.COLOURS)[int(rng.choice([i for i, c in enumerate(synth.COLOURS) if c != scene.colour]))]
        caption = synth.caption_for(rng, cls, colour)
        truth.update(mismatched=True, caption_class=cls)
    elif fault == "non_english":
        language = synth.LANGUAGES[1 + int(rng.integers(len(synth.LANGUAGES) - 1))]
        caption = synth.scene_caption(rng, scene, language)
        truth.update(non_english=True, language=language)
    elif fault == "empty_caption":
        caption = ""
        truth.update(empty_caption=True, caption_class=None, language=None)
    else:
        caption = synth.scene_caption(rng, scene)
    truth["caption_colour"] = _caption_colour(caption, language, colour)
    if fault == "corrupt":
        jpg = _corrupt(rng, jpg, corrupt_kind or "truncated")
        truth.update(corrupt=True, corrupt_kind=corrupt_kind)
    return _Sample(jpg=jpg, caption=caption, width=width, height=height, truth=truth, order=float(index))


def _near_copy(rng: np.random.Generator, orig: _Sample, kind: str) -> tuple[bytes, int, int]:
    img = Image.open(io.BytesIO(orig.jpg), formats=["JPEG"]).convert("RGB")
    if kind == "requality":
        return _encode(img, int(rng.integers(55, 71))), img.width, img.height
    if kind == "resize":
        # Never below 64 px, so a near duplicate is not also a tiny image.
        f = max(float(rng.uniform(0.6, 0.85)), 64 / min(img.size))
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BICUBIC)
    else:
        w, h = img.size
        left, top, right, bottom = (float(v) for v in rng.uniform(0.02, 0.05, size=4))
        img = img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))
    return _encode(img, int(rng.integers(_QUALITY_RANGE[0], _QUALITY_RANGE[1] + 1))), img.width, img.height


def _plant_duplicates(rng: np.random.Generator, base: list[_Sample]) -> list[_Sample]:
    clean = [i for i, s in enumerate(base) if s.truth["fault"] == "clean"]
    picks = rng.choice(len(clean), size=NUM_EXACT_DUPS + NUM_NEAR_DUPS, replace=False)
    dups = []
    for n, p in enumerate(picks):
        oi = clean[int(p)]
        orig = base[oi]
        # Anywhere after the original: across shards as often as the positions allow.
        order = float(rng.uniform(oi + 0.01, len(base)))
        truth = dict(orig.truth)
        if n < NUM_EXACT_DUPS:
            jpg, width, height = orig.jpg, orig.width, orig.height
            truth.update(fault="exact_dup", dup_kind="exact")
        else:
            kind = _NEAR_KINDS[n % len(_NEAR_KINDS)]
            jpg, width, height = _near_copy(rng, orig, kind)
            truth.update(fault="near_dup", dup_kind="near", near_kind=kind)
        dups.append(
            _Sample(jpg=jpg, caption=orig.caption, width=width, height=height, truth=truth, order=order, origin=oi)
        )
    return dups


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_pool(pool_dir: Path, samples: list[_Sample]) -> None:
    pool_dir.mkdir(parents=True, exist_ok=True)
    for shard in range(NUM_SHARDS):
        chunk = samples[shard * SAMPLES_PER_SHARD : (shard + 1) * SAMPLES_PER_SHARD]
        _write_shard(pool_dir / f"{shard:05d}.tar", chunk)


def _write_shard(path: Path, chunk: list[_Sample]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in chunk:
            key = s.meta["key"]
            _tar_member(tar, f"{key}.jpg", s.jpg)
            _tar_member(tar, f"{key}.txt", s.caption.encode("utf-8"))
            _tar_member(
                tar, f"{key}.json", json.dumps(s.meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            )
    path.write_bytes(buf.getvalue())


def _quality_samples(seed: int) -> list[_Sample]:
    """Clean samples, ``WATERMARKED`` of them (at random positions) with a text overlay."""
    rng = np.random.default_rng([seed, _QUALITY_STREAM])
    marked = np.zeros(QUALITY_SAMPLES, dtype=bool)
    marked[rng.choice(QUALITY_SAMPLES, size=WATERMARKED, replace=False)] = True
    uid_rng = np.random.default_rng([seed, _QUALITY_UID_STREAM])
    samples = []
    for i in range(QUALITY_SAMPLES):
        scene = synth.random_scene(rng)
        width, height = _normal_size(rng)
        quality = int(rng.integers(_QUALITY_RANGE[0], _QUALITY_RANGE[1] + 1))
        img = synth.render_scene(scene, width, height)
        truth = _truth(scene, width, height, "clean")
        wm = watermark.random_watermark(rng) if marked[i] else None
        if wm is not None:
            img = watermark.overlay(img, wm)
            truth["fault"] = "watermark"
        caption = synth.scene_caption(rng, scene)
        truth.update(
            caption_colour=_caption_colour(caption, "en", scene.colour),
            watermark=wm is not None,
            watermark_text=wm.text if wm else None,
        )
        s = _Sample(jpg=_encode(img, quality), caption=caption, width=width, height=height, truth=truth, order=float(i))
        s.meta = {
            "uid": uid_rng.bytes(16).hex(),
            "key": f"{QUALITY_SHARD:05d}{i:04d}",
            "original_width": width,
            "original_height": height,
            "truth": truth,
        }
        samples.append(s)
    return samples


def _write_reference(ref_dir: Path, seed: int) -> dict[str, int]:
    rng = np.random.default_rng([seed, _REFERENCE_STREAM])
    counts = {}
    for cls in REFERENCE_CLASSES:
        (ref_dir / cls).mkdir(parents=True, exist_ok=True)
        for n in range(REFERENCE_PER_CLASS):
            scene = synth.random_scene(rng, cls)
            width, height = _normal_size(rng)
            jpg = _encode(synth.render_scene(scene, width, height), 85)
            (ref_dir / cls / f"{n:03d}.jpg").write_bytes(jpg)
        counts[cls] = REFERENCE_PER_CLASS
    return counts


_README = """\
# poolsift bundled sample (generated)

Made by `poolsift make-sample` (`filtering.sample.make.make_sample`, seed {seed});
regenerating with the same seed gives byte-identical files.

- `pool/00000.tar` .. `pool/{last:05d}.tar`: {samples} synthetic image-text samples in
  WebDataset shards (`KEY.jpg`, `KEY.txt`, `KEY.json`). Keys: 5 digits of shard, 4 of
  index. The `.json` holds `uid`, `key`, `original_width`,
  `original_height` and `truth`, the planted ground truth.
- `quality/{quality_shard:05d}.tar`: {quality} more clean samples, {watermarked} of them under a
  watermark-like text overlay (`truth.watermark`), for `configs/sample_quality.yaml`
  and the watermark head in `heads/` (trained by `filtering/sample/train_quality_head.py`).
- `reference/<class>/NNN.jpg`: {per_class} images each of {ref_classes}, standing in
  for ImageNet as the image-cluster reference set.

Planted faults (`truth.fault`): {faults}.

`truth` fields: fault, class, colour, caption_class, caption_colour, language,
mismatched, duplicate_of (the original's uid), dup_kind ("exact" | "near"),
near_kind ("requality" | "resize" | "crop"), empty_caption, non_english, tiny,
extreme_aspect, corrupt, corrupt_kind ("truncated" | "random" | "bad_header"),
background, background_colour; in the quality shard also watermark and
watermark_text. See the docstring of
`filtering/sample/make.py` for the exact rules.
"""


def make_sample(out_dir: Path | str, seed: int = 0) -> dict:
    """Write the sample pool, reference set and README under ``out_dir``.

    Deterministic in ``seed``. Existing files of the same names are overwritten;
    nothing else in ``out_dir`` is touched. Returns a summary: sample and shard
    counts, samples per fault, reference images per class and bytes written.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng([seed, _POOL_STREAM])
    num_base = NUM_SHARDS * SAMPLES_PER_SHARD - NUM_EXACT_DUPS - NUM_NEAR_DUPS
    faults = ["clean"] * (num_base - sum(FAULT_COUNTS.values()))
    for name, count in FAULT_COUNTS.items():
        faults += [name] * count
    faults = [faults[int(i)] for i in rng.permutation(len(faults))]

    base = []
    corrupt_seen = 0
    for i, fault in enumerate(faults):
        kind = None
        if fault == "corrupt":
            kind = _CORRUPT_KINDS[corrupt_seen % len(_CORRUPT_KINDS)]
            corrupt_seen += 1
        base.append(_base_sample(rng, fault, i, kind))
    dups = _plant_duplicates(rng, base)
    samples = sorted(base + dups, key=lambda s: s.order)

    uid_rng = np.random.default_rng([seed, _UID_STREAM])
    for pos, s in enumerate(samples):
        key = f"{pos // SAMPLES_PER_SHARD:05d}{pos % SAMPLES_PER_SHARD:04d}"
        s.meta = {"uid": uid_rng.bytes(16).hex(), "key": key}
    for s in dups:
        s.truth["duplicate_of"] = base[s.origin].meta["uid"]
    for s in samples:
        s.meta.update(original_width=s.width, original_height=s.height, truth=s.truth)

    _write_pool(out_dir / "pool", samples)
    (out_dir / "quality").mkdir(parents=True, exist_ok=True)
    _write_shard(out_dir / "quality" / f"{QUALITY_SHARD:05d}.tar", _quality_samples(seed))
    reference = _write_reference(out_dir / "reference", seed)
    fault_counts = Counter(s.truth["fault"] for s in samples)
    summary = {
        "seed": seed,
        "samples": len(samples),
        "shards": NUM_SHARDS,
        "faults": {name: fault_counts.get(name, 0) for name in FAULTS},
        "reference": reference,
        "quality": {"samples": QUALITY_SAMPLES, "watermark": WATERMARKED},
        "pool_bytes": sum((out_dir / "pool" / f"{k:05d}.tar").stat().st_size for k in range(NUM_SHARDS)),
        "reference_bytes": sum(p.stat().st_size for p in (out_dir / "reference").rglob("*.jpg")),
    }
    readme = _README.format(
        seed=seed,
        last=NUM_SHARDS - 1,
        samples=len(samples),
        per_class=REFERENCE_PER_CLASS,
        ref_classes=", ".join(REFERENCE_CLASSES),
        faults=", ".join(f"{k} {v}" for k, v in summary["faults"].items()),
        quality_shard=QUALITY_SHARD,
        quality=QUALITY_SAMPLES,
        watermarked=WATERMARKED,
    )
    (out_dir / "README.md").write_text(readme, encoding="utf-8")
    return summary
