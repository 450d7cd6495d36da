"""write_report: files, a self-contained escaped HTML page, what it says it verified, and the
data behind every interactive figure."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from atp_nnsight import plots  # noqa: E402
from atp_nnsight.evaluation.diagnostic import Diagnosis  # noqa: E402
from atp_nnsight.report import depth_table, write_report  # noqa: E402
from atp_nnsight.results import Attribution  # noqa: E402
from atp_nnsight.types import Node  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INJECTION = "<script>alert('x')</script>"


def synthetic(
    method: str,
    *,
    seed: int = 0,
    per_position: bool = False,
    signed: bool = True,
    truth: np.ndarray | None = None,
    noise: float = 0.3,
    n_layers: int = 3,
    n_heads: int = 4,
    seq: int = 4,
) -> Attribution:
    """Head nodes of a small model plus one neuron layer; per-pair values near ``truth``."""
    rows = [
        (kind, layer, unit, pos)
        for kind, units in (("head", n_heads), ("neuron", 5))
        for layer in range(n_layers)
        for unit in range(units)
        for pos in (range(seq) if per_position else [None])
    ]
    nodes = pd.DataFrame(rows, columns=["kind", "layer", "index", "position"])
    nodes["position"] = pd.array(nodes["position"], dtype="Int64")
    rng = np.random.default_rng(seed)
    n_pairs = 3
    if truth is None:
        truth = rng.normal(size=len(nodes)) * rng.exponential(size=len(nodes))
    per_pair = truth + rng.normal(size=(n_pairs, len(nodes))) * noise
    mean = per_pair.mean(0)
    return Attribution(
        nodes=nodes,
        scores=np.abs(mean) if method == "exact" else np.abs(per_pair).mean(0),
        per_pair=per_pair,
        mean_effect=mean if signed else None,
        method=method,
        direction="noising",
        metric="logit-diff",
        model="tiny/synthetic",
        cost=float(n_pairs * (len(nodes) if method == "exact" else 4)),
        pairs=[
            {
                "clean": "When Mary and John went, John gave a drink to",
                "noise": "When Alice and Bob went, Bob gave a drink to",
                "clean_target": " Mary",
                "noise_target": " Alice <b>",
            }
        ]
        * n_pairs,
        metadata={
            "kinds": ["head", "neuron"],
            "layers": list(range(n_layers)),
            "per_position": per_position,
            "seq_len": seq if per_position else None,
        },
    )


def verify_top(result: Attribution, truth: np.ndarray, k: int = 6, cost: float = 18) -> None:
    order = result.ranking()[:k]
    result.metadata["verified"] = {
        "order": order.tolist(),
        "mean_effect": truth[order].tolist(),
        "cost": cost,
    }


def suite(per_position: bool = False) -> tuple[dict[str, Attribution], Attribution]:
    exact = synthetic("exact", per_position=per_position, noise=0.1)
    truth = exact.mean_effect
    star = synthetic("atp*", seed=1, truth=truth, per_position=per_position)
    results = {
        "atp*": star,
        "atp": synthetic("atp", seed=2, truth=truth, noise=1.0, per_position=per_position),
        "atp+gd": synthetic("atp+gd", seed=3, truth=truth, signed=False, per_position=per_position),
    }
    verify_top(star, truth)
    return results, exact


def curves() -> pd.DataFrame:
    x = np.arange(1, 9)
    return pd.DataFrame(
        [
            {"method": m, "kind": k, "x": int(i), "cost": c + s * i}
            for m, c, s in (("atp*", 4, 1.2), ("atp", 4, 2.0))
            for k in ("head", "neuron")
            for i in x
        ]
    )


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if not self._in_script:
            self.text.append(data)


def parse(html_text: str) -> _Collector:
    p = _Collector()
    p.feed(html_text)
    p.close()
    return p


def page_text(html_text: str) -> str:
    """The visible text of the page (outside scripts), whitespace collapsed."""
    return re.sub(r"\s+", " ", "".join(parse(html_text).text))


def figure_specs(html_text: str) -> dict[str, dict]:
    """``{div id: plotly figure}`` from the page's JSON figure specs."""
    found = re.findall(
        r'<script type="application/json" class="figure-spec" data-target="([^"]+)">(.*?)'
        r"</script>",
        html_text,
        flags=re.S,
    )
    return {target: json.loads(spec) for target, spec in found}


