"""The `manymodels` commands (``cmd_*``): each opens the workdir with the command's flags, calls a
stage of :mod:`shared.runs.pipeline` and prints what it did (one JSON object with ``--json``).

The parser and the error boundary are in :mod:`shared.cli`, which re-exports every name here.
"""
from __future__ import annotations

import math

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from shared.errors import ManyModelsError


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
        "data.time_format": get("time_format"),
        "data.dayfirst": get("dayfirst"),
        "ingest.delimiter": "\t" if get("delimiter") in ("tab", "\\t") else get("delimiter"),
        "ingest.decimal": get("decimal"),
        "ingest.thousands": get("thousands"),
        "ingest.encoding": get("encoding"),
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


def writes_workdir(args: argparse.Namespace) -> bool:
    """Does this command change the workdir (and so need its writer lock and the lake's lease)?"""
    return args.command in WRITERS or (args.command == "models" and getattr(args, "action", None) == "seal")


# Writer leases a command's workspaces hold until the command ends (closed by ``cli.main``).
LEASES = contextlib.ExitStack()


def _workspace(args: argparse.Namespace):
    """The workdir with this command's flags applied; nothing is saved here (see :func:`_remember`).

    A command that writes holds the lake's writer lease too (:func:`shared.runs.backends.writer_lease`):
    nothing more on a local lake, whose workdir lock ``cli.main`` already holds; the blob lease on
    a Blob lake, which other machines and the Functions app share.
    """
    from shared.runs.backends import writer_lease
    from shared.runs.workspace import Workspace

    ws = Workspace.open(args.workdir, overrides=_overrides(args), config_path=args.config, remember=False)
    if writes_workdir(args):
        LEASES.enter_context(writer_lease(ws, _holder_text(args), wait=getattr(args, "wait", 0.0) or 0.0))
    return ws


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
        from shared.runs.workspace import reset_workdir

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
    from shared.data.synthetic import COLUMNS, INTERMITTENT_SHARE, write_panel

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    share = INTERMITTENT_SHARE if getattr(args, "intermittent", None) is None else args.intermittent
    stats = write_panel(out, partitions=args.partitions, periods=args.periods, freq=args.freq, seed=args.seed,
                        intermittent_share=share)
    _say(args, f"wrote {stats.get('rows', '?')} rows for {args.partitions} partitions to {out} "
               f"(columns {', '.join(COLUMNS)}; models use price and promo with --covariates price,promo)")
    return {"path": str(out), **{k: v for k, v in stats.items() if isinstance(v, (int, float, str))}}


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from shared.runs.pipeline import ingest

    _reset(args)
    ws = _workspace(args)
    summary = ingest(ws, args.data, query=args.query)
    _remember(args, ws)
    _say(args, f"dataset {summary.dataset_id}: {summary.partitions} partitions, {summary.rows} rows"
               + (" (already ingested)" if summary.reused else ""))
    if summary.rewrote:
        _say(args, f"  {summary.rewrote}")
    for line in _report_lines(summary.report):
        _say(args, f"  {line}")
    for line in _repair_lines(summary.report, ws.config.data.freq):
        _say(args, f"  {line}")
    return summary.to_dict()


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from shared.runs.pipeline import train

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
    problems = training_problems(reg.failed, reg.failures, len(failed_batches),
                                 [str(b.get("error")) for b in failed_batches])
    return {**reg.to_dict(), "partitions": plan.partitions, "failed_batches": len(failed_batches),
            "problems": problems}


def cmd_promote(args: argparse.Namespace) -> dict[str, Any]:
    from shared.runs.pipeline import promote

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
    from shared.runs.pipeline import score

    ws = _workspace(args)
    plan, loaded = score(ws, data=args.data, horizon=args.horizon, progress=_progress(args))
    _say(args, f"scoring {plan.score_id}: {loaded.rows} predictions for {loaded.partitions} partitions "
               f"({loaded.fallback_partitions} from a fallback source, {loaded.no_model} without a model, "
               f"{loaded.failed} failed) -> {ws.sql_location}")
    return {**loaded.to_dict(), "sql": ws.sql_location,
            "problems": scoring_problems(loaded.failed, loaded.degraded, loaded.problems)}


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from shared.runs.pipeline import report

    ws = _workspace(args)
    path = report(ws, Path(args.out) if args.out else None)
    _say(args, f"report: {path}")
    return {"report": str(path)}


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from shared.runs.pipeline import run_all

    _reset(args)
    ws = _workspace(args)
    summary = run_all(ws, args.data, min_accuracy=args.min_accuracy, progress=_progress(args),
                      scoring_data=args.scoring_data, full=args.full)
    _remember(args, ws)
    _print_run_summary(args, summary)
    return {**summary, "problems": run_problems(summary)}


