"""Tests for cte_jax.data: files written here are read back and compared pixel by pixel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cte_jax import data
from cte_jax.data import Target, open_labelled, open_target, rgb_to_grey
from cte_jax.errors import CTEError

ts = pytest.importorskip("tensorstore")

SHARED = Path(os.environ.get("CTE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
RNG = np.random.default_rng(0)


def _rand(shape, dtype=np.uint8):
    info = np.iinfo(dtype)
    return RNG.integers(info.min, int(info.max) + 1, size=shape).astype(dtype)


def _png(path, arr, mode=None):
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _write_ts(path, arr, driver, chunks=None):
    """Write ``arr`` with tensorstore; N5 stores dimensions fastest first, so write the transpose."""
    spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}}
    shape = arr.shape[::-1] if driver == "n5" else arr.shape
    kw = {}
    if chunks is not None:
        kw["chunk_layout"] = ts.ChunkLayout(write_chunk_shape=chunks[::-1] if driver == "n5" else chunks)
    store = ts.open(spec, create=True, dtype=ts.dtype(arr.dtype.name), shape=shape, **kw).result()
    (store.T if driver == "n5" else store)[...] = arr
    return path


def _hwc(a):
    return a[:, :, None] if a.ndim == 2 else a


# ---------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arr, mode, expect",
    [
        (_rand((7, 9)), None, lambda a: a[:, :, None]),  # L
        (_rand((7, 9), np.uint16), None, lambda a: a[:, :, None]),  # I;16
        (_rand((7, 9, 3)), None, lambda a: a),  # RGB
        (_rand((7, 9, 4)), None, lambda a: a[:, :, :3]),  # RGBA drops alpha
        (_rand((7, 9, 2)), "LA", lambda a: a[:, :, :1]),  # grey + alpha drops alpha
    ],
)
def test_png_roundtrip(tmp_path, arr, mode, expect):
    p = _png(tmp_path / "img.png", arr, mode)
    t = open_target(p)
    assert len(t) == 1 and t.names == ["img"] and t.path == p
    out = t.read(0)
    np.testing.assert_array_equal(out, expect(arr))
    assert out.dtype == arr.dtype
    assert t.shape(0) == out.shape


def test_png_palette_image_vs_label(tmp_path):
    idx = RNG.integers(0, 4, size=(6, 5)).astype(np.uint8)
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 12)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(palette)
    im.save(tmp_path / "p.png")
    rgb = np.asarray(palette, dtype=np.uint8).reshape(256, 3)[idx]
    np.testing.assert_array_equal(open_target(tmp_path / "p.png").read(0), rgb)
    # as a label, a palette PNG yields its indices
    d = tmp_path / "dom"
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir()
    _png(d / "images" / "p.png", _rand((6, 5)))
    im.save(d / "labels" / "p.png")
    _, labels = open_labelled(d)
    np.testing.assert_array_equal(labels.read(0), idx[:, :, None])
    assert labels.shape(0) == (6, 5, 1)


def test_16bit_colour_png_warns(tmp_path):
    import struct
    import zlib

    a = _rand((4, 5, 3), np.uint16)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 4, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (tmp_path / "c16.png").write_bytes(png)
    with pytest.warns(UserWarning, match="8-bit precision"):
        out = open_target(tmp_path / "c16.png").read(0)
    np.testing.assert_array_equal(out, (a >> 8).astype(np.uint8))


def test_truncated_png_is_a_cte_error_at_read(tmp_path):
    p = _png(tmp_path / "broken.png", _rand((64, 64, 3)))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    t = open_target(tmp_path)  # opening is lazy: no pixels decoded yet
    assert t.names == ["broken"]
    with pytest.raises(CTEError) as err:
        t.read(0)
    assert err.value.path == str(p)
    assert "broken.png" in str(err.value) and "cannot read image" in str(err.value)


def test_png_that_is_not_an_image(tmp_path):
    p = tmp_path / "fake.png"
    p.write_text("not a png")
    with pytest.raises(CTEError, match="fake.png"):
        open_target(p).read(0)


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------
def test_folder_sorted_hidden_and_other_files_skipped(tmp_path):
    arrays = {"b": _rand((5, 6)), "a": _rand((4, 4, 3)), "c10": _rand((3, 3)), "c2": _rand((2, 7))}
    for name, a in arrays.items():
        _png(tmp_path / f"{name}.png", a)
    _png(tmp_path / ".hidden.png", _rand((3, 3)))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "deep.png", _rand((3, 3)))
    tifffile.imwrite(tmp_path / "d.TIF", _rand((3, 5), np.uint16))
    t = open_target(tmp_path)
    assert t.names == ["a", "b", "c10", "c2", "d"]
    for name, a in arrays.items():
        np.testing.assert_array_equal(t.read(t.index(name)), _hwc(a))
    assert t.read(-1).dtype == np.uint16
    assert "a" in t and "hidden" not in t
    assert [x.shape for x in t] == [t.shape(i) for i in range(len(t))]


def test_jpeg_images_are_read_and_jpeg_labels_refused(tmp_path):
    rng = np.random.default_rng(0)
    grey, rgb = rng.integers(0, 256, (20, 30), np.uint8), rng.integers(0, 256, (16, 12, 3), np.uint8)
    Image.fromarray(grey).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(rgb).save(tmp_path / "b.JPEG", quality=90)
    _png(tmp_path / "c.png", _rand((5, 6)))
    t = open_target(tmp_path)
    assert t.names == ["a", "b", "c"]
    for name in ("a.jpg", "b.JPEG"):  # oracle: Pillow's own decoding of the file
        with Image.open(tmp_path / name) as im:
            want = np.asarray(im)
        np.testing.assert_array_equal(t.read(t.index(Path(name).stem)), _hwc(want))
    assert open_target(tmp_path / "a.jpg").shape(0) == (20, 30, 1)
    dom = tmp_path / "dom"
    (dom / "images").mkdir(parents=True)
    (dom / "labels").mkdir()
    _png(dom / "images" / "x.png", _rand((8, 8)))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(dom / "labels" / "x.jpg")
    with pytest.raises(CTEError, match="labels must not be JPEG files"):
        open_labelled(dom)


def test_folder_same_stem_keeps_file_names(tmp_path):
    a, b = _rand((3, 3)), _rand((4, 4), np.uint16)
    _png(tmp_path / "x.png", a)
    tifffile.imwrite(tmp_path / "x.tif", b)
    _png(tmp_path / "y.png", a)
    t = open_target(tmp_path)
    assert t.names == ["x.png", "x.tif", "y"]
    np.testing.assert_array_equal(t.read(1), b[:, :, None])


def test_empty_and_imageless_folders(tmp_path):
    with pytest.raises(CTEError, match="no images found") as err:
        open_target(tmp_path)
    assert err.value.path == str(tmp_path)
    (tmp_path / "readme.md").write_text("x")
    _png(tmp_path / ".hidden.png", _rand((3, 3)))
    with pytest.raises(CTEError, match="no images found"):
        open_target(tmp_path)


def test_unknown_path_and_unsupported_file(tmp_path):
    with pytest.raises(CTEError, match="no such file") as err:
        open_target(tmp_path / "missing")
    assert err.value.path == str(tmp_path / "missing")
    (tmp_path / "a.bmp").write_bytes(b"x")
    with pytest.raises(CTEError, match="unsupported file type"):
        open_target(tmp_path / "a.bmp")
    with pytest.raises(CTEError, match="not a zarr/N5 container"):
        open_target(tmp_path / "a.bmp", dataset="x")
    (tmp_path / "pngs").mkdir()
    _png(tmp_path / "pngs" / "a.png", _rand((4, 4)))
    with pytest.raises(CTEError, match="folder of image files: leave --dataset out"):
        open_target(tmp_path / "pngs", dataset="raw")


def test_target_indexing(tmp_path):
    for k in range(3):
        _png(tmp_path / f"i{k}.png", np.full((2, 2), k, np.uint8))
    t = open_target(tmp_path)
    assert isinstance(t, Target) and len(t) == 3
    assert t[-1][0, 0, 0] == 2 and t[0][0, 0, 0] == 0
    with pytest.raises(IndexError):
        t.read(3)
    sub = t.select(["i2", "i0"])
    assert sub.names == ["i2", "i0"] and sub.read(0)[0, 0, 0] == 2
    with pytest.raises(CTEError, match="no image named"):
        t.select(["nope"])
    assert t.source_path(1) == tmp_path / "i1.png"


# ---------------------------------------------------------------------------------------------
# TIFF
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int32])
def test_tiff_single_image(tmp_path, dtype):
    a = (RNG.standard_normal((9, 11)) * 1000).astype(dtype)
    tifffile.imwrite(tmp_path / "one.tiff", a)
    t = open_target(tmp_path / "one.tiff")
    assert t.names == ["one"]
    out = t.read(0)
    assert out.dtype == np.dtype(dtype) and out.shape == (9, 11, 1)
    np.testing.assert_array_equal(out[:, :, 0], a)


def test_tiff_rgb_and_rgba(tmp_path):
    rgb, rgba = _rand((5, 6, 3)), _rand((5, 6, 4))
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb")
    t = open_target(tmp_path)
    np.testing.assert_array_equal(t.read(t.index("rgb")), rgb)
    np.testing.assert_array_equal(t.read(t.index("rgba")), rgba[:, :, :3])


def test_tiff_stack_3d_cut_into_slices(tmp_path):
    stack = _rand((12, 8, 10), np.uint16)
    tifffile.imwrite(tmp_path / "vol.tif", stack, photometric="minisblack")
    t = open_target(tmp_path / "vol.tif")
    assert t.names == [f"vol_z{z:04d}" for z in range(12)]
    for z in (0, 3, 11):  # out of order: pages are read on demand
        np.testing.assert_array_equal(t.read(z), stack[z][:, :, None])
    assert t.shape(5) == (8, 10, 1)
    t.close()
    np.testing.assert_array_equal(t.read(7), stack[7][:, :, None])  # reopens after close


def test_tiff_of_several_series_reads_every_image(tmp_path):
    """tifffile.TiffWriter.write once per image makes one series per image: all are images, and
    series of different shapes are refused rather than read in part. LZW pages decode too."""
    imgs = [_rand((8, 10), np.uint16) for _ in range(4)]
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tw:
        for a in imgs:
            tw.write(a, compression="lzw")
    t = open_target(tmp_path / "pages.tif")
    assert len(t) == 4 and t.shape(2) == (8, 10, 1)
    for k in (3, 0, 2):
        np.testing.assert_array_equal(t.read(k), imgs[k][:, :, None])
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tw:
        tw.write(imgs[0])
        tw.write(_rand((5, 5), np.uint16))
    with pytest.raises(CTEError, match="2 series"):
        open_target(tmp_path / "mixed.tif")


def test_tiff_stack_4d_rgb_and_imagej_channels(tmp_path):
    rgb = _rand((3, 6, 7, 3))
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    t = open_target(tmp_path / "rgb.tif")
    assert len(t) == 3
    for z in range(3):
        np.testing.assert_array_equal(t.read(z), rgb[z])
    zcyx = _rand((4, 3, 6, 7))
    tifffile.imwrite(tmp_path / "ij.tif", zcyx, imagej=True, metadata={"axes": "ZCYX"})
    t = open_target(tmp_path / "ij.tif")
    assert len(t) == 4
    for z in range(4):
        np.testing.assert_array_equal(t.read(z), np.moveaxis(zcyx[z], 0, -1))


def test_tiff_hyperstack_and_ome(tmp_path):
    tzcyx = _rand((2, 2, 3, 6, 7))
    tifffile.imwrite(tmp_path / "hyper.tif", tzcyx, imagej=True, metadata={"axes": "TZCYX"})
    t = open_target(tmp_path / "hyper.tif")
    expect = np.moveaxis(tzcyx, 2, -1).reshape(4, 6, 7, 3)  # T and Z flattened in C order
    np.testing.assert_array_equal(np.stack([t.read(i) for i in (0, 1, 2, 3)]), expect)
    zcyx = _rand((4, 3, 6, 7), np.uint16)
    tifffile.imwrite(tmp_path / "cells.ome.tif", zcyx, ome=True, metadata={"axes": "ZCYX"})
    t = open_target(tmp_path / "cells.ome.tif")
    assert t.names == [f"cells_z{z:04d}" for z in range(4)]
    np.testing.assert_array_equal(t.read(3), np.moveaxis(zcyx[3], 0, -1))


def test_tiff_written_without_axes(tmp_path):
    # tifffile.imwrite of (z, y, x) and (z, y, x, 1) arrays with no metadata
    vol = _rand((5, 6, 7))
    tifffile.imwrite(tmp_path / "v.tif", vol)
    t = open_target(tmp_path / "v.tif")
    np.testing.assert_array_equal(np.stack([t.read(i) for i in range(len(t))])[..., 0], vol)
    vol1 = _rand((2, 6, 7, 1))
    tifffile.imwrite(tmp_path / "v1.tif", vol1)
    t = open_target(tmp_path / "v1.tif")
    np.testing.assert_array_equal(np.stack([t.read(i) for i in range(len(t))]), vol1)


@pytest.mark.parametrize("channels", [2, 5])
@pytest.mark.parametrize("how", ["samples", "plain"])
def test_tiff_stack_bad_channel_count(tmp_path, channels, how):
    a = _rand((2, 6, 7, channels))
    kw = {"photometric": "minisblack", "planarconfig": "contig"} if how == "samples" else {}
    tifffile.imwrite(tmp_path / "bad.tif", a, **kw)
    with pytest.raises(CTEError) as err:
        open_target(tmp_path / "bad.tif")
    msg = str(err.value)
    assert "bad.tif" in msg and f"{channels} channels" in msg and "(2, 6, 7, " in msg


def test_truncated_tiff(tmp_path):
    p = tmp_path / "t.tif"
    tifffile.imwrite(p, _rand((3, 64, 64), np.uint16), photometric="minisblack")
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CTEError, match="t.tif"):
        t = open_target(p)
        for i in range(len(t)):
            t.read(i)
    p.write_bytes(b"II*\x00garbage")
    with pytest.raises(CTEError, match="t.tif"):
        open_target(p)
    p.write_bytes(b"MM\x00\x2b\x00")  # a BigTIFF header cut short
    with pytest.raises(CTEError, match="cannot read TIFF"):
        open_target(p)


@settings(max_examples=15, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    c=st.sampled_from([1, 3]),
    dtype=st.sampled_from([np.uint8, np.uint16]),
    fmt=st.sampled_from(["png", "tif"]),
)
def test_roundtrip_property(tmp_path_factory, h, w, c, dtype, fmt):
    if fmt == "png" and c == 3 and dtype == np.uint16:
        dtype = np.uint8  # Pillow writes/reads 16-bit colour PNG as 8-bit
    a = _rand((h, w, c), dtype)
    d = tmp_path_factory.mktemp("rt")
    p = d / f"x.{fmt}"
    if fmt == "png":
        _png(p, a[:, :, 0] if c == 1 else a)
    else:
        tifffile.imwrite(p, a[:, :, 0] if c == 1 else a, photometric="minisblack" if c == 1 else "rgb")
    t = open_target(p)
    np.testing.assert_array_equal(t.read(0), a)
    assert t.read(0).dtype == a.dtype and t.shape(0) == a.shape


# ---------------------------------------------------------------------------------------------
# zarr / N5 via tensorstore
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("driver", ["zarr", "zarr3", "n5"])
def test_chunked_3d_array(tmp_path, driver):
    vol = _rand((4, 9, 11), np.uint16)
    path = _write_ts(tmp_path / "vol.zarr", vol, driver, chunks=(1, 9, 11))
    t = open_target(path)
    assert t.names == [f"vol_z{z:04d}" for z in range(4)]
    for z in (2, 0, 3):
        out = t.read(z)
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, vol[z][:, :, None])
    assert t.shape(1) == (9, 11, 1)


def test_n5_dimensions_are_reversed(tmp_path):
    vol = _rand((3, 5, 7))
    _write_ts(tmp_path / "n5arr", vol, "n5")
    attrs = json.loads((tmp_path / "n5arr" / "attributes.json").read_text())
    assert attrs["dimensions"] == [7, 5, 3]  # N5 lists x, y, z
    np.testing.assert_array_equal(open_target(tmp_path / "n5arr").read(1)[:, :, 0], vol[1])


@pytest.mark.parametrize("driver", ["zarr", "zarr3", "n5"])
def test_chunked_2d_and_4d(tmp_path, driver):
    img = RNG.standard_normal((6, 8)).astype(np.float32)
    t = open_target(_write_ts(tmp_path / "img", img, driver))
    assert t.names == ["img"]
    np.testing.assert_array_equal(t.read(0)[:, :, 0], img)
    rgb = _rand((2, 6, 8, 3))
    t = open_target(_write_ts(tmp_path / "rgb", rgb, driver))
    np.testing.assert_array_equal(t.read(1), rgb[1])


_GROUP_MARKERS = {
    "zarr": (".zgroup", {"zarr_format": 2}),
    "zarr3": ("zarr.json", {"zarr_format": 3, "node_type": "group"}),
    "n5": ("attributes.json", {"n5": "2.0.0"}),
}


@pytest.mark.parametrize("driver", ["zarr", "zarr3", "n5"])
def test_container_with_dataset_key(tmp_path, driver):
    root = tmp_path / "c.container"
    root.mkdir()
    marker, content = _GROUP_MARKERS[driver]
    (root / marker).write_text(json.dumps(content))
    vol = _rand((3, 4, 5))
    _write_ts(root / "volumes" / "raw", vol, driver)
    t = open_target(root, dataset="volumes/raw")
    assert t.names == [f"raw_z{z:04d}" for z in range(3)] and t.path == root / "volumes" / "raw"
    np.testing.assert_array_equal(t.read(2)[:, :, 0], vol[2])
    with pytest.raises(CTEError, match="volumes/raw"):  # a group needs dataset=, listing arrays
        open_target(root)
    with pytest.raises(CTEError, match="no zarr or N5 array at dataset 'volumes/seg'"):
        open_target(root, dataset="volumes/seg")


def test_zarr_bad_rank_and_channels(tmp_path):
    with pytest.raises(CTEError, match=r"shape \(2, 2, 3, 4, 5\)"):
        open_target(_write_ts(tmp_path / "r5", _rand((2, 2, 3, 4, 5)), "zarr"))
    with pytest.raises(CTEError, match="5 channels"):
        open_target(_write_ts(tmp_path / "c5", _rand((2, 3, 4, 5)), "zarr"))
    with pytest.raises(CTEError, match=r"shape \(7,\)"):
        open_target(_write_ts(tmp_path / "r1", _rand((7,)), "zarr3"))


def test_zarr_is_read_lazily_and_corrupt_chunks_are_cte_errors(tmp_path):
    vol = _rand((3, 16, 16), np.uint16)
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "v")},
            "metadata": {"compressor": None, "chunks": [1, 16, 16]}}
    store = ts.open(spec, create=True, dtype=ts.uint16, shape=vol.shape).result()
    store[...] = vol
    t = open_target(tmp_path / "v")
    (tmp_path / "v" / "1.0.0").write_bytes(b"garbage")  # after opening: only slice 1 is broken
    np.testing.assert_array_equal(t.read(0)[:, :, 0], vol[0])
    np.testing.assert_array_equal(t.read(2)[:, :, 0], vol[2])
    with pytest.raises(CTEError, match="cannot read slice 1") as err:
        t.read(1)
    assert err.value.path == str(tmp_path / "v")
    assert "tensorstore_spec" not in str(err.value)


def test_broken_zarr_metadata(tmp_path):
    d = tmp_path / "bad.zarr"
    d.mkdir()
    (d / ".zarray").write_text("{not json")
    with pytest.raises(CTEError, match="cannot open zarr v2 array"):
        open_target(d)


# ---------------------------------------------------------------------------------------------
# rgb_to_grey
# ---------------------------------------------------------------------------------------------
def test_rgb_to_grey_modes():
    rgb = _rand((6, 7, 3))
    f = rgb.astype(np.float64)
    lum = rgb_to_grey(rgb)
    assert lum.shape == (6, 7, 1) and lum.dtype == np.float32
    np.testing.assert_allclose(lum[:, :, 0], 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2], rtol=1e-6)
    # PIL's 'L' conversion is the same formula rounded to uint8
    pil = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.float64)
    assert np.abs(lum[:, :, 0] - pil).max() <= 0.5 + 1e-3
    np.testing.assert_allclose(rgb_to_grey(rgb, mode="mean")[:, :, 0], f.mean(-1), rtol=1e-6)
    np.testing.assert_array_equal(rgb_to_grey(rgb, mode="first")[:, :, 0], f[..., 0])
    grey = _rand((4, 5), np.uint16)
    np.testing.assert_array_equal(rgb_to_grey(grey)[:, :, 0], grey.astype(np.float32))
    with pytest.raises(ValueError, match="grey mode"):
        rgb_to_grey(rgb, mode="max")
    with pytest.raises(ValueError, match="shape"):
        rgb_to_grey(_rand((4, 5, 4)))


# ---------------------------------------------------------------------------------------------
# labelled domains
# ---------------------------------------------------------------------------------------------
def _domain(root: Path, names, split=None):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    data = {}
    for n in names:
        img, lab = _rand((5, 6)), RNG.integers(0, 5, size=(5, 6)).astype(np.uint16)
        _png(root / "images" / f"{n}.png", img)
        _png(root / "labels" / f"{n}.png", lab)
        data[n] = (img, lab)
    if split is not None:
        (root / "split.json").write_text(json.dumps(split))
    return data


def test_open_labelled_splits(tmp_path):
    data = _domain(tmp_path, ["c", "a", "b", "d"], {"train": ["d", "a", "c"], "test": ["b"]})
    imgs, labs = open_labelled(tmp_path, split="train")
    assert imgs.names == labs.names == ["a", "c", "d"]
    for i, n in enumerate(imgs.names):
        np.testing.assert_array_equal(imgs.read(i)[:, :, 0], data[n][0])
        np.testing.assert_array_equal(labs.read(i)[:, :, 0], data[n][1])
        assert labs.read(i).dtype == np.uint16
    assert open_labelled(tmp_path, split="test")[0].names == ["b"]
    assert open_labelled(tmp_path)[1].names == ["a", "b", "c", "d"]
    with pytest.raises(CTEError, match="no split 'val'; available: test, train, all"):
        open_labelled(tmp_path, split="val")


def test_open_labelled_errors(tmp_path):
    _domain(tmp_path / "d1", ["a", "b"], {"train": ["a", "zz"]})
    with pytest.raises(CTEError, match="missing from images") as err:
        open_labelled(tmp_path / "d1", split="train")
    assert err.value.path.endswith("split.json")
    _domain(tmp_path / "d2", ["a", "b"])
    (tmp_path / "d2" / "labels" / "b.png").unlink()
    with pytest.raises(CTEError, match="no label"):
        open_labelled(tmp_path / "d2")
    with pytest.raises(CTEError, match="no split.json"):
        open_labelled(tmp_path / "d2", split="test")
    (tmp_path / "d3").mkdir()
    with pytest.raises(CTEError, match="no images/ folder"):
        open_labelled(tmp_path / "d3")
    with pytest.raises(CTEError, match="no such folder"):
        open_labelled(tmp_path / "nowhere")


@pytest.mark.parametrize("domain", ["nuclei/dsb2018_fluo_other", "nuclei/dsb2018_tissue_rgb"])
def test_real_domain(domain):
    root = SHARED / "data" / domain
    if not (root / "split.json").is_file():
        pytest.skip(f"{root} not available")
    split = json.loads((root / "split.json").read_text())
    imgs, labs = open_labelled(root, split="test")
    assert imgs.names == sorted(split["test"]) == labs.names
    for i in range(min(3, len(imgs))):
        name = imgs.names[i]
        ref_img = np.asarray(Image.open(root / "images" / f"{name}.png").convert("RGB"))
        ref_lab = np.asarray(Image.open(root / "labels" / f"{name}.png"))
        img, lab = imgs.read(i), labs.read(i)
        assert img.shape[:2] == lab.shape[:2] == ref_lab.shape and img.dtype == np.uint8
        assert lab.dtype == np.uint16 and lab.shape[2] == 1
        np.testing.assert_array_equal(img if img.shape[2] == 3 else np.repeat(img, 3, -1), ref_img)
        np.testing.assert_array_equal(lab[:, :, 0], ref_lab)
        assert imgs.shape(i) == img.shape
    all_imgs = open_target(root / "images")
    assert len(all_imgs) == len(split["train"]) + len(split["test"])


def test_neighbour_change_separates_labels_from_raw_images():
    rng = np.random.default_rng(0)
    lab = np.zeros((6, 8), np.uint16)
    lab[1:4, 1:4] = 1
    lab[1:4, 4:7] = 2  # touches object 1 along 3 rows
    # foreground pairs: across 3 rows x 5, down 2 x 6 = 27; differing: the 3 pairs where 1 meets 2
    assert data.neighbour_change(lab) == pytest.approx(3 / 27)
    assert data.neighbour_change((lab > 0).astype(np.uint8)) == 0.0
    assert data.neighbour_change(np.zeros((5, 5), np.uint8)) is None
    raw = rng.integers(1, 256, (32, 32)).astype(np.uint8)
    want = (np.count_nonzero(np.diff(raw.astype(int), axis=1)) + np.count_nonzero(np.diff(raw.astype(int), axis=0))) / (
        2 * 31 * 32)  # every pixel is foreground here
    assert data.neighbour_change(raw) == pytest.approx(want)
    with pytest.raises(CTEError, match="do not look like label images"):
        data.check_labels([raw, raw, lab], "folder")
    data.check_labels([lab, raw, lab], "folder")  # the median decides: one odd image passes


def test_data_pack_labels_pass_and_its_images_would_not(shared_data):
    """On the real data: every domain's labels pass the raw-image check, its images fail it."""
    for labels in sorted(shared_data.glob("*/*/labels")):
        files = sorted(labels.glob("*.png"))[:6]
        data.check_labels([np.asarray(Image.open(f)) for f in files], labels)
        images = [np.asarray(Image.open(labels.parent / "images" / f.name)) for f in files]
        with pytest.raises(CTEError, match="do not look like label images"):
            data.check_labels(images, labels.parent / "images")
