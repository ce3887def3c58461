"""The manifest as the commit record of an output directory.

A run's outputs (``subset/``, ``subset.npy``, ``dropped/``, ``shards/``) are several
files, and no file system renames several files at once. So the manifest decides what
is valid: a run removes ``manifest.json`` before it writes any output, writes every
output (each one atomically), and writes the manifest last, listing every output file
with its size and, except for resharded tars (copies of the input, often hundreds of
GB), its sha256. A run that fails or is killed in between leaves no manifest; the
outputs it left are not a result. Readers (``poolsift report``, ``sweep``) check the
files against the manifest before using them and refuse, in one line, a folder whose
files disagree with it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from typing import Any

from filtering.errors import PoolsiftError
from filtering.io.paths import get_fs, is_local, join, local_path

MANIFEST = "manifest.json"
# The folders whose files a manifest lists; anything else in them is left by another run.
LISTED = {"subset": "part-*.parquet", "dropped": "part-*.parquet", "shards": "*.tar"}
UNHASHED = ("shards/",)


class OutputMismatchError(PoolsiftError):
    """An output directory whose files do not match its manifest (exit 1)."""


def invalidate(out_dir: str) -> None:
    """Remove the manifest (and the report drawn from it): from here until a new one is
    written the folder holds no result."""
    for name in (MANIFEST, "report.html"):
        path = join(out_dir, name)
        if is_local(path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(local_path(path))
            continue
        fs, p = get_fs(path)
        if fs.exists(p):
            fs.rm(p)


def _relative(out_dir: str, url: str) -> str:
    return url[len(out_dir.rstrip("/")) + 1 :] if url.startswith(out_dir.rstrip("/") + "/") else url


def _size(url: str) -> int | None:
    if is_local(url):
        try:
            return os.stat(local_path(url)).st_size
        except FileNotFoundError:
            return None
    fs, p = get_fs(url)
    return int(fs.info(p)["size"]) if fs.exists(p) else None


def _sha256(url: str) -> str:
    h = hashlib.sha256()
    if is_local(url):
        with open(local_path(url), "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()
    fs, p = get_fs(url)
    with fs.open(p, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_records(out_dir: str, paths: list[str]) -> dict[str, dict[str, Any]]:
    """``{path relative to out_dir: {"size", "sha256"}}`` for the files a run wrote."""
    records = {}
    for url in paths:
        rel = _relative(out_dir, url)
        record: dict[str, Any] = {"size": _size(url)}
        if not rel.startswith(UNHASHED):
            record["sha256"] = _sha256(url)
        records[rel] = record
    return dict(sorted(records.items()))


def _listed_now(out_dir: str) -> set[str]:
    found = set()
    for folder, pattern in LISTED.items():
        if is_local(out_dir):
            names = glob.glob(os.path.join(glob.escape(local_path(join(out_dir, folder))), pattern))
            found |= {f"{folder}/{os.path.basename(n)}" for n in names}
        else:
            fs, p = get_fs(join(out_dir, folder))
            found |= {f"{folder}/{n.rsplit('/', 1)[-1]}" for n in fs.glob(f"{p}/{pattern}")}
    return found


def verify(out_dir: str, manifest: dict[str, Any], hashes: tuple[str, ...] = ("subset.npy",)) -> None:
    """Check the files of ``out_dir`` against its manifest: each listed file present with
    its size (and sha256 for the small files in ``hashes``), no unlisted parts or shards.
    Manifests written before files were listed are taken as they are."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return
    rerun = "the folder was changed after its run, or a later run did not finish; rerun poolsift run"
    for rel, record in files.items():
        url = join(out_dir, rel)
        size = _size(url)
        if size is None:
            raise OutputMismatchError(f"{url}: listed in {MANIFEST} but missing; {rerun}")
        if size != record.get("size"):
            raise OutputMismatchError(f"{url}: {size} bytes, {MANIFEST} says {record.get('size')}; {rerun}")
        if rel in hashes and record.get("sha256") and _sha256(url) != record["sha256"]:
            raise OutputMismatchError(f"{url}: content differs from {MANIFEST} (sha256); {rerun}")
    extra = sorted(_listed_now(out_dir) - set(files))
    if extra:
        raise OutputMismatchError(f"{join(out_dir, extra[0])}: not listed in {MANIFEST}; {rerun}")
