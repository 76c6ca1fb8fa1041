"""Reading target images lazily: folders of PNG/TIFF/JPEG, single files, TIFF stacks, zarr and N5 arrays."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from cte_jax.errors import CTEError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_JPEG_SUFFIXES = (".jpg", ".jpeg")
GREY_MODES = ("luminance", "mean", "first")
SPLITS_FILE = "split.json"

# ITU-R 601-2 luma weights, the ones PIL uses for its "L" conversion.
LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)

_TIFF_SUFFIXES = (".tif", ".tiff")
_MAX_TIFF_HANDLES = 4


# --------------------------------------------------------------------------------------------
# helpers shared by every source
# --------------------------------------------------------------------------------------------
def _describe(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line user errors."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    # tensorstore appends a long JSON spec to its messages; the part before it is the useful one.
    first = first.split(" [tensorstore_spec=")[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _native(arr: np.ndarray) -> np.ndarray:
    """Native byte order, bool as uint8 0/1, C-contiguous and writable."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.array(arr, copy=True, order="C")


def _check_dtype(dtype: np.dtype, path) -> None:
    if np.dtype(dtype).kind not in "biuf":
        raise CTEError(f"unsupported pixel type {np.dtype(dtype)}, expected integers or floats", path)


def _channels_last(arr: np.ndarray, path) -> np.ndarray:
    """Validate a 2D image of rank 2 or 3 (channels last) and return it as (h, w, c), c in {1, 3}.

    RGBA (c = 4) drops its alpha channel.
    """
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise CTEError(f"image has shape {tuple(arr.shape)}, expected (h, w) or (h, w, c)", path)
    h, w, c = arr.shape
    if c not in (1, 3, 4):
        raise CTEError(f"image of shape {tuple(arr.shape)} has {c} channels, expected 1, 3 or 4 (RGBA)", path)
    if h == 0 or w == 0:
        raise CTEError(f"image has shape {tuple(arr.shape)}, which is empty", path)
    _check_dtype(arr.dtype, path)
    return _native(arr[:, :, :3])


def rgb_to_grey(img: np.ndarray, *, mode: str = "luminance") -> np.ndarray:
    """Convert an RGB image to one grey channel.

    Args:
      img: (h, w, 3) or (h, w, 1) or (h, w), any real dtype. One-channel input is only cast.
      mode: ``"luminance"``: ITU-R 601-2 luma ``0.299 R + 0.587 G + 0.114 B`` (PIL's ``"L"``
        conversion, without its rounding to uint8); ``"mean"``: ``(R + G + B) / 3``;
        ``"first"``: the first channel.

    Returns:
      (h, w, 1) float32. Computed in float64 before the cast.

    Raises:
      ValueError: unknown mode, or an image that is not (h, w), (h, w, 1) or (h, w, 3).
    """
    if mode not in GREY_MODES:
        raise ValueError(f"grey mode {mode!r} is not one of {GREY_MODES}")
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"rgb_to_grey needs an (h, w), (h, w, 1) or (h, w, 3) image, got shape {img.shape}")
    x = img.astype(np.float64)
    if img.shape[-1] == 1 or mode == "first":
        grey = x[:, :, :1]
    elif mode == "mean":
        grey = x.mean(axis=-1, keepdims=True)
    else:
        grey = x @ np.asarray(LUMINANCE_WEIGHTS)[:, None]
    return grey.astype(np.float32)


