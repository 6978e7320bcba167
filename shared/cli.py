"""The `manymodels` command: the whole pipeline and each stage from a terminal.

A thin adapter over `shared.pipeline`. Flags override the workdir's remembered config (itself
created from `--config FILE` or the defaults), so later commands on a workdir need no column
flags. Errors print one line and exit non-zero; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from shared.errors import ManyModelsError

EXIT_USAGE = 2  # a ManyModelsError (or a missing input file): the message says what to change
EXIT_FAILED = 1  # anything else is unexpected: a bug or the environment; --debug shows the traceback
# Errors meant for users: ours by type, plus a named input file that does not exist.
USER_ERRORS: tuple[type[BaseException], ...] = (ManyModelsError, FileNotFoundError)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=os.environ.get("MM_WORKDIR", "./mm"),
                        help="workspace folder (lake, registries, SQL file, report); default ./mm or $MM_WORKDIR")
    parser.add_argument("--config", help="project TOML file (used when the workdir has no remembered config)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _data_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data and forecasting (override the config)")
    g.add_argument("--keys", help="partition key columns, comma-separated (default store,item)")
    g.add_argument("--time", help="time column (default date)")
    g.add_argument("--target", help="target column (default sales)")
    g.add_argument("--covariates", help="known-in-advance covariate columns, comma-separated ('' for none)")
    g.add_argument("--freq", help="pandas offset alias (D, W, MS, M, Q ...) or 'int' for integer periods")
    g.add_argument("--horizon", type=int, help="periods to forecast (default 12)")
    g.add_argument("--test-periods", type=int, help="held-out test window (default 12)")
    g.add_argument("--validation-periods", type=int, help="model-selection window (default 12)")
    g.add_argument("--season-length", type=int, help="periods per season (default from --freq)")
    g.add_argument("--seed", type=int, help="random seed for the models")
    g.add_argument("--workers", type=int, help="worker processes (0 = one per CPU)")
    g.add_argument("--mini-batch-size", type=int, help="files per run(mini_batch) call")
    g.add_argument("--rows-per-file", type=int, help="rows per mini-batch file when partitioning")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    def listed(value: str | None) -> list[str] | None:
        if value is None:
            return None
        return [v.strip() for v in value.split(",") if v.strip()]

    get = lambda name: getattr(args, name, None)  # noqa: E731
    overrides = {
        "data.keys": listed(get("keys")),
        "data.time": get("time"),
        "data.target": get("target"),
        "data.covariates": listed(get("covariates")),
        "data.freq": get("freq"),
        "forecast.horizon": get("horizon"),
        "forecast.test_periods": get("test_periods"),
        "forecast.validation_periods": get("validation_periods"),
        "forecast.season_length": get("season_length"),
        "training.seed": get("seed"),
        "runner.workers": get("workers"),
        "runner.mini_batch_size": get("mini_batch_size"),
        "runner.rows_per_file": get("rows_per_file"),
    }
    if get("no_progress"):
        overrides["runner.progress"] = False
    return overrides


# Commands that change the workdir hold its writer lock (shared.locking) for their whole run;
# the others (models list/show/verify, report, serve) work alongside them.
WRITERS = ("ingest", "train", "promote", "score", "run", "demo")
# Commands that define the project: only they save the workdir's config, and only once they succeed.
PROJECT_COMMANDS = ("ingest", "run", "demo")
# How one command runs, never what the project is: never saved, whichever command gives them.
ONE_OFF = ("runner.workers", "runner.mini_batch_size", "runner.rows_per_file", "runner.progress")


def _workspace(args: argparse.Namespace):
    """The workdir with this command's flags applied; nothing is saved here (see :func:`_remember`)."""
    from shared.workspace import Workspace

    return Workspace.open(args.workdir, overrides=_overrides(args), config_path=args.config, remember=False)


