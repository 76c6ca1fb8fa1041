import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cte_jax.arch import UNetSpec
from cte_jax.networks import UNet, abstract_variables, check_size, init_variables, resize


@pytest.mark.parametrize("up,order", [("nearest", "cr"), ("bilinear", "gcr"), ("deconv", "bcl"), ("bilinear_conv", "ice")])
def test_encode_then_decode_equals_call(up, order):
    spec = UNetSpec(features=(8, 16, 32), layer_order=order, upsampling=up, num_groups=4)
    v = init_variables(spec, jax.random.key(0))
    shape = (2, 32, 48, 1) if up == "bilinear_conv" else (2, 35, 29, 1)
    x = jax.random.normal(jax.random.key(1), shape)
    net = UNet(spec)
    y = net.apply(v, x)
    feats = net.apply(v, x, method=UNet.encode)
    assert [f.shape[-1] for f in feats] == [8, 16, 32]
    assert y.shape == shape
    np.testing.assert_array_equal(y, net.apply(v, feats, method=UNet.decode))
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_spec_round_trip_and_unknown_keys():
    spec = UNetSpec(features=(4, 8, 16, 32), layer_order="gcr", upsampling="deconv", final_activation=None)
    assert UNetSpec.from_json(spec.to_json()) == spec
    d = json.loads(spec.to_json())
    d["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        UNetSpec.from_dict(d)


@pytest.mark.parametrize("kwargs", [dict(features=(8,)), dict(layer_order="rr"), dict(layer_order="cgbr"),
                                    dict(upsampling="cubic"), dict(features=(6, 12), layer_order="gcr", num_groups=4)])
def test_spec_rejects(kwargs):
    with pytest.raises(ValueError):
        UNetSpec(**kwargs)


def test_pytorch_3dunet_channel_rule():
    # pytorch-3dunet DoubleConv(encoder): mid = max(out // 2, in); decoder in = deep + skip
    spec = UNetSpec(in_channels=1, features=(32, 64, 128), encoder_mid="half")
    assert spec.encoder_channels(0) == (1, 16, 32)
    assert spec.encoder_channels(1) == (32, 32, 64)
    assert spec.decoder_channels(0) == (192, 64)
    params = abstract_variables(spec)["params"]
    assert params["encoders_0"]["unit_0"]["conv"]["kernel"].shape == (3, 3, 1, 16)
    assert params["decoders_0"]["unit_0"]["conv"]["kernel"].shape == (3, 3, 192, 64)


def test_group_norm_falls_back_to_one_group():
    spec = UNetSpec(features=(8, 16, 32), layer_order="gcr", num_groups=8)
    assert spec.group_count(4) == 1 and spec.group_count(16) == 8
    with pytest.raises(ValueError, match="12 channels"):  # decoder input 8 + 4 = 12 is not divisible by 8
        UNetSpec(features=(4, 8, 16), layer_order="gcr", num_groups=8)


def test_check_size():
    spec = UNetSpec(features=(8, 16, 32, 64), upsampling="bilinear_conv")
    check_size(spec, 64, 40)
    with pytest.raises(ValueError, match="multiples of 8"):
        check_size(spec, 60, 40)
    with pytest.raises(ValueError, match="smaller"):
        check_size(UNetSpec(features=(8, 16, 32, 64)), 4, 40)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("sizes", [((3, 5), (7, 11)), ((4, 4), (8, 8)), ((2, 2), (5, 4))])
def test_resize_matches_torch(mode, sizes):
    torch = pytest.importorskip("torch")
    (h, w), out = sizes
    x = np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)
    kw = {} if mode == "nearest" else {"align_corners": False}
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out, mode=mode, **kw)
    np.testing.assert_allclose(resize(jnp.asarray(x), out, mode), ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize("size", [(5, 9), (6, 10), (5, 10)])
def test_deconv_matches_torch_conv_transpose(size):
    torch = pytest.importorskip("torch")
    from cte_jax.networks import Upsample

    spec = UNetSpec(features=(4, 6), upsampling="deconv")
    x = np.random.default_rng(1).normal(size=(1, 3, 5, 6)).astype(np.float32)
    conv = torch.nn.ConvTranspose2d(6, 4, kernel_size=3, stride=2, padding=1)
    with torch.no_grad():
        ref = conv(torch.from_numpy(x).permute(0, 3, 1, 2), output_size=size).permute(0, 2, 3, 1).numpy()
    w = conv.weight.detach().numpy()  # (in, out, kh, kw)
    kernel = np.transpose(w[:, :, ::-1, ::-1], (2, 3, 0, 1))
    out = Upsample(spec, 4).apply({"params": {"kernel": kernel, "bias": conv.bias.detach().numpy()}}, jnp.asarray(x), size)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def _group_norm_numpy(x, groups, scale, bias, eps):
    """torch.nn.GroupNorm on (b h w c) in float64: mean and biased variance per (image, group)."""
    b, h, w, c = x.shape
    g = x.astype(np.float64).reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


@pytest.mark.parametrize("shape,groups", [((3, 17, 9, 16), 8), ((2, 8, 8, 6), 3), ((1, 5, 5, 4), 1)])
def test_group_norm_matches_numpy(shape, groups):
    from cte_jax.networks import GroupNorm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)  # offset: a naive E[x^2]-E[x]^2 would drift
    scale, bias = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    v = {"params": {"scale": scale.astype(np.float32), "bias": bias.astype(np.float32)}}
    got = GroupNorm(groups, epsilon=1e-5).apply(v, x)
    np.testing.assert_allclose(got, _group_norm_numpy(x, groups, scale, bias, 1e-5), atol=2e-5)


