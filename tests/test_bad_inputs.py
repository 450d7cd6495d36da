"""Bad inputs, as a new user would try them: each gets one clear message naming the problem
and the fix, the CLI exits with code 2 before loading any model, and nothing is written."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atp_nnsight import checks, cli
from atp_nnsight.data import load_pairs, tokenize_pairs
from atp_nnsight.models.tiny import tiny_tokenizer
from atp_nnsight.results import Attribution
from atp_nnsight.types import parse_kinds, parse_layers

GOOD_PAIR = {"clean": "w1 w2 w3", "noise": "w4 w5 w6", "clean_target": " w7", "noise_target": " w8"}


@dataclass
class Files:
    """Inputs of the bad-input cases, made fresh in a temporary folder for every case."""

    root: Path

    def path(self, name: str) -> str:
        return str(self.root / name)

    def write(self, name: str, text: str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return str(path)

    def model(self, name: str = "model", config: dict | None = None, files=None) -> str:
        """A model folder that passes the file checks but holds no real weights: the CLI must
        fail before it would load them."""
        config = {"model_type": "llama", "num_hidden_layers": 8} if config is None else config
        self.write(f"{name}/config.json", json.dumps(config))
        for file in ("model.safetensors", "tokenizer.json") if files is None else files:
            self.write(f"{name}/{file}", "")
        return self.path(name)

    def pairs(self, rows: list[dict], name: str = "pairs.jsonl") -> str:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class CliCase:
    id: str
    argv: Callable[[Files], list[str]]
    problem: str
    fix: str


def _with_model(*extra: str) -> Callable[[Files], list[str]]:
    return lambda f: ["patch", "--model", f.model(), "--pairs", f.pairs([GOOD_PAIR]), *extra]


CLI_CASES = [
    CliCase("batch-size -1", _with_model("--batch-size", "-1"), "must be positive", "omit"),
    CliCase("batch-size 0", _with_model("--batch-size", "0"), "--batch-size", "omit"),
    CliCase("batch-size text", _with_model("--batch-size", "ten"), "whole number", "'ten'"),
    CliCase(
        "pairs-per-chunk 0",
        lambda f: ["attribute", "--pairs-per-chunk", "0"],
        "--pairs-per-chunk",
        "positive",
    ),
    CliCase("n-pairs 0", lambda f: ["patch", "--n-pairs", "0"], "--n-pairs", "positive"),
    CliCase("seed -1", lambda f: ["patch", "--seed", "-1"], "--seed", ">= 0"),
    CliCase("top -3", lambda f: ["attribute", "--top", "-3"], "--top", ">= 0"),
    CliCase("p 2", lambda f: ["diagnose", "--p", "2"], "--p", "strictly between 0 and 1"),
    CliCase("p 0", lambda f: ["diagnose", "--p", "0"], "--p", "strictly between 0 and 1"),
    CliCase("delta 1.5", lambda f: ["diagnose", "--delta", "1.5"], "--delta", "between 0 and 1"),
    CliCase("theta -1", lambda f: ["diagnose", "--theta", "-1"], "--theta", "positive"),
    CliCase("subsets 1", lambda f: ["diagnose", "--subsets", "1"], "--subsets", ">= 2"),
    CliCase(
        "diagnose verify 0 without theta",
        lambda f: ["diagnose", "--verify", "0", "--pairs", f.pairs([GOOD_PAIR])],
        "theta is needed",
        "give --theta",
    ),
    CliCase("run verify 0", lambda f: ["run", "--verify", "0"], "--verify", "positive"),
    CliCase("unknown kind", _with_model("--nodes", "heads"), "'heads'", "did you mean 'head'"),
    CliCase("no kinds", _with_model("--nodes", ","), "no node kinds", "choose from"),
    CliCase("reversed range", _with_model("--layers", "5-2"), "reversed layer range", "'2-5'"),
    CliCase(
        "reversed range in a list",
        _with_model("--layers", "0-2,5-2"),
        "'5-2'",
        "write it as '2-5'",
    ),
    CliCase("float layer", _with_model("--layers", "0.7"), "'0.7'", "whole layer numbers"),
    CliCase("negative layer", _with_model("--layers", "-1"), "'-1'", "whole layer numbers"),
    CliCase("layer out of range", _with_model("--layers", "3,9"), "9 out of range", "0-7"),
    CliCase("empty layers", _with_model("--layers", ","), "no layers selected", "'0-3,29'"),
    CliCase(
        "bundled model layer out of range",
        lambda f: ["attribute", "--layers", "40"],
        "40 out of range",
        "0-29",
    ),
    CliCase(
        "missing model folder",
        lambda f: ["patch", "--model", f.path("nope")],
        "no such local folder",
        "save_pretrained",
    ),
    CliCase(
        "model is a file",
        lambda f: ["patch", "--model", f.write("weights.bin", "x")],
        "is a file",
        "pass the folder",
    ),
    CliCase(
        "folder with only config.json",
        lambda f: ["patch", "--model", f.model(files=())],
        "no weights",
        "tokenizer.save_pretrained(folder)",
    ),
    CliCase(
        "folder without tokenizer",
        lambda f: ["patch", "--model", f.model(files=("model.safetensors",))],
        "no tokenizer files",
        "tokenizer.save_pretrained(folder)",
    ),
    CliCase(
        "folder without config",
        lambda f: ["patch", "--model", str(Path(f.write("m/README.md", "hi")).parent)],
        "no config.json",
        "save_pretrained()",
    ),
    CliCase(
        "unsupported architecture",
        lambda f: ["patch", "--model", f.model(config={"model_type": "bert"})],
        "unsupported architecture 'bert'",
        "llama",
    ),
    CliCase(
        "broken config.json",
        lambda f: ["patch", "--model", str(Path(f.write("m/config.json", "{")).parent)],
        "not readable JSON",
        "save_pretrained()",
    ),
    CliCase(
        "missing pairs file",
        lambda f: ["patch", "--pairs", f.path("pairs.jsonl")],
        "no such prompt-pair file",
        "check the path",
    ),
    CliCase(
        "pairs file extension",
        lambda f: ["patch", "--pairs", f.write("pairs.txt", "x")],
        "unknown file extension '.txt'",
        ".jsonl, .csv",
    ),
    CliCase(
        "pairs csv unknown column",
        lambda f: ["patch", "--pairs", f.write("p.csv", "clean,noise,target\na,b,c\n")],
        "unknown field(s) 'target'",
        "allowed fields",
    ),
    CliCase(
        "pairs missing field",
        lambda f: ["patch", "--pairs", f.pairs([{"clean": "w1", "noise": "w2"}])],
        "missing field(s) 'clean_target', 'noise_target'",
        "line 1",
    ),
    CliCase(
        "pairs bad json",
        lambda f: ["patch", "--pairs", f.write("p.jsonl", '{"clean": "w1",\n')],
        "bad JSON",
        "line 1",
    ),
    CliCase(
        "pairs empty file",
        lambda f: ["patch", "--pairs", f.write("p.jsonl", "\n")],
        "no prompt pairs",
        "give at least one pair",
    ),
    CliCase(
        "identical prompts",
        lambda f: ["patch", "--pairs", f.pairs([GOOD_PAIR, {**GOOD_PAIR, "noise": "w1 w2 w3"}])],
        "pair 1: clean and noise prompts are the same",
        "make each noise prompt differ",
    ),
    CliCase(
        "identical targets",
        lambda f: ["patch", "--pairs", f.pairs([{**GOOD_PAIR, "noise_target": " w7"}])],
        "pair 0: clean_target and noise_target are the same",
        "logprob",
    ),
    CliCase("out suffix", _with_model("--out", "scores.txt"), "must end in .csv or .npz", ".csv"),
    CliCase(
        "out is a folder",
        lambda f: ["patch", "--out", str(Path(f.write("res.csv/keep", "")).parent)],
        "is a folder",
        "give a file name",
    ),
    CliCase(
        "out npz beside is a folder",
        lambda f: ["patch", "--out", f.write("res.npz/keep", "").replace("npz/keep", "csv")],
        "res.npz' is a folder",
        "give a file name",
    ),
    CliCase(
        "out below a file",
        lambda f: ["attribute", "--out", f.write("notes.txt", "x") + "/scores.csv"],
        "is a file, so no folder can be made there",
        "choose another path",
    ),
    CliCase(
        "out in an unwritable folder",
        lambda f: ["patch", "--out", "/proc/atp-nnsight/scores.csv"],
        "cannot write in '/proc'",
        "writable folder",
    ),
    CliCase(
        "run out is a file",
        lambda f: ["run", "--out", f.write("report", "x")],
        "is an existing file",
        "give a folder name",
    ),
    CliCase(
        "run out holds other files",
        lambda f: ["run", "--out", str(Path(f.write("mine/thesis.tex", "x")).parent)],
        "already holds other files",
        "new folder name",
    ),
    CliCase(
        "remote ndif without a model",
        lambda f: ["attribute", "--remote", "ndif"],
        "needs --model",
        "hub id",
    ),
    CliCase(
        "checkpoint dir is a file",
        lambda f: ["patch", "--checkpoint-dir", f.write("ckpt", "x")],
        "--checkpoint-dir",
        "give a folder name",
    ),
    CliCase(
        "unknown direction",
        lambda f: ["patch", "--direction", "sideways"],
        "invalid choice: 'sideways'",
        "noising",
    ),
    CliCase(
        "unknown method",
        lambda f: ["attribute", "--method", "atp**"],
        "invalid choice: 'atp**'",
        "atp+qk",
    ),
]


def _snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")
    )


@pytest.fixture
def no_model_load(monkeypatch, tmp_path):
    """Fail the test if a command gets as far as loading a model; run in an empty folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input error was found")

    monkeypatch.setattr(cli, "load_inputs", refuse)
    monkeypatch.setattr("atp_nnsight.models.loading.load_model", refuse)
    monkeypatch.chdir(tmp_path)
    return Files(tmp_path)