def _remember(args: argparse.Namespace, ws: Any) -> None:
    """Save the project's config once a project-defining command succeeded: the remembered (or
    --config) file with this command's column and forecasting flags, never the one-off ones."""
    from shared.config import load_config

    overrides = {k: v for k, v in _overrides(args).items() if k not in ONE_OFF}
    base = Path(args.config) if args.config else (ws.config_file if ws.config_file.is_file() else None)
    project = load_config(base, overrides)
    text = project.to_toml()
    if not ws.config_file.is_file() or ws.config_file.read_text(encoding="utf-8") != text:
        project.save(ws.config_file)


def _reset(args: argparse.Namespace) -> None:
    if getattr(args, "reset", False):
        from shared.workspace import reset_workdir

        removed = reset_workdir(args.workdir)
        if removed:
            _say(args, f"reset {args.workdir}: removed {', '.join(removed)}")


def _holder_text(args: argparse.Namespace) -> str:
    """What the lock file says this command does (no connection strings: --data odbc:... is shown
    as 'odbc:...', a file by its name)."""
    words = [args.command]
    if args.command == "models":
        words.append(args.action)
    data = getattr(args, "data", None)
    if data:
        text = str(data)
        words += ["--data", "odbc:..." if text.startswith("odbc:") else Path(text).name]
    return "manymodels " + " ".join(words)


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


# -- commands -----------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from shared.synthetic import write_panel

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = write_panel(out, partitions=args.partitions, periods=args.periods, freq=args.freq, seed=args.seed)
    _say(args, f"wrote {stats.get('rows', '?')} rows for {args.partitions} partitions to {out}")
    return {"path": str(out), **{k: v for k, v in stats.items() if isinstance(v, (int, float, str))}}


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from shared.pipeline import ingest

    _reset(args)
    ws = _workspace(args)
    summary = ingest(ws, args.data, query=args.query)
    _remember(args, ws)
    _say(args, f"dataset {summary.dataset_id}: {summary.partitions} partitions, {summary.rows} rows"
               + (" (already ingested)" if summary.reused else ""))
    for line in _report_lines(summary.report):
        _say(args, f"  {line}")
    for line in _repair_lines(summary.report, ws.config.data.freq):
        _say(args, f"  {line}")
    return summary.to_dict()


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from shared.pipeline import train

    ws = _workspace(args)
    plan, groups, reg = train(ws, args.dataset, run_id=args.run_id, progress=_progress(args), full=args.full)
    _say(args, f"run {plan.run_id}: trained {reg.trained}, baseline only {reg.baseline_only}, "
               f"failed {reg.failed}, skipped {reg.skipped}; registered {reg.registered} in dev"
               + (f"; carried forward {reg.carried} unchanged" if reg.carried else ""))
    _say_wape(args, reg.model_wape, reg.baseline_wape)
    for failure in reg.failures[:5]:
        _say(args, f"  failed {failure['partition_id']}: {failure['reason']}")
    failed_batches = [f for g in groups for f in g.failed_batches]
    for batch in failed_batches[:5]:
        _say(args, f"  mini-batch failed after retries: {batch.get('files')} {str(batch.get('error'))[:200]}")
    return {**reg.to_dict(), "partitions": plan.partitions, "failed_batches": len(failed_batches)}


