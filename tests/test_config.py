"""The project config: TOML in, dotted overrides, clear errors naming the field."""
from __future__ import annotations

import pytest

from shared.config import ConfigError, ProjectConfig, default_season_length, load_config, offset_alias


def test_defaults_match_the_generator_and_the_reference_rule():
    cfg = ProjectConfig()
    assert cfg.data.keys == ["store", "item"] and cfg.data.time == "date" and cfg.data.target == "sales"
    assert cfg.promotion.metric == "accuracy" and cfg.promotion.min_value == 0.80
    assert cfg.season_length == 52


def test_toml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "mm.toml"
    path.write_text('[data]\nkeys = ["warehouse", "sku"]\nfreq = "D"\n[forecast]\nhorizon = 14\n'
                    '[[training.extra_candidates]]\nname = "rf"\nestimator = "sklearn.ensemble.RandomForestRegressor"\n'
                    'params = { n_estimators = 20 }\n')
    cfg = load_config(path, {"forecast.test_periods": 7, "data.covariates": "price", "runner.workers": None})
    assert cfg.data.keys == ["warehouse", "sku"] and cfg.season_length == 7
    assert cfg.forecast.horizon == 14 and cfg.forecast.test_periods == 7 and cfg.data.covariates == ["price"]
    assert cfg.training.extra_candidates[0].params == {"n_estimators": 20}
    again = ProjectConfig.from_dict(__import__("tomllib").loads(cfg.to_toml()))
    assert again == cfg


@pytest.mark.parametrize("overrides, field", [
    ({"forecast.horizon": 0}, "forecast.horizon"),
    ({"forecast.horizon": "twelve"}, "forecast.horizon"),
    ({"data.freq": "fortnightly"}, "data.freq"),
    ({"data.keys": []}, "data.keys"),
    ({"data.keys": ["store", "date"]}, "data"),
    ({"validation.duplicates": "average"}, "validation.duplicates"),
    ({"training.candidates": ["baseline", "prophet"]}, "training.candidates"),
    ({"promotion.fallback": "zero"}, "promotion.fallback"),
    ({"nonsense.field": 1}, "nonsense"),
    ({"forecast.horizn": 3}, "forecast.horizn"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ProjectConfig().with_overrides(overrides)


def test_bad_toml_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nkeys=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_legacy_and_current_frequency_aliases_are_accepted():
    assert offset_alias("W") == "W"
    assert offset_alias("M") in ("M", "ME") and offset_alias("H") in ("H", "h")
    assert default_season_length("M") == 12 and default_season_length("int") == 1
    ProjectConfig().with_overrides({"data.freq": "M"})
    ProjectConfig().with_overrides({"data.freq": "int"})


# -- issue 18: every number of the project file is bounded and finite (shared.bounds) -------------
@pytest.mark.parametrize("section, line, field", [
    ("promotion", "min_value = nan", "promotion.min_value"),
    ("promotion", "min_value = inf", "promotion.min_value"),
    ("promotion", "min_value = -inf", "promotion.min_value"),
    ("training", "folds = 1000000", "training.folds"),
    ("runner", "workers = 100000", "runner.workers"),
    ("ingest", "workers = 100000", "ingest.workers"),
    ("training", "selection_margin = nan", "training.selection_margin"),
    ("forecast", "interval_level = nan", "forecast.interval_level"),
    ("runner", "retries = 1000000", "runner.retries"),
    ("scoring", "max_distance = 1000000000000", "scoring.max_distance"),
])
def test_a_project_file_number_out_of_bounds_or_not_finite_is_refused_naming_it(tmp_path, section, line, field):
    path = tmp_path / "mm.toml"
    path.write_text(f"[{section}]\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{field}: ") and ("out of bounds" in message or "not a finite number" in message)
    assert " to " in message  # the bound itself is named


def test_a_nan_threshold_given_as_an_override_is_refused_too():
    with pytest.raises(ConfigError, match=r"promotion\.min_value: nan is not a finite number"):
        ProjectConfig().with_overrides({"promotion.min_value": float("nan")})
    assert ProjectConfig().with_overrides({"promotion.min_value": 0.5}).promotion.min_value == 0.5


def test_each_fixed_choice_is_listed_once_for_the_project_file_and_for_messages():
    from shared.config import CHOICES, MESSAGE_OVERRIDES, check_message_overrides

    offered = {key: rule.choices for key, rule in MESSAGE_OVERRIDES.items() if rule.kind == "choice"}
    assert offered and all(offered[key] == CHOICES[key] for key in offered)  # a message offers the same values
    for name, allowed in CHOICES.items():
        for value in allowed:
            ProjectConfig().with_overrides({name: value})
        with pytest.raises(ConfigError, match=rf"^{name.replace('.', '[.]')}: 'nope' is not one of"):
            ProjectConfig().with_overrides({name: "nope"})
        if name in offered:
            assert check_message_overrides({name: allowed[-1]}) == {name: allowed[-1]}
            with pytest.raises(ConfigError, match=f"one of {list(allowed)}".replace("[", r"\[")):
                check_message_overrides({name: "nope"})


def test_the_metric_options_are_the_metric_vocabulary():
    from shared.config import CHOICES
    from shared.models.metric_names import METRICS, lower_is_better

    assert CHOICES["promotion.metric"] == METRICS
    assert CHOICES["training.selection_metric"] == tuple(m for m in METRICS if lower_is_better(m))