def _exit_code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as stop:  # argparse reports bad option values this way
        return int(stop.code)


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_refuses_bad_input(case, no_model_load, capsys):
    argv = case.argv(no_model_load)
    before = _snapshot(no_model_load.root)
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert case.problem in err, err
    assert case.fix in err, err
    assert "Traceback" not in err
    assert _snapshot(no_model_load.root) == before, "a failed command wrote files"


# ---- the API ---------------------------------------------------------------------------------


def _result(kinds=("head",)) -> Attribution:
    nodes = pd.DataFrame(
        {
            "kind": [k for k in kinds for _ in range(2)],
            "layer": [0, 1] * len(kinds),
            "index": [0] * 2 * len(kinds),
            "position": pd.array([None] * 2 * len(kinds), dtype="Int64"),
        }
    )
    per_pair = np.arange(6 * len(kinds), dtype=np.float32).reshape(3, -1)
    return Attribution(
        nodes=nodes,
        scores=np.abs(per_pair).mean(0),
        per_pair=per_pair,
        mean_effect=per_pair.mean(0),
        method="atp",
        direction="noising",
        metric="logit-diff",
        model="tiny",
        cost=12.0,
    )


@dataclass
class ApiCase:
    id: str
    call: Callable[[Files], object]
    error: type[Exception]
    problem: str
    fix: str


