"""Site policy: fail-closed loading, validation errors, refusals, TOML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.client.policy import POLICY_NAME, PolicyError, SitePolicy, load_policy, write_policy
from medfed.common.config import RunSettings


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / POLICY_NAME
    path.write_text(text, encoding="utf-8")
    return path


def test_load_valid(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'site_id = "h1"\nepsilon_budget = 4.5\ndelta = 1e-6\nallowed_tasks = ["risk"]\n'
        "min_cohort = 10\n",
    )
    policy = load_policy(path)
    assert policy.site_id == "h1"
    assert policy.epsilon_budget == 4.5
    assert policy.delta == 1e-6
    assert policy.allowed_tasks == ["risk"]
    assert policy.allowed_models == ["logreg", "mlp", "cnn2d", "cnn3d"]
    assert policy.min_cohort == 10
    assert policy.on_bad_row == "skip"


def test_minimal_policy_uses_defaults(tmp_path: Path) -> None:
    policy = load_policy(_write(tmp_path, 'site_id = "x"\n'))
    assert policy == SitePolicy(site_id="x")
    assert policy.epsilon_budget == 10.0
    assert policy.min_noise_multiplier == 0.3


def test_missing_file_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / POLICY_NAME
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_bad_toml_names_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'site_id = "h1\nepsilon_budget = = 3\n')
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(path) in str(info.value)


def test_binary_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / POLICY_NAME
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(PolicyError, match=POLICY_NAME):
        load_policy(path)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, 'site_id = "h1"\nepsilon_budjet = 3.0\n')
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    msg = str(info.value)
    assert "epsilon_budjet" in msg and str(path) in msg


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('epsilon_budget = "lots"', "epsilon_budget"),
        ('allowed_tasks = "risk"', "allowed_tasks"),
        ("max_rounds_per_run = 2.5", "max_rounds_per_run"),
        ("site_id = 7", "site_id"),
    ],
)
def test_wrong_type_is_named(tmp_path: Path, line: str, key: str) -> None:
    text = line + "\n" if key == "site_id" else f'site_id = "h1"\n{line}\n'
    with pytest.raises(PolicyError, match=key):
        load_policy(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("epsilon_budget = 0.0", "epsilon_budget"),
        ("epsilon_budget = -1.0", "epsilon_budget"),
        ("delta = 1.0", "delta"),
        ("min_noise_multiplier = -0.1", "min_noise_multiplier"),
        ("max_rounds_per_run = 0", "max_rounds_per_run"),
        ("min_cohort = 0", "min_cohort"),
        ('on_bad_row = "ignore"', "on_bad_row"),
    ],
)
def test_out_of_range_is_named(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(PolicyError, match=key):
        load_policy(_write(tmp_path, f'site_id = "h1"\n{line}\n'))


def test_missing_site_id(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="site_id"):
        load_policy(_write(tmp_path, "epsilon_budget = 3.0\n"))


def test_bad_site_id(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="site_id"):
        load_policy(_write(tmp_path, 'site_id = "h 1/../x"\n'))


def test_refusal_allows_default_settings() -> None:
    assert SitePolicy(site_id="h1").refusal(RunSettings()) is None


def test_refusal_disallowed_task() -> None:
    policy = SitePolicy(site_id="h1", allowed_tasks=["risk"])
    reason = policy.refusal(RunSettings(task="rehab"))
    assert reason is not None and "rehab" in reason and "task" in reason
    assert policy.refusal(RunSettings(task="risk")) is None


def test_refusal_disallowed_model() -> None:
    policy = SitePolicy(site_id="h1", allowed_models=["logreg"])
    reason = policy.refusal(RunSettings(model="mlp"))
    assert reason is not None and "mlp" in reason


def test_refusal_too_many_rounds() -> None:
    policy = SitePolicy(site_id="h1", max_rounds_per_run=5)
    assert policy.refusal(RunSettings(num_rounds=5)) is None
    reason = policy.refusal(RunSettings(num_rounds=6))
    assert reason is not None and "6" in reason and "5" in reason


def test_refusal_larger_delta() -> None:
    policy = SitePolicy(site_id="h1", delta=1e-6)
    assert policy.refusal(RunSettings(delta=1e-6)) is None
    assert policy.refusal(RunSettings(delta=1e-7)) is None
    reason = policy.refusal(RunSettings(delta=1e-5))
    assert reason is not None and "delta" in reason


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    policy = SitePolicy(
        site_id="st-mary_01",
        epsilon_budget=2.5,
        delta=1e-7,
        min_noise_multiplier=0.0,
        allowed_tasks=["rehab"],
        allowed_models=["mlp"],
        max_rounds_per_run=12,
        min_cohort=3,
        on_bad_row="error",
    )
    path = tmp_path / "nested" / POLICY_NAME
    write_policy(path, policy)
    assert load_policy(path) == policy
    assert [p.name for p in path.parent.iterdir()] == [POLICY_NAME]


def test_write_default_round_trip(tmp_path: Path) -> None:
    path = tmp_path / POLICY_NAME
    write_policy(path, SitePolicy(site_id="h1"))
    assert load_policy(path) == SitePolicy(site_id="h1")
