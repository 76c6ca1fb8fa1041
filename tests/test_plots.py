"""Figures 2 and 3: the plotted data is what was given, lines are least-squares fits, files are PNGs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cte_jax import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= 600 and h >= 400  # legible at 150 dpi
        pixels = np.asarray(im.convert("L"))
    # Something is drawn: a good share of non-white pixels.
    assert (pixels < 200).mean() > 0.01


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=2, max_size=12))
def test_least_squares_line_matches_polyfit(xy):
    x = np.array([p[0] for p in xy])
    y = np.array([p[1] for p in xy])
    fit = plots.least_squares_line(x, y)
    if np.ptp(x) <= 1e-6 * np.max(np.abs(x)):
        assert fit is None
        return
    if np.ptp(x) < 1e-6:  # polyfit itself is ill-conditioned here
        return
    slope, intercept = np.polyfit(x, y, 1)
    assert fit[0] == pytest.approx(slope, rel=1e-6, abs=1e-6)
    assert fit[1] == pytest.approx(intercept, rel=1e-6, abs=1e-6)


def test_least_squares_line_undefined():
    assert plots.least_squares_line([1.0], [2.0]) is None
    assert plots.least_squares_line([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]) is None
    assert plots.least_squares_line([1.0, float("nan"), 2.0], [0.0, 1.0, 2.0]) is None


def test_least_squares_line_ignores_rounding_differences():
    # 0.1 + 0.2 != 0.3 in binary floating point, and a float32 score read back as float64 differs
    # from the float64 value in the 8th digit: neither is a spread worth a line.
    assert 0.1 + 0.2 != 0.3
    assert plots.least_squares_line([0.3, 0.1 + 0.2, 0.3], [0.2, 0.5, 0.9]) is None
    assert plots.least_squares_line([float(np.float32(0.7)), 0.7], [0.1, 0.8]) is None
    # a small but real spread still gets its line
    slope, intercept = plots.least_squares_line([0.7, 0.7001], [0.1, 0.2])
    assert slope == pytest.approx(1000.0, rel=1e-6)
    assert intercept == pytest.approx(0.1 - 1000.0 * 0.7, rel=1e-6)


def test_figure2_one_point_per_model_and_line_per_target(tmp_path):
    rng = np.random.default_rng(0)
    a = [(f"model_{i}", float(rng.random()), float(rng.random())) for i in range(7)]
    b = [(f"model_{i}", float(rng.random()), float(rng.random())) for i in range(5)]
    b.append(("no_score", None, 0.5))  # a model without score is not drawn
    b.append(("nan_score", float("nan"), 0.5))
    out = plots.score_vs_performance({"target A": a, "target B": b}, tmp_path / "fig2.png",
                                     xlabel="CTE-NHD (dropout:0.1)", ylabel="F1", title="t",
                                     highlight=["model_3"])
    _check_png(tmp_path / "fig2.png")
    assert out["path"] == str(tmp_path / "fig2.png")
    sa, sb = out["series"]["target A"], out["series"]["target B"]
    assert sa["n_points"] == 7 and sb["n_points"] == 5
    assert sa["models"] == [p[0] for p in a]
    assert sa["x"] == [p[1] for p in a] and sa["y"] == [p[2] for p in a]
    slope, intercept = np.polyfit([p[1] for p in a], [p[2] for p in a], 1)
    assert sa["fit"]["slope"] == pytest.approx(slope) and sa["fit"]["intercept"] == pytest.approx(intercept)
    assert sa["highlighted"] == ["model_3"] and sb["highlighted"] == ["model_3"]


def test_figure2_single_point_has_no_line(tmp_path):
    out = plots.score_vs_performance({"t": [("m", 0.5, 0.5)]}, tmp_path / "one.png", xlabel="x", ylabel="y")
    assert out["series"]["t"]["n_points"] == 1 and out["series"]["t"]["fit"] is None
    _check_png(tmp_path / "one.png")


def test_figure3_one_series_per_strength(tmp_path):
    rng = np.random.default_rng(1)
    models = [f"m{i}" for i in range(6)]
    strengths = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5]
    perf = rng.random(6)
    points = {f"p={s:g}": [(m, float(perf[i] - s * rng.random()), float(perf[i])) for i, m in enumerate(models)]
              for s in strengths}
    out = plots.strength_sweep(points, tmp_path / "fig3.png", xlabel="CTE-NHD", ylabel="F1", title="sweep")
    _check_png(tmp_path / "fig3.png")
    assert list(out["series"]) == [f"p={s:g}" for s in strengths]
    for name, series in out["series"].items():
        assert series["n_points"] == 6 and series["models"] == models
        x = [p[1] for p in points[name]]
        assert series["fit"]["slope"] == pytest.approx(np.polyfit(x, perf, 1)[0])


def test_no_temporary_files_left(tmp_path):
    plots.score_vs_performance({"t": [("a", 0.1, 0.2), ("b", 0.3, 0.4)]}, tmp_path / "f.png", xlabel="x", ylabel="y")
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_highlight_per_target(tmp_path):
    pts = [("a", 0.1, 0.2), ("b", 0.3, 0.4)]
    out = plots.score_vs_performance({"t1": pts, "t2": pts}, tmp_path / "h.png", xlabel="x", ylabel="y",
                                     highlight={"t2": ["b"]})
    assert out["series"]["t1"]["highlighted"] == [] and out["series"]["t2"]["highlighted"] == ["b"]


def test_figure2_one_panel_per_target_when_many(tmp_path):
    rng = np.random.default_rng(2)
    pts = {f"t{i}": [(f"m{j}", float(rng.random()), float(rng.random())) for j in range(4)] for i in range(5)}
    pts["empty"] = [("m0", None, 0.5)]
    out = plots.score_vs_performance(pts, tmp_path / "p.png", xlabel="x", ylabel="y", title="t",
                                     highlight={"t3": ["m1"]}, notes={"t0": "S_rho 0.50"})
    _check_png(tmp_path / "p.png")
    assert out["layout"] == "panels"
    # Each target with points has an axes of its own, in the given order; the empty one has none.
    assert [out["series"][f"t{i}"]["panel"] for i in range(5)] == [0, 1, 2, 3, 4]
    assert out["series"]["empty"]["panel"] is None and out["series"]["empty"]["n_points"] == 0
    assert out["series"]["t3"]["highlighted"] == ["m1"]
    for i in range(5):  # the same points and fits as in one panel
        x, y = [p[1] for p in pts[f"t{i}"]], [p[2] for p in pts[f"t{i}"]]
        assert out["series"][f"t{i}"]["x"] == x
        assert out["series"][f"t{i}"]["fit"]["slope"] == pytest.approx(np.polyfit(x, y, 1)[0])
    few = plots.score_vs_performance({k: pts[k] for k in ("t0", "t1")}, tmp_path / "s.png", xlabel="x", ylabel="y")
    assert few["layout"] == "single" and {s["panel"] for s in few["series"].values()} == {0}
    forced = plots.score_vs_performance(pts, tmp_path / "f.png", xlabel="x", ylabel="y", panels=False)
    assert forced["layout"] == "single"
    assert plots._series_label("t0", 4, {"t0": "S_rho 0.50"}) == "t0 (n=4, S_rho 0.50)"
    assert plots._series_label("t1", 4, {"t0": "S_rho 0.50"}) == "t1 (n=4)"


def test_figure2_panel_tick_labels_do_not_touch(tmp_path, monkeypatch):
    # Scores of a nuclei target of our study span 0.974-0.991: with matplotlib's default locator a
    # 4-inch panel got 8 four-digit x labels that ran into each other. Inspect the figure as saved.
    seen = {}
    save = plots._save

    def keep(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            lo, hi = ax.get_xlim()
            labels = [t for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi and t.get_text()]
            boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
            seen[ax.get_title()] = (len(labels), [b.x0 - a.x1 for a, b in zip(boxes, boxes[1:])])
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    x = [0.9743, 0.9745, 0.9788, 0.9793, 0.9828, 0.9853, 0.9875, 0.9905, 0.9741]
    pts = {f"t{i}": [(f"m{j}", v, 0.7 + 0.01 * j) for j, v in enumerate(x)] for i in range(4)}
    plots.score_vs_performance(pts, tmp_path / "p.png", xlabel="x", ylabel="y")
    assert len(seen) == 4
    for n, gaps in seen.values():
        assert 2 <= n <= 6
        assert min(gaps) > 0  # pixels between neighbouring labels


# Three targets of our nuclei study (CTE-NHD, F1), where several models sit within 0.002 of each other.
CLUSTERED = {
    "fluo_256": [("coelho_nih3t3", 0.9233, 0.517), ("coelho_u2os", 0.9542, 0.731), ("fluo360", 0.9932, 0.908),
                 ("fluo360_narrow", 0.9836, 0.886), ("fluo_other", 0.9878, 0.887), ("fluo_u2os520", 0.9892, 0.875),
                 ("fluo_u2os520_noaug", 0.9932, 0.915), ("stage1_test", 0.9824, 0.847)],
    "coelho_u2os": [("coelho_nih3t3", 0.9875, 0.958), ("fluo256", 0.9787, 0.752), ("fluo256_deep", 0.9872, 0.823),
                    ("fluo360", 0.997, 0.937), ("fluo360_narrow", 0.9961, 0.95), ("fluo_other", 0.9972, 0.949),
                    ("fluo_u2os520", 0.9951, 0.929), ("fluo_u2os520_noaug", 0.9935, 0.924),
                    ("stage1_test", 0.985, 0.93)],
    "coelho_nih3t3": [("coelho_u2os", 0.9875, 0.958), ("fluo256", 0.9624, 0.585), ("fluo256_deep", 0.9649, 0.608),
                      ("fluo360", 0.9958, 0.914), ("fluo360_narrow", 0.9947, 0.936), ("fluo_other", 0.9947, 0.943),
                      ("fluo_u2os520", 0.9944, 0.916), ("fluo_u2os520_noaug", 0.9886, 0.878),
                      ("stage1_test", 0.9703, 0.814)],
}

# CTE-NHD (dropout 0.1) and F1 of the whole nuclei study (seven targets, twelve-model bank).
STUDY_NHD = {
    "dsb2018_fluo_256": [
        ("coelho_nih3t3", 0.9233, 0.517), ("coelho_u2os", 0.9542, 0.731), ("fluo360", 0.9932, 0.908),
        ("fluo360_deconv", 0.9907, 0.891), ("fluo360_deconv_s2", 0.9930, 0.899),
        ("fluo_other", 0.9878, 0.887), ("fluo_u2os520", 0.9892, 0.875),
        ("fluo_u2os520_noaug", 0.9932, 0.915), ("stage1_test", 0.9824, 0.847)
    ],
    "dsb2018_fluo_360": [
        ("coelho_nih3t3", 0.9865, 0.882), ("coelho_u2os", 0.9947, 0.913), ("fluo256", 0.9841, 0.773),
        ("fluo256_bn", 0.9687, 0.715), ("fluo256_bn_s2", 0.9767, 0.810), ("fluo_other", 0.9971, 0.970),
        ("fluo_u2os520", 0.9980, 0.971), ("fluo_u2os520_noaug", 0.9980, 0.972),
        ("stage1_test", 0.9779, 0.880)
    ],
    "dsb2018_fluo_u2os_520": [
        ("coelho_nih3t3", 0.9812, 0.790), ("coelho_u2os", 0.9913, 0.858), ("fluo256", 0.9936, 0.914),
        ("fluo256_bn", 0.9853, 0.897), ("fluo256_bn_s2", 0.9883, 0.908), ("fluo360", 0.9971, 0.965),
        ("fluo360_deconv", 0.9973, 0.962), ("fluo360_deconv_s2", 0.9976, 0.964),
        ("fluo_other", 0.9955, 0.959), ("stage1_test", 0.9897, 0.904)
    ],
    "dsb2018_fluo_other": [
        ("coelho_nih3t3", 0.9743, 0.697), ("coelho_u2os", 0.9795, 0.801), ("fluo256", 0.9828, 0.749),
        ("fluo256_bn", 0.9618, 0.613), ("fluo256_bn_s2", 0.9716, 0.738), ("fluo360", 0.9875, 0.804),
        ("fluo360_deconv", 0.9878, 0.825), ("fluo360_deconv_s2", 0.9906, 0.831),
        ("fluo_u2os520", 0.9853, 0.848), ("fluo_u2os520_noaug", 0.9788, 0.720),
        ("stage1_test", 0.9740, 0.794)
    ],
    "dsb2018_stage1_test": [
        ("coelho_nih3t3", 0.9645, 0.582), ("coelho_u2os", 0.9832, 0.747), ("fluo256", 0.9878, 0.806),
        ("fluo256_bn", 0.9731, 0.749), ("fluo256_bn_s2", 0.9810, 0.843), ("fluo360", 0.9936, 0.804),
        ("fluo360_deconv", 0.9924, 0.835), ("fluo360_deconv_s2", 0.9941, 0.830),
        ("fluo_other", 0.9922, 0.866), ("fluo_u2os520", 0.9901, 0.800),
        ("fluo_u2os520_noaug", 0.9929, 0.834)
    ],
    "coelho2009_u2os": [
        ("coelho_nih3t3", 0.9875, 0.958), ("fluo256", 0.9787, 0.752), ("fluo256_bn", 0.9592, 0.507),
        ("fluo256_bn_s2", 0.9650, 0.712), ("fluo360", 0.9970, 0.937),
        ("fluo360_deconv", 0.9980, 0.949), ("fluo360_deconv_s2", 0.9977, 0.945),
        ("fluo_other", 0.9972, 0.949), ("fluo_u2os520", 0.9951, 0.929),
        ("fluo_u2os520_noaug", 0.9935, 0.924), ("stage1_test", 0.9850, 0.930)
    ],
    "coelho2009_nih3t3": [
        ("coelho_u2os", 0.9875, 0.958), ("fluo256", 0.9624, 0.585), ("fluo256_bn", 0.9338, 0.284),
        ("fluo256_bn_s2", 0.9277, 0.510), ("fluo360", 0.9958, 0.914),
        ("fluo360_deconv", 0.9962, 0.929), ("fluo360_deconv_s2", 0.9952, 0.931),
        ("fluo_other", 0.9947, 0.943), ("fluo_u2os520", 0.9944, 0.916),
        ("fluo_u2os520_noaug", 0.9886, 0.878), ("stage1_test", 0.9703, 0.814)
    ],
}
# Two of its targets: coelho2009_u2os (eleven candidates, six of them within 0.005 CTE-NHD), and
# coelho2009_nih3t3, where fluo256_bn is flagged.
CLUSTERED_11 = {"coelho_u2os": STUDY_NHD["coelho2009_u2os"]}
NIH3T3_11 = STUDY_NHD["coelho2009_nih3t3"]


def _label_geometry(fig):
    """Per axes, in pixels: its frame, each label's text box, its point, the leader lines, and
    the legend's box (None without a legend)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        texts = [c for c in ax.get_children() if c.__class__.__name__ == "Annotation"]
        boxes = [Text.get_window_extent(t, r) for t in texts]  # the text alone
        dots = [ax.transData.transform(t.xy) for t in texts]
        leaders = [ax.transData.transform(np.column_stack(ln.get_data())) for ln in ax.get_lines()
                   if ln.get_gid() == plots.LEADER_GID]
        legend = ax.get_legend().get_window_extent(r) if ax.get_legend() is not None else None
        out.append((ax.get_window_extent(r), boxes, dots, leaders, legend))
    return out


