import hashlib
import os
import re
import subprocess

import pytest

from filtering import provenance
from filtering.io.paths import file_info
from tests.conftest import REPO


def _inputs(paths):
    return [{"path": str(p), **file_info(str(p))} for p in paths]


def test_small_local_inputs_get_full_sha256(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"x" * 1000)
    records, method = provenance.checksum_inputs(_inputs([p]))
    assert method == "sha256"
    assert records[0]["sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()
    assert records[0]["size"] == 1000


def test_large_local_inputs_get_a_head_tail_fingerprint_that_sees_edits(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "FULL_HASH_LIMIT", 0)
    block = provenance.HEAD_TAIL_BYTES
    data = bytearray(b"a" * (3 * block))
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    records, method = provenance.checksum_inputs(_inputs([p]))
    assert method.startswith("sha256_head_tail") and "sha256" not in records[0]
    first = records[0]["sha256_head_tail"]
    expected = hashlib.sha256(len(data).to_bytes(8, "big") + data[:block] + data[-block:]).hexdigest()
    assert first == expected
    data[-1:] = b"b"  # an edit in the tail (a Parquet footer, an npz directory)
    p.write_bytes(data)
    assert provenance.checksum_inputs(_inputs([p]))[0][0]["sha256_head_tail"] != first
    p.write_bytes(data[:-1])  # truncation changes the size
    assert provenance.checksum_inputs(_inputs([p]))[0][0]["sha256_head_tail"] != first


def test_remote_inputs_keep_size_and_mtime():
    records, method = provenance.checksum_inputs([{"path": "s3://bucket/00000.tar", "size": 5, "mtime": "t"}])
    assert method == "size+mtime" and records == [{"path": "s3://bucket/00000.tar", "size": 5, "mtime": "t"}]


def _python310() -> str | None:
    """A working Python 3.10 interpreter (on PATH or under pyenv), if the machine has one."""
    import glob
    import shutil

    candidates = [
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10"))),
        shutil.which("python3.10"),
    ]
    for exe in filter(None, candidates):
        probe = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 10)":
            return exe
    return None


def test_timestamps_work_on_the_oldest_supported_python():
    """``requires-python >= 3.10``: the manifest's timestamp must not use 3.11-only names
    such as ``datetime.UTC``. Runs under a Python 3.10 interpreter when one is installed."""
    exe = _python310()
    if exe is None:
        pytest.skip("no Python 3.10 interpreter on this machine (the static check below still runs)")
    code = "from filtering.provenance import now_iso; s = now_iso(); assert s.endswith('+00:00'), s; print(s)"
    proc = subprocess.run(
        [exe, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    missing = re.search(r"ModuleNotFoundError: No module named '([^'.]+)", proc.stderr)
    if missing and missing.group(1) not in ("filtering", "pipelines"):
        pytest.skip(f"the Python 3.10 interpreter lacks {missing.group(1)} (the static check below still runs)")
    assert proc.returncode == 0, proc.stderr


# Stdlib names added in Python 3.11+ (module, attribute); requires-python is >= 3.10.
PY311_NAMES = {
    ("datetime", "UTC"),
    ("enum", "StrEnum"),
    ("typing", "Self"),
    ("typing", "Never"),
    ("typing", "LiteralString"),
    ("typing", "assert_never"),
    ("typing", "reveal_type"),
    ("typing", "NotRequired"),
    ("typing", "Required"),
    ("hashlib", "file_digest"),
    ("asyncio", "TaskGroup"),
    ("asyncio", "timeout"),
    ("operator", "call"),
}


def test_no_module_uses_stdlib_names_newer_than_python_310():
    import ast

    found = []
    for path in sorted([*REPO.glob("filtering/**/*.py"), *REPO.glob("pipelines/**/*.py")]):
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> stdlib module, from `import datetime as dt`
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname or a.name: a.name for a in node.names})
            elif isinstance(node, ast.ImportFrom) and node.module in {"tomllib", "wsgiref.types"}:
                found.append(f"{path.relative_to(REPO)}: {node.module}")
            elif isinstance(node, ast.ImportFrom):
                found += [
                    f"{path.relative_to(REPO)}: {node.module}.{a.name}"
                    for a in node.names
                    if (node.module, a.name) in PY311_NAMES
                ]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if (aliases.get(node.value.id), node.attr) in PY311_NAMES:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
            elif isinstance(node, ast.Import):
                found += [f"{path.relative_to(REPO)}: import {a.name}" for a in node.names if a.name == "tomllib"]
    assert found == []