def cmd_promote(args: argparse.Namespace) -> dict[str, Any]:
    from shared.pipeline import promote

    ws = _workspace(args)
    summary = promote(ws, args.run_id, min_accuracy=args.min_accuracy)
    _say(args, f"run {summary.run_id}: promoted {summary.promoted}, rejected {summary.rejected}, "
               f"unchanged {summary.unchanged}; {summary.in_production} of its models are in production")
    for reason, count in sorted(summary.reasons.items(), key=lambda kv: -kv[1]):
        _say(args, f"  rejected ({reason}): {count}")
    if summary.reconciled:
        _say(args, f"  recorded {summary.reconciled} earlier promotion(s) that the SQL store was missing")
    return summary.to_dict()


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    from shared.pipeline import score

    ws = _workspace(args)
    plan, loaded = score(ws, data=args.data, horizon=args.horizon, progress=_progress(args))
    _say(args, f"scoring {plan.score_id}: {loaded.rows} predictions for {loaded.partitions} partitions "
               f"({loaded.fallback_partitions} from a fallback source, {loaded.no_model} without a model, "
               f"{loaded.failed} failed) -> {ws.sql_location}")
    return {**loaded.to_dict(), "sql": ws.sql_location}


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from shared.pipeline import report

    ws = _workspace(args)
    path = report(ws, Path(args.out) if args.out else None)
    _say(args, f"report: {path}")
    return {"report": str(path)}


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from shared.pipeline import run_all

    _reset(args)
    ws = _workspace(args)
    summary = run_all(ws, args.data, min_accuracy=args.min_accuracy, progress=_progress(args),
                      scoring_data=args.scoring_data, full=args.full)
    _remember(args, ws)
    _print_run_summary(args, summary)
    return summary


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from shared.pipeline import run_all
    from shared.workspace import Workspace
    from shared.synthetic import write_panel

    started = time.perf_counter()
    _reset(args)
    root = Path(args.workdir)
    data = root / "data" / "sales.parquet"
    data.parent.mkdir(parents=True, exist_ok=True)
    if not data.exists():
        stats = write_panel(data, partitions=args.partitions, periods=args.periods, freq="W", seed=args.seed)
        _say(args, f"generated {stats.get('rows', '?')} rows: {args.partitions} store x item series, "
                   f"{args.periods} weeks -> {data}")
    ws = Workspace.open(root, overrides=_overrides(args), config_path=args.config, remember=False)
    summary = run_all(ws, data, min_accuracy=args.min_accuracy, progress=_progress(args))
    _remember(args, ws)
    summary["seconds"]["total"] = round(time.perf_counter() - started, 2)
    _print_run_summary(args, summary)
    _say(args, "")
    _say(args, f"query it:  python -c \"import sqlite3; print(sqlite3.connect('{summary['sql']}')"
               f".execute('select * from predictions limit 5').fetchall())\"")
    _say(args, f"open it:   {summary['report']}")
    return summary


def cmd_models(args: argparse.Namespace) -> dict[str, Any]:
    ws = _workspace(args)
    if args.action in ("seal", "verify"):
        return _seal_or_verify(args, ws)
    registry = ws.prod if args.registry == "prod" else ws.dev
    args.registry = args.registry or "dev"
    tags = dict(_parse_tag(t) for t in (args.tag or []))
    if args.action == "show":
        partition = args.partition or _partition_from_tags(ws, tags)
        record = registry.latest(partition) if args.version is None else registry.get(partition, args.version)
        if record is None:
            raise _UsageError(f"no model for partition {partition} in the {args.registry} registry")
        row = _record_dict(record)
        _say(args, json.dumps(row, indent=2, default=str))
        return row
    records = registry.find(tags or None, limit=args.limit, run_id=args.run_id)
    rows = [_record_dict(r) for r in records]
    for r in rows:
        acc = (r.get("metrics") or {}).get("accuracy")
        acc_text = f"{acc:.3f}" if isinstance(acc, (int, float)) and acc == acc else "  n/a"
        keys = " ".join(f"{k}={v}" for k, v in (r.get("tags") or {}).items() if k in ws.config.data.keys)
        _say(args, f"{r['partition_id']}  v{r['version']:<3} {r.get('model_type', ''):<10} acc {acc_text}  {keys}")
    _say(args, f"{len(rows)} model(s) in {args.registry}")
    return {"registry": args.registry, "count": len(rows), "models": rows if args.json else []}