@pytest.fixture
def seen(monkeypatch):
    """The label geometry of every figure saved during the test (see _label_geometry)."""
    out = []
    save = plots._save

    def keep(fig, path):
        out.extend(_label_geometry(fig))
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return out


@pytest.mark.parametrize("case", ["panels", "single", "eleven"])
def test_point_labels_do_not_overlap(tmp_path, seen, case):
    # With fixed alternating offsets, names in these clusters ran into each other. Measure the
    # saved figure: no two labels of an axes overlap, no label covers a point of its axes, and
    # every label stays inside its axes.
    pts = {"panels": CLUSTERED, "single": {"fluo_256": CLUSTERED["fluo_256"]}, "eleven": CLUSTERED_11}[case]
    plots.score_vs_performance(pts, tmp_path / "p.png", xlabel="x", ylabel="y", panels=case == "panels")
    assert sum(len(b) for _, b, _, _, _ in seen) == sum(len(v) for v in pts.values())
    for frame, boxes, dots, _, _ in seen:
        for i, a in enumerate(boxes):
            assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
            assert not any(a.overlaps(b) for b in boxes[i + 1:])
            assert not any(a.x0 < x < a.x1 and a.y0 < y < a.y1 for x, y in dots)


def test_point_labels_keep_off_the_legend(tmp_path, seen):
    # A panel with a flagged model has a legend; names must not be placed under it.
    pts = {**CLUSTERED_11, "fluo_256": CLUSTERED["fluo_256"], "coelho_nih3t3": NIH3T3_11}
    flagged = {t: [v[0][0], v[-1][0]] for t, v in pts.items()}
    flagged["coelho_nih3t3"] = ["fluo256_bn"]  # as in the study
    plots.score_vs_performance(pts, tmp_path / "p.png", xlabel="x", ylabel="y", panels=True, highlight=flagged)
    with_legend = [(boxes, legend) for _, boxes, _, _, legend in seen if legend is not None]
    assert with_legend
    assert not [b for boxes, legend in with_legend for b in boxes if b.overlaps(legend)]