DEMO_COVARIATES = "price,promo"  # the generated panel's covariates, which `demo` uses (none is the default)


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from shared.runs.pipeline import run_all
    from shared.runs.workspace import Workspace
    from shared.data.synthetic import write_panel

    started = time.perf_counter()
    if getattr(args, "covariates", None) is None:  # the demo shows covariates: named, as a user would
        args.covariates = DEMO_COVARIATES
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
    if summary["report"]:
        _say(args, f"open it:   {summary['report']}")
    return {**summary, "problems": run_problems(summary)}


def cmd_models(args: argparse.Namespace) -> dict[str, Any]:
    ws = _workspace(args)
    if args.action in ("seal", "verify"):
        return _seal_or_verify(args, ws)
    registry = ws.prod if args.registry == "prod" else ws.dev
    args.registry = args.registry or "dev"
    tags = dict(_parse_tag(t) for t in (args.tag or []))
    if args.action == "show":
        partition = _partition_to_show(ws, registry, args.registry, args.partition or [], tags)
        record = registry.latest(partition) if args.version is None else registry.get(partition, args.version)
        if record is None:
            raise _UsageError(f"no model for partition {partition} in the {args.registry} registry"
                              + (f" (version {args.version})" if args.version is not None else ""))
        row = _record_dict(record)
        _say(args, json.dumps(row, indent=2, default=str))
        return row
    for text in args.partition or []:  # `models list store=S001`: filters, as --tag store=S001
        if "=" not in text:
            raise _UsageError(f"models list {text!r}: expected KEY=VALUE filters (e.g. store=S001); "
                              "`models show` takes a partition id")
        tags.update(_key_values(text, "models list"))
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
    from shared.registries.registry import ArtifactIntegrityError, RegistryError

    names = [args.registry] if args.registry else ["dev", "prod"]
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name in names:
        registry = ws.prod if name == "prod" else ws.dev
        if not registry.sealable:
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


SHOWN_VALUES = 10  # existing partitions or key values an error of `models show` lists


def _key_values(text: str, what: str) -> dict[str, str]:
    """``store=3,item=7`` as ``{"store": "3", "item": "7"}`` (a value holding a comma: use --tag)."""
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise _UsageError(f"{what} {text!r}: expected KEY=VALUE pairs separated by commas, e.g. "
                              f"store=S001,item=I0001 (a value holding a comma: --tag KEY=VALUE)")
        out[name.strip()] = value
    return out


def _partition_to_show(ws: Any, registry: Any, where: str, words: list[str], tags: dict[str, str]) -> str:
    """The partition id `models show` names: an id (``p`` + 20 hex digits, ``_global``), the partition's key
    values (``store=S001,item=I0001``, or ``store=S001 item=I0001``), or one ``--tag`` per key column.
    Key values that name several partitions, an unknown key column or values no model has are
    refused, naming what exists."""
    from shared.keys import describe

    keys = list(ws.config.data.keys)
    example = ",".join(f"{k}=..." for k in keys)
    ids = [w for w in words if "=" not in w]  # p + 20 hex digits (or _global: the run's global model)
    if ids:
        if len(words) > 1 or tags:
            raise _UsageError(f"models show: give a partition id or its key values ({example}), not both")
        return ids[0]
    named = dict(tags)
    for word in words:
        for name, value in _key_values(word, "models show").items():
            if named.get(name, value) != value:
                raise _UsageError(f"models show: {name} is given twice ({named[name]!r} and {value!r})")
            named[name] = value
    if not named:
        raise _UsageError(f"models show needs a partition: its key values ({example}) or its id (p..., "
                          "from `models list`)")
    unknown = [k for k in named if k not in keys]
    if unknown:
        raise _UsageError(f"models show: unknown key column(s) {unknown}; the partition keys are {keys} "
                          f"(e.g. models show {example})")
    found = registry.find(named, limit=SHOWN_VALUES + 1, latest_only=True)
    if not found:
        raise _UsageError(f"models show {describe(named)}: no model in the {where} registry; "
                          + _what_exists(registry, keys, named))
    missing = [k for k in keys if k not in named]
    if missing:  # several partitions share these values: name them
        listed = "; ".join(describe({k: r.tags.get(k, "?") for k in keys}) for r in found[:SHOWN_VALUES])
        more = "more than " if len(found) > SHOWN_VALUES else ""
        raise _UsageError(f"models show {describe(named)}: {more}{min(len(found), SHOWN_VALUES)} partitions match, "
                          f"not one; add {', '.join(missing)}: {listed}")
    return found[0].partition_id