def _save_csv(f: Files) -> str:
    path = f.path("result.csv")
    _result().to_csv(path)
    _result().save(f.path("result.npz"))
    return path


API_CASES = [
    ApiCase(
        "float layers",
        lambda f: parse_layers([0.7, 1.2], 4),
        TypeError,
        "0.7 (float)",
        "whole layer numbers",
    ),
    ApiCase(
        "reversed range",
        lambda f: parse_layers("5-2", 8),
        ValueError,
        "reversed layer range '5-2'",
        "'2-5'",
    ),
    ApiCase(
        "reversed range in a list",
        lambda f: parse_layers("0-2,5-2", 8),
        ValueError,
        "'5-2' in '0-2,5-2'",
        "'2-5'",
    ),
    ApiCase(
        "layers of the wrong type",
        lambda f: parse_layers({0: 1}, 4),
        TypeError,
        "layers must be",
        "'0-3,29'",
    ),
    ApiCase(
        "layer strings in a list",
        lambda f: parse_layers(["0", "1"], 4),
        TypeError,
        "'0' (str)",
        "whole layer numbers",
    ),
    ApiCase(
        "no layers",
        lambda f: parse_layers([], 4),
        ValueError,
        "no layers selected",
        "omit layers for all",
    ),
    ApiCase("unknown kind", lambda f: parse_kinds("heads"), ValueError, "'heads'", "'head'"),
    ApiCase("kinds of the wrong type", lambda f: parse_kinds(5), TypeError, "int 5", "'head,"),
    ApiCase(
        "top of an unknown kind",
        lambda f: _result().top(kind="heads"),
        ValueError,
        "unknown node kind 'heads'",
        "did you mean 'head'",
    ),
    ApiCase(
        "top of an absent kind",
        lambda f: _result().top(kind="neuron"),
        ValueError,
        "no 'neuron' nodes",
        "its kinds are head",
    ),
    ApiCase("top -1", lambda f: _result().top(-1), ValueError, "k >= 0", "-1"),
    ApiCase(
        "select an unknown kind",
        lambda f: _result().select("mlp"),
        ValueError,
        "unknown node kind 'mlp'",
        "choose from",
    ),
    ApiCase(
        "load a csv",
        lambda f: Attribution.load(_save_csv(f)),
        ValueError,
        "not a saved Attribution",
        "result.npz instead",
    ),
    ApiCase(
        "load a missing file",
        lambda f: Attribution.load(f.path("none.npz")),
        FileNotFoundError,
        "no saved result",
        "none.npz",
    ),
    ApiCase(
        "load a broken npz",
        lambda f: Attribution.load(f.write("broken.npz", "not a zip")),
        ValueError,
        "not a readable .npz",
        "write it again",
    ),
    ApiCase(
        "load another npz",
        lambda f: Attribution.load(_other_npz(f)),
        ValueError,
        "not a saved Attribution",
        "Attribution.save",
    ),
    ApiCase(
        "one pair without a list",
        lambda f: load_pairs(GOOD_PAIR),
        TypeError,
        "single dict",
        "wrap it in a list",
    ),
    ApiCase("pairs of the wrong type", lambda f: load_pairs(5), TypeError, "from a int", ".jsonl"),
    ApiCase(
        "a model as the tokenizer",
        lambda f: tokenize_pairs([GOOD_PAIR], object()),
        TypeError,
        "tokenizer must be",
        "model.tokenizer",
    ),
    ApiCase(
        "identical prompts",
        lambda f: tokenize_pairs([{**GOOD_PAIR, "noise": "w1  w2 w3"}], tiny_tokenizer()),
        ValueError,
        "pair 0: clean and noise prompts are the same tokens",
        "make each noise prompt differ",
    ),
    ApiCase(
        "target not in the vocabulary",
        lambda f: tokenize_pairs([{**GOOD_PAIR, "clean_target": " Sam"}], tiny_tokenizer()),
        ValueError,
        "' Sam' is not in the vocabulary",
        "a word the tokenizer knows",
    ),
    ApiCase(
        "a model name instead of a model",
        lambda f: checks.check_model("gpt2"),
        TypeError,
        "model must be an nnsight model",
        "load_model('gpt2')",
    ),
    ApiCase(
        "a metric of the wrong type",
        lambda f: checks.check_metric(5),
        TypeError,
        "int 5",
        "'logit-diff', 'logprob' or a callable",
    ),
    ApiCase(
        "batch size -1",
        lambda f: checks.check_int(-1, "batch_size"),
        ValueError,
        "batch_size must be positive",
        "-1",
    ),
    ApiCase(
        "a float batch size",
        lambda f: checks.check_int(2.0, "batch_size"),
        TypeError,
        "batch_size must be an integer",
        "float 2.0",
    ),
]


