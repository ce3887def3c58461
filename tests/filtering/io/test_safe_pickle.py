"""DataComp's .pt files load without running code; anything but array reconstruction is refused.

The legitimate files are written here the way DataComp's scripts write them
(``baselines/image_based_clustering.py:213``: ``torch.save(centroids, path, pickle_protocol=4)``
with ``centroids`` a numpy array; ``apply_filter.py:539`` reads ``torch.load(...)["image_features"]``
from the ImageNet files), at protocols 2 and 4, with numpy 2.x's module names and, rewritten,
numpy 1.x's (``numpy.core.multiarray``), next to pickles that would run a command.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest

from filtering.clustering import load_centroids, load_reference_embeddings
from filtering.io import safe_pickle
from filtering.io.safe_pickle import UnsafePickleError

torch = pytest.importorskip("torch")


def as_numpy1(pkl: bytes) -> bytes:
    """The same pickle as numpy 1.x writes it: ``numpy.core.multiarray`` for ``numpy._core``."""
    if pkl[1] == 2:  # GLOBAL opcodes: newline-terminated text
        out = pkl.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    else:  # protocol 4: length-prefixed names inside one FRAME whose length shrinks with them
        old, new = b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray"
        count = pkl.count(old)
        assert pkl[2] == 0x95 and int.from_bytes(pkl[3:11], "little") == len(pkl) - 11  # a single frame
        body = pkl[11:].replace(old, new)
        out = pkl[:2] + b"\x95" + len(body).to_bytes(8, "little") + body
        assert count
    assert out != pkl and b"numpy._core" not in out
    return out


def torch_file(obj, protocol: int, numpy1: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=protocol)
    if not numpy1:
        return buf.getvalue()
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/data.pkl"):
                data = as_numpy1(data)
                with warnings.catch_warnings():  # numpy 2 still resolves numpy.core: a real pickle
                    warnings.simplefilter("ignore", DeprecationWarning)
                    np.testing.assert_array_equal(pickle.loads(data), pickle.loads(src.read(name)))
            dst.writestr(name, data)
    return out.getvalue()


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


CENTROIDS = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
FEATURES = np.random.default_rng(1).standard_normal((9, 5)).astype(np.float16)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2", "numpy1"])
def test_datacomp_centroids_numpy_array_in_torch_file(tmp_path, protocol, numpy1):
    path = write(tmp_path, "centroids.pt", torch_file(CENTROIDS, protocol, numpy1))
    got = safe_pickle.load(path)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, CENTROIDS)
    np.testing.assert_array_equal(load_centroids(path), CENTROIDS)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_imagenet_embeddings_dict_of_tensors(tmp_path, protocol, dtype):
    feats = torch.from_numpy(FEATURES.astype(np.float32)).to(dtype)
    obj = {
        "image_features": feats,
        "labels": torch.arange(9),
        "view": feats[2:5, 1:],
    }  # a strided view of the same storage
    path = write(tmp_path, "in1k.pt", torch_file(obj, protocol))
    got = safe_pickle.load(path)
    assert sorted(got) == ["image_features", "labels", "view"]
    expected = feats.float().numpy()
    np.testing.assert_array_equal(got["image_features"].astype(np.float32), expected)
    np.testing.assert_array_equal(got["view"].astype(np.float32), expected[2:5, 1:])
    np.testing.assert_array_equal(got["labels"], np.arange(9))
    np.testing.assert_array_equal(load_reference_embeddings(path), expected)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_bare_tensor_and_plain_pickles(tmp_path, protocol):
    path = write(tmp_path, "c.pt", torch_file(torch.from_numpy(CENTROIDS), protocol))
    np.testing.assert_array_equal(load_centroids(path), CENTROIDS)
    path = write(tmp_path, "c64.pt", torch_file(CENTROIDS.astype(np.float64), protocol))  # protocol 5: _frombuffer
    np.testing.assert_array_equal(safe_pickle.load(path), CENTROIDS.astype(np.float64))
    for proto in (2, 4, 5):
        for data in (
            pickle.dumps(CENTROIDS, protocol=proto),
            as_numpy1(pickle.dumps(CENTROIDS, protocol=proto)) if proto in (2, 4) else None,
        ):
            if data is None:
                continue
            np.testing.assert_array_equal(load_centroids(write(tmp_path, f"p{proto}.pt", data)), CENTROIDS)
    path = write(tmp_path, "d.pt", torch_file({"centroids": CENTROIDS, "note": "k-means, 20 iterations"}, protocol))
    np.testing.assert_array_equal(load_centroids(path), CENTROIDS)


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("container", ["plain", "torch"])
def test_code_in_the_file_is_refused_not_run(tmp_path, container):
    marker = tmp_path / "ran"
    payloads = {"system": RunsCommand(marker), "eval": CallsEval(), "nested": {"image_features": [RunsCommand(marker)]}}
    for what, obj in payloads.items():
        data = pickle.dumps(obj, protocol=2) if container == "plain" else torch_file(obj, 4)
        path = write(tmp_path, f"{what}.pt", data)
        with pytest.raises(UnsafePickleError) as e:
            safe_pickle.load(path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(path)
        assert ("posix.system" if what != "eval" else ".eval") in msg  # the refused global, by name
        with pytest.raises(ValueError, match="refused to load"):
            load_centroids(path)
    assert not marker.exists()


def test_object_arrays_and_other_encodings_are_refused(tmp_path):
    path = write(tmp_path, "obj.pt", pickle.dumps(np.array([1, "x"], dtype=object), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"obj\.pt: .*Python objects"):
        safe_pickle.load(path)
    bad = pickle.dumps(b"abc", protocol=2).replace(b"latin1", b"rot_13")
    with pytest.raises(UnsafePickleError, match="rot_13"):
        safe_pickle.load(write(tmp_path, "enc.pt", bad))


def _torch_zip(pkl: bytes, storages: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
    return out.getvalue()


def _tensor_pickle(size: int, stride: int) -> bytes:
    """``_rebuild_tensor_v2(storage '0' of 6 floats, 0, (size,), (stride,), False, None)`` in protocol 0 opcodes."""
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        b"(Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI6\ntQ" + f"I0\n(I{size}\nt(I{stride}\ntI00\nNtR.".encode()
    )


def test_tensors_stay_inside_their_storage(tmp_path):
    raw = np.arange(6, dtype="<f4").tobytes()
    ok = write(tmp_path, "ok.pt", _torch_zip(_tensor_pickle(3, 2), {"0": raw}))
    np.testing.assert_array_equal(safe_pickle.load(ok), [0, 2, 4])
    with pytest.raises(ValueError, match="past its storage"):
        safe_pickle.load(write(tmp_path, "oob.pt", _torch_zip(_tensor_pickle(4, 2), {"0": raw})))
    with pytest.raises(ValueError, match="fewer than 6 elements"):
        safe_pickle.load(write(tmp_path, "short.pt", _torch_zip(_tensor_pickle(3, 2), {"0": raw[:8]})))


def test_unreadable_files_say_why(tmp_path):
    legacy = io.BytesIO()
    torch.save(torch.zeros(2, 2), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy"):
        safe_pickle.load(write(tmp_path, "legacy.pt", legacy.getvalue()))
    with pytest.raises(ValueError, match="neither a torch-saved file nor a pickle"):
        safe_pickle.load(write(tmp_path, "text.pt", b"hello"))
    with pytest.raises(ValueError, match="not a readable pickle"):
        safe_pickle.load(write(tmp_path, "cut.pt", pickle.dumps(CENTROIDS, protocol=4)[:40]))
