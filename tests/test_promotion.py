"""Promotion rules: threshold, champion/challenger, history; reasons recorded; idempotent."""
from __future__ import annotations

import pytest

from shared.config import PromotionRules
from shared.registries.promotion import REJECTION_CODES, Decision, higher_is_better, promote_run
from shared.registries.registry import ModelRegistry
from registry_tools import damage_model


def rules(**overrides) -> PromotionRules:
    """The rules under test; history is not checked unless a test asks for it."""
    return PromotionRules(**{"min_history": 0, **overrides})


@pytest.fixture
def dev(tmp_path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry" / "dev", "dev")


@pytest.fixture
def prod(tmp_path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry" / "prod", "prod")


def register(dev: ModelRegistry, run_id: str, models: dict[str, dict]) -> None:
    """models: partition id -> {"metrics": ..., "status": ..., "tags": ...}."""
    dev.register_many([({"partition_id": pid, "run_id": run_id, "model_name": "gbm",
                         "keys": {"store": "1", "item": pid}, **spec}, f"model {pid} {run_id}".encode())
                       for pid, spec in models.items()])


def by_partition(decisions: list[Decision]) -> dict[str, Decision]:
    return {d.partition_id: d for d in decisions}


def test_models_above_the_threshold_are_promoted_and_the_others_rejected_with_the_reason(dev, prod):
    register(dev, "r1", {"pA": {"metrics": {"accuracy": 0.93}}, "pB": {"metrics": {"accuracy": 0.742}},
                         "pC": {"metrics": {"accuracy": 0.80}}})
    dev_changes = dev.index_version()

    decisions = by_partition(promote_run(dev, prod, "r1", rules(min_value=0.80)))

    assert decisions["pA"].decision == "promoted" and decisions["pA"].prod_version == 1
    assert decisions["pA"].reason == "accuracy 0.93 >= 0.80; no champion"
    assert decisions["pC"].decision == "promoted"  # the threshold itself passes
    b = decisions["pB"]
    assert (b.decision, b.reason, b.value, b.threshold, b.prod_version) == (
        "rejected", "accuracy 0.742 < 0.80", 0.742, 0.80, None)
    assert sorted(r.partition_id for r in prod.find()) == ["pA", "pC"]
    assert prod.latest("pA").tags["source_registry"] == "dev" and prod.latest("pA").keys["item"] == "pA"
    assert prod.raw_bytes(prod.latest("pA")) == b"model pA r1"
    # promotion writes the promoted models into one new pack of the production registry
    assert len({r.artifact for r in prod.find()}) == 1 and prod.latest("pA").artifact not in \
        {r.artifact for r in dev.find()}
    assert dev.index_version() == dev_changes  # promotion never writes to dev


def test_a_second_promotion_of_the_same_run_changes_nothing(dev, prod):
    register(dev, "r1", {"pA": {"metrics": {"accuracy": 0.95}}, "pB": {"metrics": {"accuracy": 0.5}}})
    first = promote_run(dev, prod, "r1", rules())
    changes, count = prod.index_version(), prod.count()

    second = by_partition(promote_run(dev, prod, "r1", rules()))
    assert second["pA"].decision == "unchanged" and second["pA"].prod_version == 1
    assert second["pA"].reason == "already promoted as production version 1"
    assert second["pB"].decision == "rejected" and second["pB"].reason == by_partition(first)["pB"].reason
    assert (prod.index_version(), prod.count()) == (changes, count)


def test_a_challenger_must_beat_the_champion(dev, prod):
    register(dev, "r1", {"pA": {"metrics": {"accuracy": 0.91}}, "pB": {"metrics": {"accuracy": 0.85}}})
    promote_run(dev, prod, "r1", rules())
    register(dev, "r2", {"pA": {"metrics": {"accuracy": 0.88}}, "pB": {"metrics": {"accuracy": 0.90}}})

    decisions = by_partition(promote_run(dev, prod, "r2", rules()))

    a, b = decisions["pA"], decisions["pB"]
    assert (a.decision, a.reason, a.champion_value, a.prod_version) == (
        "rejected", "champion accuracy 0.91 >= challenger 0.88", 0.91, 1)
    assert (b.decision, b.prod_version, b.dev_version) == ("promoted", 2, 2)
    assert b.reason == "accuracy 0.90 >= 0.80; beats champion 0.85"
    assert prod.latest("pA").run_id == "r1" and prod.latest("pB").run_id == "r2"


def test_without_the_champion_rule_a_weaker_model_that_passes_the_threshold_is_promoted(dev, prod):
    register(dev, "r1", {"pA": {"metrics": {"accuracy": 0.95}}})
    promote_run(dev, prod, "r1", rules())
    register(dev, "r2", {"pA": {"metrics": {"accuracy": 0.85}}})
    [decision] = promote_run(dev, prod, "r2", rules(must_beat_champion=False))
    assert decision.decision == "promoted" and prod.latest("pA").run_id == "r2"


def test_a_tie_with_the_champion_is_not_an_improvement(dev, prod):
    register(dev, "r1", {"pA": {"metrics": {"accuracy": 0.9}}})
    promote_run(dev, prod, "r1", rules())
    register(dev, "r2", {"pA": {"metrics": {"accuracy": 0.9}}})
    [decision] = promote_run(dev, prod, "r2", rules())
    assert decision.reason == "champion accuracy 0.90 >= challenger 0.90"


def test_error_metrics_are_lower_is_better_whatever_the_rules_say(dev, prod):
    wape_rules = rules(metric="wape", min_value=0.30, higher_is_better=True)
    register(dev, "r1", {"pA": {"metrics": {"wape": 0.20}}, "pB": {"metrics": {"wape": 0.41}}})
    first = by_partition(promote_run(dev, prod, "r1", wape_rules))
    assert first["pA"].decision == "promoted" and first["pA"].reason == "wape 0.20 <= 0.30; no champion"
    assert first["pB"].reason == "wape 0.41 > 0.30"
    assert first["pB"].code == "accuracy"  # counted as not accurate enough, whatever the metric's name

    register(dev, "r2", {"pA": {"metrics": {"wape": 0.25}}})
    [decision] = promote_run(dev, prod, "r2", wape_rules)
    assert decision.reason == "champion wape 0.20 <= challenger 0.25"


def test_bad_status_and_missing_or_nan_metrics_are_rejected(dev, prod):
    register(dev, "r1", {
        "pFail": {"status": "failed", "metrics": {"accuracy": 0.99}},
        "pSkip": {"status": "skipped", "metrics": {}},
        "pBase": {"status": "baseline_only", "metrics": {"accuracy": 0.85}},
        "pMissing": {"metrics": {"rmse": 0.1}},
        "pNan": {"metrics": {"accuracy": float("nan")}},
        "pNull": {"metrics": {"accuracy": None}},  # how a training row stores an undefined metric
    })
    decisions = by_partition(promote_run(dev, prod, "r1", rules()))
    assert decisions["pFail"].reason == "status failed is not promotable"
    assert decisions["pSkip"].reason == "status skipped is not promotable"
    assert decisions["pBase"].decision == "promoted"
    assert decisions["pMissing"].reason == "metric accuracy is missing"
    assert decisions["pNan"].reason == decisions["pNull"].reason == "metric accuracy is NaN"
    assert [r.partition_id for r in prod.find()] == ["pBase"]


def test_minimum_history_from_the_history_map_or_the_record(dev, prod):
    register(dev, "r1", {
        "pShort": {"metrics": {"accuracy": 0.9}},
        "pLong": {"metrics": {"accuracy": 0.9}},
        "pTagged": {"metrics": {"accuracy": 0.9}, "tags": {"n_observed": "30"}},
        "pMetric": {"metrics": {"accuracy": 0.9, "n_observed": 120}},
        "pUnknown": {"metrics": {"accuracy": 0.9}},
    })
    rules = PromotionRules(min_history=52)
    decisions = by_partition(promote_run(dev, prod, "r1", rules, history={"pShort": 40, "pLong": 156}))
    assert decisions["pShort"].reason == "history 40 < min_history 52 observed periods"
    assert decisions["pLong"].decision == "promoted"
    assert decisions["pTagged"].reason == "history 30 < min_history 52 observed periods"
    assert decisions["pMetric"].decision == "promoted"
    assert decisions["pUnknown"].reason == "history unknown (min_history 52)"


def test_a_run_with_no_models_gives_no_decisions_and_decisions_serialise(dev, prod):
    assert promote_run(dev, prod, "nothing", rules()) == []
    register(dev, "r1", {"pA": {"metrics": {"accuracy": 0.95}}})
    [decision] = promote_run(dev, prod, "r1", rules())
    assert decision.to_row() == {
        "partition_id": "pA", "run_id": "r1", "decision": "promoted",
        "reason": "accuracy 0.95 >= 0.80; no champion", "metric": "accuracy", "value": 0.95,
        "threshold": 0.8, "champion_value": None, "dev_version": 1, "prod_version": 1, "code": ""}
    with pytest.raises(ValueError, match="share the folder"):
        promote_run(dev, dev, "r1", rules())


def test_every_rejection_carries_the_code_of_the_rule_it_failed_beside_its_sentence(dev, prod):
    register(dev, "r0", {"pChamp": {"metrics": {"accuracy": 0.95}}})
    promote_run(dev, prod, "r0", rules())
    register(dev, "r1", {
        "pStatus": {"status": "failed", "metrics": {"accuracy": 0.99}},
        "pMetric": {"metrics": {}},
        "pLow": {"metrics": {"accuracy": 0.5}},
        "pShort": {"metrics": {"accuracy": 0.9}},
        "pChamp": {"metrics": {"accuracy": 0.9}},
        "pDamaged": {"metrics": {"accuracy": 0.9}},
        "pGood": {"metrics": {"accuracy": 0.9}},
    })
    damaged = next(r for r in dev.find(run_id="r1") if r.partition_id == "pDamaged")
    damage_model(dev, damaged)  # its neighbours in the pack are untouched
    history = {pid: 100 for pid in ("pStatus", "pMetric", "pLow", "pChamp", "pDamaged", "pGood")}
    decisions = by_partition(promote_run(dev, prod, "r1", rules(min_history=26), {**history, "pShort": 10}))
    assert {pid: d.code for pid, d in decisions.items()} == {
        "pStatus": "status", "pMetric": "metric", "pLow": "accuracy", "pShort": "history",
        "pChamp": "champion", "pDamaged": "artifact", "pGood": ""}
    assert {d.code for d in decisions.values()} == {"", *REJECTION_CODES}
    assert decisions["pLow"].reason == "accuracy 0.50 < 0.80"  # the sentence is unchanged
    assert decisions["pDamaged"].reason.startswith("artifact integrity: ")


@pytest.mark.parametrize("metric, up", [("wape", False), ("mape", False), ("rmse", False),
                                        ("accuracy", True), ("mape_accuracy", True)])
def test_which_way_is_better_comes_from_the_metric_vocabulary(metric, up):
    assert higher_is_better(rules(metric=metric, higher_is_better=True)) is up
