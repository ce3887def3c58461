"""Reading WebDataset shards as raw samples, with webdataset's tar iterators.

Nothing is decoded here: image bytes travel as they are (for hashing, decoding in
workers, and byte-for-byte resharding). A shard that cannot be opened or is cut short
is reported, not raised: the samples read so far are kept, and the shard-level error
becomes a failure record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from filtering.io.paths import open_file

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]  # extension -> bytes, as stored in the tar

    @property
    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.members), None)

    @property
    def image(self) -> bytes | None:
        ext = self.image_ext
        return self.members[ext] if ext else None

    @property
    def caption(self) -> str:
        raw = self.members.get("txt")
        return raw.decode("utf-8", errors="replace") if raw is not None else ""

    @property
    def meta(self) -> dict | None:
        raw = self.members.get("json")
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None


@dataclass
class ShardReadResult:
    url: str
    error: str | None = None
    samples_read: int = 0
    extra: dict = field(default_factory=dict)


def iter_shard(url: str, result: ShardReadResult | None = None) -> Iterator[RawSample]:
    """Yield the samples of one tar shard in stored order; errors go to ``result.error``."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    result = result if result is not None else ShardReadResult(url)

    def files():
        with open_file(url) as f:
            for item in tar_file_iterator(f):
                item["__url__"] = url
                yield item

    try:
        for sample in group_by_keys(files()):
            key = sample.pop("__key__")
            sample.pop("__url__", None)
            sample.pop("__local_path__", None)
            result.samples_read += 1
            yield RawSample(key=key, members=sample)
    except Exception as e:  # noqa: BLE001 — a broken tar must not stop the run
        result.error = f"unreadable_shard: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