# --------------------------------------------------------------------------------------------
# sources: one file or array that yields one or more 2D images
# --------------------------------------------------------------------------------------------
class _Source:
    """One file or array holding ``count`` 2D images; subclasses read image ``k`` as (h, w, c)."""

    path: Path
    count: int = 1

    def read(self, k: int) -> np.ndarray:
        raise NotImplementedError

    def shape(self, k: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def close(self) -> None:
        pass


# Pillow modes a PNG can have, with the channel count we return for them.
_PIL_GREY = ("1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")
_PIL_GREY_ALPHA = ("LA", "La")
_PIL_RGB_ALPHA = ("RGBA", "RGBa", "RGBX")


def _pil_channels(mode: str, labels: bool) -> int:
    if mode in _PIL_GREY or mode in _PIL_GREY_ALPHA:
        return 1
    if mode in ("P", "PA") and labels:
        return 1
    return 3


def _pil_array(im, labels: bool) -> np.ndarray:
    """Pixels of a loaded Pillow image, alpha dropped; palette images give indices for labels."""
    mode = im.mode
    if mode in _PIL_GREY:
        return np.asarray(im)
    if mode in _PIL_GREY_ALPHA:
        return np.asarray(im)[:, :, :1]
    if mode in ("P", "PA"):
        if labels:  # a palette label image stores the class ids as palette indices
            arr = np.asarray(im)
            return arr if arr.ndim == 2 else arr[:, :, :1]
        return np.asarray(im.convert("RGBA"))[:, :, :3]
    if mode == "RGB":
        return np.asarray(im)
    if mode in _PIL_RGB_ALPHA:
        return np.asarray(im)[:, :, :3]
    return np.asarray(im.convert("RGB"))


def _png_is_16bit_colour(path: Path) -> bool:
    """Pillow reads 16-bit RGB(A) PNGs as 8 bits; detect them from the IHDR chunk to warn."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return False
    return len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 6)


class _PillowFile(_Source):
    """A PNG (or any single image Pillow reads), decoded on each read."""

    def __init__(self, path: Path, *, labels: bool = False):
        self.path = path
        self.labels = labels

    def read(self, k: int) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(self.path) as im:
                im.load()
                arr = _pil_array(im, self.labels)
        except CTEError:
            raise
        except Exception as exc:  # Pillow raises many types for broken files
            raise CTEError(f"cannot read image ({_describe(exc)})", self.path) from exc
        if arr.dtype == np.uint8 and arr.ndim == 3 and _png_is_16bit_colour(self.path):
            warnings.warn(f"{self.path}: 16-bit colour PNG read with 8-bit precision (Pillow limitation)",
                          stacklevel=3)
        return _channels_last(arr, self.path)

    def shape(self, k: int) -> tuple[int, int, int]:
        from PIL import Image

        try:
            with Image.open(self.path) as im:
                w, h = im.size
                mode = im.mode
        except Exception as exc:
            raise CTEError(f"cannot read image ({_describe(exc)})", self.path) from exc
        return h, w, _pil_channels(mode, self.labels)


class _TiffHandles:
    """A few TIFF files kept open between reads, so walking a long stack's pages is not repeated."""

    def __init__(self, size: int):
        self.size = size
        self.lock = threading.RLock()
        self.open: collections.OrderedDict[object, object] = collections.OrderedDict()  # keyed by source

    def get(self, owner: object, path: Path):
        import tifffile

        tif = self.open.pop(owner, None)
        if tif is None:
            tif = tifffile.TiffFile(path)
        self.open[owner] = tif
        while len(self.open) > self.size:
            _, old = self.open.popitem(last=False)
            old.close()
        return tif

    def drop(self, owner: object) -> None:
        tif = self.open.pop(owner, None)
        if tif is not None:
            tif.close()


_TIFF_HANDLES = _TiffHandles(_MAX_TIFF_HANDLES)


@dataclasses.dataclass(frozen=True)
class _TiffLayout:
    """Where the 2D images of a TIFF series are.

    ``pages`` mode: each image is one page (``page_axes`` among YX, YXS, SYX) or, with an ImageJ
    channel axis ``C`` among the leading axes, ``channels`` pages. ``whole`` mode (any other
    arrangement) reads the whole series once and cuts it.
    """

    mode: str  # "pages", "whole" or "series" (one image per series)
    axes: str  # series axes as tifffile reports them
    shape: tuple[int, ...]  # series shape
    count: int  # number of 2D images
    hw: tuple[int, int]
    channels: int  # 1, 3 or 4 in the file
    page_axes: str = ""
    lead_shape: tuple[int, ...] = ()  # leading (non-page) axes, including C
    c_lead: int = -1  # index of C among the leading axes, or -1


def _unlabelled_channels_last(tif, axes: str, shape: tuple[int, ...]) -> bool:
    """A tifffile 'shaped' array of rank >= 4 without axes metadata whose last axis looks like channels."""
    if not tif.is_shaped or len(shape) < 4 or axes != "Q" * (len(shape) - 2) + "YX":
        return False
    meta = tif.shaped_metadata[0] if tif.shaped_metadata else None
    if not isinstance(meta, dict) or "axes" in meta:
        return False
    return shape[-1] <= 16 and shape[-1] < min(shape[-3], shape[-2])


def _tiff_layout(tif, path: Path) -> _TiffLayout:
    if not tif.series:
        raise CTEError("TIFF file holds no images", path)
    if len(tif.series) > 1:
        return _series_layout(tif, path)
    series = tif.series[0]
    axes, shape = series.axes, tuple(int(s) for s in series.shape)
    if _unlabelled_channels_last(tif, axes, shape):
        # tifffile.imwrite of a (z, y, x, c) array with c not 3/4 and no axes metadata stores
        # pages of (x, c); its recorded shape tells us the array really ended in a channel axis.
        axes = "Q" * (len(shape) - 3) + "YXC"
    desc = f"TIFF axes {axes}, shape {shape}"
    if "Y" not in axes or "X" not in axes:
        raise CTEError(f"TIFF has no Y and X axes ({desc})", path)
    if any(s == 0 for s in shape):
        raise CTEError(f"TIFF image is empty ({desc})", path)
    _check_dtype(series.dtype, path)
    chan = [a for a in "SC" if a in axes and shape[axes.index(a)] > 1]
    if len(chan) > 1:
        raise CTEError(f"TIFF has both samples and channels ({desc}); expected one channel axis", path)
    channels = shape[axes.index(chan[0])] if chan else 1
    if channels not in (1, 3, 4):
        raise CTEError(f"image has {channels} channels ({desc}), expected 1, 3 or 4 (RGBA)", path)
    hw = (shape[axes.index("Y")], shape[axes.index("X")])
    slice_axes = [i for i, a in enumerate(axes) if a not in "YXSC"]
    count = math.prod(shape[i] for i in slice_axes)

    page_axes = series.keyframe.axes
    lead = axes[: len(axes) - len(page_axes)]
    fast = (
        page_axes in ("YX", "YXS", "SYX")
        and axes.endswith(page_axes)
        and "Y" not in lead and "X" not in lead and "S" not in lead
        and len(series.pages) == math.prod(shape[: len(lead)])
    )
    if fast:
        c_lead = lead.find("C")
        return _TiffLayout("pages", axes, shape, count, hw, channels, page_axes, shape[: len(lead)], c_lead)
    return _TiffLayout("whole", axes, shape, count, hw, channels)


def _series_layout(tif, path: Path) -> _TiffLayout:
    """Several series (e.g. tifffile.TiffWriter called once per image): one 2D image each, all of
    one shape; anything else is refused rather than read in part."""
    kinds = sorted({(sr.axes, tuple(int(n) for n in sr.shape)) for sr in tif.series})
    first = tif.series[0]
    axes, shape = first.axes, tuple(int(n) for n in first.shape)
    if len(kinds) > 1 or axes not in ("YX", "YXS", "SYX"):
        listed = ", ".join(f"{a} {sh}" for a, sh in kinds[:4]) + (", ..." if len(kinds) > 4 else "")
        raise CTEError(f"TIFF holds {len(tif.series)} series ({listed}); only series that are single 2D images of "
                       f"one shape are read together: save the others as separate files", path)
    if any(n == 0 for n in shape):
        raise CTEError(f"TIFF image is empty (TIFF axes {axes}, shape {shape})", path)
    _check_dtype(first.dtype, path)
    channels = shape[axes.index("S")] if "S" in axes else 1
    if channels not in (1, 3, 4):
        raise CTEError(f"image has {channels} channels (TIFF axes {axes}, shape {shape}), expected 1, 3 or 4 (RGBA)",
                       path)
    hw = (shape[axes.index("Y")], shape[axes.index("X")])
    return _TiffLayout("series", axes, shape, len(tif.series), hw, channels, page_axes=axes)


class _TiffFile(_Source):
    """A TIFF image or stack: its series cut into 2D images along every non-YX, non-channel axis
    (a file of several series: one 2D image per series).

    The axes are the ones tifffile reports (ImageJ hyperstacks: ``ZCYX`` etc.; RGB pages: ``S``);
    a channel axis is ``S`` (samples) or ``C``, moved last.
    """

    def __init__(self, path: Path):
        self.path = path
        self._whole: np.ndarray | None = None
        with _TIFF_HANDLES.lock:
            try:
                tif = _TIFF_HANDLES.get(self, path)
                self.layout = _tiff_layout(tif, path)
            except CTEError:
                _TIFF_HANDLES.drop(self)
                raise
            except Exception as exc:
                _TIFF_HANDLES.drop(self)
                raise CTEError(f"cannot read TIFF ({_describe(exc)})", path) from exc
        self.count = self.layout.count

    def shape(self, k: int) -> tuple[int, int, int]:
        return (*self.layout.hw, min(self.layout.channels, 3))

    def read(self, k: int) -> np.ndarray:
        with _TIFF_HANDLES.lock:
            try:
                tif = _TIFF_HANDLES.get(self, self.path)
                if self.layout.mode == "series":
                    arr = tif.series[k].asarray()
                    arr = np.moveaxis(arr, 0, -1) if self.layout.page_axes == "SYX" else arr
                elif self.layout.mode == "pages":
                    arr = self._read_pages(tif, k)
                else:
                    arr = self._read_whole(tif, k)
            except CTEError:
                raise
            except Exception as exc:
                _TIFF_HANDLES.drop(self)
                raise CTEError(f"cannot read TIFF image {k} ({_describe(exc)})", self.path) from exc
        return _channels_last(arr, self.path)

    def _page(self, tif, index: int) -> np.ndarray:
        arr = tif.series[0].pages[index].asarray()
        return np.moveaxis(arr, 0, -1) if self.layout.page_axes == "SYX" else arr

    def _read_pages(self, tif, k: int) -> np.ndarray:
        lay = self.layout
        if lay.c_lead < 0:
            return self._page(tif, k)
        outer = lay.lead_shape[: lay.c_lead] + lay.lead_shape[lay.c_lead + 1 :]
        idx = list(np.unravel_index(k, outer)) if outer else []
        planes = []
        for c in range(lay.lead_shape[lay.c_lead]):
            full = tuple(idx[: lay.c_lead]) + (c,) + tuple(idx[lay.c_lead :])
            page = self._page(tif, int(np.ravel_multi_index(full, lay.lead_shape)))
            planes.append(page if page.ndim == 3 else page[:, :, None])
        return np.concatenate(planes, axis=-1)

    def _read_whole(self, tif, k: int) -> np.ndarray:
        if self._whole is None:
            lay = self.layout
            arr = tif.series[0].asarray().reshape(lay.shape)
            order = [i for i, a in enumerate(lay.axes) if a not in "YXSC"]
            order += [lay.axes.index("Y"), lay.axes.index("X")]
            order += [i for i, a in enumerate(lay.axes) if a in "SC"]
            arr = np.transpose(arr, order)
            self._whole = arr.reshape((lay.count, *lay.hw, -1))
        return self._whole[k]

    def close(self) -> None:
        with _TIFF_HANDLES.lock:
            _TIFF_HANDLES.drop(self)
        self._whole = None


_TS_DRIVERS = {"zarr": "zarr v2", "zarr3": "zarr v3", "n5": "N5"}


def _array_driver(path: Path) -> str | None:
    """Which tensorstore driver reads the array stored in directory ``path`` (None: not an array)."""
    if (path / ".zarray").is_file():
        return "zarr"
    meta = path / "zarr.json"
    if meta.is_file():
        try:
            node = json.loads(meta.read_text()).get("node_type")
        except (OSError, ValueError, AttributeError) as exc:
            raise CTEError(f"cannot parse zarr.json ({_describe(exc)})", meta) from exc
        return "zarr3" if node == "array" else None
    attrs = path / "attributes.json"
    if attrs.is_file():
        try:
            is_array = "dimensions" in json.loads(attrs.read_text())
        except (OSError, ValueError, TypeError) as exc:
            raise CTEError(f"cannot parse attributes.json ({_describe(exc)})", attrs) from exc
        return "n5" if is_array else None
    return None


def _is_container(path: Path) -> bool:
    return any((path / m).is_file() for m in (".zgroup", "zarr.json", "attributes.json"))


def _find_arrays(root: Path, *, depth: int = 3, limit: int = 12) -> list[str]:
    """Relative paths of zarr/N5 arrays below ``root``, for error messages."""
    found: list[str] = []
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for d in frontier:
            try:
                subs = sorted(e.path for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
            except OSError:
                continue
            for s in map(Path, subs):
                try:
                    drv = _array_driver(s)
                except CTEError:
                    drv = None
                if drv:
                    found.append(s.relative_to(root).as_posix())
                    if len(found) >= limit:
                        return found
                else:
                    nxt.append(s)
        frontier = nxt
    return found


class _TensorStoreArray(_Source):
    """A zarr v2, zarr v3 or N5 array: (y, x), (z, y, x) or (z, y, x, c); z slices read on demand.

    N5 lists dimensions fastest first (x, y, z); as z5py and zarr-python do, we present them
    reversed, in C order (z, y, x).
    """

    def __init__(self, path: Path, driver: str):
        import tensorstore as ts

        self.path = path
        self.driver = driver
        spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}}
        try:
            store = ts.open(spec, read=True, write=False).result()
            if driver == "n5":
                store = store.T
            store = store[ts.d[:].translate_to[0]]
            dtype = np.dtype(store.dtype.numpy_dtype)
        except Exception as exc:
            raise CTEError(f"cannot open {_TS_DRIVERS[driver]} array ({_describe(exc)})", path) from exc
        _check_dtype(dtype, path)
        shape = tuple(int(s) for s in store.shape)
        if len(shape) not in (2, 3, 4):
            raise CTEError(f"array has shape {shape}, expected (y, x), (z, y, x) or (z, y, x, c)", path)
        if len(shape) == 4 and shape[3] not in (1, 3, 4):
            raise CTEError(f"array of shape {shape} has {shape[3]} channels, expected 1, 3 or 4 (RGBA)", path)
        if any(s == 0 for s in shape):
            raise CTEError(f"array has shape {shape}, which is empty", path)
        self.store = store
        self.array_shape = shape
        self.count = 1 if len(shape) == 2 else shape[0]

    def shape(self, k: int) -> tuple[int, int, int]:
        s = self.array_shape
        return (s[0], s[1], 1) if len(s) == 2 else (s[1], s[2], 1 if len(s) == 3 else min(s[3], 3))

    def read(self, k: int) -> np.ndarray:
        try:
            view = self.store if len(self.array_shape) == 2 else self.store[k]
            arr = np.asarray(view.read().result())
        except Exception as exc:
            raise CTEError(f"cannot read slice {k} ({_describe(exc)})", self.path) from exc
        return _channels_last(arr, self.path)


