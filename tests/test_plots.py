"""Plots of Attribution results: the drawn data equals matrices built by hand."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from atp_nnsight import plots  # noqa: E402
from atp_nnsight.results import Attribution  # noqa: E402

LAYERS = (0, 1, 2)
N_HEADS, N_KV, SEQ = 4, 2, 3


def node_table(per_position: bool, layers=LAYERS, kinds=(("head", N_HEADS), ("k", N_KV))):
    rows = [
        (kind, layer, unit, pos)
        for kind, units in kinds
        for layer in layers
        for unit in range(units)
        for pos in (range(SEQ) if per_position else [None])
    ]
    nodes = pd.DataFrame(rows, columns=["kind", "layer", "index", "position"])
    nodes["position"] = pd.array(nodes["position"], dtype="Int64")
    return nodes


def make(
    per_position: bool = False,
    *,
    method: str = "atp*",
    signed: bool = True,
    layers=LAYERS,
    values: np.ndarray | None = None,
    n_pairs: int = 2,
) -> Attribution:
    """A result whose per-pair values are known: by default ``value = 100 l + 10 u + p``."""
    nodes = node_table(per_position, layers)
    if values is None:
        pos = nodes["position"].fillna(0).to_numpy(dtype=float)
        values = 100.0 * nodes["layer"] + 10.0 * nodes["index"] + pos
        values = np.asarray(values, dtype=float) * np.where(nodes["kind"] == "k", -1.0, 1.0)
    per_pair = np.stack([values * (1 + 0.5 * p) for p in range(n_pairs)])
    mean = per_pair.mean(0)
    return Attribution(
        nodes=nodes,
        scores=np.abs(per_pair).mean(0),
        per_pair=per_pair,
        mean_effect=mean if signed else None,
        method=method,
        direction="noising",
        metric="logit-diff",
        model="tiny/test",
        cost=4.0 * n_pairs,
        pairs=[{"clean": "a b", "noise": "c d", "clean_target": " x", "noise_target": " y"}]
        * n_pairs,
        metadata={
            "kinds": ["head", "k"],
            "layers": list(layers),
            "per_position": per_position,
            "seq_len": SEQ if per_position else None,
        },
    )


def image_array(fig: Figure, ax_index: int = 0) -> np.ndarray:
    arr = fig.axes[ax_index].images[0].get_array()
    return np.ma.filled(arr.astype(float), np.nan)


def tick_labels(ax, axis: str = "x") -> list[str]:
    return [t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")()]


def render(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def no_pyplot_leaks():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before, "plots must not leave figures open in pyplot"


# ---- head heatmap ------------------------------------------------------------------------------
def test_head_heatmap_draws_the_layer_by_head_score_matrix():
    r = make()
    fig = plots.head_heatmap(r)
    assert isinstance(fig, Figure)
    expected = np.array([[1.25 * (100 * la + 10 * h) for h in range(N_HEADS)] for la in LAYERS])
    np.testing.assert_allclose(image_array(fig), expected)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "head" and ax.get_ylabel() == "layer"
    assert tick_labels(ax, "y") == ["0", "1", "2"]
    assert tick_labels(ax, "x") == ["0", "1", "2", "3"]
    assert len(fig.axes) == 2, "a colorbar"
    assert "score" in fig.axes[1].get_ylabel()
    im = ax.images[0]
    assert im.get_cmap().name.startswith(plots.SEQUENTIAL_CMAP)
    assert im.norm.vmin == 0 and im.norm.vmax == pytest.approx(expected.max())
    assert "AtP*" in ax.get_title() and "head" in ax.get_title()
    assert render(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_head_heatmap_signed_values_use_a_diverging_map_centred_at_zero():
    r = make()
    fig = plots.head_heatmap(r, kind="k", value="mean_effect")
    expected = np.array([[-1.25 * (100 * la + 10 * u) for u in range(N_KV)] for la in LAYERS])
    np.testing.assert_allclose(image_array(fig), expected)
    im = fig.axes[0].images[0]
    assert im.get_cmap().name.startswith(plots.DIVERGING_CMAP)
    assert im.norm.vmin == pytest.approx(-im.norm.vmax)
    assert im.norm.vmax == pytest.approx(np.abs(expected).max())
    assert fig.axes[0].get_xlabel() == "KV head"


def test_head_heatmap_per_position_sums_abs_over_positions_and_says_so():
    r = make(per_position=True)
    # give position 1 negative values: |.| must be summed, not the signed values
    r.mean_effect = np.where(r.nodes["position"] == 1, -r.mean_effect, r.mean_effect)
    fig = plots.head_heatmap(r, value="mean_effect")
    base = np.array([[100 * la + 10 * h for h in range(N_HEADS)] for la in LAYERS], float)
    expected = 1.25 * sum(base + p for p in range(SEQ))
    np.testing.assert_allclose(image_array(fig), expected)
    title = fig.axes[0].get_title()
    assert "over positions" in title
    assert "over positions" in fig.axes[1].get_ylabel()
    # summed |.| is unsigned: sequential map from 0
    assert fig.axes[0].images[0].get_cmap().name.startswith(plots.SEQUENTIAL_CMAP)


def test_head_heatmap_nan_cells_are_masked_and_layers_follow_the_result():
    r = make(layers=(2, 5))
    scores = r.scores.copy()
    i = int(np.flatnonzero((r.nodes["kind"] == "head") & (r.nodes["layer"] == 5))[1])
    scores[i] = np.nan
    fig = plots.head_heatmap(r, value=scores)
    arr = fig.axes[0].images[0].get_array()
    assert arr.shape == (2, N_HEADS)
    assert arr.mask[1, 1] and arr.mask.sum() == 1
    assert tick_labels(fig.axes[0], "y") == ["2", "5"]
    render(fig)


def test_head_heatmap_verified_values_grey_out_unverified_nodes():
    r = make()
    head = np.flatnonzero(r.nodes["kind"] == "head")
    order = head[[5, 0]]
    r.metadata["verified"] = {"order": order.tolist(), "mean_effect": [7.0, -3.0]}
    mat, layers, _ = plots.layer_unit_matrix(r, "head", "verified")
    assert np.isfinite(mat).sum() == 2
    assert mat[1, 1] == 7.0 and mat[0, 0] == -3.0  # head index 5 = layer 1, head 1
    fig = plots.head_heatmap(r, value="verified")
    np.testing.assert_array_equal(np.isnan(image_array(fig)), np.isnan(mat))


def test_head_heatmap_draws_into_a_given_axes():
    fig0, (a, b) = plt.subplots(1, 2)
    try:
        out = plots.head_heatmap(make(), ax=b, title="mine")
        assert out is fig0
        assert b.get_title() == "mine" and len(b.images) == 1 and not a.images
    finally:
        plt.close(fig0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "heads"}, "unknown node kind 'heads'"),
        ({"kind": "neuron"}, "no 'neuron' nodes"),
        ({"value": "effect"}, "unknown value 'effect'"),
        ({"value": np.zeros(3)}, "one per node"),
        ({"value": "verified"}, "no verified nodes"),
    ],
)
def test_head_heatmap_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plots.head_heatmap(make(), **kwargs)


def test_unsigned_result_has_no_mean_effect_plot():
    with pytest.raises(ValueError, match="unsigned"):
        plots.head_heatmap(make(method="atp+gd", signed=False), value="mean_effect")


# ---- position heatmap --------------------------------------------------------------------------
def test_position_heatmap_max_keeps_the_sign_of_the_largest_unit():
    r = make(per_position=True)
    # head 2 of layer 1 at position 2 gets a large negative effect
    sel = (
        (r.nodes["kind"] == "head")
        & (r.nodes["layer"] == 1)
        & (r.nodes["index"] == 2)
        & (r.nodes["position"] == 2)
    ).to_numpy()
    r.mean_effect = r.mean_effect.copy()
    r.mean_effect[sel] = -1000.0
    fig = plots.position_heatmap(r, "head", value="mean_effect")
    expected = np.array(
        [[1.25 * (100 * la + 10 * (N_HEADS - 1) + p) for p in range(SEQ)] for la in LAYERS]
    )
    expected[1, 2] = -1000.0
    np.testing.assert_allclose(image_array(fig), expected)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "layer" and "position" in ax.get_xlabel()
    assert tick_labels(ax) == ["0", "1", "2"]
    assert fig.axes[0].images[0].norm.vmin == pytest.approx(-1000.0)


def test_position_heatmap_sum_and_token_labels():
    r = make(per_position=True)
    fig = plots.position_heatmap(r, "k", tokens=["<s>", " $5", "\n"], agg="sum")
    expected = np.array(
        [
            [1.25 * sum(100 * la + 10 * u + p for u in range(N_KV)) for p in range(SEQ)]
            for la in LAYERS
        ]
    )
    np.testing.assert_allclose(image_array(fig), expected)
    # "$" must not start mathtext; newlines are shown escaped
    assert tick_labels(fig.axes[0]) == ["<s>", r" \$5", "\\n"]
    assert "Σ over KV heads" in fig.axes[0].get_title()
    render(fig)


def test_position_heatmap_nan_cells():
    r = make(per_position=True)
    scores = r.scores.copy()
    scores[(r.nodes["layer"] == 0).to_numpy() & (r.nodes["position"] == 0).to_numpy()] = np.nan
    mat, _ = plots.layer_position_matrix(r, "head", scores)
    assert np.isnan(mat[0, 0]) and np.isfinite(mat).sum() == mat.size - 1
    fig = plots.position_heatmap(r, "head", value=scores)
    assert fig.axes[0].images[0].get_array().mask[0, 0]
    render(fig)


def test_position_heatmap_refuses_summed_results():
    with pytest.raises(ValueError, match="per-position result.*summed over positions"):
        plots.position_heatmap(make(), "head")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokens": ["a", "b"]}, "2 tokens for 3 positions"),
        ({"agg": "mean"}, "unknown agg"),
        ({"kind": "v"}, "no 'v' nodes"),
    ],
)
def test_position_heatmap_errors(kwargs, message):
    kwargs = {"kind": "head", **kwargs}
    with pytest.raises(ValueError, match=message):
        plots.position_heatmap(make(per_position=True), **kwargs)


# ---- scatter -----------------------------------------------------------------------------------
def scatter_points(fig: Figure) -> dict[str, np.ndarray]:
    ax = fig.axes[0]
    return {c.get_label().split(" ")[0]: np.asarray(c.get_offsets()) for c in ax.collections}


def exact_for(est: Attribution, shift: float = 0.0) -> Attribution:
    rng = np.random.default_rng(0)
    per_pair = est.per_pair + rng.normal(size=est.per_pair.shape) * 5 + shift
    return Attribution(
        nodes=est.nodes.copy(),
        scores=np.abs(per_pair.mean(0)),
        per_pair=per_pair,
        mean_effect=per_pair.mean(0),
        method="exact",
        direction=est.direction,
        metric=est.metric,
        model=est.model,
        cost=100.0,
        metadata=dict(est.metadata),
    )


def test_scatter_signed_estimate_against_exact_mean_per_kind():
    est = make()
    ex = exact_for(est)
    ex.mean_effect[0] = np.nan  # dropped
    fig = plots.scatter_vs_exact(est, ex, annotate=3)
    pts = scatter_points(fig)
    for kind in ("head", "k"):
        sel = (est.nodes["kind"] == kind).to_numpy().copy()
        sel[0] = False
        np.testing.assert_allclose(pts[kind][:, 0], est.mean_effect[sel])
        np.testing.assert_allclose(pts[kind][:, 1], ex.mean_effect[sel])
    ax = fig.axes[0]
    assert "signed mean" in ax.get_xlabel() and ax.get_ylabel() == "exact mean effect"
    assert any(line.get_label() == "y = x" for line in ax.lines)
    # annotated: the three nodes farthest from y = x, labelled like "head L2.H3"
    finite = np.isfinite(ex.mean_effect)
    dist = np.where(finite, np.abs(est.mean_effect - ex.mean_effect), -1)
    want = {str(est.node(int(i))) for i in np.argsort(-dist)[:3]}
    got = {t.get_text() for t in ax.texts if t.get_text().startswith(("head ", "k "))}
    assert got <= want and len(got) >= 2  # overlapping labels may be skipped
    assert any("Pearson" in t.get_text() for t in ax.texts)
    render(fig)


def test_scatter_uses_verified_nodes_only():
    est = make()
    order = est.ranking()[:4]
    eff = [1.0, -2.0, 3.0, 0.5]
    est.metadata["verified"] = {"order": order.tolist(), "mean_effect": eff, "cost": 4}
    fig = plots.scatter_vs_exact(est)
    pts = np.concatenate(list(scatter_points(fig).values()))
    assert len(pts) == 4
    got = sorted(map(tuple, pts))
    want = sorted(zip(est.mean_effect[order], eff, strict=True))
    np.testing.assert_allclose(got, want)
    assert "verified" in fig.axes[0].get_ylabel()
    # verified data can also be passed directly
    fig2 = plots.scatter_vs_exact(est, {"order": order[:2].tolist(), "mean_effect": eff[:2]})
    assert sum(len(p) for p in scatter_points(fig2).values()) == 2


def test_scatter_graddrop_score_against_abs_exact_and_node_matching():
    est = make(method="atp+gd", signed=False)
    full = exact_for(make())
    sub = full.select((full.nodes["kind"] == "k").to_numpy())  # exact only for k nodes
    fig = plots.scatter_vs_exact(est, sub)
    pts = scatter_points(fig)
    assert set(pts) == {"k"}
    sel = (est.nodes["kind"] == "k").to_numpy()
    np.testing.assert_allclose(pts["k"][:, 0], est.scores[sel])
    np.testing.assert_allclose(pts["k"][:, 1], np.abs(full.mean_effect[sel]))
    assert "score" in fig.axes[0].get_xlabel() and "|" in fig.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="no signed mean"):
        plots.scatter_vs_exact(est, sub, value="signed")


def test_scatter_errors():
    est = make()
    with pytest.raises(ValueError, match="no exact values"):
        plots.scatter_vs_exact(est)
    ex = exact_for(est)
    ex.mean_effect[:] = np.nan
    with pytest.raises(ValueError, match="all NaN"):
        plots.scatter_vs_exact(est, ex)
    with pytest.raises(ValueError, match="out of range"):
        plots.scatter_vs_exact(est, {"order": [999], "mean_effect": [1.0]})
    other = make(layers=(7,))
    with pytest.raises(ValueError, match="share no nodes"):
        plots.scatter_vs_exact(est, exact_for(other))


# ---- recall curve ------------------------------------------------------------------------------
def test_recall_curve_from_dict_is_log_log_with_oracle():
    x = np.arange(1, 6)
    fig = plots.recall_curve({"atp*": (x, 10 + x), "subsampling": (x, 100 * x)})
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"AtP*", "subsampling", "oracle (y = x)"}
    np.testing.assert_allclose(lines["AtP*"].get_ydata(), 10 + x)
    np.testing.assert_allclose(lines["oracle (y = x)"].get_xdata(), [1, 5])
    np.testing.assert_allclose(lines["oracle (y = x)"].get_ydata(), [1, 5])
    assert "recalled" in ax.get_xlabel() and "forward passes" in ax.get_ylabel()
    render(fig)


def test_recall_curve_one_panel_per_kind():
    rows = []
    for kind in ("all", "neuron", "head"):
        for m in ("atp*", "atp"):
            for x in range(1, 4):
                rows.append({"method": m, "kind": kind, "x": x, "cost": 5.0 * x})
    df = pd.DataFrame(rows)
    fig = plots.recall_curve(df)
    assert [a.get_title() for a in fig.axes] == ["head nodes", "neuron nodes"]  # "all" hidden
    for a in fig.axes:
        assert a.get_xscale() == "log" and len(a.lines) == 3
    fig = plots.recall_curve(df, kinds=["all"])
    assert [a.get_title() for a in fig.axes] == ["all nodes"]
    fig0, axes = plt.subplots(1, 2)
    try:
        assert plots.recall_curve(df, ax=axes) is fig0
    finally:
        plt.close(fig0)


def test_recall_curve_errors():
    with pytest.raises(ValueError, match="x column"):
        plots.recall_curve(pd.DataFrame({"method": ["a"], "cost": [1.0]}))
    with pytest.raises(ValueError, match="no positive"):
        plots.recall_curve({"a": ([0], [0])})
    with pytest.raises(ValueError, match="no curves for kind"):
        plots.recall_curve(
            pd.DataFrame({"method": ["a"], "x": [1], "cost": [2], "kind": ["head"]}), kinds=["q"]
        )


# ---- Attribution methods -----------------------------------------------------------------------
def test_attribution_plot_methods_delegate():
    r = make(per_position=True)
    np.testing.assert_allclose(image_array(r.plot_heads()), image_array(plots.head_heatmap(r)))
    fig = r.plot_positions("k", tokens=["a", "b", "c"])
    assert tick_labels(fig.axes[0]) == ["a", "b", "c"]
    r2 = make()
    fig = r2.plot_scatter(exact_for(r2), annotate=0)
    assert not [t for t in fig.axes[0].texts if t.get_text().startswith("head ")]


def test_head_heatmap_pools_many_units_without_losing_large_values():
    r = make()
    vals = r.mean_effect.copy()
    head = (r.nodes["kind"] == "head").to_numpy()
    vals[np.flatnonzero(head)[2]] = -1e4  # layer 0, head 2
    vals[np.flatnonzero(head)[4:6]] = np.nan  # layer 1, heads 0-1: an all-NaN block
    fig = plots.head_heatmap(r, value=vals, max_columns=2)
    full, _, _ = plots.layer_unit_matrix(r, "head", vals)
    expected = np.stack([full[:, 1], full[:, 3]], axis=1)  # |.| grows with the head index
    expected[0, 1] = -1e4
    expected[1, 0] = np.nan
    np.testing.assert_allclose(image_array(fig), expected)
    assert "blocks of 2" in fig.axes[0].get_xlabel() and "blocks of 2" in fig.axes[0].get_title()
    render(fig)


# ---- the node behind each cell -----------------------------------------------------------------
def test_layer_unit_nodes_name_the_node_of_each_cell():
    r = make()
    nodes = plots.layer_unit_nodes(r, "k")
    table = r.nodes
    for row, layer in enumerate(LAYERS):
        for unit in range(N_KV):
            i = nodes[row, unit]
            assert (table.loc[i, "kind"], table.loc[i, "layer"], table.loc[i, "index"]) == (
                "k",
                layer,
                unit,
            )


def test_layer_unit_nodes_per_position_pick_the_largest_position():
    r = make(per_position=True)
    vals = r.scores.copy()
    head = np.flatnonzero((r.nodes["kind"] == "head").to_numpy())
    vals[head[0]] = 1e6  # layer 0, head 0, position 0 beats positions 1 and 2
    nodes = plots.layer_unit_nodes(r, "head", vals)
    assert nodes[0, 0] == head[0]
    assert r.nodes.loc[nodes[1, 2], "position"] == SEQ - 1  # value grows with the position
    vals[head[:SEQ]] = np.nan  # every position of layer 0, head 0 unknown
    assert plots.layer_unit_nodes(r, "head", vals)[0, 0] == -1


def test_layer_position_nodes_match_the_max_matrix():
    r = make(per_position=True)
    matrix, layers = plots.layer_position_matrix(r, "k", "mean_effect")
    nodes = plots.layer_position_nodes(r, "k", "mean_effect")
    np.testing.assert_allclose(r.mean_effect[nodes], matrix)
    assert all(r.nodes.loc[nodes[i, p], "position"] == p for i in range(3) for p in range(SEQ))


def test_pool_columns_reports_the_source_column():
    m = np.array([[1.0, -5.0, 2.0, np.nan, np.nan], [0.0, 1.0, np.nan, 3.0, -4.0]])
    pooled, source = plots.pool_columns(m, 2)
    np.testing.assert_allclose(pooled, [[-5.0, 2.0, np.nan], [1.0, 3.0, -4.0]])
    np.testing.assert_array_equal(source, [[1, 2, -1], [1, 3, 4]])
    assert plots.column_block(1536, 256) == 6 and plots.column_block(9, 256) == 1


# ---- verification depth ------------------------------------------------------------------------
def verified_result() -> Attribution:
    r = make()
    order = r.ranking()
    kinds = r.nodes["kind"].to_numpy()
    top = [int(i) for i in order if kinds[i] == "head"][:3] + [
        int(i) for i in order if kinds[i] == "k"
    ][:2]
    r.metadata["verified"] = {"order": top, "mean_effect": [3.0, -2.0, 1.0, 0.5, -0.25]}
    return r


def test_within_kind_rank_counts_within_each_kind():
    r = make()
    rank = plots.within_kind_rank(r)
    for kind in ("head", "k"):
        sel = (r.nodes["kind"] == kind).to_numpy()
        order = np.argsort(-r.scores[sel], kind="stable")
        np.testing.assert_array_equal(rank[sel][order], np.arange(1, sel.sum() + 1))


def test_verification_depth_draws_scores_exact_effects_and_the_deepest_rank():
    r = verified_result()
    fig = plots.verification_depth(r, bound=0.4, theta=0.3)
    axes = fig.axes
    assert [a.get_title() for a in axes] == [
        "k: verified 2, to rank 2 of 6",
        "head: verified 3, to rank 3 of 12",
    ]
    head = axes[1]
    score_line = head.lines[0]
    np.testing.assert_allclose(
        score_line.get_ydata(), np.sort(r.scores[(r.nodes["kind"] == "head").to_numpy()])[::-1]
    )
    points = sorted(map(tuple, np.asarray(head.collections[0].get_offsets())))
    assert points == [(1, 3), (2, 2), (3, 1)]  # (rank among heads, |exact|)
    ys = sorted(
        line.get_ydata()[0] for line in head.lines[1:] if line.get_ydata()[0] == line.get_ydata()[1]
    )
    xs = [
        line.get_xdata()[0] for line in head.lines[1:] if line.get_xdata()[0] == line.get_xdata()[1]
    ]
    assert 3 in xs and ys == [0.3, 0.4]
    assert head.get_xscale() == "log"
    render(fig)


def test_verification_depth_needs_verified_nodes():
    with pytest.raises(ValueError, match="no verified nodes"):
        plots.verification_depth(make())


# ---- per-position views ------------------------------------------------------------------------
def test_unit_position_matrix_keeps_the_best_units_with_signed_estimates():
    r = make(per_position=True)
    matrix, labels, nodes, signed = plots.unit_position_matrix(r, n_top=3)
    # a unit's best score: 1.25 |100 l + 10 u + p| at p = 2; ties (head L2.H1, k L2.K1) keep
    # the node-table order
    assert signed and labels == ["head L2.H3", "head L2.H2", "head L2.H1"]
    np.testing.assert_allclose(matrix[0], [1.25 * (230 + p) for p in range(SEQ)])
    np.testing.assert_allclose(matrix[1], [1.25 * (220 + p) for p in range(SEQ)])
    np.testing.assert_allclose(r.mean_effect[nodes], matrix)
    unsigned = make(per_position=True, method="atp+gd", signed=False)
    m2, _, _, signed2 = plots.unit_position_matrix(unsigned, n_top=2)
    assert not signed2 and (m2 >= 0).all()
    with pytest.raises(ValueError, match="per-position"):
        plots.unit_position_matrix(make())


def test_top_units_by_position_labels_rows_and_tokens():
    r = make(per_position=True)
    fig = plots.top_units_by_position(r, ["<s>", " Mary", " $x"], n_top=4)
    ax = fig.axes[0]
    assert tick_labels(ax, "y") == ["head L2.H3", "head L2.H2", "head L2.H1", "k L2.K1"]
    assert tick_labels(ax) == ["<s>", " Mary", r" \$x"]
    im = ax.images[0]
    assert im.get_cmap().name.startswith(plots.DIVERGING_CMAP)
    assert im.norm.vmin == -im.norm.vmax
    with pytest.raises(ValueError, match="2 tokens for 3 positions"):
        plots.top_units_by_position(r, ["a", "b"])
    render(fig)


def test_scatter_counts_sign_agreement():
    est = make()
    ex = exact_for(est)
    ex.mean_effect[:] = est.mean_effect
    ex.mean_effect[1:4] *= -1  # three nodes of the opposite sign (node 0 is zero)
    fig = plots.scatter_vs_exact(est, ex, annotate=0)
    text = next(t.get_text() for t in fig.axes[0].texts if "sign agrees" in t.get_text())
    assert f"sign agrees: {len(est) - 3} of {len(est)}" in text
