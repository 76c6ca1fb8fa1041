"""Read PyTorch ``.pt`` files (zip, legacy and TorchScript archives) into NumPy without torch.

A pickle can name any importable callable, so loading one with :mod:`pickle` can run arbitrary
code. This module unpickles with an allow-list: tensor and storage rebuilders (which it
implements itself, on NumPy arrays), ``collections.OrderedDict``, a few TorchScript list
builders, NumPy scalars of numeric dtypes, and, inside TorchScript archives only, inert records
for the scripted module classes (``__torch__.*``). Every other global is refused with a
:class:`~cte_jax.errors.CTEError` that names it, before anything is called.

Public API:
  load(path) -> object: the unpickled object, tensors as ``np.ndarray``.
  load_state_dict(path) -> dict[str, np.ndarray]: a flat state dict, unwrapped from
    ``model_state_dict`` / ``state_dict`` / ``model`` checkpoint keys when needed.
  load_torchscript(path) -> ScriptObject: the module tree of a TorchScript archive, inert.
  load_torchscript_parameters(path) -> dict[str, np.ndarray]: the named parameters and
    buffers of a scripted or traced module, named as its ``state_dict()`` would name them.

Reference: PyTorch's serialisation (``torch/serialization.py``, ``torch/_utils.py``).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cte_jax.errors import CTEError

# Storage classes as PyTorch pickles them -> NumPy dtype. bfloat16 is widened to float32 (NumPy
# has no bfloat16); its bits are the top half of a float32, so the widening is exact.
_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
_ITEMSIZE = {"bfloat16": 2}

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_ALLOWED_NUMPY_KINDS = "biufc?"


class StorageType:
    """A storage class named by the pickle (``torch.FloatStorage`` ...): only its dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE.get(self.dtype, None) or np.dtype(self.dtype).itemsize

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class ScriptObject:
    """An inert record of a TorchScript object (``__torch__.<qualname>``): class name + attributes.

    Unpickling one only stores the pickled state; no method of the original class exists here.
    """

    qualname = "__torch__"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["__state__"] = state

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


_SCRIPT_CLASSES: dict[str, type] = {}


def _script_class(qualname: str) -> type:
    cls = _SCRIPT_CLASSES.get(qualname)
    if cls is None:
        cls = type("ScriptObject", (ScriptObject,), {"qualname": qualname})
        _SCRIPT_CLASSES[qualname] = cls
    return cls


class _Pending:
    """A tensor whose storage bytes come after the pickle (legacy format)."""

    def __init__(self, storage: "_LegacyStorage", offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _LegacyStorage:
    def __init__(self, stype: StorageType, numel: int):
        self.stype, self.numel = stype, numel
        self.array: np.ndarray | None = None


def _as_array(raw: bytes, stype: StorageType, numel: int, big_endian: bool, where: str) -> np.ndarray:
    need = numel * stype.itemsize
    if len(raw) < need:
        raise CTEError(f"truncated tensor data in {where}: {len(raw)} bytes, expected {need}")
    raw = raw[:need]
    if stype.dtype == "bfloat16":
        u16 = np.frombuffer(raw, dtype=">u2" if big_endian else "<u2").astype(np.uint32)
        return (u16 << 16).view(np.float32)
    dt = np.dtype(stype.dtype)
    if dt.itemsize > 1:
        dt = dt.newbyteorder(">" if big_endian else "<")
    return np.frombuffer(raw, dtype=dt).astype(np.dtype(stype.dtype).newbyteorder("="))


def _view(flat: np.ndarray, offset: int, size: tuple, stride: tuple, where: str) -> np.ndarray:
    """A copy of ``flat[offset + sum(i_k * stride_k)]`` over the index grid of ``size``."""
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise CTEError(f"bad tensor geometry in {where}: size {size}, stride {stride}, offset {offset}")
    if any(s == 0 for s in size):
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        # as_strided would read past the buffer: refuse rather than leak memory.
        raise CTEError(f"tensor in {where} reaches element {last} of a storage of {flat.size}")
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                           strides=tuple(s * flat.itemsize for s in stride), writeable=False)
    return np.array(view, copy=True)


# -- rebuilders: called by the unpickler through the allow-list ---------------------------------
def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if isinstance(storage, _LegacyStorage):
        return _Pending(storage, int(storage_offset), tuple(size), tuple(stride))
    if not isinstance(storage, np.ndarray):
        raise CTEError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    return _view(storage, int(storage_offset), size, stride, "the pickle")


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_parameter, _rebuild_tensor):
        raise CTEError("tensor subclass rebuilt with a function that is not a tensor rebuilder")
    return func(*args)


