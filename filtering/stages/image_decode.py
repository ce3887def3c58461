"""Defensive image decoding, run in worker processes.

Each image is decoded with PIL, checked, hashed perceptually, then put through the
PIL part of the model's own transform (resize, center crop, RGB) and returned as a
uint8 HWC array: the float conversion and normalization happen on the model's device.
A corrupt image becomes a reason string; it never raises.

By default (``draft=None``) every image is decoded at full size, exactly as the model's
own preprocessing does, so CLIP scores are open_clip's. As an opt-in
(``model.jpeg_draft: true``), JPEGs at least twice the model input are decoded with
libjpeg-turbo's DCT-domain downscaling (PIL ``Image.draft``): the decoder produces a
1/2, 1/4 or 1/8 scale image directly, never smaller than the model's resize target on
either side, and the model's own resize finishes the job. This skips most of the
decoding work for large images, but the pixels differ and so do the scores
(docs/performance.md). The perceptual hash is computed from the same decoded image, so
with draft decoding it too can differ in a few bits from a full-size decode.

Pool images (the WebDataset source) and reference images (decontamination, the
image-cluster reference set, the quality head's training images) take the one path,
:func:`decode_image` under a :class:`DecodePlan` (reference images under
:func:`reference_plan`: the source's required steps, the perceptual hash and CLIP's
preprocessing), through the one worker loop, :func:`decode_window` (reference images by
way of :func:`decode_in_order`), so their hashes, pixels and failure reasons are the pool's.

Images are opened only with the decoders of the formats allowed (``input.image_formats``,
default :data:`DEFAULT_IMAGE_FORMATS`), whatever a member's extension says: pool bytes come
from the open web, and PIL would otherwise hand EPS and PostScript to Ghostscript, an
external program with a record of remote-code-execution bugs (CVE-2023-36664,
CVE-2024-29510). Bytes in another format fail the sample as ``unsupported_format: <FORMAT>``.
"""

from __future__ import annotations

import contextlib
import io
import re
import signal
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")

# The formats ``input.image_formats`` may name: PIL decoders that run in-process, for
# formats found on the web. EPS, PDF and the rest are never offered.
IMAGE_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")
# JPEG, PNG and WebP are what web pools hold; BMP because image-folder reference sets
# list ``.bmp`` files (filtering/image_clusters/image_clusters_stage.py, IMAGE_EXTS).
DEFAULT_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Formats PIL cannot open but that turn up where images are expected, by their first bytes.
_OTHER_SIGNATURES = ((b"%PDF-", "PDF"), (b"<svg", "SVG"), (b"<?xml", "XML"), (b"<!DOCTYPE", "HTML"), (b"<html", "HTML"))


