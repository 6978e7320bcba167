"""The `manymodels` command: the whole pipeline and each stage from a terminal.

A thin adapter over `shared.runs.pipeline`. Flags override the workdir's remembered config (itself
created from `--config FILE` or the defaults), so later commands on a workdir need no column
flags. Errors print one line and exit non-zero; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

from shared.cli_commands import (
    LEASES, WRITERS, writes_workdir, _holder_text, cmd_demo, cmd_generate, cmd_ingest, cmd_models,
    cmd_promote, cmd_report, cmd_run, cmd_score, cmd_serve, cmd_train,
)
from shared import package_version
from shared.results import failures
from shared.config import DataSpec, ForecastSpec
from shared.errors import ManyModelsError

EXIT_USAGE = 2  # a ManyModelsError (or a missing input file): the message says what to change
EXIT_FAILED = 1  # anything else is unexpected: a bug or the environment; --debug shows the traceback
EXIT_PARTIAL = 3  # the command finished but did not deliver everything: its summary says what and why
# Errors meant for users: ours by type, plus a named input file that does not exist.
USER_ERRORS: tuple[type[BaseException], ...] = (ManyModelsError, FileNotFoundError)


def _bounded(name: str, kind: type = float) -> Callable[[str], int | float]:
    """An argparse type: the flag's value parsed, then checked against the one table of bounds
    (:data:`shared.bounds.BOUNDS`), so ``--min-accuracy nan`` is refused like ``min_value = nan``."""
    from shared import bounds

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from exc
        try:
            return bounds.check(name, value)
        except bounds.BoundsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=os.environ.get("MM_WORKDIR", "./mm"),
                        help="workspace folder (lake, registries, SQL file, report); default ./mm or $MM_WORKDIR")
    parser.add_argument("--config", help="project TOML file (used when the workdir has no remembered config)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _data_flags(parser: argparse.ArgumentParser) -> None:
    # the defaults the help states are the config's own (one place to change them)
    data, fc = DataSpec(), ForecastSpec()
    g = parser.add_argument_group("data and forecasting (override the config)")
    g.add_argument("--keys", help=f"partition key columns, comma-separated (default {','.join(data.keys)})")
    g.add_argument("--time", help=f"time column (default {data.time})")
    g.add_argument("--target", help=f"target column (default {data.target})")
    g.add_argument("--covariates", help="known-in-advance covariate columns, comma-separated, e.g. price,promo "
                                        f"(default {','.join(data.covariates) or 'none'}; '' for none)")
    g.add_argument("--freq", help="pandas offset alias (D, W, MS, M, Q ...) or 'int' for integer periods "
                                  f"(default {data.freq})")
    g.add_argument("--horizon", type=int, help=f"periods to forecast (default {fc.horizon})")
    g.add_argument("--test-periods", type=int, help=f"held-out test window (default {fc.test_periods})")
    g.add_argument("--validation-periods", type=int,
                   help=f"model-selection window, each fold (default {fc.validation_periods})")
    g.add_argument("--season-length", type=int, help="periods per season (default from --freq)")
    r = parser.add_argument_group("reading the input (override the config)")
    r.add_argument("--time-format", help="strptime format of text times, e.g. '%%d.%%m.%%Y' (default: inferred)")
    r.add_argument("--dayfirst", action="store_true", default=None,
                   help="text dates are day first: 03/04/2024 is 3 April")
    r.add_argument("--delimiter", help="CSV field delimiter (default: sniffed from the header among , ; tab |)")
    r.add_argument("--decimal", help="decimal mark of CSV numbers: '.' or ',' (default '.')")
    r.add_argument("--thousands", help="thousands separator of CSV numbers, e.g. ',' in 24,924.50 (default none)")
    r.add_argument("--encoding", help="text encoding of CSV files (default utf-8; latin-1, cp1252...)")
    g.add_argument("--seed", type=int, help="random seed for the models")
    g.add_argument("--workers", type=int, help="worker processes (0 = one per CPU)")
    g.add_argument("--mini-batch-size", type=int, help="files per run(mini_batch) call")
    g.add_argument("--rows-per-file", type=int, help="rows per mini-batch file when partitioning")


# -- parser -------------------------------------------------------------------------------------
def _reset_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reset", action="store_true",
                        help="first clear this workdir's data, models, results and remembered config "
                             "(needed to change the partition keys or time column of a workdir)")


def _writer_lock(args: argparse.Namespace):
    """The workdir's writer lock for a command that changes it, else None."""
    from shared.locking import WorkdirLock

    if not writes_workdir(args):
        return None
    return WorkdirLock(Path(args.workdir).resolve(), _holder_text(args), wait=getattr(args, "wait", 0.0) or 0.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manymodels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"manymodels {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str, data: bool = True, epilog: str | None = None
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog)
        _common(p)
        if data:
            _data_flags(p)
        if name in WRITERS:
            p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                           help="wait up to SECONDS for another command changing the workdir to finish "
                                "(default: refuse at once, naming it)")
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("generate", help="write a synthetic retail panel (CSV or Parquet by suffix)",
                       description="write a synthetic retail panel (store x item series with price and "
                                   "promotion covariates, gaps and intermittent series), streamed; its "
                                   "columns are the defaults of --keys, --time and --target, and models use "
                                   "its covariates when asked: --covariates price,promo")
    p.add_argument("--partitions", type=_bounded("generate.partitions", int), default=500,
                   help="number of series (default 500)")
    p.add_argument("--periods", type=_bounded("generate.periods", int), default=156,
                   help="periods per series (default 156)")
    p.add_argument("--freq", default="W", help="pandas offset alias of the periods (default W)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--intermittent", type=float, default=None, metavar="SHARE",
                   help="share of intermittent-demand series, mostly zeros (default 0.10)")
    p.add_argument("--out", required=True, help="file to write: .csv or .parquet")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_generate)

    p = add("ingest", cmd_ingest, "validate and partition a data set into the lake")
    p.add_argument("--data", required=True, help="CSV or Parquet file/folder, or odbc:<connection string>")
    p.add_argument("--query", help="SQL query, with an odbc: source")
    _reset_flag(p)

    p = add("train", cmd_train, "train a model per partition of the latest (or given) dataset")
    p.add_argument("--dataset", help="dataset id (default: the latest ingested)")
    p.add_argument("--run-id", help="run id (default: derived from the dataset and config)")
    p.add_argument("--full", action="store_true",
                   help="retrain every partition (default: only those whose data or training config changed)")

    p = add("promote", cmd_promote, "apply promotion rules and copy eligible models to production")
    p.add_argument("--run-id", help="training run (default: the latest)")
    p.add_argument("--min-accuracy", type=_bounded("min_accuracy"), help="accuracy threshold (default from config, 0.80)")

    p = add("score", cmd_score, "batch-score with production models and load predictions into SQL")
    p.add_argument("--data", help="scoring file: key, time and covariate columns (default: next --horizon periods)")

    p = add("report", cmd_report, "write the HTML dashboard from the SQL store", data=False)
    p.add_argument("--out", help="output HTML path (default WORKDIR/report.html)")

    p = add("run", cmd_run, "the whole pipeline: ingest, train, promote, score, report")
    p.add_argument("--data", required=True, help="CSV or Parquet file/folder, or odbc:<connection string>")
    p.add_argument("--scoring-data", help="scoring file (default: the next --horizon periods)")
    p.add_argument("--min-accuracy", type=_bounded("min_accuracy"), help="promotion accuracy threshold (default 0.80)")
    p.add_argument("--full", action="store_true",
                   help="retrain every partition (default: only those whose data or training config changed)")
    _reset_flag(p)

    p = add("demo", cmd_demo, "generate a demo panel and run the whole pipeline on it (with its price and "
                              "promo covariates unless --covariates says otherwise)")
    p.add_argument("--partitions", type=_bounded("generate.partitions", int), default=500)
    p.add_argument("--periods", type=_bounded("generate.periods", int), default=156)
    p.add_argument("--min-accuracy", type=_bounded("min_accuracy"))
    _reset_flag(p)
    p.set_defaults(seed=0)

    p = add("models", cmd_models, "list or show registered models, filtered by tags", data=False,
            epilog="examples: models show store=S001,item=I0001 | models show p0123456789abcdef0123 | "
                   "models list store=S001 | models list --tag store=S001 --registry prod")
    p.add_argument("action", choices=["list", "show", "seal", "verify"],
                   help="list, show PARTITION, seal (record the digests of legacy models), verify (check "
                        "every model file against its recorded SHA-256)")
    p.add_argument("partition", nargs="*", metavar="PARTITION",
                   help="show: the partition's key values, KEY=VALUE for every key column, comma- or "
                        "space-separated (store=S001,item=I0001), or its id (p..., as `models list` "
                        "prints); list: KEY=VALUE filters")
    p.add_argument("--registry", choices=["dev", "prod"],
                   help="dev (default for list and show) or prod; seal and verify do both by default")
    p.add_argument("--wait", type=float, default=0.0, help="seal: seconds to wait for another writer")
    p.add_argument("--tag", action="append",
                   help="filter NAME=VALUE (repeatable), e.g. --tag store=S001; show: one per key column")
    p.add_argument("--run-id")
    p.add_argument("--version", type=int)
    p.add_argument("--limit", type=int, default=50)

    p = add("serve", cmd_serve, "serve real-time predictions over HTTP on 127.0.0.1", data=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--cache-mb", type=float, default=None,
                   help="model cache size in MB (default: MM_SERVING_CACHE_MB, else 512)")
    return parser


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (``manymodels models list | head -1``): not an error.
    Further writes go to /dev/null so that the interpreter's final flush does not fail either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    code = _main(args)
    if code not in (0, EXIT_PARTIAL):
        _remove_if_left_empty(args)
    return code


