"""Arrays out of torch-saved ``.pt`` files and pickles, without running code from the file.

DataComp's assets are pickles: ``baselines/image_based_clustering.py`` writes its centroids
with ``torch.save(centroids, path, pickle_protocol=4)`` (a numpy array inside torch's zip
container) and the ImageNet-1k embeddings ``in1k_clip_vit_l14_{0..4}.pt`` are dicts with
an ``image_features`` tensor. Unpickling calls whatever the file names, so this reader
admits only what rebuilds arrays: numpy's ndarray, dtype and scalar reconstruction (the
module spelled ``numpy.core`` by numpy 1.x or ``numpy._core`` by 2.x), ``_codecs.encode``
with latin-1 (how protocol 2 stores bytes), torch's tensor rebuild (done here in numpy,
from the zip's raw storages, without importing torch), and plain containers (dict, list,
tuple, ``collections.OrderedDict``). Any other global is refused before it is called,
with a one-line :class:`UnsafePickleError` naming the file and the global. Tensors come
back as numpy arrays (bfloat16 widened to float32). Torch's legacy pre-1.6 container is
not read.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import numpy as np

from filtering.io.paths import open_file

_core = getattr(np, "_core", None) or np.core  # numpy 2.x, else 1.x
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGES = {  # torch.<Name>Storage -> element type of its raw bytes
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class UnsafePickleError(ValueError):
    """The file asks for something other than array reconstruction."""


class _Storage:
    """A torch storage's raw elements; ``bf16`` when they are bfloat16 bit patterns."""

    def __init__(self, values: np.ndarray, bf16: bool):
        self.values = values
        self.bf16 = bf16


class _StorageType:
    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype


def _plain_dtype(dt: np.dtype, what: str) -> np.dtype:
    if dt.hasobject:
        raise UnsafePickleError(f"refused {what} with Python objects ({dt})")
    return dt


def _dtype(*args):
    return _plain_dtype(np.dtype(*args), "a dtype")


def _reconstruct(subtype, shape, typecode):
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refused an array of type {getattr(subtype, '__name__', subtype)!r}")
    return _core.multiarray._reconstruct(np.ndarray, shape, typecode)


def _scalar(dtype, *state):
    _plain_dtype(np.dtype(dtype), "a scalar")
    return _core.multiarray.scalar(dtype, *state)


def _frombuffer(buf, dtype, shape, order):
    _plain_dtype(np.dtype(dtype), "a buffer")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _encode(text, encoding="utf-8"):
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode with {encoding!r}")
    return text.encode("latin-1")


def _rebuild_tensor(storage, offset, size, stride, *_rest):
    """torch's ``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])``
    as a numpy copy, every index checked against the storage."""
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("refused a tensor without a storage from the file")
    values = storage.values
    size, stride = tuple(size), tuple(stride)
    ints = (offset, *size, *stride)
    if not all(isinstance(v, int) and v >= 0 for v in ints) or len(size) != len(stride):
        raise ValueError(f"malformed tensor: offset {offset}, size {size}, stride {stride}")
    if 0 in size:
        out = np.zeros(size, values.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= len(values):
            raise ValueError(f"tensor of size {size} reaches past its storage of {len(values)} elements")
        view = np.lib.stride_tricks.as_strided(
            values[offset:], shape=size, strides=[s * values.itemsize for s in stride], writeable=False
        )
        out = np.array(view)
    if storage.bf16:
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_parameter(data, *_rest):
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
for _mod in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_mod}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED[(f"{_mod}.multiarray", "scalar")] = _scalar
    _ALLOWED[(f"{_mod}.numeric", "_frombuffer")] = _frombuffer
for _name, _dt in _STORAGES.items():
    _ALLOWED[("torch", _name)] = _StorageType(_name, _dt)


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str, archive: zipfile.ZipFile | None = None, prefix: str = ""):
        super().__init__(io.BytesIO(data))
        self.path = path
        self.archive = archive
        self.prefix = prefix
        self.byteorder = "<"
        if archive is not None and f"{prefix}byteorder" in archive.namelist():
            self.byteorder = ">" if archive.read(f"{prefix}byteorder").strip() == b"big" else "<"
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"{self.path}: refused to load {module}.{name}: only arrays, tensors and plain containers are read"
            )
        return allowed

    def persistent_load(self, pid):
        ok = isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
        if not ok or self.archive is None:
            raise UnsafePickleError(f"{self.path}: refused a persistent reference {str(pid)[:80]}")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                raw = self.archive.read(name)
            except KeyError as e:
                raise ValueError(f"{self.path}: storage {name} is missing") from e
            dtype = (
                np.dtype(kind.dtype).newbyteorder(self.byteorder)
                if kind.dtype not in ("?", "i1", "u1")
                else np.dtype(kind.dtype)
            )
            if not isinstance(numel, int) or len(raw) < numel * dtype.itemsize:
                raise ValueError(f"{self.path}: storage {name} holds {len(raw)} bytes, fewer than {numel} elements")
            values = np.frombuffer(raw, dtype=dtype, count=numel)
            if not dtype.isnative:
                values = values.astype(dtype.newbyteorder("="))
            self.storages[key] = _Storage(values, bf16=kind.name == "BFloat16Storage")
        return self.storages[key]


def _unpickle(unpickler: _ArrayUnpickler) -> Any:
    try:
        return unpickler.load()
    except UnsafePickleError as e:
        msg = str(e)
        raise UnsafePickleError(msg if msg.startswith(unpickler.path) else f"{unpickler.path}: {msg}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{unpickler.path}: not a readable pickle ({type(e).__name__}: {e})") from e


def load(path: str) -> Any:
    """The object pickled in ``path``: a torch zip container (``torch.save``) or a plain pickle."""
    with open_file(path) as f:
        head = f.read(4)
        f.seek(0)
        if head == b"PK\x03\x04":
            try:
                archive = zipfile.ZipFile(f)  # storages are read from the file one at a time
            except zipfile.BadZipFile as e:
                raise ValueError(f"{path}: not a readable torch file ({e})") from e
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise ValueError(f"{path}: a zip file without torch's <name>/data.pkl")
            prefix = pkl[0][: -len("data.pkl")]
            return _unpickle(_ArrayUnpickler(archive.read(pkl[0]), path, archive, prefix))
        if head[:1] != b"\x80":
            raise ValueError(f"{path}: neither a torch-saved file nor a pickle")
        obj = _unpickle(_ArrayUnpickler(f.read(), path))
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
        raise ValueError(
            f"{path}: torch's legacy (pre-1.6) format is not read; save it again with torch.save, or as .npy"
        )
    return obj