def _what_exists(registry: Any, keys: list[str], named: dict[str, str]) -> str:
    """Why no model matches key values: the first value no model has, with values that exist (or,
    each value existing, the partitions that share the first one)."""
    from shared.keys import describe

    for name, value in named.items():
        if registry.find({name: value}, limit=1, latest_only=True):
            continue
        seen: list[str] = []
        for record in registry.find(None, limit=2000, latest_only=True):
            text = record.tags.get(name)
            if text is not None and text not in seen:
                seen.append(text)
        shown = ", ".join(seen[:SHOWN_VALUES]) + (", ..." if len(seen) > SHOWN_VALUES else "")
        return f"no model has {name}={value}; {name} values with a model: {shown or 'none (the registry is empty)'}"
    first = next(iter(named.items()))
    with_first = registry.find(dict([first]), limit=SHOWN_VALUES + 1, latest_only=True)
    listed = "; ".join(describe({k: r.tags.get(k, "?") for k in keys}) for r in with_first[:SHOWN_VALUES])
    return (f"each value has models but not together; partitions with {first[0]}={first[1]}: {listed}"
            + ("; ..." if len(with_first) > SHOWN_VALUES else ""))


def _record_dict(record: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(record) if is_dataclass(record) else dict(record)


def _parse_tag(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise _UsageError(f"--tag {text!r}: expected NAME=VALUE")
    return name, value


# -- what a command did not deliver (cli.main exits EXIT_PARTIAL when there is any) ------------
def training_problems(failed: int, failures: list[dict[str, Any]], failed_batches: int,
                      batch_errors: list[str]) -> list[str]:
    """One line per kind of shortfall of a training run: partitions that failed, mini-batches lost."""
    out = []
    if failed:
        first = failures[0] if failures else {}
        out.append(f"training: {failed} partition(s) failed, e.g. {first.get('partition_id', '?')}: "
                   f"{str(first.get('reason', ''))[:300]}")
    if failed_batches:
        out.append(f"training: {failed_batches} mini-batch(es) failed after retries: "
                   f"{(batch_errors or [''])[0][:300]}")
    return out


def scoring_problems(failed: int, degraded: int, examples: list[str]) -> list[str]:
    """One line per kind of shortfall of a scoring run, then the first partitions and why."""
    out = []
    if failed:
        out.append(f"scoring: {failed} partition(s) failed: no source of the scoring chain could answer")
    if degraded:
        out.append(f"scoring: {degraded} partition(s) answered by a fallback because an artifact they "
                   "needed could not be used")
    return out + examples if out else []


def run_problems(summary: dict[str, Any]) -> list[str]:
    """The shortfalls of a whole `run` / `demo`: its training's and its scoring's."""
    return (training_problems(summary.get("failed", 0), summary.get("training_failures") or [],
                              summary.get("failed_batches", 0), [])
            + scoring_problems(summary.get("scoring_failed", 0), summary.get("degraded", 0),
                               summary.get("scoring_problems") or [])
            + ([f"the report was not written ({summary['report_error']}); the predictions are in SQL: "
                "rerun `manymodels report` once the cause is fixed"] if summary.get("report_error") else []))


# -- output -------------------------------------------------------------------------------------
def _say(args: argparse.Namespace, text: str) -> None:
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def _say_wape(args: argparse.Namespace, model: float | None, baseline: float | None) -> None:
    if model is not None and baseline is not None:
        _say(args, f"test-window WAPE: chosen models {model:.3f} vs moving-average baseline {baseline:.3f} "
                   f"({versus_baseline(model, baseline)})")


def versus_baseline(model: float, baseline: float) -> str:
    """How the chosen models compare with the baseline, in words that stay sensible at any ratio:
    a share of lower error when they did better, a multiple of the baseline's error when worse (a
    percentage of 'lower error' below -100 % says nothing: -72555972662 % once did)."""
    if not (math.isfinite(model) and math.isfinite(baseline)) or baseline <= 0:
        return "no comparison: a WAPE is undefined"
    if model <= baseline:
        return f"{(1 - model / baseline) * 100:.0f} % lower error"
    ratio = model / baseline
    return f"{ratio:.3g} times the baseline's error" if ratio < 1e6 else "over a million times the baseline's error"


def _report_lines(report: dict[str, Any]) -> list[str]:
    lines = report.get("summary_lines")
    if isinstance(lines, list):
        return [str(x) for x in lines]
    return [f"{k}: {v}" for k, v in report.items() if isinstance(v, (int, float)) and v]


def _repair_lines(report: dict[str, Any], freq: str) -> list[str]:
    """What validation repaired, counted per kind, then its warnings (the config is likely wrong)."""
    from shared.data.validation import ValidationReport

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
    _say(args, f"report:    {s['report'] or 'not written: ' + str(s.get('report_error'))}")


class _UsageError(ManyModelsError, ValueError):
    """The command line asks for something that does not exist or cannot be done."""