SHARED_SPECS = [
    dict(layer_order="gcr", num_groups=4),  # groups straddle skip and upsampled channels
    dict(layer_order="gcr", num_groups=2),  # no group lies wholly in the skip
    dict(layer_order="bcr"),
    dict(layer_order="cr"),
    dict(layer_order="icl", skip_first=False, upsampling="bilinear_conv"),  # torch-em layout
    dict(layer_order="gcr", num_groups=4, group_rule="min", skip_first=False, upsampling="deconv_concat"),
    dict(layer_order="bcr", upsampling="deconv"),  # joined by sum: nothing to share
]


@pytest.mark.parametrize("kw", SHARED_SPECS)
def test_static_skip_channels_are_those_the_bottleneck_cannot_reach(kw):
    """The channels named static must be exactly the first conv inputs that stay the same when
    only the upsampled half of the decoder input changes: checked by changing it."""
    from cte_jax.networks import ConvUnit, static_skip_channels

    spec = UNetSpec(features=(8, 16, 32), **kw)
    for step in range(spec.levels - 1):
        cin, cout = spec.decoder_channels(step)
        n_skip = spec.features[spec.levels - 2 - step]
        rng = np.random.default_rng(step)
        skip = rng.standard_normal((2, 8, 8, n_skip)).astype(np.float32)
        ups = [rng.standard_normal((2, 8, 8, cin - n_skip)).astype(np.float32) for _ in range(2)]
        join = (lambda u: np.concatenate([skip, u], -1)) if spec.skip_first else (lambda u: np.concatenate([u, skip], -1))
        pre_spec = UNetSpec(features=spec.features, layer_order=spec.layer_order[:spec.layer_order.index("c")] + "c",
                            num_groups=spec.num_groups, group_rule=spec.group_rule)
        unit = ConvUnit(pre_spec, cin, cout)
        v = unit.init(jax.random.key(0), join(ups[0]))
        seen = []  # what reaches the convolution, for each upsampled half
        from cte_jax import networks

        def spy(self, x, static=None, partial=None, up=None):
            seen.append(np.asarray(x))
            return x

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(networks.Conv3x3, "__call__", spy)
            for u in ups:
                unit.apply(v, join(u))
        same = np.all(seen[0] == seen[1], axis=(0, 1, 2))
        got = static_skip_channels(spec, step)
        if spec.upsampling == "deconv":
            assert got is None
            continue
        want = list(np.flatnonzero(same))
        assert (list(range(*got)) if got else []) == want


@pytest.mark.parametrize("kw", SHARED_SPECS)
def test_decode_shared_equals_a_full_decode_of_the_perturbed_bottleneck(kw):
    spec = UNetSpec(features=(8, 16, 32), **kw)
    v = init_variables(spec, jax.random.key(0))
    if "batch_stats" in v:  # non-trivial inference statistics
        v["batch_stats"] = jax.tree.map(lambda a: a + 0.3, v["batch_stats"])
    net = UNet(spec)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
    feats = net.apply(v, x, method=UNet.encode)
    clean, partials = net.apply(v, feats, method=UNet.decode_shared)
    np.testing.assert_allclose(clean, net.apply(v, feats, method=UNet.decode_logits), atol=2e-5)
    dropped = feats[-1] * (jax.random.uniform(jax.random.key(2), feats[-1].shape[:1] + (1, 1) + feats[-1].shape[-1:]) > 0.4)
    pert_feats = list(feats[:-1]) + [dropped]
    got, _ = net.apply(v, pert_feats, partials, method=UNet.decode_shared)
    want = net.apply(v, pert_feats, method=UNet.decode_logits)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert float(jnp.abs(want - clean).max()) > 1e-2  # the perturbation did change the output


