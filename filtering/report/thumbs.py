"""Thumbnails for the report: the few samples shown, read from their source shards.

Only shards that hold a wanted sample are opened, each streamed once with the standard
library's tar reader (no torch import for a report) and closed as soon as its wanted
keys are found; the number of shards opened is capped. Thumbnails are
small JPEGs re-encoded from the image (the report is for looking, not for training),
embedded as ``data:`` URIs so the page needs no network. Images are decoded under
scoring's limits (:func:`filtering.stages.image_decode.decode_limits`) and with the run's
allowed decoders only (``input.image_formats``, :func:`filtering.stages.image_decode.open_allowed`):
an image that scoring refused, as a decompression bomb or in a format not allowed, gets no
thumbnail.
"""

from __future__ import annotations

import base64
import io
import posixpath
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Iterator

from filtering.io.paths import open_file
from filtering.io.reader import IMAGE_EXTS
from filtering.report.data import Sample
from filtering.stages.image_decode import DEFAULT_IMAGE_FORMATS, IMAGE_FORMATS

THUMB_PX = 112
MAX_SHARDS = 64


def thumbnail_uri(data: bytes, size: int = THUMB_PX, formats: Iterable[str] = DEFAULT_IMAGE_FORMATS) -> str | None:
    """A base64 JPEG data URI of the image scaled to fit ``size`` pixels; None if it does not
    decode with the decoders of ``formats``."""
    from filtering.stages.image_decode import decode_limits, open_allowed

    try:
        with decode_limits(), open_allowed(data, formats) as img:
            img.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale
            rgb = img.convert("RGB")
            rgb.thumbnail((size, size))
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=82)
    except Exception:  # noqa: BLE001 — corrupt images are shown without a picture
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fill_thumbnails(
    samples: Iterable[Sample], max_shards: int = MAX_SHARDS, log=None, formats: Iterable[str] = DEFAULT_IMAGE_FORMATS
) -> int:
    """Set ``sample.image`` for samples whose shard is readable; returns how many got one.
    ``formats``: the decoders allowed (the run's ``input.image_formats``)."""
    formats = tuple(formats)
    wanted: dict[str, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        if s.source_shard and s.key and str(s.source_shard).endswith(".tar"):
            wanted[s.source_shard][s.key].append(s)
    filled = 0
    for n, (shard, keys) in enumerate(sorted(wanted.items())):
        if n >= max_shards:
            if log:
                log(f"report: thumbnails from the first {max_shards} of {len(wanted)} shards only")
            break
        try:
            for key, data in iter_images(shard, set(keys)):
                uri = thumbnail_uri(data, formats=formats)
                for s in keys[key]:
                    s.image = uri
                    filled += uri is not None
        except (OSError, tarfile.TarError) as e:
            if log:
                log(f"report: no thumbnails from {shard}: {e}")
    return filled


def run_formats(manifest: dict) -> tuple[str, ...]:
    """The decoders the run allowed (its config's ``input.image_formats``), limited to those
    poolsift offers whatever the manifest says; the default when it names none."""
    named = ((manifest.get("config") or {}).get("input") or {}).get("image_formats")
    if not isinstance(named, list | tuple):
        return DEFAULT_IMAGE_FORMATS
    return tuple(f for f in named if f in IMAGE_FORMATS) or DEFAULT_IMAGE_FORMATS


def iter_images(shard: str, keys: set[str]) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) for the wanted keys, in stored order; stops once all are found.

    Keys follow WebDataset: the member path up to the first dot of its file name.
    """
    remaining = set(keys)
    with open_file(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            head, base = posixpath.split(member.name)
            stem, _, ext = base.partition(".")
            key = posixpath.join(head, stem) if head else stem
            if key in remaining and ext.lower() in IMAGE_EXTS:
                remaining.discard(key)
                yield key, tf.extractfile(member).read()
                if not remaining:
                    return