@contextlib.contextmanager
def decode_limits():
    """The limits every image decode in poolsift runs under (scoring, the report): an image
    of more than PIL's ``Image.MAX_IMAGE_PIXELS`` (89.5 MP) is refused as a decompression
    bomb. PIL itself only warns up to twice that, and a 12000x12000 PNG of 560 KB would
    take 1.2 GB to decode."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _message(e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    # PIL names the buffer by its address ("<_io.BytesIO object at 0x7f..>"): drop it, so the
    # same bytes give the same reason in every run (resumed and Ray runs must match exactly).
    return _ADDRESS.sub("", msg).strip()[:160]


def _reason(e: Exception) -> str:
    return f"corrupt_image: {_message(e)}"


def sniff_format(data: bytes) -> str | None:
    """The format ``data`` starts like, by the first bytes alone (each PIL plugin's own
    signature check, nothing parsed or decoded), or None when none matches."""
    from PIL import Image

    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        try:
            match = accept is not None and accept(prefix)
        except Exception:  # noqa: BLE001 — a signature check that cannot read 16 bytes is no match
            match = False
        if match and not isinstance(match, str):  # a str is PIL's warning about a variant it cannot read
            return name
    head = data[:64].lstrip().lower()
    return next((name for sig, name in _OTHER_SIGNATURES if head.startswith(sig.lower())), None)


def open_allowed(data: bytes, formats: Iterable[str] = DEFAULT_IMAGE_FORMATS):
    """``PIL.Image.open`` of ``data`` trying only the decoders of ``formats``; bytes in
    another format raise :class:`UnsupportedFormatError` naming it. The one way poolsift opens
    image bytes (scoring, reference sets, the report's thumbnails)."""
    from PIL import Image, UnidentifiedImageError

    formats = tuple(formats)
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        found = sniff_format(data)
        if found is not None and found not in formats:
            raise UnsupportedFormatError(found) from None
        raise


class UnsupportedFormatError(Exception):
    """Image bytes in a format outside the allowed ones (``input.image_formats``)."""

    def __init__(self, found: str):
        super().__init__(found)
        self.found = found


def open_image(data: bytes | None, draft: int | None = None, formats: Iterable[str] = DEFAULT_IMAGE_FORMATS):
    """Decode one image: (PIL image, original width, original height, error). ``draft``: the
    shorter-side size a JPEG may be DCT-downscaled to (None = full decode); ``formats``: the
    decoders allowed (:func:`open_allowed`)."""
    if data is None:
        return None, None, None, "missing_image: no jpg/jpeg/png/webp member"
    try:
        with decode_limits():
            img = open_allowed(data, formats)
            width, height = img.size
            if draft and img.format == "JPEG" and min(width, height) >= 2 * draft:
                # DCT-domain scaling by 1/2, 1/4 or 1/8; both sides stay >= draft.
                img.draft(img.mode, (draft, draft))
            img.load()
    except UnsupportedFormatError as e:
        return None, None, None, f"unsupported_format: {e.found}"
    except Exception as e:  # noqa: BLE001 — any decoder failure is a per-sample failure
        return None, None, None, _reason(e)
    if width < 1 or height < 1:
        return None, width, height, "corrupt_image: empty image"
    return img, width, height, None


# --- decoding with image scorers and transforms (pool and reference images) ----------


@dataclass
class DecodePlan:
    """What the decode workers do with each image besides checking it: run the image
    scorers (``Needs.images``) on the decoded image, and apply each pixel scorer's
    transform (``Needs.pixels``), keyed by scorer name. Picklable: sent once per worker."""

    draft: int | None = None
    scorers: list = field(default_factory=list)  # Needs.images scorers
    transforms: dict = field(default_factory=dict)  # pixel scorer name -> PIL transform
    # Scorers whose failure on an image fails the sample (the source's own: CLIP's
    # preprocessing and the perceptual hash); run whenever the rows ("source") are wanted.
    required: frozenset = frozenset()
    formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS  # the decoders allowed (input.image_formats)


@dataclass
class DecodedImage:
    """One sample's image after the decode pass. ``values``: per image scorer, its
    columns' values (absent: not scored); ``pixels``: per pixel scorer, its input;
    ``failures``: per scorer (not a required one) that failed on this image, why."""

    width: int | None
    height: int | None
    error: str | None
    values: dict = field(default_factory=dict)
    pixels: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)


_PLAN: DecodePlan | None = None


def init_scoring_worker(plan: DecodePlan) -> None:
    """Pool initializer of the decode workers: keep the plan per process instead of
    pickling it per task.

    Workers ignore SIGINT: Ctrl-C reaches the whole process group, and the parent alone
    decides how to stop (cancel pending chunks, shut the pool down) instead of workers
    dying mid-task and leaving the pool broken.
    """
    global _PLAN
    _PLAN = plan
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "torch" in sys.modules:  # a transform only torchvision can run brought torch in
        sys.modules["torch"].set_num_threads(1)


def decode_image(data: bytes | None, wanted, plan: DecodePlan | None = None) -> DecodedImage:
    """Decode one image, run the wanted image scorers on it and the wanted pixel scorers'
    transforms. A failed decode, or a failure of a ``plan.required`` scorer or transform
    (CLIP's preprocessing, the perceptual hash), fails the sample as a corrupt image; any
    other scorer or transform that fails on this image leaves that scorer's value null and
    its reason in ``failures`` (the source counts them per scorer in the manifest)."""
    from filtering.scorers.base import Batch

    plan = plan or _PLAN
    img, width, height, error = open_image(data, plan.draft, plan.formats)
    out = DecodedImage(width, height, error)
    if img is None:
        return out

    def runs(name: str) -> bool:
        return name in wanted or ("source" in wanted and name in plan.required)

    def failed(name: str, message: str, sized: bool = False) -> DecodedImage | None:
        """A required step's failure fails the sample as a corrupt image (the reason a
        failed decode gives); another's is recorded and that scorer's value left null."""
        if name in plan.required:
            return (
                DecodedImage(width, height, f"corrupt_image: {message}")
                if sized
                else DecodedImage(None, None, f"corrupt_image: {message}")
            )
        out.failures[name] = message
        return None

    for scorer in plan.scorers:
        if not runs(scorer.name):
            continue
        try:
            scorer.ensure_setup()
            result = scorer.score(Batch(images=[img]))
            out.values[scorer.name] = {c: np.asarray(result[c])[0] for c in scorer.provides()}
        except Exception as e:  # noqa: BLE001 — one odd image: a failed sample or a null value
            if (fail := failed(scorer.name, _message(e))) is not None:
                return fail
    for name, transform in plan.transforms.items():
        if not runs(name):
            continue
        try:
            pixels = np.asarray(transform(img), dtype=np.uint8)
        except Exception as e:  # noqa: BLE001
            if (fail := failed(name, _message(e))) is not None:
                return fail
            continue
        if pixels.ndim == 3 and pixels.shape[2] == 3:
            out.pixels[name] = pixels
        elif (fail := failed(name, f"unexpected shape {pixels.shape}", sized=True)) is not None:
            return fail
    return out


