"""write_report: files, a self-contained escaped HTML page, embedded images."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from atp_nnsight.report import write_report  # noqa: E402
from atp_nnsight.results import Attribution  # noqa: E402

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


def suite(per_position: bool = False) -> tuple[dict[str, Attribution], Attribution]:
    exact = synthetic("exact", per_position=per_position, noise=0.1)
    truth = exact.mean_effect
    star = synthetic("atp*", seed=1, truth=truth, per_position=per_position)
    results = {
        "atp*": star,
        "atp": synthetic("atp", seed=2, truth=truth, noise=1.0, per_position=per_position),
        "atp+gd": synthetic("atp+gd", seed=3, truth=truth, signed=False, per_position=per_position),
    }
    order = star.ranking()[:6]
    star.metadata["verified"] = {
        "order": order.tolist(),
        "mean_effect": truth[order].tolist(),
        "cost": 18,
    }
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

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(html_text: str) -> _Collector:
    p = _Collector()
    p.feed(html_text)
    p.close()
    return p


def without_data_uris(html_text: str) -> str:
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", html_text)


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


def test_writes_pngs_results_and_html(full_report):
    path, _ = full_report
    folder = path.parent
    assert path.name == "report.html" and path.exists()
    names = {p.name for p in folder.iterdir()}
    for slug in ("atp_star", "atp", "atp_gd", "exact"):
        assert {f"{slug}.csv", f"{slug}.npz"} <= names
    expected_pngs = {
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


def test_every_image_is_embedded_as_a_data_uri(full_report):
    path, text = full_report
    folder = path.parent
    imgs = [attrs for tag, attrs in parse(text).tags if tag == "img"]
    pngs = {p.name for p in folder.glob("*.png")}
    assert sorted(a["data-file"] for a in imgs) == sorted(pngs)
    for attrs in imgs:
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data == (folder / attrs["data-file"]).read_bytes()
        assert attrs["alt"] and "onload" in attrs


def test_no_external_resources(full_report):
    _, text = full_report
    stripped = without_data_uris(text)
    assert "http:" not in stripped and "https:" not in stripped and "//" not in stripped
    p = parse(text)
    assert not [t for t, _ in p.tags if t in ("link", "iframe", "object", "embed")]
    assert all("src" not in a for t, a in p.tags if t == "script")
    for _, attrs in p.tags:
        for key in ("src", "href"):
            value = attrs.get(key)
            if value is not None:
                assert value.startswith("data:") or re.fullmatch(r"[\w.-]+", value), value
    assert "<style>" in text and "@import" not in text


def test_settings_and_tables_are_shown_and_escaped(full_report):
    _, text = full_report
    results, exact = suite()
    body = " ".join(parse(text).text)
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
    # ranked tables: the best AtP* node first, with its label and exact effect
    star = results["atp*"]
    best = star.ranking()[0]
    label = str(star.node(int(best)))
    tables = re.findall(r"<table.*?</table>", text, flags=re.S)
    ranked = next(t for t in tables if label in t and "signed mean estimate" in t)
    first_row = re.search(r"<tbody><tr>(.*?)</tr>", ranked).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", first_row)
    assert cells[0] == "1" and cells[1] == label and cells[5] == "all"
    assert float(cells[-1]) == pytest.approx(exact.mean_effect[best], rel=1e-3)
    for caption in ("Cost of verified recall", "centred at 0", "y = x", "|estimated effect|"):
        assert caption in body, caption


def test_report_without_exact_uses_verified_nodes(tmp_path):
    results, _ = suite()
    path = write_report(tmp_path, {"atp*": results["atp*"]}, settings={})
    names = {p.name for p in tmp_path.glob("*.png")}
    assert names == {
        "atp_star_head_score.png",
        "atp_star_neuron_score.png",
        "verified_head_effect.png",
        "verified_neuron_effect.png",
        "atp_star_vs_exact.png",
    }
    text = path.read_text()
    assert "grey = not verified" in text and "verified exact effect" in text
    assert text.count("data:image/png;base64,") == len(names)


def test_report_of_unverified_summed_result_has_scores_only(tmp_path):
    results, _ = suite()
    r = results["atp"]
    path = write_report(tmp_path, {"atp": r}, settings={"note": "x"})
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "atp_head_score.png",
        "atp_neuron_score.png",
    }
    text = path.read_text()
    assert "Estimate vs exact" not in text and "Exact effects" not in text


def test_per_position_report_has_position_heatmaps_with_tokens(tmp_path):
    results, exact = suite(per_position=True)
    tokens = ["<s>", "When", " Mary", " $x"]
    path = write_report(
        tmp_path, {"atp*": results["atp*"]}, settings={}, exact=exact, tokens=tokens
    )
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"atp_star_head_positions.png", "atp_star_neuron_positions.png"} <= names
    text = path.read_text()
    assert "per position (4 positions)" in text
    assert text.count("data:image/png;base64,") == len(names)
    with pytest.raises(ValueError, match="tokens"):
        write_report(tmp_path / "bad", {"atp*": results["atp*"]}, settings={}, tokens=["a"])


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="at least one result"):
        write_report(tmp_path, {}, settings={})
    with pytest.raises(TypeError, match="not an Attribution"):
        write_report(tmp_path, {"x": object()}, settings={})
