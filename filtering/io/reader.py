"""Reading WebDataset shards as raw samples.

Nothing is decoded here: image bytes travel as they are (for hashing, decoding in
workers, and byte-for-byte resharding). A shard that cannot be opened or is cut short
is reported, not raised: the samples read so far are kept, and the shard-level error
becomes a failure record.

Samples are webdataset's: regular members grouped by key (the name up to the first
dot of its base name), extensions lower-cased, ``__meta__`` files skipped. Where
webdataset raises and drops the rest of the shard, this reader keeps going:

- a member name repeated within a sample (``x.jpg`` twice) makes that one sample a
  failure (``RawSample.error``, reason ``duplicate_member``); later samples are read;
- at damage (a cut, a bad checksum, a header claiming more bytes than the file holds)
  the sample being assembled is kept when it is complete: when the damaged member's
  header names another key, or, when that header cannot be trusted, when the sample
  has the members the shard's previous sample had (for the shard's first sample:
  unless the damaged header, read as a hint, names the same key). Everything after
  the damage is lost, and reported as the shard's error.

A header's size is never trusted for an allocation: large members are read in
pieces, so a 1 TiB claim in a small file costs what the file holds. The tar
headers are parsed here rather than by Python's ``tarfile``, which spends about 50 us
per member in Python code: at the thousands of samples per second a GPU scores, that
alone would take a core. Parsing covers ustar, GNU (long names) and pax headers. A
shard using anything else (sparse files, say) is read with webdataset's own iterator,
from the same position, so the samples are the same either way (tested against
webdataset on tars of each format).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from filtering.io.paths import open_file

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]  # extension -> bytes, as stored in the tar
    error: str | None = None  # why this sample cannot be used ("reason: detail"): it becomes a failure row

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
        return self.read_meta()[0]

    def read_meta(self) -> tuple[dict | None, str | None]:
        """The ``.json`` member as a dict, and why it is unusable when it is present but not
        a JSON object (``bad_json: ...``); ``(None, None)`` when there is none."""
        raw = self.members.get("json")
        if raw is None:
            return None, None
        try:
            value = json.loads(raw)
        except RecursionError:
            return None, "bad_json: nested too deep"
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            return None, f"bad_json: {one_line(e)[:120]}"
        if not isinstance(value, dict):
            return None, f"bad_json: a {type(value).__name__}, not an object"
        return value, None


@dataclass
class ShardReadResult:
    url: str
    error: str | None = None
    samples_read: int = 0


def unsafe_name(key: str) -> str | None:
    """Why a sample key cannot be written back as a member name (``output.webdataset``),
    or None. An absolute path or a ``..`` component would let a tar extractor without a
    filter (``tarfile.extractall``) write outside its target folder."""
    if key.startswith(("/", "\\")):
        return "unsafe_name: absolute member name"
    if ".." in key.replace("\\", "/").split("/"):
        return "unsafe_name: '..' in the member name"
    return None


def one_line(e: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message (MemoryError)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def iter_shard(url: str, result: ShardReadResult | None = None) -> Iterator[RawSample]:
    """Yield the samples of one tar shard in stored order; errors go to ``result.error``."""
    result = result if result is not None else ShardReadResult(url)
    try:
        try:
            with open_file(url) as f:
                for key, members, error in group_members(tar_members(f)):
                    result.samples_read += 1
                    yield RawSample(key=key, members=members, error=error)
        except _UnsupportedTarError:
            for i, sample in enumerate(_iter_shard_webdataset(url)):
                if i >= result.samples_read:  # those before were read already, identically
                    result.samples_read += 1
                    yield sample
    except Exception as e:  # noqa: BLE001 — a broken tar must not stop the run
        lines = str(e).strip().splitlines()  # MemoryError() has none
        result.error = f"unreadable_shard: {type(e).__name__}" + (f": {lines[0][:200]}" if lines else "")


def _iter_shard_webdataset(url: str) -> Iterator[RawSample]:
    """Members from webdataset's tar iterator (any format ``tarfile`` reads), grouped as above."""
    from webdataset.tariterators import tar_file_iterator

    def files():
        with open_file(url) as f:
            for item in tar_file_iterator(f):
                yield item["fname"], item["data"]

    for key, members, error in group_members(files()):
        yield RawSample(key=key, members=members, error=error)


class _UnsupportedTarError(Exception):
    """A tar feature this reader leaves to webdataset's iterator."""


class TarError(Exception):
    """A damaged tar stream. ``member``: the damaged member's name when its header was read;
    ``verified``: whether that header's checksum held (else the name is only a hint)."""

    def __init__(self, message: str, member: str | None = None, verified: bool = False):
        super().__init__(message)
        self.member, self.verified = member, verified