def _numpy_conv3x3(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """'Same' 3x3 cross-correlation with zero padding, as torch and lax define it (b h w c)."""
    h, w = x.shape[1:3]
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(xp[:, i:i + h, j:j + w] @ k[i, j].astype(np.float64) for i in range(3) for j in range(3))


@pytest.mark.parametrize("cout", [1, 8])
def test_one_channel_conv_equals_lax_conv(cout):
    from cte_jax.networks import Conv3x3

    rng = np.random.default_rng(cout)
    x = jnp.asarray(rng.normal(size=(2, 9, 13, 1)).astype(np.float32))
    conv = Conv3x3(cout)
    v = conv.init(jax.random.key(0), x)
    v = {"params": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 1, cout)).astype(np.float32)),
                    "bias": jnp.asarray(rng.normal(size=(cout,)).astype(np.float32))}}
    want = jax.lax.conv_general_dilated(x, v["params"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + v["params"]["bias"]
    # A numpy oracle of the borders: zero padding, cross-correlation as torch and lax define it.
    oracle = _numpy_conv3x3(np.asarray(x), np.asarray(v["params"]["kernel"])) + np.asarray(v["params"]["bias"])
    got = conv.apply(v, x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, oracle, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 8, 8, 16), (1, 1, 1, 2), (3, 4, 1, 5)])
def test_conv3x3_upsampled_equals_conv_of_the_upsampled_image(shape):
    """The four-phase low-resolution form against NumPy: repeat every pixel into a 2x2 block,
    then convolve. Odd sizes and one-pixel sides reach every border case."""
    from cte_jax.networks import conv3x3_upsampled

    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    k = rng.standard_normal((3, 3, shape[-1], 4)).astype(np.float32)
    want = _numpy_conv3x3(x.repeat(2, axis=1).repeat(2, axis=2), k)
    got = np.asarray(jax.jit(conv3x3_upsampled)(x, k))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_decoder_convolves_upsampled_channels_at_low_resolution():
    """A decoder's first convolution takes its nearest-2x upsampled channels at the
    low resolution (no full-size convolution over them), and the decoder still equals the same
    layers applied the plain way, in NumPy, on the upsampled input."""
    from cte_jax import networks

    spec = UNetSpec(features=(4, 8), layer_order="cr")
    v = init_variables(spec, jax.random.key(3))
    net = UNet(spec)
    x = jax.random.normal(jax.random.key(4), (1, 8, 10, 1))
    feats = net.apply(v, x, method=UNet.encode)
    calls = []
    real = networks.conv3x3_upsampled

    def counting(a, k):
        calls.append(a.shape)
        return real(a, k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(networks, "conv3x3_upsampled", counting)
        got = np.asarray(net.apply(v, feats, method=UNet.decode_logits))
    assert calls == [(1, 4, 5, 8)]  # the bottleneck's 8 channels at 4x5, not 8x10
    p = v["params"]
    skip, deep = np.asarray(feats[0]), np.asarray(feats[1])
    joined = np.concatenate([skip, deep.repeat(2, 1).repeat(2, 2)], -1)  # pytorch-3dunet: skip first
    d = p["decoders_0"]
    y = np.maximum(_numpy_conv3x3(joined, np.asarray(d["unit_0"]["conv"]["kernel"])) + d["unit_0"]["conv"]["bias"], 0)
    y = np.maximum(_numpy_conv3x3(y, np.asarray(d["unit_1"]["conv"]["kernel"])) + d["unit_1"]["conv"]["bias"], 0)
    want = y @ np.asarray(p["final"]["kernel"])[0, 0] + np.asarray(p["final"]["bias"])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_training_gradients_through_the_low_resolution_convolution():
    """Training uses the low-resolution form too: it is the same function of parameters and input,
    so its gradients must equal those of the plain form, written here with lax.conv on the
    upsampled input (an independent path: no phase kernels, no strided sampling)."""
    from cte_jax.networks import conv3x3_upsampled, resize

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
    t = jnp.asarray(rng.standard_normal((2, 10, 12, 4)).astype(np.float32))

    def plain(x, k):
        u = resize(x, (10, 12), "nearest")
        return jax.lax.conv_general_dilated(u, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(f):
        return lambda x, k: jnp.sum(jnp.tanh(f(x, k)) * t)

    got = jax.grad(loss(conv3x3_upsampled), argnums=(0, 1))(x, k)
    want = jax.grad(loss(plain), argnums=(0, 1))(x, k)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