def _seal_or_verify(args: argparse.Namespace, ws: Any) -> dict[str, Any]:
    """`models seal`: record the SHA-256 of legacy models (registered before digests) as they are now.
    `models verify`: check every model file against its recorded SHA-256, unpickling nothing."""
    from shared.registry import ArtifactIntegrityError, RegistryError

    names = [args.registry] if args.registry else ["dev", "prod"]
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name in names:
        registry = ws.prod if name == "prod" else ws.dev
        if not hasattr(registry, "seal"):
            raise _UsageError(f"the {name} registry ({type(registry).__name__}) keeps its own digests: "
                              f"'models {args.action}' is for local registries")
        if args.action == "seal":
            sealed = registry.seal()
            _say(args, f"{name}: sealed {sealed} model(s) that had no recorded SHA-256")
            out[name] = {"sealed": sealed}
            continue
        checked, bad = 0, []
        for record in registry.find(include_global=True):
            checked += 1
            try:
                registry.verify(record)
            except (ArtifactIntegrityError, RegistryError) as exc:
                bad.append(f"{record.partition_id} v{record.version}: {exc}")
        _say(args, f"{name}: {checked - len(bad)} of {checked} model file(s) match their recorded SHA-256")
        for line in bad[:20]:
            _say(args, f"  refused {line}")
        out[name] = {"checked": checked, "failed": len(bad)}
        problems += [f"{name} {line}" for line in bad]
    if problems:
        raise RegistryError(f"{len(problems)} model file(s) fail verification and will not be loaded: "
                            f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return out


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from shared.serving import serve

    serve(Path(args.workdir), host=args.host, port=args.port, cache_mb=args.cache_mb)
    return {}


def _partition_from_tags(ws: Any, tags: dict[str, str]) -> str:
    """`models show --tag store=S001 --tag item=I0001`: every key column names one partition."""
    from shared.keys import PartitionKeyError, partition_of

    try:
        return partition_of(ws.config.data.keys, tags)[0]
    except PartitionKeyError as exc:
        raise _UsageError(f"models show needs a partition id (p...) or one --tag per key column: "
                          f"{exc.message}") from exc


def _record_dict(record: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(record) if is_dataclass(record) else dict(record)


def _parse_tag(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise _UsageError(f"--tag {text!r}: expected NAME=VALUE")
    return name, value


# -- output -------------------------------------------------------------------------------------
def _say(args: argparse.Namespace, text: str) -> None:
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def _say_wape(args: argparse.Namespace, model: float | None, baseline: float | None) -> None:
    if model is not None and baseline is not None:
        gain = (1 - model / baseline) * 100 if baseline else 0.0
        _say(args, f"test-window WAPE: chosen models {model:.3f} vs moving-average baseline {baseline:.3f} "
                   f"({gain:.0f} % lower error)")


def _report_lines(report: dict[str, Any]) -> list[str]:
    lines = report.get("summary_lines")
    if isinstance(lines, list):
        return [str(x) for x in lines]
    return [f"{k}: {v}" for k, v in report.items() if isinstance(v, (int, float)) and v]


def _repair_lines(report: dict[str, Any], freq: str) -> list[str]:
    """What validation repaired, counted per kind, then its warnings (the config is likely wrong)."""
    from shared.validation import ValidationReport

    checked = ValidationReport.from_dict(report)
    repairs = checked.repairs()
    lines = ["repairs: " + (", ".join(f"{kind} {n}" for kind, n in sorted(repairs.items())) if repairs else "none")]
    return lines + [f"warning: {text}" for text in checked.warnings(freq)]


def _print_run_summary(args: argparse.Namespace, s: dict[str, Any]) -> None:
    _say(args, "")
    _say(args, f"partitions {s['partitions']}  trained {s['trained']} (baseline only {s['baseline_only']})  "
               f"failed {s['failed']}  skipped {s['skipped']}")
    _say(args, f"promoted {s['promoted']}  rejected {s['rejected']}  "
               + "  ".join(f"[{k}: {v}]" for k, v in s.get("rejection_reasons", {}).items()))
    _say(args, f"predictions {s['predictions']} rows for {s['scored_partitions']} partitions "
               f"({s['fallback_partitions']} from the scoring chain's fallbacks: unpromoted, global or baseline)")
    _say_wape(args, s.get("model_wape"), s.get("baseline_wape"))
    repairs = s.get("repairs") or {}
    _say(args, "repairs: " + (", ".join(f"{k} {n}" for k, n in sorted(repairs.items())) if repairs else "none"))
    for text in s.get("warnings") or []:
        _say(args, f"warning: {text}")
    _say(args, "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["seconds"].items()))
    _say(args, f"SQL store: {s['sql']}")
    _say(args, f"report:    {s['report']}")


class _UsageError(ManyModelsError, ValueError):
    """The command line asks for something that does not exist or cannot be done."""


# -- parser -------------------------------------------------------------------------------------
def _reset_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reset", action="store_true",
                        help="first clear this workdir's data, models, results and remembered config "
                             "(needed to change the partition keys or time column of a workdir)")


def _writer_lock(args: argparse.Namespace):
    """The workdir's writer lock for a command that changes it, else None."""
    from shared.locking import WorkdirLock

    writes = args.command in WRITERS or (args.command == "models" and args.action == "seal")
    if not writes:
        return None
    return WorkdirLock(Path(args.workdir).resolve(), _holder_text(args), wait=getattr(args, "wait", 0.0) or 0.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manymodels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str, data: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        if data:
            _data_flags(p)
        if name in WRITERS:
            p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                           help="wait up to SECONDS for another command changing the workdir to finish "
                                "(default: refuse at once, naming it)")
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("generate", help="write a synthetic retail panel (CSV or Parquet by suffix)")
    p.add_argument("--partitions", type=int, default=500)
    p.add_argument("--periods", type=int, default=156)
    p.add_argument("--freq", default="W")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")
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
    p.add_argument("--min-accuracy", type=float, help="accuracy threshold (default from config, 0.80)")

    p = add("score", cmd_score, "batch-score with production models and load predictions into SQL")
    p.add_argument("--data", help="scoring file: key, time and covariate columns (default: next --horizon periods)")

    p = add("report", cmd_report, "write the HTML dashboard from the SQL store", data=False)
    p.add_argument("--out", help="output HTML path (default WORKDIR/report.html)")

    p = add("run", cmd_run, "the whole pipeline: ingest, train, promote, score, report")
    p.add_argument("--data", required=True, help="CSV or Parquet file/folder, or odbc:<connection string>")
    p.add_argument("--scoring-data", help="scoring file (default: the next --horizon periods)")
    p.add_argument("--min-accuracy", type=float, help="promotion accuracy threshold (default 0.80)")
    p.add_argument("--full", action="store_true",
                   help="retrain every partition (default: only those whose data or training config changed)")
    _reset_flag(p)

    p = add("demo", cmd_demo, "generate a demo panel and run the whole pipeline on it")
    p.add_argument("--partitions", type=int, default=500)
    p.add_argument("--periods", type=int, default=156)
    p.add_argument("--min-accuracy", type=float)
    _reset_flag(p)
    p.set_defaults(seed=0)

    p = add("models", cmd_models, "list or show registered models, filtered by tags", data=False)
    p.add_argument("action", choices=["list", "show", "seal", "verify"],
                   help="list, show PARTITION, seal (record the digests of legacy models), verify (check "
                        "every model file against its recorded SHA-256)")
    p.add_argument("partition", nargs="?", help="partition id, for show")
    p.add_argument("--registry", choices=["dev", "prod"],
                   help="dev (default for list and show) or prod; seal and verify do both by default")
    p.add_argument("--wait", type=float, default=0.0, help="seal: seconds to wait for another writer")
    p.add_argument("--tag", action="append", help="filter NAME=VALUE (repeatable), e.g. --tag store=S001")
    p.add_argument("--run-id")
    p.add_argument("--version", type=int)
    p.add_argument("--limit", type=int, default=50)

    p = add("serve", cmd_serve, "serve real-time predictions over HTTP on 127.0.0.1", data=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--cache-mb", type=int, default=512)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        lock = _writer_lock(args)
        if lock is None:
            result = args.func(args)
        else:
            with lock:
                result = args.func(args)
    except KeyboardInterrupt:
        if args.command == "serve":
            print("server stopped", file=sys.stderr)
            return 0
        print("interrupted: rerun the same command to resume where it stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI boundary turns every error into one line
        if args.debug:
            raise
        known = isinstance(exc, USER_ERRORS)
        text = str(exc).strip().splitlines()
        message = text[0] if known and text else f"{type(exc).__name__}: {' '.join(text)[:500]}"
        if known and len(text) > 1:
            message = " | ".join(t.strip() for t in text[:8])
        print(f"error: {message}" + ("" if known else " (run with --debug for the traceback)"), file=sys.stderr)
        return EXIT_USAGE if known else EXIT_FAILED
    if args.json:
        print(json.dumps(result, default=str, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
