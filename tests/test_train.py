"""cte_jax.train on a tiny synthetic domain in the shared data layout (images/, labels/, split.json)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cte_jax.arch import UNetSpec
from cte_jax.errors import CTEError
from cte_jax.train import (TrainConfig, boundary_map, label_target, load_data, sample_batch, train,
                           validation_names)

TINY = UNetSpec(features=(4, 8), layer_order="cr", final_activation="sigmoid")


def _write_domain(root: Path, n: int = 10, size: int = 40, seed: int = 0, rgb: bool = False) -> Path:
    """Bright disks (instance labels) on a dark, noisy background; the last 2 images are 'test'."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    yy, xx = np.mgrid[:size, :size]
    names = []
    for i in range(n):
        lab = np.zeros((size, size), np.uint16)
        for k in range(1, 5):
            cy, cx, r = rng.integers(6, size - 6), rng.integers(6, size - 6), rng.integers(3, 6)
            lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (lab == 0)] = k
        img = 30 + 150 * (lab > 0) + rng.normal(0, 12, lab.shape)
        img = np.clip(img, 0, 255).astype(np.uint8)
        if rgb:
            img = np.stack([img, img // 2, img], -1)
        name = f"img{i:02d}"
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        Image.fromarray(lab).save(root / "labels" / f"{name}.png")
        names.append(name)
    (root / "split.json").write_text(json.dumps({"train": names[:-2], "test": names[-2:]}))
    return root


@pytest.fixture(scope="module")
def domain(tmp_path_factory) -> Path:
    return _write_domain(tmp_path_factory.mktemp("data") / "synthetic_a")


def _config(domain, **kw) -> TrainConfig:
    base = dict(data=(str(domain),), spec=TINY, patch_size=32, batch_size=4, steps=60, learning_rate=1e-2,
                eval_every=20, checkpoint_every=0, val_fraction=0.25, seed=0, command="pytest")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(domain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    return train(_config(domain), out, progress=False)


def test_loss_decreases_and_model_loads_and_predicts(trained, domain):
    from cte_jax.modelio import load_model
    from cte_jax.predict import predict_image

    model = load_model(trained)
    hist = model.provenance["loss_history"]
    assert hist[-1][0] == 60
    assert hist[-1][1] < 0.8 * hist[0][1], hist
    assert model.spec == TINY and model.task == "foreground"
    # provenance: split facts and command
    facts = model.provenance["data"][0]
    assert facts["n_train"] + facts["n_val"] == 8 and facts["n_val"] >= 1
    assert set(facts["val_names"]).isdisjoint({"img08", "img09"})  # never the test split
    assert model.provenance["command"] == "pytest"
    assert model.provenance["final_val"]["val_f1"] == pytest.approx(
        max(h["val_f1"] for h in model.provenance["val_history"]))
    # predicts on a raw test image, and the prediction beats chance against the label
    img = np.asarray(Image.open(domain / "images" / "img09.png"))
    lab = np.asarray(Image.open(domain / "labels" / "img09.png")) > 0
    prob = predict_image(model, img)
    assert prob.shape == (40, 40, 1)
    pred = prob[..., 0] > 0.5
    f1 = 2 * (pred & lab).sum() / max(pred.sum() + lab.sum(), 1)
    assert f1 > 0.5


def test_same_seed_same_weights_and_resume_matches(trained, domain, tmp_path):
    from cte_jax.modelio import load_model

    # Same program as the `trained` fixture (only bookkeeping differs), so nothing recompiles.
    a = load_model(trained).variables
    b = load_model(train(_config(domain, checkpoint_every=30), tmp_path / "b", progress=False)).variables
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # a run killed right after its step-30 checkpoint, then resumed, ends with the same weights
    ck = tmp_path / "ck"
    _train_until(_config(domain, checkpoint_every=30, checkpoint_dir=str(ck)), 30)
    assert ck.is_dir()
    resumed = _config(domain, checkpoint_every=30, checkpoint_dir=str(ck), resume=True)
    c = load_model(train(resumed, tmp_path / "c", progress=False))
    jax.tree.map(np.testing.assert_array_equal, a, c.variables)
    assert not ck.exists()  # removed after a successful run
    # a checkpoint from another configuration is refused
    _train_until(_config(domain, checkpoint_every=30, checkpoint_dir=str(ck)), 30)
    with pytest.raises(CTEError, match="different training configuration"):
        train(_config(domain, seed=5, checkpoint_dir=str(ck), resume=True), tmp_path / "d", progress=False)


def _train_until(config, stop_after):
    """Run ``train`` and interrupt it right after step ``stop_after``'s checkpoint."""
    import cte_jax.train as T

    class Stop(Exception):
        pass

    original = T._Checkpoints.save

    def save_then_stop(self, step, trees, meta):
        original(self, step, trees, meta)
        if step >= stop_after:
            raise Stop

    T._Checkpoints.save = save_then_stop
    try:
        with pytest.raises(Stop):
            train(config, Path(config.checkpoint_dir).parent / "killed", progress=False)
    finally:
        T._Checkpoints.save = original


def test_batchnorm_layer_order_trains(domain, tmp_path):
    from cte_jax.modelio import load_model

    spec = UNetSpec(features=(4, 8), layer_order="bcr", final_activation="sigmoid")
    m = load_model(train(_config(domain, spec=spec, steps=4, eval_every=4, keep="last", augment=False), tmp_path / "bn",
                         progress=False))
    stats = m.variables["batch_stats"]
    means = [np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(stats) if "mean" in jax.tree_util.keystr(k)]
    assert means and any(np.abs(v).max() > 0 for v in means)  # running statistics were updated


def test_validation_split_is_deterministic_and_disjoint(domain):
    cfg = _config(domain, val_fraction=0.3)
    tr, va, facts = load_data(cfg)
    names = [f"img{i:02d}" for i in range(8)]
    held = validation_names("synthetic_a", names, 0.3)
    assert [n for _, n in va.names] == held and 1 <= len(held) < 8
    assert {n for _, n in tr.names}.isdisjoint(held)
    assert {n for _, n in tr.names} | set(held) == set(names)
    assert validation_names("synthetic_a", names, 0.0) == []


def test_sample_batch_depends_on_seed_and_step_only(domain):
    tr, _, _ = load_data(_config(domain))
    a = sample_batch(tr, seed=1, step=5, batch_size=3, patch_size=32)
    b = sample_batch(tr, seed=1, step=5, batch_size=3, patch_size=32)
    c = sample_batch(tr, seed=1, step=6, batch_size=3, patch_size=32)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (3, 32, 32, 1) and a[1].shape == (3, 32, 32, 1)


def test_small_images_are_mirror_padded_and_rgb_made_grey(tmp_path):
    root = _write_domain(tmp_path / "small_rgb", n=4, size=20, rgb=True)
    tr, _, facts = load_data(_config(root, val_fraction=0.0))
    x, y = sample_batch(tr, seed=0, step=0, batch_size=2, patch_size=32)
    assert x.shape == (2, 32, 32, 1) and facts[0]["label_kind"] == "instance"


def test_masks_saved_as_0_255_are_binary_labels(tmp_path):
    root = _write_domain(tmp_path / "masks", n=4, size=20)
    for f in (root / "labels").iterdir():
        Image.fromarray(((np.asarray(Image.open(f)) > 0) * 255).astype(np.uint8)).save(f)
    _, _, facts = load_data(_config(root, val_fraction=0.0))
    assert facts[0]["label_kind"] == "binary"


def test_raw_images_given_as_labels_are_refused(tmp_path):
    root = _write_domain(tmp_path / "raw_as_labels", n=4, size=40)
    for f in (root / "images").iterdir():
        (root / "labels" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CTEError, match=r"do not look like label images.*raw images") as e:
        load_data(_config(root, val_fraction=0.0))
    assert e.value.path == str(root / "labels")


def test_label_targets():
    lab = np.array([[0, 0, 0, 0], [0, 1, 1, 2], [0, 1, 1, 2], [0, 0, 0, 0]], np.uint16)
    np.testing.assert_array_equal(label_target(lab, task="foreground", binary=False)[..., 0], lab > 0)
    from skimage.segmentation import find_boundaries

    np.testing.assert_array_equal(boundary_map(lab), find_boundaries(lab, connectivity=1, mode="thick"))
    binary = (lab > 0).astype(np.uint8)
    np.testing.assert_array_equal(label_target(binary, task="boundary", binary=True)[..., 0], binary > 0)


def test_config_validation_and_errors(domain, tmp_path):
    with pytest.raises(ValueError, match="patch_size"):
        _config(domain, patch_size=30, spec=UNetSpec(features=(4, 8, 16), final_activation="sigmoid"))
    with pytest.raises(ValueError, match="sigmoid"):
        _config(domain, spec=UNetSpec(features=(4, 8), final_activation=None))
    with pytest.raises(ValueError, match="test split"):
        _config(domain, train_split="test")
    with pytest.raises(ValueError, match="seed must be a whole number"):
        _config(domain, seed=2 ** 64)
    with pytest.raises(ValueError, match="normalisation"):
        _config(domain, normalization="percentile:99,1")
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(CTEError, match="already exists"):
        train(_config(domain), existing, progress=False)
    with pytest.raises(CTEError):
        train(_config(tmp_path / "nowhere"), tmp_path / "m", progress=False)
    cfg = _config(domain)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_intensity_flags_reach_the_config():
    import argparse

    from cte_jax.augment import IntensityRanges
    from cte_jax.train import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--data", "d", "--out", "o"]
    default = config_from_args(p.parse_args(base))
    assert default.intensity == IntensityRanges()
    cfg = config_from_args(p.parse_args([*base, "--aug-noise", "0.1,0.2", "--aug-gamma", "0.5,2", "--aug-p", "0.8"]))
    assert cfg.intensity == IntensityRanges(noise=(0.1, 0.2), gamma=(0.5, 2.0), p=0.8)
    assert TrainConfig.from_dict(cfg.to_dict()).intensity == cfg.intensity
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--aug-noise", "0.2,0.1"])
