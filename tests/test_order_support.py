"""order_support: the paired bootstrap behind `rank`'s "vs next" column, against scipy.stats.bootstrap."""

import numpy as np
import pytest
from scipy import stats

from cte_jax.ranking import order_support


def _scipy_share(a, b, agg, n_resamples, seed):
    """Share of scipy's paired bootstrap distribution of agg(a) - agg(b) above 0 (ties half)."""
    res = stats.bootstrap((a, b), lambda x, y, axis: agg(x, axis=axis) - agg(y, axis=axis), paired=True,
                          vectorized=True, n_resamples=n_resamples, method="percentile",
                          random_state=np.random.default_rng(seed))
    d = res.bootstrap_distribution
    return float(np.mean(d > 0) + 0.5 * np.mean(d == 0))


@pytest.mark.parametrize("aggregate,agg", [("median", np.median), ("mean", np.mean)])
@pytest.mark.parametrize("shift", [0.0, 0.004, 0.01])
def test_share_matches_scipy_paired_bootstrap(aggregate, agg, shift):
    rng = np.random.default_rng(7)
    # Consistency-like scores: near 1, skewed, the two models correlated over images.
    base = 1 - rng.gamma(2.0, 0.01, size=60)
    a = np.clip(base + shift + rng.normal(0, 0.01, 60), 0, 1)
    b = np.clip(base + rng.normal(0, 0.01, 60), 0, 1)
    ours = order_support(a, b, aggregate=aggregate, n_resamples=4000, seed=1)
    want = _scipy_share(a, b, agg, 4000, 2)
    # Two independent Monte Carlo estimates of one probability: sd <= 0.008 each at 4000 draws.
    assert ours == pytest.approx(want, abs=0.03)


def test_shares_of_the_two_orders_add_to_one_and_clear_cases():
    rng = np.random.default_rng(3)
    a, b = rng.random(25), rng.random(25)
    for aggregate in ("median", "mean"):
        assert order_support(a, b, aggregate=aggregate, seed=5) + order_support(b, a, aggregate=aggregate, seed=5) == 1
        assert order_support(a, a, aggregate=aggregate) == 0.5
        assert order_support(a + 0.01, a, aggregate=aggregate) == 1.0
        assert order_support(a, a + 0.01, aggregate=aggregate) == 0.0
    assert order_support(np.array([]), np.array([])) is None


def test_chunking_does_not_change_the_share(monkeypatch):
    # Draws held in memory in many small chunks or all at once: the same share.
    from cte_jax import ranking

    rng = np.random.default_rng(0)
    a, b = rng.random(500), rng.random(500) + 0.02
    whole = order_support(a, b, n_resamples=300, seed=4)
    monkeypatch.setattr(ranking, "_CHUNK_DRAWS", 7 * 500 + 3)  # chunks of 7 resamples, the last of 6
    assert order_support(a, b, n_resamples=300, seed=4) == whole


def test_large_targets_draw_fewer_resamples(monkeypatch):
    from cte_jax import ranking

    rng = np.random.default_rng(1)
    a, b = rng.random(1000), rng.random(1000) + 0.01
    want = {k: order_support(a, b, n_resamples=k, seed=2) for k in (300, ranking.ORDER_MIN_RESAMPLES)}
    assert want[300] != order_support(a, b, n_resamples=1000, seed=2)
    # A budget of 300 resamples of 1000 units: the first 300 of the same draws.
    monkeypatch.setattr(ranking, "ORDER_MAX_DRAWS", 1000 * 300)
    assert order_support(a, b, n_resamples=1000, seed=2) == want[300]
    # However large the target, never fewer than ORDER_MIN_RESAMPLES.
    monkeypatch.setattr(ranking, "ORDER_MAX_DRAWS", 10)
    assert order_support(a, b, n_resamples=1000, seed=2) == want[ranking.ORDER_MIN_RESAMPLES]


@pytest.mark.parametrize("aggregate", ["median", "mean"])
@pytest.mark.parametrize("n", [12, 13])
def test_tiles_of_one_image_are_drawn_together(aggregate, n):
    """A resample draws images, each with all its tiles (drawing tiles independently would not
    pass either check)."""
    rng = np.random.default_rng(11)
    a, b = rng.random(n), rng.random(n) + 0.05
    # Every image cut into 3 tiles that repeat its score: exactly the share of the untiled images.
    images = np.repeat(np.arange(n) * 10 + 5, 3)  # any image ids
    want = order_support(a, b, aggregate=aggregate, n_resamples=500, seed=6)
    assert order_support(np.repeat(a, 3), np.repeat(b, 3), images=images, aggregate=aggregate, n_resamples=500,
                         seed=6) == pytest.approx(want, abs=1e-12)
    # 1-3 tiles per image, each its own score: against the expanded draw built by hand, draw by draw.
    images = np.repeat(np.arange(n) * 10 + 5, 1 + np.arange(n) % 3)
    ta, tb = rng.random(len(images)), rng.random(len(images)) + 0.02
    agg = np.median if aggregate == "median" else np.mean
    draws = np.random.default_rng(8).integers(0, n, size=(300, n), dtype=np.int32)
    wins = 0.0
    for row in draws:
        units = np.concatenate([np.nonzero(images == np.arange(n)[i] * 10 + 5)[0] for i in row])
        sa, sb = agg(ta[units]), agg(tb[units])
        wins += (sa > sb) + 0.5 * (sa == sb)
    got = order_support(ta, tb, images=images, aggregate=aggregate, n_resamples=300, seed=8)
    assert got == pytest.approx(wins / 300, abs=1e-12)


def test_one_image_has_no_order_support():
    # 30 tiles of one image are not 30 draws of the target: nothing to resample.
    rng = np.random.default_rng(2)
    assert order_support(rng.random(30), rng.random(30), images=np.zeros(30, int)) is None
    assert order_support(np.array([0.9]), np.array([0.8])) is None