# --------------------------------------------------------------------------------------------
# Target: the lazy collection
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Item:
    name: str
    source: _Source
    k: int


class Target:
    """A lazy, indexable collection of 2D images; pixels are read only by ``read``.

    Attributes:
      path: what was opened (folder, file, or array directory).
      names: unique image names, in a stable order (file stems; ``stem_z0003`` for slices).
    """

    def __init__(self, path: str | os.PathLike, items: Sequence[_Item]):
        self.path = Path(path)
        self._items = list(items)
        self.names = [it.name for it in self._items]
        self._index = {n: i for i, n in enumerate(self.names)}
        if len(self._index) != len(self.names):
            raise ValueError("Target names must be unique")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read(i)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.read(i) for i in range(len(self)))

    def __repr__(self) -> str:
        return f"Target({str(self.path)!r}, {len(self)} images)"

    def _item(self, i: int) -> _Item:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"image index must be an int, got {type(i).__name__}")
        n = len(self._items)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        return self._items[int(i)]

    def read(self, i: int) -> np.ndarray:
        """Image ``i`` as (h, w, c), c in {1, 3}, in the file's dtype (bool becomes uint8).

        Raises:
          CTEError: unreadable, or a float image with NaN or infinite pixels (no normalisation
            or score could use it), naming the file.
        """
        it = self._item(i)
        img = it.source.read(it.k)
        if img.dtype.kind == "f" and not np.isfinite(img).all():
            where = f"{it.source.path} [image {it.k}]" if it.source.count > 1 else it.source.path
            raise CTEError(f"image contains {np.count_nonzero(~np.isfinite(img))} NaN or infinite pixels", where)
        return img

    def shape(self, i: int) -> tuple[int, int, int]:
        """(h, w, c) of image ``i`` from the file's header, without decoding pixels."""
        it = self._item(i)
        return it.source.shape(it.k)

    def source_path(self, i: int) -> Path:
        """The file or array directory image ``i`` comes from."""
        return self._item(i).source.path

    def index(self, name: str) -> int:
        """Position of the image called ``name``."""
        try:
            return self._index[name]
        except KeyError:
            raise CTEError(f"no image named {name!r}", self.path) from None

    def select(self, names: Sequence[str]) -> Target:
        """A Target of the images called ``names``, in that order."""
        return Target(self.path, [self._items[self.index(n)] for n in names])

    def close(self) -> None:
        """Release open file handles (TIFF stacks); reading again reopens them."""
        for src in {id(it.source): it.source for it in self._items}.values():
            src.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _slice_names(base: str, count: int) -> list[str]:
    if count == 1:
        return [base]
    width = max(4, len(str(count - 1)))
    return [f"{base}_z{k:0{width}d}" for k in range(count)]