def ranked_table(html_text: str, table_id: str) -> tuple[list[str], list[list[str]], list[str]]:
    """``(header, rows of cell texts, data-node of each row)`` of a ranked table."""
    table = re.search(rf'<table class="ranked" id="{table_id}">(.*?)</table>', html_text, re.S)
    assert table, table_id
    header = re.findall(r"<th\b[^>]*>(.*?)</th>", table.group(1))
    rows = re.findall(r'<tr data-node="([^"]*)">(.*?)</tr>', table.group(1))
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", body) for _, body in rows]
    return header, cells, [node for node, _ in rows]


def decode(values) -> np.ndarray:
    """A plotly array: a JSON list, or ``{"dtype", "bdata"}`` (plotly's binary encoding)."""
    import base64

    if isinstance(values, dict):
        shape = values.get("shape")
        arr = np.frombuffer(base64.b64decode(values["bdata"]), dtype=np.dtype(values["dtype"]))
        if shape:
            arr = arr.reshape([int(s) for s in str(shape).split(",")])
        return arr
    return np.asarray(values, dtype=object)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("report") / "out"  # created by write_report
    results, exact = suite()
    path = write_report(
        folder,
        results,
        settings={"task": f"ioi {INJECTION}", "seed": 7, "time": "12.5 s"},
        exact=exact,
        curves=curves(),
        tables={"IRWRGM & friends": pd.DataFrame({"method": ["atp<1>"], "irwrgm": [1.25]})},
    )
    return path, path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def run_report(tmp_path_factory) -> tuple[Path, str, Attribution]:
    """What ``atp-nnsight run`` writes: one verified AtP* result, no ground truth."""
    folder = tmp_path_factory.mktemp("run")
    results, _ = suite()
    path = write_report(
        folder,
        {"atp*": results["atp*"]},
        settings={"seed": 0},
        diagnose_command="atp-nnsight run --task ioi --diagnose",
    )
    return path, path.read_text(encoding="utf-8"), results["atp*"]


def test_writes_pngs_results_and_html(full_report):
    path, _ = full_report
    folder = path.parent
    assert path.name == "report.html" and path.exists()
    names = {p.name for p in folder.iterdir()}
    for slug in ("atp_star", "atp", "atp_gd", "exact"):
        assert {f"{slug}.csv", f"{slug}.npz"} <= names
    expected_pngs = {
        "verified_vs_estimate.png",
        "verification_depth.png",
        "atp_star_head_score.png",
        "atp_star_neuron_score.png",
        "atp_head_score.png",
        "atp_gd_head_score.png",
        "exact_head_effect.png",
        "exact_neuron_effect.png",
        "atp_star_vs_exact.png",
        "atp_vs_exact.png",
        "atp_gd_vs_exact.png",
        "verified_recall.png",
    }
    assert expected_pngs <= names
    for png in folder.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1024, png.name
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            w, h = im.size
            assert w > 200 and h > 200
            # not blank: the figure has real content
            assert len(set(im.convert("L").getdata())) > 10, png.name


def test_saved_results_round_trip(full_report):
    folder = full_report[0].parent
    results, exact = suite()
    loaded = Attribution.load(folder / "atp_star.npz")
    np.testing.assert_allclose(loaded.scores, results["atp*"].scores)
    assert loaded.metadata["verified"]["order"] == results["atp*"].metadata["verified"]["order"]
    csv = pd.read_csv(folder / "exact.csv")
    assert list(csv.columns) == ["kind", "layer", "index", "position", "score", "mean_effect"]
    np.testing.assert_allclose(csv["mean_effect"], exact.mean_effect)


def test_every_figure_is_interactive_with_a_png_twin(full_report):
    path, text = full_report
    specs = figure_specs(text)
    divs = [a for t, a in parse(text).tags if t == "div" and "plot" in (a.get("class") or "")]
    assert sorted(a["id"] for a in divs) == sorted(specs)
    pngs = re.findall(r'<figcaption>.*?<a href="([^"]+\.png)">PNG</a></figcaption>', text, re.S)
    assert sorted(pngs) == sorted(p.name for p in path.parent.glob("*.png"))
    for spec in specs.values():
        assert spec["data"] and spec["layout"]["title"]["text"]