def test_legend_stays_where_the_labels_were_placed(tmp_path, monkeypatch):
    # Labels are placed at the screen resolution, the PNG is drawn at 150 dpi. A "best" legend
    # was placed anew at 150 dpi: in the study's coelho2009_nih3t3 panel it moved from the upper
    # left to the upper middle, onto coelho_u2os's name. Its place must not depend on the dpi.
    where, save = [], plots._save

    def keep(fig, path):
        for dpi in (fig.dpi, 150):
            fig.set_dpi(dpi)
            fig.canvas.draw()
            r = fig.canvas.get_renderer()
            where.append([tuple(ax.transAxes.inverted().transform(ax.get_legend().get_window_extent(r).p0))
                          for ax in fig.axes if ax.get_legend() is not None])
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    plots.score_vs_performance(STUDY_NHD, tmp_path / "p.png", xlabel="CTE-NHD", ylabel="F1", title="CTE-NHD vs F1",
                               highlight={"coelho2009_nih3t3": ["fluo256_bn"]},
                               notes={t: "S_rho 0.00" for t in STUDY_NHD})
    before, after = where
    assert len(before) == 1
    np.testing.assert_allclose(before, after, atol=0.01)


def test_far_labels_get_a_leader_line_to_their_point(tmp_path, seen):
    # In a cluster some names can only be placed away from their point; a thin line then joins
    # each such name to its point, so that which name is whose stays readable. Near names get none.
    plots.score_vs_performance(CLUSTERED_11, tmp_path / "p.png", xlabel="x", ylabel="y")
    ((_, boxes, dots, leaders, _),) = seen

    def gap(box, x, y):  # pixels from a point to a text box
        return float(np.hypot(max(box.x0 - x, 0, x - box.x1), max(box.y0 - y, 0, y - box.y1)))

    far = [(box, d) for box, d in zip(boxes, dots) if gap(box, *d) > 12]
    assert far, "the cluster should push some names away from their points"
    assert len(leaders) == len(far)
    for box, (x, y) in far:
        # One leader starts within a marker's reach of this point and ends on this name's box.
        assert any(np.hypot(*(ln[0] - (x, y))) < 8 and gap(box, *ln[1]) < 1.5 for ln in leaders)
