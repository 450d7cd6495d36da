"""``atp-nnsight``: a thin command line over the library.

Subcommands: ``patch`` (exact activation patching), ``attribute`` (AtP family), ``run`` (the
main job: AtP*, verification of the top nodes of each kind, an HTML report), ``diagnose``
(verify the top of an AtP ranking and bound what it missed), ``plan`` (size a run from the
model config, before it starts), ``check-remote`` (the smallest NDIF job, to check a
remote setup) and ``circuit`` (edge attribution, a pruned circuit, its faithfulness curve
and an HTML report; :mod:`atp_nnsight.circuit_cli`).

Outputs: ``--out NAME.csv`` or ``--out NAME.npz`` writes both ``NAME.csv`` (one row per node:
``kind,layer,index,position,score,mean_effect``; for ``diagnose`` the flagged nodes) and
``NAME.npz`` (the full result with per-pair values, ``Attribution.load``). ``run --out FOLDER``
writes a report folder. Every output is written to a temporary name beside its target and
renamed into place, so a failure leaves earlier outputs intact and never a half-written one.

Every input that can be checked without the model is checked first (pairs file, node kinds,
layers against the model's ``config.json``, output paths, numeric options): input errors exit
with code 2 in well under a second. Heavy libraries (torch, transformers, nnsight, pandas) are
imported only once a command runs. Long runs checkpoint finished chunks (default: a folder per
run under the cache); rerunning an interrupted command resumes from them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from atp_nnsight import checks
from atp_nnsight.types import NODE_KINDS, parse_kinds, parse_layers

ALL_KINDS = ",".join(NODE_KINDS)
RUN_KINDS = "head,q,k,v,neuron"
REPORT_MARKER = "report.html"
"""The file that marks a folder as an earlier report, which ``run`` may replace."""

EXIT_INPUT_ERROR = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

CHECK_REMOTE_HELP = "run the smallest meaningful NDIF job to check your setup"
CIRCUIT_HELP = "edge attribution (eap, eap-ig, eap*, ...), a circuit, its faithfulness, a report"
PLAN_HELP = (
    "size a run before it starts, from the model config alone: nodes, passes, peak memory "
    "per chunk, NDIF requests and bytes, time"
)

OUT_HELP = (
    "NAME.csv or NAME.npz: writes both NAME.csv (one row per node) and NAME.npz (full result, "
    "Attribution.load); each file is written atomically"
)

# Options that change only what is shown or where it goes, not what is computed.
_PRESENTATION_OPTIONS = ("out", "top", "no_progress", "checkpoint_dir", "command_line")


# ---- option types (argparse reports their errors with exit code 2) --------------------------


def _int_type(minimum: int, fix: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        try:
            return checks.check_int(value, "the value", minimum, fix)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("the value ")) from None

    return parse


def _float_type(check: Callable[[float, str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        try:
            return check(value, "the value")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("the value ")) from None

    return parse


POSITIVE = _int_type(1)
NON_NEGATIVE = _int_type(0)
BATCH_SIZE = _int_type(1, "omit --batch-size to size batches from the memory budget")
FRACTION = _float_type(checks.check_fraction)
POSITIVE_FLOAT = _float_type(checks.check_positive)


# ---- the parser ------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="hub id or local directory (default: bundled SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--pairs",
        default=None,
        help="prompt pairs (.jsonl/.csv with clean,noise,clean_target,noise_target); "
        "default: built-in --task pairs",
    )
    p.add_argument(
        "--task",
        default="ioi",
        choices=["ioi", "factual", "random"],
        help="built-in task used when --pairs is not given (default: ioi)",
    )
    p.add_argument("--n-pairs", type=POSITIVE, default=16, help="built-in pairs to generate")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the built-in pairs")
    p.add_argument("--nodes", default="head", help=f"node kinds, comma-separated ({ALL_KINDS})")
    p.add_argument("--layers", default=None, help="layers, e.g. '0-3,29' (default: all)")
    p.add_argument(
        "--per-position",
        action="store_true",
        help="one node per position (0-based from the first token) instead of summed",
    )
    p.add_argument("--direction", default="noising", choices=["noising", "denoising"])
    p.add_argument("--metric", default="logit-diff", choices=["logit-diff", "logprob"])
    p.add_argument("--prepend-bos", action="store_true", help="prepend the tokenizer's BOS token")
    p.add_argument(
        "--remote",
        default="none",
        choices=["none", "local", "ndif"],
        help="run on NDIF (needs NDIF_API_KEY), or 'local' to dry-run the request",
    )
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--top", type=NON_NEGATIVE, default=20, help="rows of the ranked table to print")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where finished chunks are kept until the run succeeds; rerunning an interrupted "
        "command resumes from them (default: a folder per run under the atp_nnsight cache)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atp-nnsight",
        description="Localize a language model's behaviour to its components (AtP*, nnsight).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("patch", help="exact activation patching, one node at a time")
    _common(p)
    _batch_size(p)
    a = sub.add_parser("attribute", help="AtP / AtP+QK / AtP+GD / AtP* estimates of every node")
    _common(a)
    _method_options(a)
    r = sub.add_parser(
        "run",
        help="the main job: AtP* over head,q,k,v,neuron nodes, verify the top of each kind, "
        "write a report",
    )
    _common(r)
    r.set_defaults(nodes=RUN_KINDS, out="atp_report")
    _set_help(r, "nodes", f"node kinds, comma-separated (default {RUN_KINDS})")
    _set_help(
        r,
        "out",
        f"report folder (default atp_report); an earlier report there ({REPORT_MARKER}) is "
        "replaced once the new one is complete",
    )
    _method_options(r)
    r.add_argument("--verify", type=POSITIVE, default=10, help="top nodes of each kind to verify")
    _batch_size(r)
    r.add_argument(
        "--diagnose",
        action="store_true",
        help="also run the false-negative diagnostic on the unverified nodes and show its "
        "bound in the report (options below)",
    )
    _diagnostic_options(r)
    d = sub.add_parser(
        "diagnose",
        help="verify the top nodes of an AtP-family ranking and bound the effects it missed",
    )
    _common(d)
    _set_help(
        d,
        "out",
        "NAME.csv or NAME.npz: writes NAME.csv (flagged nodes) and NAME.npz (verified result)",
    )
    _method_options(d)
    _batch_size(d)
    d.add_argument(
        "--verify",
        type=NON_NEGATIVE,
        default=20,
        help="top nodes to verify with exact patching (K; 0 needs --theta)",
    )
    _diagnostic_options(d)
    for command, (_, help_text) in DELEGATED.items():
        sub.add_parser(command, help=help_text, add_help=False)
    return parser


def _diagnostic_options(p: argparse.ArgumentParser) -> None:
    """Options of the false-negative diagnostic (``diagnose``, and ``run --diagnose``)."""
    p.add_argument(
        "--subsets", type=_int_type(2), default=200, help="random subsets of unverified nodes (M)"
    )
    p.add_argument(
        "--p",
        type=FRACTION,
        default=None,
        help="subset inclusion probability, in (0, 1) (default min(0.5, 20/M))",
    )
    p.add_argument(
        "--theta",
        type=POSITIVE_FLOAT,
        default=None,
        help="effect size that matters (default 0.1 x the largest verified |effect|)",
    )
    p.add_argument(
        "--delta",
        type=FRACTION,
        default=0.05,
        help="1 - confidence of the bound, in (0, 1) (default 0.05)",
    )
    p.add_argument("--subset-seed", type=NON_NEGATIVE, default=0, help="seed of the random subsets")


def _batch_size(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size",
        type=BATCH_SIZE,
        default=None,
        help="patched rows per forward (default: sized from the memory budget)",
    )


def _method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="atp*", choices=["atp", "atp+qk", "atp+gd", "atp*"])
    p.add_argument(
        "--pairs-per-chunk",
        type=POSITIVE,
        default=16,
        help="pairs per forward/backward and per remote session",
    )


def _set_help(p: argparse.ArgumentParser, dest: str, text: str) -> None:
    for action in p._actions:
        if action.dest == dest:
            action.help = text


# ---- checks before the model is loaded -------------------------------------------------------


def output_files(out: str) -> tuple[Path, Path]:
    """``(NAME.csv, NAME.npz)`` for ``--out NAME.csv`` or ``--out NAME.npz``."""
    path = Path(out)
    if path.suffix.lower() not in (".csv", ".npz"):
        raise ValueError(
            f"--out {out!r} must end in .csv or .npz (both NAME.csv and NAME.npz are written), "
            f"e.g. --out {path.with_suffix('.csv')}"
        )
    return path.with_suffix(".csv"), path.with_suffix(".npz")


def _option(name: str, check: Callable[[], Any]) -> Any:
    """Run ``check``; prefix its error with the option it is about."""
    try:
        return check()
    except (ValueError, TypeError) as err:
        raise type(err)(f"{name}: {err}") from None


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model: node kinds, model folder and config, layers against
    it, the pairs file, output paths and option combinations. Raises ``ValueError``,
    ``TypeError`` or ``FileNotFoundError`` with a one-line message."""
    _option("--nodes", lambda: parse_kinds(args.nodes))
    if args.remote == "ndif" and args.model is None:
        raise ValueError(
            "--remote ndif needs --model with the hub id of a model hosted on NDIF (e.g. "
            "meta-llama/Llama-3.1-8B); the bundled model runs locally only"
        )
    config = _option("--model", lambda: checks.read_model_config(args.model))
    n_layers = checks.config_n_layers(config) if config is not None else sys.maxsize
    _option("--layers", lambda: parse_layers(args.layers, n_layers))
    if args.pairs is not None:
        from atp_nnsight.data import load_pairs

        pairs = _option("--pairs", lambda: load_pairs(args.pairs))
        _option("--pairs", lambda: checks.check_pair_texts(pairs, metric=args.metric))
    if args.command == "run":
        checks.check_output_folder(args.out, "--out", replaced_if=REPORT_MARKER)
    elif args.out is not None:
        for path in output_files(args.out):
            checks.check_output_file(path, "--out")
    if args.checkpoint_dir is not None:
        checks.check_output_folder(args.checkpoint_dir, "--checkpoint-dir")
    if args.command == "diagnose" and args.verify == 0 and args.theta is None:
        raise ValueError(
            "--verify 0 verifies nothing, so theta is needed: give --theta (the effect size "
            "that matters), or verify some nodes (the default theta is 0.1 x the largest "
            "verified |effect|)"
        )