def _build_list(*args):
    return list(args[0]) if len(args) == 1 else list(args)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in _ALLOWED_NUMPY_KINDS or not isinstance(data, bytes):
        raise CTEError(f"refusing a NumPy scalar of dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_dtype(name, align=False, copy=False):
    dt = np.dtype(name)
    if dt.kind not in _ALLOWED_NUMPY_KINDS:
        raise CTEError(f"refusing NumPy dtype {name!r}")
    return dt


class _Marker:
    """A class the pickle may name but that is never called (e.g. ``torch.Tensor`` as a type tag)."""

    def __init__(self, name: str):
        self.name = name


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Marker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.Parameter"),
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
    ("torch.jit._pickle", "build_genericlist"): _build_list,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, type_str: value,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}
for _name in _STORAGE_DTYPES:
    _ALLOWED[("torch", _name)] = StorageType(_name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, where: str, load_storage: Callable[[tuple], Any], script: bool):
        super().__init__(file)
        self._where = where
        self._load_storage = load_storage
        self._script = script

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if self._script and (module == "__torch__" or module.startswith("__torch__.")):
            return _script_class(f"{module}.{name}")
        hint = ""
        if name[:1].isupper():
            hint = " (the file pickles a whole Python object, e.g. a model; save its state_dict() instead)"
        raise CTEError(f"refusing to unpickle global {module}.{name}: only tensors and plain containers are allowed{hint}",
                       self._where)

    def persistent_load(self, pid: Any) -> Any:
        return self._load_storage(pid)


def _storage_pid(pid: Any, where: str) -> tuple[StorageType, str, int]:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
        raise CTEError(f"unexpected persistent id {str(pid)[:80]} (not a tensor storage)", where)
    return pid[1], str(pid[2]), int(pid[4])


# -- zip archives (torch.save since 1.6, TorchScript) -------------------------------------------
def _zip_prefix(zf: zipfile.ZipFile, path: Path, pickle_name: str) -> str:
    names = zf.namelist()
    hits = [n for n in names if n.endswith("/" + pickle_name) and n.count("/") == 1]
    if not hits:
        raise CTEError(f"zip archive without {pickle_name}: not a PyTorch file", path)
    return hits[0][: -len(pickle_name)]


def _load_zip(path: Path, zf: zipfile.ZipFile, *, script: bool, pickle_name: str = "data.pkl") -> Any:
    where = os.fspath(path)
    prefix = _zip_prefix(zf, path, pickle_name)
    names = set(zf.namelist())
    big = False
    if prefix + "byteorder" in names:
        big = zf.read(prefix + "byteorder").decode(errors="replace").strip() == "big"
    cache: dict[str, np.ndarray] = {}

    def load_storage(pid):
        stype, key, numel = _storage_pid(pid, where)
        if key not in cache:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise CTEError(f"tensor data {member} missing from the archive", path)
            cache[key] = _as_array(zf.read(member), stype, numel, big, member)
        arr = cache[key]
        if np.dtype(arr.dtype) != np.dtype(np.float32 if stype.dtype == "bfloat16" else stype.dtype):
            raise CTEError(f"storage {key} used with two dtypes", path)
        return arr

    data = zf.read(prefix + pickle_name)
    return _RestrictedUnpickler(io.BytesIO(data), where=where, load_storage=load_storage, script=script).load()


# -- legacy format (torch.save before 1.6 or with _use_new_zipfile_serialization=False) ---------
def _load_legacy(path: Path, f) -> Any:
    where = os.fspath(path)

    def plain(fh):
        return _RestrictedUnpickler(fh, where=where, load_storage=lambda pid: _refuse_pid(pid, where), script=False).load()

    magic = plain(f)
    if magic != LEGACY_MAGIC:
        raise CTEError("not a PyTorch file (neither a zip archive nor the legacy format)", path)
    protocol = plain(f)
    if protocol != LEGACY_PROTOCOL:
        raise CTEError(f"unsupported legacy PyTorch protocol {protocol}", path)
    sys_info = plain(f)
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    storages: dict[str, _LegacyStorage] = {}

    def load_storage(pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CTEError(f"unexpected persistent id {str(pid)[:80]} (not a tensor storage)", where)
        stype, key, numel = _storage_pid(pid[:5], where)
        root = storages.setdefault(key, _LegacyStorage(stype, numel))
        view = pid[5] if len(pid) > 5 else None
        if view is not None:
            raise CTEError("legacy storage views are not supported; re-save the file with a recent PyTorch", path)
        return root

    result = _RestrictedUnpickler(f, where=where, load_storage=load_storage, script=False).load()
    keys = plain(f)
    if not isinstance(keys, list):
        raise CTEError("damaged legacy PyTorch file (no storage key list)", path)
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise CTEError(f"damaged legacy PyTorch file (unknown storage {key})", path)
        head = f.read(8)
        if len(head) < 8:
            raise CTEError("truncated file (tensor data ends early)", path)
        (numel,) = struct.unpack("<q" if little else ">q", head)
        raw = f.read(numel * st.stype.itemsize)
        st.array = _as_array(raw, st.stype, numel, not little, f"{where} storage {key}")
    return _resolve(result, where)


def _refuse_pid(pid, where):
    raise CTEError(f"unexpected persistent id {str(pid)[:80]}", where)


def _resolve(obj: Any, where: str) -> Any:
    if isinstance(obj, _Pending):
        if obj.storage.array is None:
            raise CTEError("damaged legacy PyTorch file (a tensor's storage was never written)", where)
        return _view(obj.storage.array, obj.offset, obj.size, obj.stride, where)
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _resolve(obj[k], where)
        return obj
    if isinstance(obj, list):
        return [_resolve(v, where) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v, where) for v in obj)
    return obj