def test_plotly_is_inlined_once_and_nothing_is_fetched(full_report):
    _, text = full_report
    p = parse(text)
    scripts = [a for t, a in p.tags if t == "script"]
    assert all("src" not in a for a in scripts)
    assert text.count("plotly.js v") == 1  # the bundle's banner: inlined once, no CDN
    assert not [t for t, _ in p.tags if t in ("link", "iframe", "object", "embed", "img")]
    for _, attrs in p.tags:
        for key in ("src", "href"):
            value = attrs.get(key)
            if value is not None:
                assert re.fullmatch(r"[\w.-]+", value), value  # files beside report.html
    assert "<style>" in text and "@import" not in text


def test_settings_and_tables_are_shown_and_escaped(full_report):
    _, text = full_report
    results, exact = suite()
    body = page_text(text)
    for needle in (
        "tiny/synthetic",
        "prompt pairs",
        "AtP*, AtP, AtP+GD",
        "noising",
        "logit-diff",
        "12 forward passes (4 per pair)",  # atp*: 3 pairs x 4
        "seed",
        "12.5 s",
        "6 nodes in AtP* order",
        "IRWRGM & friends",
        "atp<1>",
        f"ioi {INJECTION}",
        "' Alice <b>'",  # a prompt pair, quoted so spaces are visible
    ):
        assert needle in body, needle
    # raw markup from user text never reaches the page
    assert INJECTION not in text and "<b>'" not in text and "atp<1>" not in text
    assert "ioi &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    for caption in ("Cost of verified recall", "centred at 0", "y = x", "|estimated effect|"):
        assert caption in body, caption


def test_ranked_table_has_rank_node_estimate_exact_and_sign_agreement(full_report):
    _, text = full_report
    results, exact = suite()
    star = results["atp"]
    header, rows, nodes = ranked_table(text, "ranked-atp")
    assert header == [
        "rank",
        "node",
        "kind",
        "layer",
        "index",
        "position",
        "score",
        "signed mean estimate",
        "exact mean effect",
        "sign agrees",
    ]
    assert len(rows) == 20 and [int(r[0]) for r in rows] == list(range(1, 21))
    for row, node, i in zip(rows, nodes, star.ranking()[:20], strict=True):
        label = str(star.node(int(i)))
        assert row[1] == node == label and row[5] == "all"
        assert float(row[7]) == pytest.approx(star.mean_effect[i], rel=1e-3, abs=1e-4)
        assert float(row[8]) == pytest.approx(exact.mean_effect[i], rel=1e-3, abs=1e-4)
        agrees = np.sign(star.mean_effect[i]) == np.sign(exact.mean_effect[i])
        assert row[9] == ("yes" if agrees else "no")
    gd_header, _, _ = ranked_table(text, "ranked-atp_gd")
    assert "signed mean estimate" not in gd_header and "sign agrees" not in gd_header


def test_ranked_table_lists_every_verified_node(tmp_path):
    results, _ = suite()
    star = results["atp*"]
    truth = suite()[1].mean_effect
    order = star.ranking()
    star.metadata["verified"] = {
        "order": [int(order[0]), int(order[19])],  # rank 20 is below top_k
        "mean_effect": truth[[order[0], order[19]]].tolist(),
        "cost": 6,
    }
    text = write_report(tmp_path, {"atp*": star}, settings={}, top_k=5).read_text()
    header, rows, nodes = ranked_table(text, "ranked-atp_star")
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 20]
    exact_col = header.index("verified exact effect")
    assert float(rows[-1][exact_col]) == pytest.approx(truth[order[19]], rel=1e-3, abs=1e-4)
    assert rows[1][exact_col] == ""  # rank 2 was not verified


def test_score_heatmap_cells_carry_node_score_exact_and_rank(run_report):
    _, text, star = run_report
    specs = figure_specs(text)
    heads = next(s for s in specs.values() if s["layout"]["title"]["text"] == "AtP*: head nodes")
    trace = heads["data"][0]
    assert trace["type"] == "heatmap" and "%{customdata[0]}" in trace["hovertemplate"]
    custom = trace["customdata"]
    z = decode(trace["z"]) if isinstance(trace["z"], dict) else np.array(trace["z"], float)
    verified = dict(
        zip(
            star.metadata["verified"]["order"],
            star.metadata["verified"]["mean_effect"],
            strict=True,
        )
    )
    rank = np.empty(len(star), dtype=int)
    rank[star.ranking()] = np.arange(1, len(star) + 1)
    nodes = star.nodes
    for layer in range(3):
        for unit in range(4):
            i = int(
                np.flatnonzero(
                    (nodes["kind"] == "head") & (nodes["layer"] == layer) & (nodes["index"] == unit)
                )[0]
            )
            label, score, exact_text, rank_text, _ = custom[layer][unit]
            assert label == str(Node("head", layer, unit))
            assert float(score) == pytest.approx(star.scores[i], rel=1e-3)
            assert z[layer][unit] == pytest.approx(star.scores[i])
            assert int(rank_text) == rank[i]
            if i in verified:
                assert float(exact_text) == pytest.approx(verified[i], rel=1e-3, abs=1e-4)
            else:
                assert exact_text == "not verified"
    assert heads["layout"]["yaxis"]["autorange"] == "reversed"  # layer 0 at the top


