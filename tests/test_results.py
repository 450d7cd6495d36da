"""Writing results atomically: a failure leaves earlier files and folders as they were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atp_nnsight.results import Attribution, atomic_folder, atomic_paths


def _result(scale: float = 1.0) -> Attribution:
    per_pair = scale * np.arange(6, dtype=np.float32).reshape(2, 3)
    return Attribution(
        nodes=pd.DataFrame(
            {
                "kind": ["head"] * 3,
                "layer": [0, 0, 1],
                "index": [0, 1, 0],
                "position": pd.array([None] * 3, dtype="Int64"),
            }
        ),
        scores=np.abs(per_pair).mean(0),
        per_pair=per_pair,
        mean_effect=per_pair.mean(0),
        method="atp",
        direction="noising",
        metric="logit-diff",
        model="tiny",
        cost=8.0,
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_save_and_csv_round_trip_into_new_folders(tmp_path):
    result = _result()
    npz = result.save(tmp_path / "a" / "res")
    csv = result.to_csv(tmp_path / "b" / "res.csv")
    assert npz == tmp_path / "a" / "res.npz"
    np.testing.assert_array_equal(Attribution.load(npz).per_pair, result.per_pair)
    np.testing.assert_allclose(pd.read_csv(csv)["score"], result.scores)
    assert sorted(_files(tmp_path)) == ["a/res.npz", "b/res.csv"]


@pytest.mark.parametrize("write", ["to_csv", "save"])
def test_failed_write_keeps_the_earlier_file(tmp_path, monkeypatch, write):
    path = tmp_path / ("res.csv" if write == "to_csv" else "res.npz")
    getattr(_result(), write)(path)
    before = _files(tmp_path)

    def fail(target, *args, **kwargs):
        Path(target).write_bytes(b"partial")
        raise OSError("disk full")

    if write == "to_csv":
        monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, target, **kw: fail(target))
    else:
        monkeypatch.setattr(np, "savez_compressed", fail)
    with pytest.raises(OSError, match="disk full"):
        getattr(_result(scale=2.0), write)(path)
    assert _files(tmp_path) == before


def test_atomic_paths_publish_all_or_nothing(tmp_path):
    first, second = tmp_path / "x.csv", tmp_path / "x.npz"
    first.write_text("old csv")
    with pytest.raises(RuntimeError), atomic_paths(first, second) as (tmp_first, _):
        tmp_first.write_text("new csv")
        raise RuntimeError("the second write failed")
    assert _files(tmp_path) == {"x.csv": b"old csv"}
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_paths(first, second) as (tmp_first, _):
            tmp_first.write_text("new csv")
    assert _files(tmp_path) == {"x.csv": b"old csv"}
    with atomic_paths(first, second) as (tmp_first, tmp_second):
        assert tmp_first.suffix == ".csv" and tmp_second.suffix == ".npz"
        tmp_first.write_text("new csv")
        tmp_second.write_text("new npz")
    assert _files(tmp_path) == {"x.csv": b"new csv", "x.npz": b"new npz"}


def test_atomic_folder_replaces_only_when_complete(tmp_path):
    target = tmp_path / "report"
    with atomic_folder(target) as staging:
        (staging / "report.html").write_text("first")
    assert _files(tmp_path) == {"report/report.html": b"first"}
    with pytest.raises(KeyboardInterrupt), atomic_folder(target) as staging:
        (staging / "report.html").write_text("half")
        raise KeyboardInterrupt
    assert _files(tmp_path) == {"report/report.html": b"first"}
    with atomic_folder(target) as staging:
        (staging / "report.html").write_text("second")
        (staging / "fig.png").write_text("png")
    assert _files(tmp_path) == {"report/report.html": b"second", "report/fig.png": b"png"}


def test_nan_scores_rank_last():
    result = _result()
    result.scores[0] = np.nan
    assert result.ranking().tolist() == [2, 1, 0]
    assert result.top(1)["index"].tolist() == [0] and result.top(1)["layer"].tolist() == [1]