def decode_images(items: list[bytes | None], wanted) -> list[DecodedImage]:
    return [decode_image(d, wanted) for d in items]


def decode_window(
    tasks: Iterable[tuple[Any, list[bytes | None] | None, Any]], plan: DecodePlan, workers: int, window: int
) -> Iterator[tuple[Any, list[DecodedImage] | None]]:
    """The decode workers' loop, for pool images (the source's ``score_stream``) and
    reference images (:func:`decode_in_order`) alike: ``(tag, images, wanted)`` tasks in,
    ``(tag, decoded images)`` out, in order, each image through :func:`decode_image` with
    the scorers ``wanted`` (a task without images passes through in its place, decoded
    None). ``workers=0`` decodes in this process as each task comes; else ``workers``
    spawned processes decode ahead, at most ``window`` tasks in flight beyond the one
    awaited, so memory holds a window of images however many there are. A worker that
    dies raises ``BrokenProcessPool``; leaving early (an error, ``close()``) cancels the
    queued tasks and stops the workers."""
    if workers <= 0:
        for tag, images, wanted in tasks:
            yield tag, None if images is None else [decode_image(d, wanted, plan) for d in images]
        return
    from filtering.tasks import process_pool, windowed

    items = ((tag, None if images is None else (images, wanted)) for tag, images, wanted in tasks)
    with process_pool(workers, "spawn", init_scoring_worker, (plan,)) as ex:
        yield from windowed(ex, decode_images, items, window)


# --- reference images ------------------------------------------------------------------

REFERENCE_WINDOW = 4  # chunks in flight per worker process


def reference_plan(
    transform=None, draft: int | None = None, formats: Iterable[str] = DEFAULT_IMAGE_FORMATS
) -> DecodePlan:
    """How reference images are decoded: as the source decodes pool images, with its
    required steps, the perceptual hash (``phash``) and, given CLIP's ``transform``, its
    preprocessing (``clip``); either failing fails the image with the reason a pool
    sample would get. ``draft``: the JPEG draft size (None = full decode); ``formats``:
    the decoders allowed (``input.image_formats``)."""
    from filtering.scorers.base import InputInfo
    from filtering.scorers.phash import PhashScorer

    transforms = {} if transform is None else {"clip": transform}
    phash = PhashScorer(PhashScorer.Params(), InputInfo("webdataset"))
    return DecodePlan(draft, [phash], transforms, required=frozenset({phash.name, *transforms}), formats=tuple(formats))


def decode_in_order(
    items: Iterable[tuple[Any, bytes | None]], plan: DecodePlan, workers: int, chunk: int = 64
) -> Iterator[tuple[Any, DecodedImage]]:
    """``(key, image bytes)`` pairs in, ``(key, decoded image)`` pairs out, in order, each
    image through ``plan``'s required steps, in chunks of ``chunk`` images through
    :func:`decode_window` with ``REFERENCE_WINDOW`` chunks per worker in flight (the
    parent keeps only the keys of those)."""
    import itertools

    wanted = tuple(sorted(plan.required))
    it = iter(items)
    chunks = iter(lambda: list(itertools.islice(it, chunk)), [])
    tasks = (([k for k, _ in pairs], [d for _, d in pairs], wanted) for pairs in chunks)
    with contextlib.closing(decode_window(tasks, plan, workers, REFERENCE_WINDOW * workers)) as decoded:
        for keys, images in decoded:
            yield from zip(keys, images, strict=True)