def _unique(names: list[str]) -> list[str]:
    """Make names unique, keeping the first of each and suffixing later repeats with #2, #3..."""
    seen: collections.Counter[str] = collections.Counter()
    out = []
    taken = set(names)
    for n in names:
        seen[n] += 1
        if seen[n] == 1:
            out.append(n)
            continue
        k = seen[n]
        while f"{n}#{k}" in taken:
            k += 1
        out.append(f"{n}#{k}")
        taken.add(out[-1])
    return out


def _stem(path: Path) -> str:
    """File name without its suffix (and without ``.ome`` for OME-TIFF)."""
    stem = path.stem
    if path.suffix.lower() in _TIFF_SUFFIXES and stem.lower().endswith(".ome"):
        stem = stem[:-4] or stem
    return stem


def _file_source(path: Path, *, labels: bool) -> _Source:
    if path.suffix.lower() in _TIFF_SUFFIXES:
        return _TiffFile(path)
    return _PillowFile(path, labels=labels)


def _items(sources: list[tuple[str, _Source]]) -> list[_Item]:
    names: list[str] = []
    refs: list[tuple[_Source, int]] = []
    for base, src in sources:
        names += _slice_names(base, src.count)
        refs += [(src, k) for k in range(src.count)]
    return [_Item(n, s, k) for n, (s, k) in zip(_unique(names), refs)]