# ---- loading and checking the inputs ---------------------------------------------------------


def load_inputs(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The model and prompt pairs the arguments ask for."""
    from atp_nnsight.data import keep_correct, load_pairs, make_task
    from atp_nnsight.models.loading import load_model

    model = load_model(args.model, remote=args.remote == "ndif")
    if args.pairs is not None:
        pairs = load_pairs(args.pairs)
    else:
        pairs = make_task(args.task, args.n_pairs, seed=args.seed, tokenizer=model.tokenizer)
        if args.remote != "ndif":
            pairs = keep_correct(model, pairs, prepend_bos=args.prepend_bos)
    return model, pairs


def check_loaded_pairs(model: Any, pairs: list[Any], args: argparse.Namespace) -> None:
    """Token-level checks of the pairs under the model's tokenizer, before any compute."""
    from atp_nnsight.data import tokenize_pairs

    tokenized = tokenize_pairs(pairs, model.tokenizer, prepend_bos=args.prepend_bos)
    checks.check_distinct_targets(tokenized, metric=args.metric)


def _input_errors() -> tuple[type[BaseException], ...]:
    from atp_nnsight.models.loading import BundledModelMissingError, ModelLoadError

    return (ValueError, TypeError, FileNotFoundError, ModelLoadError, BundledModelMissingError)


def _error(err: BaseException | str, code: int = EXIT_INPUT_ERROR) -> int:
    print(f"atp-nnsight: error: {err}", file=sys.stderr)
    return code


@contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Show warnings (e.g. about suspicious pairs) as one ``atp-nnsight: warning:`` line."""

    def show(message: Any, category: Any, *_: Any, **__: Any) -> None:
        print(f"atp-nnsight: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


# ---- checkpoints -----------------------------------------------------------------------------


def checkpoint_root(args: argparse.Namespace, model: Any, pairs: list[Any]) -> Path:
    """``--checkpoint-dir``, or ``<cache>/runs/cli-<command>-<key>``: the key hashes the model,
    the pairs and every option that changes the computation, so a rerun finds its chunks."""
    if args.checkpoint_dir is not None:
        return Path(args.checkpoint_dir).expanduser()
    from atp_nnsight.methods.common import model_name
    from atp_nnsight.models.loading import cache_dir

    settings = {k: v for k, v in vars(args).items() if k not in _PRESENTATION_OPTIONS}
    settings["model"] = model_name(model)
    settings["pairs"] = [p.to_dict() for p in pairs]
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "runs" / f"cli-{args.command}-{key}"


def _remove_checkpoints(root: Path, steps: Sequence[str]) -> None:
    """Delete the step folders of a finished run (and ``root`` once it is empty)."""
    for step in steps:
        shutil.rmtree(root / step, ignore_errors=True)
    try:
        root.rmdir()
    except OSError:  # missing, or holds other things (a user-chosen folder)
        pass


# ---- commands --------------------------------------------------------------------------------


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """How every model computation of a command runs: remote backend, progress, BOS."""
    return dict(
        remote=_remote(args.remote), progress=not args.no_progress, prepend_bos=args.prepend_bos
    )


def _remote(value: str) -> Any:
    return {"none": False, "local": "local", "ndif": True}[value]


def print_table(df: Any, title: str) -> None:
    show = df[["rank", "kind", "layer", "index", "position", "score", "mean_effect"]]
    print(f"\n{title}")
    print(show.to_string(index=False, float_format=lambda x: f"{x:.4f}"))


def write_outputs(result: Any, out: str | None) -> None:
    """``NAME.csv`` and ``NAME.npz`` of ``--out``, published together (see the module doc)."""
    if out is None:
        return
    from atp_nnsight.results import atomic_paths

    csv, npz = output_files(out)
    with atomic_paths(csv, npz) as (tmp_csv, tmp_npz):
        result.to_csv(tmp_csv)
        result.save(tmp_npz)
    print(f"\nwrote {csv} (node scores) and {npz} (full result)")


def _attribute(model: Any, pairs: Any, args: argparse.Namespace, **run: Any) -> Any:
    from atp_nnsight.methods.atp import attribute

    return attribute(
        model,
        pairs,
        args.nodes,
        method=args.method,
        layers=args.layers,
        per_position=args.per_position,
        direction=args.direction,
        metric=args.metric,
        pairs_per_chunk=args.pairs_per_chunk,
        **run,
    )


class _Run:
    """One command's model, pairs and checkpoint folder; reports errors with exit codes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.perf_counter()
        self.model: Any = None
        self.pairs: list[Any] = []
        self.root: Path | None = None
        self.steps: list[str] = []

    def load(self) -> None:
        self.model, self.pairs = load_inputs(self.args)
        check_loaded_pairs(self.model, self.pairs, self.args)
        self.root = checkpoint_root(self.args, self.model, self.pairs)
        print(
            f"checkpoints: {self.root} (rerun the same command to resume if interrupted)",
            file=sys.stderr,
        )

    def rank(self) -> tuple[Any, dict[str, Any]]:
        """Load, then rank with the AtP-family method (checkpointed); refuse nan/inf scores.
        Returns the result and the run options the later steps share."""
        self.load()
        options = _run_options(self.args)
        result = _attribute(
            self.model,
            self.pairs,
            self.args,
            checkpoint_dir=self.checkpoint("attribute"),
            **options,
        )
        checks.check_finite_scores(result)
        return result, options

    def diagnose(self, result: Any, verified: Any, options: dict[str, Any]) -> Any:
        """The false-negative diagnostic of ``result``'s unverified nodes (checkpointed), with
        the command's ``--subsets/--p/--theta/--delta/--subset-seed``."""
        from atp_nnsight.evaluation import diagnose

        args = self.args
        return diagnose(
            self.model,
            self.pairs,
            result,
            verified=verified,
            n_subsets=args.subsets,
            p=args.p,
            theta=args.theta,
            delta=args.delta,
            seed=args.subset_seed,
            batch_size=args.batch_size,
            checkpoint_dir=self.checkpoint("diagnose"),
            **options,
        )

    def checkpoint(self, step: str) -> Path:
        assert self.root is not None
        self.steps.append(step)
        return self.root / step

    def finish(self) -> None:
        if self.root is not None:
            _remove_checkpoints(self.root, self.steps)

    def execute(self, body: Callable[[], int]) -> int:
        """``body()``, with input errors as exit code 2 and failures as 1 (chunks kept)."""
        kept = ""
        try:
            code = body()
        except _input_errors() as err:
            return _error(err)
        except KeyboardInterrupt:
            if self.root is not None:
                kept = f"; finished chunks are kept in {self.root}, rerun to resume"
            return _error(f"interrupted{kept}", EXIT_INTERRUPTED)
        except Exception as err:
            if self.root is not None:
                kept = f" (finished chunks are kept in {self.root}; rerun to resume)"
            return _error(f"{type(err).__name__}: {err}{kept}", EXIT_FAILED)
        self.finish()
        return code

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def run_patch_or_attribute(args: argparse.Namespace) -> int:
    """``atp-nnsight patch`` / ``attribute``: score every node, print the top, write ``--out``."""
    run = _Run(args)

    def body() -> int:
        run.load()
        if args.command == "patch":
            from atp_nnsight.methods.exact import patch

            result = patch(
                run.model,
                run.pairs,
                args.nodes,
                layers=args.layers,
                per_position=args.per_position,
                direction=args.direction,
                metric=args.metric,
                batch_size=args.batch_size,
                checkpoint_dir=run.checkpoint("patch"),
                **_run_options(args),
            )
        else:
            result = _attribute(
                run.model,
                run.pairs,
                args,
                checkpoint_dir=run.checkpoint("attribute"),
                **_run_options(args),
            )
        checks.check_finite_scores(result)
        print(
            f"{result.method} on {result.model}: {len(run.pairs)} pairs, {len(result)} nodes, "
            f"{result.direction}, metric {result.metric}, cost {result.cost:g} forward passes, "
            f"{run.elapsed():.1f} s"
        )
        print_table(result.top(args.top), f"top {args.top} nodes by score")
        write_outputs(result, args.out)
        return 0

    return run.execute(body)


def run_diagnose(args: argparse.Namespace) -> int:
    """``atp-nnsight diagnose``: rank, verify the top ``--verify``, diagnose the rest."""
    run = _Run(args)

    def body() -> int:
        from atp_nnsight.evaluation import verified_table, verify
        from atp_nnsight.results import atomic_paths

        result, options = run.rank()
        verified = verify(
            run.model,
            run.pairs,
            result,
            budget=args.verify,
            batch_size=args.batch_size,
            checkpoint_dir=run.checkpoint("verify"),
            **options,
        )
        diagnosis = run.diagnose(result, verified, options)
        info = verified.metadata["verified"]
        print(
            f"{result.method} on {result.model}: {len(run.pairs)} pairs, {len(result)} nodes, "
            f"{result.direction}, metric {result.metric}; cost {result.cost:g} (ranking) + "
            f"{info['cost']:g} (verification) + {diagnosis.cost:g} (diagnostic) forward "
            f"passes, {run.elapsed():.1f} s"
        )
        table = verified_table(verified).head(args.top)
        print(f"\nverified nodes (top {len(info['order'])} by {result.method}; first {len(table)})")
        print(
            table[["step", "kind", "layer", "index", "position", "score", "exact"]].to_string(
                index=False, float_format=lambda x: f"{x:.4f}"
            )
        )
        print()
        print(diagnosis.summary(max_rows=args.top))
        print(f"decision: {'STOP' if diagnosis.stop else 'CONTINUE'} verifying")
        if args.out is not None:
            csv, npz = output_files(args.out)
            with atomic_paths(csv, npz) as (tmp_csv, tmp_npz):
                diagnosis.flagged.to_csv(tmp_csv, index=False)
                verified.save(tmp_npz)
            print(f"\nwrote {csv} (flagged nodes) and {npz} (verified result)")
        return 0

    return run.execute(body)


def run_main_job(args: argparse.Namespace) -> int:
    """``atp-nnsight run``: attribute, verify the top ``--verify`` of each kind, with
    ``--diagnose`` bound the effects of the rest, and write the report."""
    run = _Run(args)

    def body() -> int:
        from atp_nnsight.evaluation import verified_table, verify
        from atp_nnsight.report import write_report
        from atp_nnsight.results import atomic_folder

        result, options = run.rank()
        ranked_at = run.elapsed()
        verified = verify(
            run.model,
            run.pairs,
            result,
            per_kind=args.verify,
            batch_size=args.batch_size,
            checkpoint_dir=run.checkpoint("verify"),
            **options,
        )
        diagnosis = run.diagnose(result, verified, options) if args.diagnose else None
        elapsed = run.elapsed()
        info = verified.metadata["verified"]
        diagnostic = "" if diagnosis is None else f" + {diagnosis.cost:g} (diagnostic)"
        print(
            f"{result.method} on {result.model}: {len(run.pairs)} pairs, {len(result)} nodes, "
            f"{result.direction}, metric {result.metric}; cost {result.cost:g} (ranking, "
            f"{ranked_at:.0f} s) + {info['cost']:g} (verification){diagnostic} forward passes; "
            f"{elapsed:.0f} s"
        )
        table = verified_table(verified).sort_values(["kind", "rank"], kind="stable")
        columns = ["rank", "layer", "index", "position", "score", "estimate", "exact"]
        if table["estimate"].isna().all():  # unsigned method (GradDrop): no signed estimate
            columns.remove("estimate")
        if table["position"].isna().all():  # nodes summed over positions
            columns.remove("position")
        for kind, rows in table.groupby("kind", sort=False):
            print(
                f"\ntop {len(rows)} {kind} nodes by {result.method} score, verified by exact "
                "patching"
            )
            print(
                rows[columns].to_string(index=False, float_format=lambda x: f"{x:.4f}", na_rep="-")
            )
        settings = {
            "task": "pairs from " + args.pairs if args.pairs else f"built-in {args.task}",
            "seed": args.seed,
            "verified per kind": args.verify,
            "time (s)": f"{elapsed:.0f}",
            "command": f"atp-nnsight {args.command_line}",
        }
        tokens = (
            run.model.tokenizer.convert_ids_to_tokens(
                run.model.tokenizer(run.pairs[0].clean)["input_ids"]
            )
            if args.per_position
            else None
        )
        out = Path(args.out)
        with atomic_folder(out) as staging:
            html = write_report(
                staging,
                {result.method: verified},
                settings=settings,
                diagnosis=diagnosis,
                diagnose_command=f"atp-nnsight {args.command_line} --diagnose",
                tokens=tokens,
            )
        if diagnosis is not None:
            print()
            print(diagnosis.summary(max_rows=args.top))
        print(f"\nreport: {out / Path(html).relative_to(staging)}")
        return 0

    return run.execute(body)


DELEGATED: dict[str, tuple[str, str]] = {
    "check-remote": ("atp_nnsight.remote_check", CHECK_REMOTE_HELP),
    "plan": ("atp_nnsight.plan_cli", PLAN_HELP),
    "circuit": ("atp_nnsight.circuit_cli", CIRCUIT_HELP),
}
"""Subcommands whose options and behaviour live in their own module (imported only when run):
``add_arguments(parser)`` and ``run(args) -> int``."""


def run_delegated(command: str, argv: Sequence[str]) -> int:
    """Run a :data:`DELEGATED` subcommand."""
    module_name, help_text = DELEGATED[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        return _error(
            f"{command} is not available: this installation of atp_nnsight has no "
            f"{module_name} module; reinstall or update atp_nnsight (pip install -e .)"
        )
    parser = argparse.ArgumentParser(prog=f"atp-nnsight {command}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "patch": run_patch_or_attribute,
    "attribute": run_patch_or_attribute,
    "run": run_main_job,
    "diagnose": run_diagnose,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in DELEGATED:
        return run_delegated(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(argv)
    with _warnings_to_stderr():
        try:
            check_args(args)
        except (ValueError, TypeError, FileNotFoundError) as err:
            return _error(err)
        return COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
