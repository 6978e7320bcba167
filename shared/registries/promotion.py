"""Promotion: business rules decide which trained models reach the production registry.

Every dev model of a run gets one :class:`Decision` with a human-readable reason ("accuracy
0.742 < 0.80", "champion accuracy 0.91 >= challenger 0.88"). Eligible models are verified (their
artifact's bytes against the SHA-256 the dev registry recorded: a damaged one is rejected alone,
with the reason) and copied into the production registry in one transaction. Promotion is
idempotent: promoting a run twice finds its models already in production (by run id and
partition) and reports them "unchanged".

The production copy carries its decision in its tags (``promotion_*``): the production index is the
record of what was promoted, and the SQL store's ``promotions`` rows are rebuilt from it when they
are missing (:func:`decision_of`, used by ``shared.runs.pipeline.promote`` to reconcile after a crash or
a failed store write between the copy and the SQL write).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from shared.config import PromotionRules
from shared.models.global_model import GLOBAL_ID
from shared.models.metric_names import lower_is_better
from shared.models.metrics import metric_value
from shared.registries.registry import ModelRecord, ModelRegistry, RegistryError

PROMOTABLE_STATUSES = ("trained", "baseline_only")
DECISION_TAGS = ("reason", "metric", "value", "threshold", "champion_value")  # as promotion_<name>
# The rule a rejected model failed, one word each, set where the rule is applied: the run summary
# counts rejections by it ("rejection_reasons"), never by the first word of the sentence.
REJECTION_CODES = (
    "status",  # its training status is not promotable (failed, skipped)
    "metric",  # the promotion metric is missing or NaN
    "accuracy",  # the metric misses rules.min_value (whatever the metric: not accurate enough)
    "history",  # too few observed periods, or unknown
    "champion",  # the production model is as good or better
    "artifact",  # its artifact changed or vanished since it was registered
)


@dataclass
class Decision:
    """One partition's promotion outcome.

    ``value``/``champion_value`` are the compared metric; ``prod_version`` is the production
    version created (promoted), already holding this run's model (unchanged), or the champion's
    version that was not beaten (rejected). ``code`` is the rule a rejected model failed (one of
    :data:`REJECTION_CODES`; empty otherwise), ``reason`` the same in words.
    """

    partition_id: str
    run_id: str
    decision: str  # promoted | rejected | unchanged
    reason: str
    metric: str
    value: float | None = None
    threshold: float | None = None
    champion_value: float | None = None
    dev_version: int | None = None
    prod_version: int | None = None
    code: str = ""

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def higher_is_better(rules: PromotionRules) -> bool:
    """Error metrics (wape, mape, rmse) are lower-is-better whatever the rules say; accuracy and
    custom metrics follow ``rules.higher_is_better``."""
    return False if lower_is_better(rules.metric) else bool(rules.higher_is_better)


def promote_run(dev: ModelRegistry, prod: ModelRegistry, run_id: str, rules: PromotionRules,
                history: Mapping[str, int] | None = None) -> list[Decision]:
    """Decide for every dev model of ``run_id`` and copy the eligible ones into ``prod``.

    Rules, in order: the status is trained/baseline_only; the metric exists and is a number; it
    passes ``rules.min_value`` (a ceiling for error metrics); the partition has at least
    ``rules.min_history`` observed periods (from ``history``, else the record's ``n_observed``
    tag or metric); with ``rules.must_beat_champion``, it is strictly better than the current
    production model of the partition. Decisions are sorted by partition id.
    """
    if dev.root == prod.root:
        raise ValueError(f"dev and prod registries share the folder {dev.root}")
    found = _run_records(dev, run_id)
    global_records = [r for r in found if r.partition_id == GLOBAL_ID]
    candidates = [r for r in found if r.partition_id != GLOBAL_ID]
    already = {r.partition_id: r for r in _run_records(prod, run_id)}
    champions = prod.latest_many(r.partition_id for r in candidates if r.partition_id not in already)
    up = higher_is_better(rules)
    decisions: list[Decision] = []
    to_copy: list[tuple[ModelRecord, Decision]] = []
    for record in candidates:
        value = _metric(record, rules.metric)
        decision = Decision(partition_id=record.partition_id, run_id=run_id, decision="rejected", reason="",
                            metric=rules.metric, value=value, threshold=float(rules.min_value),
                            dev_version=record.version)
        decisions.append(decision)
        if record.partition_id in already:
            promoted = already[record.partition_id]
            decision.decision, decision.prod_version = "unchanged", promoted.version
            decision.reason = f"already promoted as production version {promoted.version}"
            continue
        champion = champions.get(record.partition_id)
        champion_value = _metric(champion, rules.metric) if champion is not None else None
        decision.champion_value = champion_value
        if champion is not None:
            decision.prod_version = champion.version
        failed = _rejection(record, value, champion_value, rules, up, history)
        if failed:
            decision.code, decision.reason = failed
            continue
        damaged = _integrity(dev, record)
        if damaged:
            decision.code, decision.reason = "artifact", damaged
            continue
        decision.decision = "promoted"
        passed = f"{rules.metric} {_fmt(value)} {'>=' if up else '<='} {_fmt(rules.min_value)}"
        if champion is None:
            passed += "; no champion"
        elif champion_value is None or math.isnan(champion_value):
            passed += f"; champion v{champion.version} has no {rules.metric}"
        elif rules.must_beat_champion:
            passed += f"; beats champion {_fmt(champion_value)}"
        decision.reason = passed
        to_copy.append((record, decision))
    if to_copy:
        # the run's global model goes along (idempotent): promoted bundles may forecast through it
        tagged = [replace(record, tags={**record.tags, **decision_tags(decision)}) for record, decision in to_copy]
        copies = prod.copy_many(dev, tagged + global_records)
        for (_, decision), copy in zip(to_copy, copies[:len(to_copy)], strict=True):
            decision.prod_version = copy.version
    return sorted(decisions, key=lambda d: d.partition_id)


def _integrity(dev: ModelRegistry, record: ModelRecord) -> str | None:
    """Why a candidate's artifact may not be promoted (changed or missing since it was registered)."""
    verify = getattr(dev, "verify", None)
    if verify is None:  # a registry that checks its own artifacts (Azure ML)
        return None
    try:
        verify(record)
    except RegistryError as exc:
        return f"artifact integrity: {exc}"
    return None