def test_run_report_says_what_it_verified(run_report):
    path, text, star = run_report
    body = page_text(text)
    ver = star.metadata["verified"]
    assert "6 of 27 nodes were verified" in body
    assert "Verification cost 18 forward passes (6 per pair)" in body
    signed = star.mean_effect[ver["order"]]
    agree = int((np.sign(signed) == np.sign(ver["mean_effect"])).sum())
    assert f"agrees with the exact effect for {agree} of 6" in body
    theta = 0.1 * np.abs(ver["mean_effect"]).max()
    matters = int((np.abs(ver["mean_effect"]) >= theta).sum())
    assert f"{matters} of the 6 verified nodes have an exact |effect| of at least" in body
    # nothing bounds the rest: one sentence and the command that would
    assert "Nothing bounds the effects of the 21 nodes that were not verified" in body
    assert "atp-nnsight run --task ioi --diagnose" in body
    # no circular recall curve without ground truth
    assert "Cost of verified recall" not in body
    assert not (path.parent / "verified_recall.png").exists()
    titles = [s["layout"]["title"]["text"] for s in figure_specs(text).values()]
    assert titles[:2] == [
        "Which candidates held up? AtP* vs exact",
        "How far down verification went: AtP*",
    ]


def test_held_up_scatter_splits_nodes_by_sign_agreement(run_report):
    _, text, star = run_report
    scatter = next(iter(figure_specs(text).values()))
    ver = star.metadata["verified"]
    est = dict(zip(ver["order"], star.mean_effect[ver["order"]], strict=True))
    exact = dict(zip(ver["order"], ver["mean_effect"], strict=True))
    seen = 0
    for trace in scatter["data"]:
        if not trace["name"].startswith("sign"):
            continue
        agrees = trace["name"].startswith("sign agrees")
        for x, y, custom in zip(
            decode(trace["x"]), decode(trace["y"]), trace["customdata"], strict=True
        ):
            i = next(j for j in ver["order"] if str(star.node(j)) == custom[0])
            assert (x, y) == pytest.approx((est[i], exact[i]))
            assert (np.sign(x) == np.sign(y)) == agrees
            seen += 1
    assert seen == 6


def test_depth_table_reports_how_far_each_kind_went():
    star = suite()[0]["atp*"]
    table = depth_table(star)
    ver = star.metadata["verified"]
    kinds = star.nodes["kind"].to_numpy()
    within = plots.within_kind_rank(star)
    for row in table.itertuples(index=False):
        mine = [i for i in ver["order"] if kinds[i] == row.kind]
        assert row.verified == len(mine) and row.nodes == int((kinds == row.kind).sum())
        assert row[table.columns.get_loc("deepest rank")] == max(within[mine])
    assert set(table["kind"]) == set(kinds[ver["order"]])


def fake_diagnosis(star: Attribution, bound: float, theta: float) -> Diagnosis:
    """A diagnosis of ``star``'s unverified nodes with a given bound; node 0 flagged."""
    done = set(star.metadata.get("verified", {}).get("order", []))
    rest = [i for i in range(len(star)) if i not in done]
    n = len(rest)
    upper = np.linspace(bound / 2, bound, n)
    nodes = pd.DataFrame(
        {
            "node": rest,
            "label": [str(star.node(i)) for i in rest],
            "rank": np.arange(1, n + 1),
            "score": star.scores[rest],
            "estimate": np.zeros(n),
            "corrected": np.zeros(n),
            "lower": upper - 0.1,
            "upper": upper,
            "flagged": np.arange(n) == n - 1,
        }
    )
    return Diagnosis(
        nodes=nodes,
        bound=bound,
        theta=theta,
        delta=0.05,
        z=3.0,
        p=0.1,
        n_subsets=200,
        subsets=pd.DataFrame(),
        residual={},
        cost=600.0,
        cost_breakdown={},
        verified=np.array(sorted(done)),
        members=[],
        subset_per_pair=np.zeros((3, 0)),
    )