def _other_npz(f: Files) -> str:
    path = f.path("other.npz")
    np.savez(path, x=np.zeros(3))
    return path


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_refuses_bad_input(case, tmp_path):
    files = Files(tmp_path)
    with pytest.raises(case.error) as info:
        case.call(files)
    message = str(info.value)
    assert case.problem in message, message
    assert case.fix in message, message
    assert "allow_pickle" not in message
    assert "\n" not in message, "messages are one line"


def test_at_least_forty_bad_inputs_are_covered():
    assert len(CLI_CASES) >= 40 and len(CLI_CASES) + len(API_CASES) >= 60


# ---- speed: --help and input errors never import the heavy libraries -------------------------


HEAVY = ("torch", "transformers", "nnsight", "pandas", "matplotlib", "numpy")


def test_help_and_input_errors_import_nothing_heavy(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({**GOOD_PAIR, "noise": GOOD_PAIR["clean"]}) + "\n")
    script = f"""
import contextlib, io, sys
from atp_nnsight.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(["--help"])
    except SystemExit:
        pass
codes = [
    main(["patch", "--layers", "5-2"]),
    main(["attribute", "--nodes", "heads"]),
    main(["patch", "--pairs", {str(pairs)!r}]),
    main(["run", "--out", {str(pairs)!r}]),
]
print(codes, [m for m in {HEAVY!r} if m in sys.modules])
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert out.stdout.strip() == "[2, 2, 2, 2] []", out.stdout + out.stderr


# ---- the methods' entry checks ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from atp_nnsight.models.tiny import tiny_model

    return tiny_model("llama")


def _methods():
    from atp_nnsight import attribute, patch

    return attribute, patch


@pytest.mark.parametrize("method", ["attribute", "patch"])
def test_methods_refuse_a_model_name(method):
    fn = dict(zip(["attribute", "patch"], _methods(), strict=True))[method]
    with pytest.raises(TypeError, match=r"load_model.*got str|got str.*load_model"):
        fn("gpt2", [GOOD_PAIR], progress=False)


@pytest.mark.parametrize("method", ["attribute", "patch"])
def test_methods_refuse_a_metric_of_the_wrong_type(tiny, method):
    fn = dict(zip(["attribute", "patch"], _methods(), strict=True))[method]
    with pytest.raises(TypeError, match="metric must be 'logit-diff', 'logprob' or a callable"):
        fn(tiny, [GOOD_PAIR], metric=5, progress=False)


def test_patch_refuses_a_negative_batch_size(tiny):
    _, patch = _methods()
    with pytest.raises(ValueError, match="batch_size must be positive, got -1"):
        patch(tiny, [GOOD_PAIR], batch_size=-1, progress=False)


@pytest.mark.parametrize("method", ["attribute", "patch"])
def test_methods_refuse_a_non_finite_metric(tiny, method):
    import torch

    fn = dict(zip(["attribute", "patch"], _methods(), strict=True))[method]

    def log_of_zero(logits, clean_target, noise_target):
        return torch.log(logits[:, -1, 0] * 0)

    with pytest.raises(ValueError, match="pair 0: the metric is -inf on the clean run"):
        fn(tiny, [GOOD_PAIR], metric=log_of_zero, progress=False)


@pytest.mark.parametrize("method", ["attribute", "patch"])
def test_methods_refuse_identical_targets_under_logit_diff(tiny, method):
    fn = dict(zip(["attribute", "patch"], _methods(), strict=True))[method]
    with pytest.raises(ValueError, match="nothing to attribute"):
        fn(tiny, [{**GOOD_PAIR, "noise_target": "w7"}], progress=False)