def _image_files(folder: Path) -> list[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise CTEError(f"cannot list folder ({_describe(exc)})", folder) from exc
    files = [
        Path(e.path)
        for e in entries
        if not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_SUFFIXES and e.is_file()
    ]
    return sorted(files, key=lambda p: p.name)


def _open_folder(folder: Path, *, labels: bool = False) -> Target:
    files = _image_files(folder)
    if not files:
        arrays = _find_arrays(folder)
        if arrays:
            raise CTEError(f"no images found; it holds zarr/N5 arrays, choose one with --dataset (dataset= in Python) "
                           f"(found: {', '.join(arrays)})", folder)
        hint = ""
        if (folder / "images").is_dir() and _image_files(folder / "images"):
            hint = f"; a labelled domain? its images are in {folder / 'images'}"
        raise CTEError(f"no images found (expected .png, .tif, .tiff or .jpg files){hint}", folder)
    jpegs = [p.name for p in files if p.suffix.lower() in _JPEG_SUFFIXES]
    if labels and jpegs:
        raise CTEError(f"labels must not be JPEG files ({jpegs[0]}{', ...' if len(jpegs) > 1 else ''}): JPEG "
                       f"compression changes label values at object borders; save them as PNG or TIFF", folder)
    stems = collections.Counter(_stem(p) for p in files)
    # two files with one stem (a.png, a.tif) keep their full file names so both stay addressable
    sources = [(_stem(p) if stems[_stem(p)] == 1 else p.name, _file_source(p, labels=labels)) for p in files]
    return Target(folder, _items(sources))


def _open_array(path: Path, driver: str, name: str) -> Target:
    return Target(path, _items([(name, _TensorStoreArray(path, driver))]))


def open_target(path: str | os.PathLike, *, dataset: str | None = None) -> Target:
    """Open an unlabelled target for lazy reading.

    Sources, detected from ``path``:
      - a folder of PNG/TIFF/JPEG files (``.png``, ``.tif``, ``.tiff``, ``.jpg``, ``.jpeg``, any case), sorted by file
        name; hidden files and other extensions are skipped, sub-folders are not searched;
      - a single PNG, TIFF or JPEG file;
      - a TIFF stack: every axis other than Y, X and the channel axis (``S`` samples or ImageJ
        ``C``) is cut into 2D slices named ``stem_z0000``, ``stem_z0001``, ... (flattened in C
        order when there are several, e.g. T and Z). Axes are the ones tifffile reports;
      - a zarr v2 (``.zarray``), zarr v3 (``zarr.json``) or N5 (``attributes.json``) array
        directory, or a container plus ``dataset=`` (the array's key inside it). Arrays are
        (y, x), (z, y, x) or (z, y, x, c); z slices are named ``name_z0000`` after the array's
        directory. N5 dimensions are reversed to C order.

    Names are file stems (file names when two files share a stem), unique and stable.

    Args:
      path: folder, file, or array/container directory.
      dataset: key of the array inside a zarr/N5 container at ``path``.

    Returns:
      A lazy ``Target``; ``read(i)`` gives (h, w, c) with c in {1, 3} (RGBA loses alpha).

    Raises:
      CTEError: naming the file and the problem (missing path, no images, unreadable or
        truncated file, a rank or channel count other than 2D with 1, 3 or 4 channels).
    """
    path = Path(path)
    if not path.exists():
        raise CTEError("no such file or directory", path)
    if dataset is not None:
        if not path.is_dir():
            raise CTEError(f"dataset={dataset!r} given, but this is not a zarr/N5 container folder", path)
        key = dataset.strip("/")
        array = path / key if key else path
        driver = _array_driver(array) if array.is_dir() else None
        if driver is None:
            found = _find_arrays(path)
            if not found and not _is_container(path) and _image_files(path):
                raise CTEError(f"dataset={dataset!r} picks an array inside a zarr/N5 container, and this is a "
                               f"folder of image files: leave --dataset out", path)
            hint = f" (found: {', '.join(found)})" if found else ""
            raise CTEError(f"no zarr or N5 array at dataset {dataset!r}{hint}", path)
        return _open_array(array, driver, Path(key).name or array.name)
    if path.is_dir():
        driver = _array_driver(path)
        if driver is not None:
            return _open_array(path, driver, path.stem or path.name)
        if _is_container(path) and not _image_files(path):
            found = _find_arrays(path)
            hint = f"found: {', '.join(found)}" if found else "none found"
            raise CTEError(f"is a zarr/N5 group, not an array; choose an array with --dataset (dataset= in Python) "
                           f"({hint})", path)
        return _open_folder(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise CTEError(f"unsupported file type {path.suffix or '(none)'!r}; expected a PNG, TIFF or JPEG file, "
                       f"a folder of them, or a zarr/N5 array", path)
    return Target(path, _items([(_stem(path), _file_source(path, labels=False))]))


LABEL_CHANGE_MAX = 0.2  # see neighbour_change
TARGET_LABEL_CHANGE = 0.05  # at or below: a target's images look like label masks


def is_binary_mask(label: np.ndarray) -> bool:
    """A label image holding 0 and at most one other value: a 0/1 or 0/255 mask, not instance ids."""
    values = np.unique(label)
    return values.size <= 2 and (values.size < 2 or values[0] == 0)


def neighbour_change(label: np.ndarray) -> float | None:
    """The share of 4-neighbour pairs of foreground (> 0) pixels whose values differ.

    Label images are regions of one value, so their ids change only where two objects touch
    (at most 4 % on the data pack's nuclei, 0 on binary masks); raw microscopy changes between
    most neighbours (22-98 %, median over a domain above 50 %). None when no pair is foreground.
    """
    lab = np.asarray(label)
    if lab.ndim == 3:
        lab = lab[..., 0]
    fg = lab > 0
    across, down = fg[:, 1:] & fg[:, :-1], fg[1:] & fg[:-1]
    pairs = int(across.sum() + down.sum())
    if pairs == 0:
        return None
    differ = int(((lab[:, 1:] != lab[:, :-1]) & across).sum() + ((lab[1:] != lab[:-1]) & down).sum())
    return differ / pairs


def check_labels(labels: Sequence[np.ndarray], folder: str | os.PathLike) -> None:
    """Refuse a folder of raw images given as labels (median :func:`neighbour_change` above 0.2)."""
    changes = [c for c in map(neighbour_change, labels) if c is not None]
    if changes and float(np.median(changes)) > LABEL_CHANGE_MAX:
        raise CTEError(f"these do not look like label images: neighbouring foreground pixels differ in "
                       f"{np.median(changes):.0%} of places (median over {len(changes)} images), where label "
                       f"images hold regions of one value (0 = background, one id per object or 1 = "
                       f"foreground). Is this a folder of raw images?", folder)


def looks_like_labels(target: Target, *, n: int = 5) -> float | None:
    """The median :func:`neighbour_change` of the first ``n`` images of ``target`` when they look
    like label masks (integer images, median at most 0.05), else None."""
    changes = []
    for i in range(min(n, len(target))):
        img = np.asarray(target.read(i))
        if not np.issubdtype(img.dtype, np.integer) or (img.ndim == 3 and img.shape[-1] != 1):
            return None
        c = neighbour_change(img)
        if c is not None:
            changes.append(c)
    if not changes or float(np.median(changes)) > TARGET_LABEL_CHANGE:
        return None
    return float(np.median(changes))


def open_labelled(path: str | os.PathLike, *, split: str = "all") -> tuple[Target, Target]:
    """Open a labelled domain folder: ``images/``, ``labels/`` (same stems) and ``split.json``.

    Args:
      path: the domain folder (e.g. ``../shared/data/nuclei/dsb2018_fluo_256``).
      split: a key of ``split.json`` (``"train"``, ``"test"``) or ``"all"`` for every image.

    Returns:
      (images, labels): two Targets with the same names in the same order (the images'
      sorted order, restricted to the split). Label images are read as stored (palette PNGs
      give their indices), as (h, w, 1). Image/label shapes are not compared here.

    Raises:
      CTEError: a missing folder or split file, an unknown split, a split naming an image that
        does not exist, or an image without a label.
    """
    root = Path(path)
    if not root.is_dir():
        raise CTEError("no such folder" if not root.exists() else "not a folder", root)
    for sub in ("images", "labels"):
        if not (root / sub).is_dir():
            raise CTEError(f"labelled domain has no {sub}/ folder", root)
    images = _open_folder(root / "images")
    labels = _open_folder(root / "labels", labels=True)
    if split == "all":
        wanted = set(images.names)
    else:
        split_path = root / SPLITS_FILE
        if not split_path.is_file():
            raise CTEError(f"no {SPLITS_FILE}, needed for split {split!r} (use --split all, or split='all' in "
                           f"Python)", root)
        try:
            splits = json.loads(split_path.read_text())
        except (OSError, ValueError) as exc:
            raise CTEError(f"cannot parse ({_describe(exc)})", split_path) from exc
        if not isinstance(splits, dict) or split not in splits:
            keys = sorted(splits) if isinstance(splits, dict) else []
            raise CTEError(f"no split {split!r}; available: {', '.join(keys + ['all'])}", split_path)
        wanted = {str(n) for n in splits[split]}
        unknown = sorted(wanted.difference(images.names))
        if unknown:
            raise CTEError(f"split {split!r} names {len(unknown)} images missing from images/ "
                           f"(first: {unknown[0]!r})", split_path)
    names = [n for n in images.names if n in wanted]
    missing = [n for n in names if n not in labels._index]
    if missing:
        raise CTEError(f"{len(missing)} images have no label (first: {missing[0]!r})", root / "labels")
    return images.select(names), labels.select(names)