def test_diagnosis_bound_is_shown(tmp_path):
    star = suite()[0]["atp*"]
    diagnosis = fake_diagnosis(star, bound=0.42, theta=0.3)
    text = write_report(tmp_path, {"atp*": star}, settings={}, diagnosis=diagnosis).read_text()
    body = page_text(text)
    flagged = str(star.node(int(diagnosis.nodes["node"].iloc[-1])))
    assert "patched 200 random subsets of the 21 unverified nodes" in body
    assert f"no unverified node has an exact |effect| above 0.42 (attained at {flagged})" in body
    assert "not below θ = 0.3" in body and "keep verifying" in body
    assert "Suspected false negatives (flagged): 1" in body and flagged in body
    assert "Nothing bounds" not in body
    depth = next(
        s for s in figure_specs(text).values() if s["layout"]["title"]["text"].startswith("How far")
    )
    levels = {s["y0"] for s in depth["layout"]["shapes"] if s["y0"] == s["y1"]}
    assert levels == {0.42, 0.3}


def test_report_without_exact_uses_verified_nodes(run_report):
    path, text, _ = run_report
    names = {p.name for p in path.parent.glob("*.png")}
    assert names == {
        "verified_vs_estimate.png",
        "verification_depth.png",
        "atp_star_head_score.png",
        "atp_star_neuron_score.png",
        "verified_head_effect.png",
        "verified_neuron_effect.png",
    }
    assert "grey = not verified" in text and "verified exact effect" in text
    assert len(figure_specs(text)) == len(names)


def test_report_of_unverified_result_says_so(tmp_path):
    results, _ = suite()
    path = write_report(tmp_path, {"atp": results["atp"]}, settings={"note": "x"})
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "atp_head_score.png",
        "atp_neuron_score.png",
    }
    body = page_text(path.read_text())
    assert "No node was verified: every score here is an estimate." in body
    assert "Estimate vs exact" not in body and "Exact effects" not in body


def test_per_position_report_shows_tokens_and_the_top_units(tmp_path):
    results, exact = suite(per_position=True)
    tokens = ["<s>", "When", " Mary", " </script>"]
    path = write_report(
        tmp_path, {"atp*": results["atp*"]}, settings={}, exact=exact, tokens=tokens
    )
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {
        "atp_star_top_units_positions.png",
        "atp_star_head_positions.png",
        "atp_star_neuron_positions.png",
    } <= names
    text = path.read_text()
    assert "per position (4 positions)" in text
    assert text.count("</script>") == text.count("<script")  # the token cannot close one
    units = next(
        s
        for s in figure_specs(text).values()
        if s["layout"]["title"]["text"] == "AtP*: top units by position"
    )
    assert units["layout"]["xaxis"]["ticktext"] == [
        "&lt;s&gt;",
        "When",
        " Mary",
        " &lt;/script&gt;",
    ]
    matrix, labels, _, _ = plots.unit_position_matrix(results["atp*"], 12)
    assert list(units["layout"]["yaxis"]["ticktext"]) == labels
    z = units["data"][0]["z"]
    z = decode(z) if isinstance(z, dict) else np.array(z, dtype=float)
    np.testing.assert_allclose(np.asarray(z, dtype=float), matrix)
    # the ranked table names each position's token
    _, rows, _ = ranked_table(text, "ranked-atp_star")
    assert any(html.unescape(r[5]).endswith("' Mary'") for r in rows)


def test_bad_inputs(tmp_path):
    results, _ = suite(per_position=True)
    with pytest.raises(ValueError, match="at least one result"):
        write_report(tmp_path, {}, settings={})
    with pytest.raises(TypeError, match="not an Attribution"):
        write_report(tmp_path, {"x": object()}, settings={})
    with pytest.raises(ValueError, match="got 1 tokens for 4 positions"):
        write_report(tmp_path, {"atp*": results["atp*"]}, settings={}, tokens=["a"])
    plain = suite()[0]["atp"]
    with pytest.raises(ValueError, match="needs a verified main result"):
        write_report(
            tmp_path, {"atp": plain}, settings={}, diagnosis=fake_diagnosis(plain, 1.0, 0.5)
        )
