"""The commit of an output directory: a new result replaces the last good one whole, or not at all.

A result is the files a run writes into ``DIR`` (``RESULT``: ``manifest.json``,
``subset/``, ``subset.npy``, ``dropped/``, ``shards/``, ``subset_match/``, ``report.html``); the cache and
the lock are not part of it. A run writes its new result into a folder of its own,
``DIR/.poolsift-next/`` (:class:`Staged`), laid out as the result will be, the manifest
included (listing every file with its size and, except for resharded tars, copies of the
input that may be hundreds of GB, its sha256). Nothing in ``DIR`` changes meanwhile, so a
run that fails at any point (a full disk, a bad row, Ctrl-C, SIGKILL) leaves the
previous result as it was.

Once every file of the new result is written and flushed to disk, :meth:`Staged.switch`
writes a small journal (``DIR/.poolsift-commit.json``: the entries of the old result and
of the new), flushed too, then renames the old entries into ``DIR/.poolsift-prev/``
(the manifest first) and the new ones into ``DIR`` (the manifest last), and removes the
journal and the old result. The journal is the commit point: a run killed before it is
written leaves the old result (its staging folder is removed at the next start); one
killed after is rolled forward by :func:`recover` at the next start, which replays the
renames not yet done. Old entries the new result lacks (fewer parts, no ``shards/``)
leave with the old result, so the manifest always matches the files beside it. Readers
(``poolsift report``, ``sweep``) check the files against it and refuse, in one line, a
folder whose files disagree.

The old and the new result are on disk together until the switch: a rerun needs room
for both. Remote outputs (fsspec URLs) have no rename of folders nor lock: there the
manifest is removed first and written last, as the commit record, and a failed run
leaves no result.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

from filtering.errors import PoolsiftError
from filtering.io.atomic import atomic_write_text
from filtering.io.paths import get_fs, is_local, join, local_path
from filtering.tasks import thread_pool

MANIFEST = "manifest.json"
# The entries of a result: moved out manifest first, moved in manifest last.
RESULT = (MANIFEST, "report.html", "subset.npy", "subset", "dropped", "shards", "subset_match", "index")
NEXT = ".poolsift-next"  # the new result while it is written
PREV = ".poolsift-prev"  # the old result while it is switched out
JOURNAL = ".poolsift-commit.json"  # present from the commit point until the switch is done
# What the staged result sees of the run's folder, for the report drawn from it.
SHARED = ("cache", "sweep.json")
# The folders whose files a manifest lists; anything else in them is left by another run.
LISTED = {
    "subset": "part-*.parquet",
    "dropped": "part-*.parquet",
    "shards": "*.tar",
    "subset_match": "*.parquet",
    "index": "part-*.arrow",
}
UNHASHED = ("shards/",)


class OutputMismatchError(PoolsiftError):
    """An output directory whose files do not match its manifest (exit 1)."""


def fsync_files(paths: list[str], threads: int = 16) -> None:
    """Flush local files to disk, many at once: the waits are the disk's, not the CPU's."""

    def one(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    with thread_pool(min(threads, len(paths))) as pool:
        list(pool.map(one, paths))


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


def place(moves: list[tuple[str, str]]) -> None:
    """Files written elsewhere (a plan's spill folder) moved to their names in a staged
    result: renamed on a local disk; on a remote file system uploaded (a local file) or
    moved (a remote one: copied on the server, many at once, then removed)."""
    remote: list[tuple[str, str]] = []
    for src, dst in moves:
        if is_local(dst):
            os.makedirs(os.path.dirname(local_path(dst)), exist_ok=True)
            os.replace(local_path(src), local_path(dst))
        elif is_local(src):
            fs, p = get_fs(dst)
            fs.put_file(local_path(src), p)
            os.remove(local_path(src))
        else:
            remote.append((src, dst))
    if remote:
        fs, _ = get_fs(remote[0][1])
        pairs = [(get_fs(s)[1], get_fs(d)[1]) for s, d in remote]
        if getattr(fs, "local_file", False):  # folders behind a URL (local://): renamed one by one
            for s, d in pairs:
                fs.mv(s, d)
        else:
            fs.mv([s for s, _ in pairs], [d for _, d in pairs])


def remove_unlisted(out_dir: str, files: dict[str, Any]) -> None:
    """The parts and shards in a remote output folder that ``files`` (the new manifest's)
    does not list: an earlier run's, which the new manifest must not stand beside. A
    local result needs none of this: it is staged in a folder of its own."""
    fs, _ = get_fs(out_dir)
    stale = sorted(_listed_now(out_dir) - set(files))
    if stale:
        fs.rm([get_fs(join(out_dir, rel))[1] for rel in stale])


class Staged:
    """Where a run writes its new result: ``url(...)`` under ``DIR/.poolsift-next/`` (the
    output folder itself for a remote one), ``final(url)`` the path it will have in
    ``DIR``. :func:`staged_result` makes one; the run calls :meth:`switch` when its
    manifest (and report) are written."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.local = is_local(out_dir)
        self.dir = join(out_dir, NEXT) if self.local else out_dir
        self.root = local_path(out_dir)
        self.had_result = self.local and os.path.exists(os.path.join(self.root, MANIFEST))

    def url(self, *parts: str) -> str:
        return join(self.dir, *parts)

    def final(self, url: str) -> str:
        """``url`` under the staged folder as it will be named in ``DIR`` after the switch."""
        prefix = self.dir.rstrip("/") + "/"
        return join(self.out_dir, url[len(prefix) :]) if url.startswith(prefix) else url

    def begin(self) -> None:
        if not self.local:
            invalidate(self.out_dir)  # no switch there: the manifest marks a complete result
            return
        staged = os.path.join(self.root, NEXT)
        shutil.rmtree(staged, ignore_errors=True)
        os.makedirs(staged)
        for name in SHARED:  # the report drawn from the staged result reads the run's cache
            os.symlink(os.path.join("..", name), os.path.join(staged, name))

    def switch(self) -> None:
        """Flush the new result, write the journal (the commit point), then rename."""
        if not self.local:
            return
        staged, prev = os.path.join(self.root, NEXT), os.path.join(self.root, PREV)
        new = [n for n in RESULT if os.path.lexists(os.path.join(staged, n))]
        if MANIFEST not in new:
            raise PoolsiftError(
                f"{self.out_dir}: the new result has no {MANIFEST} (a bug in poolsift; please report it)"
            )
        files, folders = [], [staged]
        for name in new:
            path = os.path.join(staged, name)
            if os.path.isdir(path):
                for d, _, names in os.walk(path):
                    folders.append(d)
                    files += [os.path.join(d, f) for f in names]
            else:
                files.append(path)
        fsync_files(files + folders)
        shutil.rmtree(prev, ignore_errors=True)
        os.makedirs(prev)
        _fsync_dir(self.root)
        old = [n for n in RESULT if os.path.lexists(os.path.join(self.root, n))]
        atomic_write_text(os.path.join(self.root, JOURNAL), json.dumps({"old": old, "new": new}) + "\n")
        _fsync_dir(self.root)
        _apply(self.root, old, new)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move(src: str, dst: str) -> None:
    os.rename(src, dst)


def _apply(root: str, old: list[str], new: list[str]) -> None:
    """The renames of a switch, each done only if it is not yet (so a killed switch is
    replayed from its journal): old entries out, manifest first, then the new ones in,
    manifest last; then the journal and the old result removed."""
    staged, prev = os.path.join(root, NEXT), os.path.join(root, PREV)
    os.makedirs(prev, exist_ok=True)
    for name in old:  # every old entry leaves before any new one arrives
        if os.path.lexists(os.path.join(root, name)) and not os.path.lexists(os.path.join(prev, name)):
            _move(os.path.join(root, name), os.path.join(prev, name))
    for name in sorted(new, key=lambda n: n == MANIFEST):
        if os.path.lexists(os.path.join(staged, name)):
            _move(os.path.join(staged, name), os.path.join(root, name))
    for d in (root, prev, staged):
        if os.path.isdir(d):
            _fsync_dir(d)
    os.remove(os.path.join(root, JOURNAL))
    _fsync_dir(root)
    shutil.rmtree(prev, ignore_errors=True)
    shutil.rmtree(staged, ignore_errors=True)


def recover(out_dir: str) -> str | None:
    """At a run's start (under the output lock): finish a switch that a killed run began
    (its journal is there), or remove the staged result a killed run left before its
    commit point. Returns one line saying what was done, or None."""
    if not is_local(out_dir):
        return None
    root = local_path(out_dir)
    journal = os.path.join(root, JOURNAL)
    if os.path.exists(journal):
        try:
            with open(journal, encoding="utf-8") as f:
                record = json.load(f)
            old, new = list(record["old"]), list(record["new"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OutputMismatchError(
                f"{journal}: unreadable commit journal ({e}); move it away and check {out_dir} by hand"
            ) from e
        if not all(n in RESULT for n in old + new):
            raise OutputMismatchError(f"{journal}: names entries that are not outputs; move it away")
        _apply(root, old, new)
        return f"finished switching {out_dir} to the result a killed run had committed"
    left = [d for d in (NEXT, PREV) if os.path.lexists(os.path.join(root, d))]
    for d in left:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return f"removed the unfinished outputs a killed run left in {out_dir}" if NEXT in left else None


@contextlib.contextmanager
def staged_result(out_dir: str, log: Callable[[str], None]) -> Iterator[Staged]:
    """A new result written beside the old one (:class:`Staged`); the caller switches it
    into place. On any failure before the switch the staged files are removed and, when
    ``DIR`` holds a result, one line says it is kept."""
    stage = Staged(out_dir)
    try:
        stage.begin()
        yield stage
    except BaseException:
        if stage.local and os.path.exists(os.path.join(stage.root, JOURNAL)):  # past the commit point
            try:
                recover(out_dir)
            except Exception:  # noqa: BLE001 — the original error is what matters; the next start retries
                log(f"the switch to the new result in {out_dir} did not finish; the next run finishes it")
            raise
        if stage.local:
            shutil.rmtree(os.path.join(stage.root, NEXT), ignore_errors=True)
        if stage.had_result:
            log(f"the previous result in {out_dir} is kept as it was")
        raise
