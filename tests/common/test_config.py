"""RunSettings: defaults, Flower key mapping, validation errors naming the key."""

from __future__ import annotations

import math

import pytest

from medfed.common.config import ConfigError, RunSettings


def test_defaults() -> None:
    s = RunSettings()
    assert (s.task, s.dataset, s.model) == ("risk", "synthetic", "logreg")
    assert s.num_rounds == 3
    assert s.min_sites == 2
    assert s.epsilon == 3.0
    assert s.delta == 1e-5
    assert s.local_epochs == 1
    assert s.batch_size == 64
    assert s.learning_rate == 0.5
    assert s.max_grad_norm == 1.0
    assert s.seed == 42
    assert s.test_fraction == 0.25


def test_from_flower_maps_hyphen_keys() -> None:
    s = RunSettings.from_flower(
        {
            "num-rounds": 7,
            "min-sites": 3,
            "local-epochs": 2,
            "batch-size": 32,
            "learning-rate": 0.1,
            "max-grad-norm": 2.0,
            "data-root": "/data",
            "out-dir": "/out",
            "secagg-timeout": 5.0,
            "epsilon": 1.5,
        }
    )
    assert s.num_rounds == 7
    assert s.min_sites == 3
    assert s.local_epochs == 2
    assert s.batch_size == 32
    assert s.learning_rate == 0.1
    assert s.max_grad_norm == 2.0
    assert s.data_root == "/data"
    assert s.out_dir == "/out"
    assert s.secagg_timeout == 5.0
    assert s.epsilon == 1.5


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        RunSettings.from_mapping({"bogus": 1})


def test_unknown_flower_key_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        RunSettings.from_flower({"num-round": 3})
    msg = str(info.value)
    assert "unknown key" in msg
    # The message names the key (in its Python spelling).
    assert "num-round" in msg or "num_round" in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epsilon", 0.0),
        ("epsilon", -1.0),
        ("epsilon", math.nan),
        ("min_sites", 1),
        ("delta", 1.0),
        ("delta", 2.0),
        ("delta", 0.0),
        ("num_rounds", 0),
        ("batch_size", 0),
        ("test_fraction", 1.0),
        ("max_grad_norm", 0.0),
    ],
)
def test_out_of_range_names_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunSettings.from_mapping({key: value})


def test_out_of_range_via_flower_names_key() -> None:
    with pytest.raises(ConfigError, match="min-sites"):
        RunSettings.from_flower({"min-sites": 1})


def test_wrong_type_names_key() -> None:
    with pytest.raises(ConfigError, match="'num_rounds'"):
        RunSettings.from_mapping({"num_rounds": "many"})


def test_every_bad_key_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        RunSettings.from_mapping({"epsilon": -1, "delta": 5, "nope": 1})
    msg = str(info.value)
    for key in ("epsilon", "delta", "nope"):
        assert key in msg


def test_task_dataset_mismatch_rejected() -> None:
    with pytest.raises(ConfigError, match="rehab"):
        RunSettings.from_flower({"task": "rehab", "dataset": "heart-disease"})


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_to_flower_round_trip() -> None:
    s = RunSettings(
        task="rehab",
        model="mlp",
        num_rounds=5,
        epsilon=2.5,
        delta=1e-6,
        batch_size=16,
        data_root="/tmp/x",
    )
    cfg = s.to_flower()
    assert all("_" not in k for k in cfg)
    assert cfg["num-rounds"] == 5
    assert cfg["data-root"] == "/tmp/x"
    assert RunSettings.from_flower(cfg) == s
    assert RunSettings.from_flower(RunSettings().to_flower()) == RunSettings()


def test_settings_are_frozen() -> None:
    s = RunSettings()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        s.epsilon = 5.0  # type: ignore[misc]


def test_infinite_max_grad_norm_rejected() -> None:
    with pytest.raises(ConfigError, match="max_grad_norm"):
        RunSettings.from_mapping({"max_grad_norm": math.inf})


def test_imaging_tasks_take_their_own_models():
    settings = RunSettings(task="xray", model="cnn2d", samples_per_patient=2)
    assert settings.samples_per_patient == 2
    assert RunSettings(task="ct", model="cnn3d").task == "ct"
    with pytest.raises(ConfigError, match="model 'logreg' does not fit task 'xray'"):
        RunSettings.from_mapping({"task": "xray", "model": "logreg"})
    with pytest.raises(ConfigError, match="expected one of logreg, mlp"):
        RunSettings.from_mapping({"task": "risk", "model": "cnn2d"})
    with pytest.raises(ConfigError, match="samples_per_patient"):
        RunSettings.from_mapping({"task": "xray", "model": "cnn2d", "samples_per_patient": 0})


def test_fairness_groups_default_and_off() -> None:
    settings = RunSettings()
    assert settings.fairness_attributes() == ("sex", "age")
    assert settings.age_band_edges() == (50, 65)
    assert RunSettings(fairness_groups="").fairness_attributes() == ()
    assert RunSettings(fairness_groups=" smoking , sex ").fairness_attributes() == (
        "smoking",
        "sex",
    )
    cfg = RunSettings(fairness_groups="sex", age_bands="40,60,80").to_flower()
    assert cfg["fairness-groups"] == "sex" and cfg["age-bands"] == "40,60,80"
    assert RunSettings.from_flower(cfg).age_band_edges() == (40, 60, 80)


def test_unknown_fairness_column_names_it_and_the_task_columns() -> None:
    with pytest.raises(ConfigError) as info:
        RunSettings.from_flower({"fairness-groups": "sex,ethnicity"})
    message = str(info.value)
    assert "'ethnicity'" in message and "'sex'" not in message
    assert "columns: age, sex, bmi, family_history, smoking, systolic_bp" in message
    with pytest.raises(ConfigError, match="'bmi' is not a subgroup attribute"):
        RunSettings.from_mapping({"fairness_groups": "bmi"})  # numeric, not age
    assert RunSettings(dataset="heart-disease", fairness_groups="cp,thal").fairness_attributes()
    with pytest.raises(ConfigError, match="imaging has no clinical columns"):
        RunSettings.from_mapping({"task": "xray", "model": "cnn2d", "fairness_groups": "cp"})
    assert RunSettings(task="xray", model="cnn2d").fairness_attributes() == ("sex", "age")


@pytest.mark.parametrize(
    ("bands", "match"),
    [
        ("65,50", "strictly increasing"),
        ("50,50", "strictly increasing"),
        ("fifty", "whole years"),
        ("50.5", "whole years"),
        ("", "strictly increasing"),
        ("10,50", "outside the age range"),
    ],
)
def test_bad_age_bands_rejected(bands: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunSettings.from_mapping({"age_bands": bands})


def test_repeated_fairness_group_rejected() -> None:
    with pytest.raises(ConfigError, match="sex more than once"):
        RunSettings.from_mapping({"fairness_groups": "sex,age,sex"})