_BLOCK = 512
_REGULAR = (b"0", b"\x00", b"7")
_OTHER = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: skipped, as tarfile's isreg() does
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: tarfile decompresses these
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else value
    digits = field.split(b"\x00", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarError(f"invalid number field {field!r} in tar header") from None


def _name(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


_READ_PIECE = 1 << 26  # 64 MiB


def _read_exact(f, n: int, member: str | None = None) -> bytes:
    if n <= _READ_PIECE:
        data = f.read(n)
    else:  # a header can claim any size: read what the file holds, a piece at a time
        pieces, left = [], n
        while left and (piece := f.read(min(left, _READ_PIECE))):
            pieces.append(piece)
            left -= len(piece)
        data = b"".join(pieces)
    if len(data) != n:
        raise TarError("unexpected end of data", member, verified=member is not None)
    return data


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    if stored == sum(header[:148]) + 256 + sum(header[156:]):
        return True
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:])  # some old tars
    return stored == signed + 256


def _pax(data: bytes) -> dict[str, str]:
    """The records (``"%d %s=%s\\n"``) of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\x00":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise TarError("invalid pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def tar_members(f) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular members of an uncompressed tar stream, as
    webdataset's ``tar_file_iterator`` yields them (``__meta__`` files skipped).

    Damage is an error (:class:`TarError`) wherever it is; a tar feature left to
    webdataset (compression, sparse files, global pax headers, unknown member types)
    raises :class:`_UnsupportedTarError` before that member.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    first = True
    while True:
        header = f.read(_BLOCK)
        if first and header.startswith(_COMPRESSED):
            raise _UnsupportedTarError("compressed tar")
        if not header:
            if first:
                raise TarError("empty file")
            return
        first = False
        if len(header) != _BLOCK:
            if header.count(0) == len(header):  # cut inside the end-of-archive blocks
                return
            raise TarError("unexpected end of data", _name(header[0:100]))
        if header.count(0) == _BLOCK:  # end of archive
            return
        try:
            ok = _checksum_ok(header)
        except TarError:
            ok = False
        if not ok:
            raise TarError("bad checksum", _name(header[0:100]))
        kind = header[156:157]
        try:
            size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        except ValueError:
            raise TarError(f"invalid pax size {pax['size'][:40]!r}") from None
        if size < 0:
            raise TarError(f"negative member size {size}")
        padding = -size % _BLOCK
        if kind in (b"L", b"K", b"x"):  # about the next member
            data = _read_exact(f, size + padding)[:size]
            if kind == b"L":
                long_name = _name(data)
            elif kind == b"x":
                pax = _pax(data)
                if any(k.startswith("GNU.sparse") for k in pax):
                    raise _UnsupportedTarError("sparse member")
            continue
        if kind not in _REGULAR and kind not in _OTHER:
            raise _UnsupportedTarError(f"tar member type {kind!r}")
        if long_name is not None:
            name = long_name
        elif "path" in pax:
            name = pax["path"]
        else:
            name = _name(header[0:100])
            if header[257:265] == b"ustar\x0000" and header[345] != 0:  # POSIX ustar prefix
                name = _name(header[345:500]) + "/" + name
        long_name, pax = None, {}
        if kind not in _REGULAR or (kind == b"\x00" and name.endswith("/")):
            if size:
                _read_exact(f, size + padding, name)
            continue
        data = _read_exact(f, size, name)
        f.read(padding)  # a stream cut inside the padding ends after this member, as in tarfile
        if "/" not in name and name.startswith("__") and name.endswith("__"):
            continue
        if _SKIP_META.match(name):
            continue
        yield name, data


def group_members(members) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """webdataset's ``group_by_keys``: consecutive members sharing a key form a sample;
    the extension (after the base name's first dot) is lower-cased. Yields
    ``(key, members, error)``: ``error`` names a repeated member (the first copy is
    kept). When the member stream fails, the sample being assembled is yielded first
    if it is complete (:func:`_complete_at_damage`), then the error propagates."""
    key, sample, error, previous = None, None, None, None
    try:
        for name, data in members:
            m = _KEY_EXT.match(name)
            if not m:
                continue
            prefix, suffix = m.group(1), m.group(2).lower()
            if sample is None or prefix != key:
                if sample:
                    yield key, sample, error
                    previous = sample
                key, sample, error = prefix, {}, None
            if suffix in sample:
                error = error or f"duplicate_member: {name[-200:]} appears twice in one sample"
                continue
            sample[suffix] = data
    except _UnsupportedTarError:
        raise  # the fallback reader rereads this sample
    except Exception as e:
        if sample and _complete_at_damage(e, key, sample, previous):
            yield key, sample, error
        raise
    if sample:
        yield key, sample, error


def _complete_at_damage(e: Exception, key: str, sample: dict, previous: dict | None) -> bool:
    """Whether the sample assembled when the stream broke has all its members: the damaged
    member's (checksummed) header names another key; else the sample has the extensions
    of the shard's previous sample; else (first sample) the damaged header's name, read
    as a hint, names another key or nothing readable."""
    member = getattr(e, "member", None)
    m = _KEY_EXT.match(member) if member else None
    if getattr(e, "verified", False) and member is not None:
        return m is None or m.group(1) != key
    if previous is not None:
        return sample.keys() >= previous.keys()
    return m is None or m.group(1) != key