def _remove_if_left_empty(args: argparse.Namespace) -> None:
    """A command that failed on a workdir it created leaves nothing behind: not an empty folder
    holding only its lock file (the next attempt, or a typo'd path, would find it)."""
    workdir = getattr(args, "workdir", None)
    if not workdir or getattr(args, "_workdir_existed", True):
        return
    from shared.locking import LOCK_FILE

    root = Path(workdir)
    if root.is_dir() and all(p.is_dir() or p.name == LOCK_FILE for p in root.rglob("*")):
        shutil.rmtree(root, ignore_errors=True)


def _main(args: argparse.Namespace) -> int:
    workdir = getattr(args, "workdir", None)
    args._workdir_existed = bool(workdir) and Path(workdir).exists()
    try:
        lock = _writer_lock(args)
        # serve stops on SIGTERM by itself (the server's own handler); every other command unwinds
        terminate = failures.sigterm_raises() if args.command != "serve" else contextlib.nullcontext()
        with terminate, lock if lock is not None else contextlib.nullcontext(), LEASES:
            result = args.func(args)
    except failures.Terminated:
        print("terminated by SIGTERM: stopped; rerun the same command to resume where it stopped",
              file=sys.stderr)
        return failures.EXIT_TERMINATED
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        if args.command == "serve":
            print("server stopped", file=sys.stderr)
            return 0
        print("interrupted: rerun the same command to resume where it stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI boundary turns every error into one line
        if args.debug:
            raise
        cause = failures.explain(exc, getattr(args, "workdir", None))
        if cause is not None:  # the environment (a full disk, a memory limit), named with the fix
            print(f"error: {cause}", file=sys.stderr)
            return EXIT_FAILED
        known = isinstance(exc, USER_ERRORS)
        text = str(exc).strip().splitlines()
        message = text[0] if known and text else f"{type(exc).__name__}: {' '.join(text)[:500]}"
        if known and len(text) > 1:
            message = " | ".join(t.strip() for t in text[:8])
        print(f"error: {message}" + ("" if known else " (run with --debug for the traceback)"), file=sys.stderr)
        code = EXIT_USAGE if known else EXIT_FAILED
        if getattr(args, "json", False):  # a script reading stdout gets the error as JSON too
            print(json.dumps({"error": message, "exit_code": code}, sort_keys=True))
        return code
    problems = list(result.get("problems") or []) if isinstance(result, dict) else []
    code = EXIT_PARTIAL if problems else 0
    if problems:
        print(f"incomplete (exit {EXIT_PARTIAL}): {len(problems)} problem(s)", file=sys.stderr)
        for line in problems[:10]:
            print(f"  {line}", file=sys.stderr)
    if args.json:
        try:
            print(json.dumps({**result, "exit_code": code} if isinstance(result, dict) else result,
                             default=str, sort_keys=True))
        except BrokenPipeError:
            return _quiet_broken_pipe()
    return code


if __name__ == "__main__":
    sys.exit(main())