# -- public API ---------------------------------------------------------------------------------
def load(path: str | os.PathLike) -> Any:
    """Unpickle a ``torch.save`` file (zip or legacy) with tensors as NumPy arrays.

    Raises:
      CTEError: the file is missing, truncated or damaged, or its pickle names a global outside
        the allow-list (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise CTEError("file not found", path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                if any(n.endswith("/constants.pkl") for n in zf.namelist()):
                    raise CTEError("this is a TorchScript archive (torch.jit.save), which is code, not a state dict: "
                                   "save the model's state_dict() with torch.save, or export it to ONNX and use "
                                   "--format onnx", path)
                return _load_zip(path, zf, script=False)
        with open(path, "rb") as f:
            return _load_legacy(path, f)
    except CTEError as e:
        if e.path is None:
            raise CTEError(e.problem, path) from None
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, ValueError,
            struct.error, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError, MemoryError,
            OSError) as e:
        hint = " (an ONNX file? use --format onnx)" if path.suffix.lower() == ".onnx" else " (truncated or damaged?)"
        raise CTEError(f"unreadable PyTorch file{hint}: {type(e).__name__}: {e}", path) from None


_WRAPPERS = ("model_state_dict", "state_dict", "model", "net", "network")


def unwrap_state_dict(obj: Any, path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The flat ``name -> array`` dict of a checkpoint: the object itself or one of its
    ``model_state_dict`` / ``state_dict`` / ``model`` entries; ``module.`` prefixes (from
    ``DataParallel``) are removed."""
    if isinstance(obj, dict) and not _is_flat(obj):
        for key in _WRAPPERS:
            if key in obj and isinstance(obj[key], dict) and _is_flat(obj[key]):
                obj = obj[key]
                break
    if not (isinstance(obj, dict) and obj and _is_flat(obj)):
        keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CTEError(f"no state dict found (a dict of tensors, or one under {list(_WRAPPERS[:3])}); top level: {keys}",
                       path)
    out = {}
    for k, v in obj.items():
        name = str(k)
        while name.startswith("module."):
            name = name[len("module."):]
        if name in out:
            raise CTEError(f"duplicate weight name {name!r} after removing 'module.'", path)
        out[name] = v
    return out


def _is_flat(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) for k in d) and all(isinstance(v, np.ndarray) for v in d.values())


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """:func:`load` then :func:`unwrap_state_dict`."""
    return unwrap_state_dict(load(path), path)


def load_torchscript(path: str | os.PathLike) -> ScriptObject:
    """The module tree of a TorchScript archive (``torch.jit.save``) as inert :class:`ScriptObject`
    records (attributes, submodules, tensors as arrays). No TorchScript code is read or run."""
    path = Path(path)
    if not path.is_file():
        raise CTEError("file not found", path)
    try:
        if not zipfile.is_zipfile(path):
            raise CTEError("not a TorchScript archive (not a zip file)", path)
        with zipfile.ZipFile(path) as zf:
            root = _load_zip(path, zf, script=True)
    except CTEError as e:
        if e.path is None:
            raise CTEError(e.problem, path) from None
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, struct.error, KeyError,
            IndexError, TypeError, AttributeError, UnicodeDecodeError, MemoryError, OSError) as e:
        raise CTEError(f"unreadable TorchScript archive (truncated or damaged?): {type(e).__name__}: {e}", path) from None
    if not isinstance(root, ScriptObject):
        raise CTEError("TorchScript archive whose root is not a module", path)
    return root


def script_parameters(root: ScriptObject) -> dict[str, np.ndarray]:
    """Tensor attributes of every submodule of ``root``, named as ``state_dict()`` names them."""
    out: dict[str, np.ndarray] = {}
    _collect(root, "", out, set())
    return out


def load_torchscript_parameters(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Named tensors of a TorchScript archive, as its ``state_dict()`` names them."""
    out = script_parameters(load_torchscript(path))
    if not out:
        raise CTEError("TorchScript module without parameters", path)
    return out


def _collect(obj: ScriptObject, prefix: str, out: dict, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in obj.__dict__.items():
        if name.startswith("_"):
            continue
        if isinstance(value, np.ndarray):
            out[prefix + name] = value
        elif isinstance(value, ScriptObject):
            _collect(value, f"{prefix}{name}.", out, seen)
