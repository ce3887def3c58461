"""Issue 23, finding 1: pool bytes reach only the decoders poolsift allows, never Ghostscript.

PIL hands EPS and PostScript to Ghostscript (``gs``), an external program with a record of
remote-code-execution bugs. A fake ``gs`` first on ``PATH`` records that it ran; EPS, PS,
PDF and other formats outside the allow-list (``input.image_formats``) go in as ``.jpg``,
``.png`` and ``.webp`` members of the pool, as reference images of ``image_clusters`` and
``decontaminate``, and through the report's thumbnails. The fake never runs, each such
row fails with ``unsupported_format: <FORMAT>``, and the other rows are kept.
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import EpsImagePlugin, Image

from filtering.report.thumbs import thumbnail_uri
from filtering.stages.image_decode import decode_image, reference_plan
from tests.conftest import REPO, SAMPLE, run_cli
from tests.reliability.hostile import accounted, bundled_members, failures, present, tar_bytes

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
PS = b"%!PS-Adobe-3.0\n%%Pages: 1\n/Helvetica findfont 6 scalefont setfont 0 0 moveto (hi) show\nshowpage\n"
# A one-page PDF, hand-written: PIL can only write PDFs, never read them.
PDF = (
    b"%PDF-1.4\n1 0 obj <</Type /Catalog /Pages 2 0 R>> endobj\n"
    b"2 0 obj <</Type /Pages /Kids [3 0 R] /Count 1>> endobj\n"
    b"3 0 obj <</Type /Page /Parent 2 0 R /MediaBox [0 0 8 8]>> endobj\n"
    b"trailer <</Root 1 0 R>>\n%%EOF\n"
)
# DOS EPS: a binary header (C5 D0 D3 C6) before the PostScript.
DOS_EPS = bytes.fromhex("c5d0d3c6") + (32).to_bytes(4, "little") + len(EPS).to_bytes(4, "little") + bytes(20) + EPS


def _pil_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def hostile_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the reason its row fails with)."""
    return {
        "eps": (EPS, "unsupported_format: EPS"),
        "ps": (PS, "unsupported_format: EPS"),  # PIL's EPS plugin reads PostScript too
        "dos_eps": (DOS_EPS, "unsupported_format: EPS"),
        "pdf": (PDF, "unsupported_format: PDF"),
        "gif": (_pil_bytes("GIF"), "unsupported_format: GIF"),
        "tiff": (_pil_bytes("TIFF"), "unsupported_format: TIFF"),
        "ico": (_pil_bytes("ICO"), "unsupported_format: ICO"),
    }


EXTS = ("jpg", "png", "webp")


@pytest.fixture
def fake_gs(tmp_path, monkeypatch) -> Path:
    """A ``gs`` first on PATH that records each run in the returned file (absent: never ran).
    PIL looks ``gs`` up once per process: forget any earlier answer."""
    marker = tmp_path / "gs-ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 1\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


def test_the_fake_gs_is_what_pil_would_run(fake_gs):
    # The trap works: PIL's own Image.open, with every plugin, starts it for EPS bytes.
    with pytest.raises(Exception):  # noqa: B017 — the fake fails; what matters is that it ran
        Image.open(io.BytesIO(EPS)).load()
    assert fake_gs.exists()


def test_decoding_and_thumbnails_refuse_formats_off_the_list(fake_gs):
    plan = reference_plan(lambda img: img.convert("RGB"))
    for name, (data, reason) in hostile_images().items():
        assert decode_image(data, plan.required, plan).error == reason, name
        assert thumbnail_uri(data) is None, name
    assert not fake_gs.exists()
    good = _pil_bytes("PNG")
    assert decode_image(good, plan.required, plan).error is None
    assert thumbnail_uri(good).startswith("data:image/jpeg;base64,")
    gif_allowed = reference_plan(lambda img: img.convert("RGB"), formats=("GIF", "PNG"))
    assert decode_image(_pil_bytes("GIF"), gif_allowed.required, gif_allowed).error is None
    assert decode_image(_pil_bytes("JPEG"), gif_allowed.required, gif_allowed).error == "unsupported_format: JPEG"
    # Bytes no decoder recognises keep the reason they had before the allow-list.
    assert decode_image(b"not an image", plan.required, plan).error == "corrupt_image: cannot identify image file"


