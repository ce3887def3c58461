"""Shard lists and file access for local paths and fsspec URLs.

A shard spec is what ``input.shards`` accepts: a brace range
(``pool/{00000..00003}.tar``), a glob, a directory (all ``*.tar`` inside) or a list of
those. Expansion is sorted and de-duplicated so every run sees the same order.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterable
from typing import IO, Any

from filtering.errors import InputError

_GLOB_CHARS = set("*?[")


def get_fs(url: str) -> tuple[Any, str]:
    """Return the fsspec filesystem and the protocol-stripped path for ``url``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if getattr(fs, "auto_mkdir", True) is False:
        # a file system of folders (``local://``): the writers make no parent folders (an
        # object store has none), so the file system makes them as it writes
        fs.auto_mkdir = True
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts, keeping a URL's protocol; works for local paths and fsspec URLs."""
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def local_path(url: str) -> str:
    return url.removeprefix("file://")


def open_file(url: str, mode: str = "rb") -> IO:
    if is_local(url):  # no fsspec import for local runs
        return open(local_path(url), mode)
    import fsspec

    return fsspec.open(url, mode).open()


def _protocol_prefix(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


# What a run writes in its output directory (docs/spec.md, "Output directory"). A shard spec
# that reaches into an output directory (``DIR/*`` with ``output.dir: DIR``, or ``**``
# over a folder holding it) skips these, so a rerun reads the same inputs as the first run.
OUTPUT_ENTRIES = (
    "manifest.json",
    "subset.npy",
    "subset",
    "dropped",
    "shards",
    "subset_match",
    "cache",
    "report.html",
    "sweep.json",
    ".poolsift.lock",
    ".poolsift-next",  # a result being written, the one it replaces, the switch's journal (writers/commit.py)
    ".poolsift-prev",
    ".poolsift-commit.json",
)


def is_output_file(url: str, out_dir: str) -> bool:
    """Whether ``url`` is something a run with output directory ``out_dir`` writes."""
    if is_local(url) != is_local(out_dir):
        return False
    if is_local(url):
        path, root = os.path.abspath(local_path(url)), os.path.abspath(local_path(out_dir))
    else:
        path, root = url.rstrip("/"), out_dir.rstrip("/")
    if not path.startswith(root + "/"):
        return False
    first = path[len(root) + 1 :].split("/", 1)[0]
    return first in OUTPUT_ENTRIES or first.startswith(".tmp-")


def expand_shards(spec: str | Iterable[str], suffix: str = ".tar", output_dir: str | None = None) -> list[str]:
    """Expand a shard spec into a sorted list of existing shard URLs, without the files
    a run writes in ``output_dir``.

    Raises :class:`InputError` naming the first pattern that matches nothing.
    """
    import braceexpand

    items = [spec] if isinstance(spec, str) else list(spec)
    found: list[str] = []
    for item in items:
        for pattern in braceexpand.braceexpand(item):
            every = _expand_one(pattern, suffix)
            matches = [m for m in every if output_dir is None or not is_output_file(m, output_dir)]
            if not matches:
                if every:
                    raise InputError(
                        f"input.shards: {pattern!r} matches only the outputs in output.dir "
                        f"{output_dir}, which are never read as shards"
                    )
                raise InputError(f"input.shards: no shards found at {pattern!r}")
            found.extend(matches)
    return sorted(dict.fromkeys(found))


def _expand_one(pattern: str, suffix: str) -> list[str]:
    fs, path = get_fs(pattern)
    prefix = _protocol_prefix(pattern)
    if any(c in path for c in _GLOB_CHARS):
        return [prefix + p for p in fs.glob(path) if fs.isfile(p)]
    if fs.isdir(path):
        return [prefix + p for p in fs.glob(posixpath.join(path, f"*{suffix}"))]
    if fs.isfile(path):
        return [pattern if not pattern.startswith("file://") else prefix + path]
    return []


def shard_id(url: str) -> str:
    """A filename-safe, stable id for a shard: its stem plus a short hash of the full URL.

    The hash keeps two shards named ``00000.tar`` in different folders apart.
    """
    stem = posixpath.basename(url.rstrip("/")).split(".")[0] or "shard"
    digest = hashlib.sha1(url.encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def shard_name(url: str) -> str:
    """The shard's file name as recorded in ``source_shard`` and used for derived uids."""
    return posixpath.basename(url.rstrip("/"))


def file_info(url: str) -> dict[str, Any]:
    """Size and modification stamp, used to tell whether a cached shard result is stale."""
    if is_local(url):
        st = os.stat(local_path(url))
        return {"size": int(st.st_size), "mtime": str(st.st_mtime)}
    fs, path = get_fs(url)
    info = fs.info(path)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    return {"size": int(info.get("size") or 0), "mtime": str(mtime) if mtime is not None else None}


def sha256_file(url: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_file(url) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