def decision_tags(decision: Decision) -> dict[str, str]:
    """The decision as tags of the production copy (strings; '' for none)."""
    return {f"promotion_{name}": "" if getattr(decision, name) is None else str(getattr(decision, name))
            for name in DECISION_TAGS}


def decision_of(record: ModelRecord) -> Decision:
    """The promotion decision a production record carries (its ``promotion_*`` tags), for the SQL
    store's ``promotions`` table; records copied before the tags existed get what is known."""
    tags = record.tags

    def number(name: str) -> float | None:
        text = tags.get(f"promotion_{name}", "")
        try:
            return float(text) if text != "" else None
        except ValueError:
            return None

    source_version = tags.get("source_version", "")
    return Decision(
        partition_id=record.partition_id, run_id=record.run_id, decision="promoted",
        reason=tags.get("promotion_reason") or f"promoted as production version {record.version}",
        metric=tags.get("promotion_metric", ""), value=number("value"), threshold=number("threshold"),
        champion_value=number("champion_value"),
        dev_version=int(source_version) if source_version.isdigit() else None, prod_version=record.version)


def _run_records(registry: ModelRegistry, run_id: str) -> list[ModelRecord]:
    """Every record of a run, its global model included."""
    return registry.find(run_id=run_id, include_global=True)


def _rejection(record: ModelRecord, value: float | None, champion_value: float | None,
               rules: PromotionRules, up: bool,
               history: Mapping[str, int] | None) -> tuple[str, str] | None:
    """The first rule the model fails, as its code (:data:`REJECTION_CODES`) and a sentence; None
    when it passes them all."""
    metric = rules.metric
    if record.status not in PROMOTABLE_STATUSES:
        return "status", f"status {record.status} is not promotable"
    if value is None:
        return "metric", f"metric {metric} is missing"
    if math.isnan(value):
        return "metric", f"metric {metric} is NaN"
    threshold = float(rules.min_value)
    if up and value < threshold:
        return "accuracy", f"{metric} {_fmt(value)} < {_fmt(threshold)}"
    if not up and value > threshold:
        return "accuracy", f"{metric} {_fmt(value)} > {_fmt(threshold)}"
    if rules.min_history > 0:
        observed = _observed(record, history)
        if observed is None:
            return "history", f"history unknown (min_history {rules.min_history})"
        if observed < rules.min_history:
            return "history", f"history {observed} < min_history {rules.min_history} observed periods"
    has_champion = champion_value is not None and not math.isnan(champion_value)
    beaten = has_champion and (champion_value >= value if up else champion_value <= value)
    if rules.must_beat_champion and beaten:
        sign = ">=" if up else "<="
        return "champion", f"champion {metric} {_fmt(champion_value)} {sign} challenger {_fmt(value)}"
    return None


def _metric(record: ModelRecord, name: str) -> float | None:
    """None when the metric is absent; NaN when present but undefined (JSON null is NaN).

    Accuracies come from the stored errors (:func:`shared.models.metrics.metric_value`), so a champion
    registered when ``accuracy`` meant 1 - MAPE is compared on today's scale."""
    return metric_value(record.metrics, name)


def _observed(record: ModelRecord, history: Mapping[str, int] | None) -> int | None:
    if history is not None and record.partition_id in history:
        return int(history[record.partition_id])
    for source in (record.tags, record.metrics):
        value = source.get("n_observed")
        if value is not None:
            return int(float(value))
    return None


def _fmt(value: float | None) -> str:
    """0.8 -> '0.80', 0.7421 -> '0.742', 1234.567 -> '1234.6': short, and thresholds read as such."""
    if value is None:
        return "none"
    if math.isnan(value) or abs(value) >= 100:
        return f"{value:.1f}"
    text = f"{value:.3f}".rstrip("0")
    decimals = len(text.partition(".")[2])
    return text + "0" * max(0, 2 - decimals)