def test_every_image_open_names_its_formats():
    """No ``Image.open`` in the library or the CLI may try every PIL plugin (EPS among them)."""
    unrestricted = []
    for path in [*(REPO / "filtering").rglob("*.py"), *(REPO / "pipelines").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "open"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "Image"
                and not any(k.arg == "formats" for k in node.keywords)
            ):
                unrestricted.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert unrestricted == []


def _hostile_pool(tmp_path: Path) -> tuple[Path, dict[str, str], set[str]]:
    """A shard of bundled samples with the hostile images put in place of some samples'
    image member, under each image extension in turn; (shard, key -> reason, good keys)."""
    hostile = list(hostile_images().values())
    members = bundled_members(len(hostile) + 5)
    keys = list(dict.fromkeys(n.split(".", 1)[0] for n, _ in members))
    bad = {keys[i]: (hostile[i], EXTS[i % len(EXTS)]) for i in range(len(hostile))}
    out = []
    for name, data in members:
        key, ext = name.split(".", 1)
        if key in bad and ext == "jpg":
            (payload, _), new_ext = bad[key]
            out.append((f"{key}.{new_ext}", payload))
        else:
            out.append((name, data))
    shard = tmp_path / "pool" / "00000.tar"
    shard.parent.mkdir()
    shard.write_bytes(tar_bytes(out))
    return shard, {k: r for k, ((_, r), _) in bad.items()}, set(keys) - set(bad)


def _reference_folder(tmp_path: Path) -> tuple[Path, int, int]:
    """Bundled reference images and the hostile ones as .jpg/.png/.webp files; (folder, good, bad)."""
    folder = tmp_path / "reference"
    folder.mkdir()
    good = sorted((SAMPLE / "reference").rglob("*.jpg"))[:8]
    for i, p in enumerate(good):
        shutil.copy(p, folder / f"good{i}.jpg")
    for i, (name, (data, _)) in enumerate(hostile_images().items()):
        (folder / f"{name}.{EXTS[i % len(EXTS)]}").write_bytes(data)
    return folder, len(good), len(hostile_images())


def _reference_shard(tmp_path: Path) -> tuple[Path, int]:
    """A reference shard: bundled samples, then the hostile images as samples of their own."""
    members = bundled_members(4, skip=20)
    for i, (name, (data, _)) in enumerate(hostile_images().items()):
        members += [(f"bad{name}.{EXTS[i % len(EXTS)]}", data), (f"bad{name}.txt", b"x")]
    shard = tmp_path / "eval" / "00000.tar"
    shard.parent.mkdir()
    shard.write_bytes(tar_bytes(members))
    return shard, 4


@pytest.mark.slow  # runs the CLI
def test_pool_reference_sets_and_report_never_start_gs(tmp_path, fake_gs):
    shard, reasons, good_keys = _hostile_pool(tmp_path)
    folder, n_good_ref, _ = _reference_folder(tmp_path)
    eval_shard, n_good_eval = _reference_shard(tmp_path)
    out = tmp_path / "out"
    cfg = yaml.safe_load((REPO / "configs" / "sample.yaml").read_text())
    cfg["input"]["shards"] = [str(shard)]
    cfg["model"]["pretrained"] = os.path.normpath(REPO / "configs" / cfg["model"]["pretrained"])
    cfg["model"]["num_workers"] = 0
    cfg["clusters"] = {"num_clusters": 2, "reference": str(folder), "niter": 5}
    cfg["filters"] = [
        {"decontaminate": {"reference": str(eval_shard), "method": "perceptual", "max_distance": 0}},
        {"image_clusters": {}},
    ]
    cfg["output"] = {"dir": str(out), "report": True}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))

    code, _, err = run_cli("run", path, "--quiet")
    assert code == 0, err
    assert not fake_gs.exists(), fake_gs.read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert accounted(manifest)
    assert failures(out) == reasons
    assert {k for _, k in present(out)} == good_keys
    clusters = manifest["stages"]["clusters"]
    assert clusters["reference_count"] == n_good_ref
    assert clusters["reference_failed"] == len(hostile_images())
    assert "could not be decoded and were skipped (first: " in err and "unsupported_format: " in err
    [decontam] = manifest["stages"]["decontaminate"].values()
    assert decontam["reference_items"] == n_good_eval
    html = (out / "report.html").read_text()
    assert "unsupported_format: EPS" in html and "unsupported_format: PDF" in html

    code, _, err = run_cli("report", out)  # the report again, on its own
    assert code == 0, err
    assert not fake_gs.exists()
