"""Model files fetched on first use, the way DataComp's ``baselines/utils.py`` ``download``
fetches fastText's ``lid.176.bin`` into ``~/.cache/fasttext``: streamed with a progress
bar and checked against a known sha256. Here the bytes go to a temporary file beside the
target, which is renamed into place only once its checksum matches, so an interrupted or
refused download never leaves a file where a model is looked for.

The cache folder is ``$POOLSIFT_CACHE``, else ``$XDG_CACHE_HOME/poolsift``, else
``~/.cache/poolsift``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

from filtering.errors import InputError

TIMEOUT_S = 30  # per socket operation: connecting, and each read


class DownloadError(InputError):
    """The file could not be fetched (no network, refused, HTTP error); nothing was written."""


class ChecksumError(InputError):
    """The fetched bytes are not the file asked for; nothing was kept."""


def user_cache_dir() -> Path:
    """``$POOLSIFT_CACHE``, else ``$XDG_CACHE_HOME/poolsift``, else ``~/.cache/poolsift``."""
    if os.environ.get("POOLSIFT_CACHE"):
        return Path(os.path.expanduser(os.environ["POOLSIFT_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "poolsift"


def fetch(url: str, dest: str | os.PathLike, sha256: str, what: str, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` unless ``dest`` exists; the file is kept only when its
    sha256 is ``sha256``. ``what`` starts each one-line error (the config key)."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    if dest.is_file():
        return dest
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DownloadError(f"{what}: cannot write to {dest.parent} ({e.strerror or e})") from e
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=TIMEOUT_S) as src:
                    total = int(src.headers.get("Content-Length") or 0) or None
                    with tqdm(
                        total=total,
                        desc=f"downloading {dest.name}",
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        file=sys.stderr,
                        disable=not progress,
                        dynamic_ncols=True,
                    ) as bar:
                        while block := src.read(1 << 20):
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
            except (urllib.error.URLError, HTTPException, OSError, ValueError) as e:
                raise DownloadError(
                    f"{what}: cannot download {url} ({_reason(e)}); download it yourself and put it at {dest}"
                ) from e
        got = digest.hexdigest()
        if got != sha256:
            raise ChecksumError(
                f"{what}: refused {url}: its sha256 is {got}, expected {sha256}; nothing was kept at {dest}"
            )
        os.replace(tmp, dest)
        return dest
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        for folder in made:  # folders this call created, deepest first, if left empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _reason(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        reason = e.reason
        return getattr(reason, "strerror", None) or str(reason)
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
