"""What `medfed server`, `site` and `run` hand to Flower, checked without starting it."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

import medfed.deploy.submit as submit_module
from medfed.cli.deploy_commands import _run_settings
from medfed.common.config import RunSettings
from medfed.common.secagg.identity import (
    generate_identity,
    load_identity,
    public_key_bytes,
    save_identity,
)
from medfed.deploy.bundles import load_server_bundle, load_site_bundle
from medfed.deploy.processes import DeployError
from medfed.deploy.provision import provision
from medfed.deploy.submit import app_pyproject, run_config_arg
from medfed.deploy.superlink import SuperLinkSettings, superlink_command
from medfed.deploy.supernode import (
    SiteSettings,
    check_roster_serial,
    check_site_policy,
    node_config,
    supernode_command,
)
from medfed.server.round_log import (
    COORDINATOR_CERT_NAME,
    coordinator_key_path,
    load_coordinator_key,
    publish_audit_keys,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    provision(out, "unit", ["127.0.0.1", "fl.example.org"], ["st-a", "st-b"], 19999)
    return out


def test_superlink_runs_with_tls_node_auth_and_one_address(pki: Path, tmp_path: Path) -> None:
    bundle = load_server_bundle(pki / "server")
    settings = SuperLinkSettings(
        "127.0.0.1", 19999, bundle.server_cert, bundle.server_key, bundle.ca_cert, tmp_path
    )
    cmd = superlink_command(settings)
    assert "--insecure" not in cmd
    assert "--enable-supernode-auth" in cmd
    for flag, value in [
        ("--ssl-certfile", str(bundle.server_cert)),
        ("--ssl-keyfile", str(bundle.server_key)),
        ("--ssl-ca-certfile", str(bundle.ca_cert)),
        ("--host", "127.0.0.1"),
        ("--port", "19999"),
        ("--database", str(tmp_path / "superlink.db")),
    ]:
        assert cmd[cmd.index(flag) + 1] == value


def test_supernode_verifies_tls_and_authenticates(pki: Path, tmp_path: Path) -> None:
    bundle = load_site_bundle(pki / "sites" / "st-a")
    settings = SiteSettings(bundle, tmp_path, bundle.superlink, 9123)
    cmd = supernode_command(settings)
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == str(bundle.ca_cert)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(bundle.supernode_key)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--superlink") + 1] == "127.0.0.1:19999"
    # Flower parses the node config into the keys medfed's ClientApp reads.
    parsed = parse_config_args([node_config(settings)])
    assert parsed == {
        "data-dir": str(tmp_path.resolve()),
        "identity-key": str(bundle.identity_key.resolve()),
        "roster": str(bundle.roster.resolve()),
        "ca-cert": str(bundle.ca_cert.resolve()),
    }


def test_site_needs_its_own_policy(pki: Path, tmp_path: Path) -> None:
    bundle = load_site_bundle(pki / "sites" / "st-a")
    with pytest.raises(DeployError, match=r"no site policy .*cp "):
        check_site_policy(bundle, tmp_path)
    other = load_site_bundle(pki / "sites" / "st-b")
    (tmp_path / "site.toml").write_bytes(other.policy_template.read_bytes())
    with pytest.raises(DeployError, match="site_id is 'st-b' but the bundle is for 'st-a'"):
        check_site_policy(bundle, tmp_path)
    (tmp_path / "site.toml").write_bytes(bundle.policy_template.read_bytes())
    assert "epsilon budget" in check_site_policy(bundle, tmp_path)
    with pytest.raises(DeployError, match="does not exist"):
        check_site_policy(bundle, tmp_path / "missing")


def test_site_refuses_an_older_roster(pki: Path, tmp_path: Path) -> None:
    bundle = load_site_bundle(pki / "sites" / "st-a")
    check_roster_serial(bundle, tmp_path)
    (tmp_path / ".medfed-roster-serial").write_text(f"{bundle.serial + 1}\n")
    with pytest.raises(DeployError, match="older than serial"):
        check_roster_serial(bundle, tmp_path)


def test_app_bundle_declares_every_setting_and_the_installed_apps(tmp_path: Path) -> None:
    settings = RunSettings(
        num_rounds=4, out_dir=str(tmp_path / "out"), run_name="study-1", secagg_roster="/r.json"
    )
    project = tomllib.loads(app_pyproject(settings))
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "medfed.server.app:app",
        "clientapp": "medfed.client.app:app",
    }
    config = project["tool"]["flwr"]["app"]["config"]
    assert set(config) == set(settings.to_flower())
    assert RunSettings.from_flower(config) == settings
    # The run config Flower parses from the command line gives back the same settings.
    assert RunSettings.from_flower(parse_config_args([run_config_arg(settings)])) == settings


def test_run_submission_is_stopped_at_its_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet log stream does not outlive `medfed run --timeout` (a stand-in `flwr`)."""
    fake = tmp_path / "flwr"
    fake.write_text("#!/bin/sh\necho started\nsleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(submit_module, "flower_executable", lambda name: str(fake))
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(DeployError, match="did not finish within 1 s"):
        submit_module.submit(RunSettings(), tmp_path / "app", tmp_path / "home", lines.append, 1)
    assert lines == ["started"]
    assert time.monotonic() - started < 30


def _run_opts(**changes: object) -> dict[str, object]:
    opts: dict[str, object] = {
        "task": "risk",
        "dataset": "synthetic",
        "model": None,
        "rounds": 2,
        "epsilon": 2.0,
        "delta": 1e-5,
        "min_sites": 2,
        "secure_agg": "medfed",
        "run_name": "study-1",
        "resume": False,
    }
    return {**opts, **changes}


def test_run_signs_its_round_records_with_the_bundles_coordinator_key(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(pki)  # a relative --bundle still gives the ServerApp absolute paths
    bundle = load_server_bundle(Path("server"))
    settings = _run_settings(_run_opts(), tmp_path / "out", bundle)
    assert settings.coordinator_key == str(pki / "server" / "coordinator-identity.pem")
    assert settings.secagg_roster == str(pki / "server" / "roster.json")
    assert coordinator_key_path(settings) == pki / "server" / "coordinator-identity.pem"
    assert RunSettings.from_flower(settings.to_flower()) == settings
    # the key the ServerApp signs with, and the certificate it publishes beside it
    signing = load_coordinator_key(settings).public_key().public_bytes_raw()
    assert signing == public_key_bytes(load_identity(bundle.coordinator_key))
    certificate = coordinator_key_path(settings).with_name(COORDINATOR_CERT_NAME)
    assert certificate == pki / "server" / "coordinator.pem"


def test_run_passes_the_fairness_groups(pki: Path, tmp_path: Path) -> None:
    bundle = load_server_bundle(pki / "server")
    opts = _run_opts(fairness_groups="sex", age_bands="40,60,80")
    settings = _run_settings(opts, tmp_path / "out", bundle)
    assert settings.fairness_attributes() == ("sex",) and settings.age_bands == "40,60,80"
    with pytest.raises(ValueError, match="bmi_band"):
        _run_settings(_run_opts(fairness_groups="bmi_band"), tmp_path / "out", bundle)


def _started(out: Path, settings: RunSettings) -> None:
    """What the ServerApp leaves in --out that a resume reads."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"settings": settings.model_dump()}))
    publish_audit_keys(out, load_coordinator_key(settings), Path(settings.secagg_roster))


def test_resume_keeps_the_key_the_run_started_with(pki: Path, tmp_path: Path) -> None:
    bundle = load_server_bundle(pki / "server")
    out = tmp_path / "out"
    started = _run_settings(_run_opts(), out, bundle)
    _started(out, started)
    resumed = _run_settings(_run_opts(resume=True, rounds=9), out, bundle)
    assert resumed.coordinator_key == started.coordinator_key
    assert resumed == started.model_copy(update={"resume": True})


def test_resume_refuses_a_replaced_or_missing_coordinator_key(pki: Path, tmp_path: Path) -> None:
    bundle = load_server_bundle(pki / "server")
    out = tmp_path / "out"
    key_copy = tmp_path / "key.pem"
    key_copy.write_bytes(bundle.coordinator_key.read_bytes())
    key_copy.chmod(0o600)
    started = _run_settings(_run_opts(), out, bundle).model_copy(
        update={"coordinator_key": str(key_copy)}
    )
    _started(out, started)
    save_identity(key_copy, generate_identity())  # re-provisioned since the run started
    with pytest.raises(DeployError, match="is not the key that signed this run's round records"):
        _run_settings(_run_opts(resume=True), out, bundle)
    key_copy.unlink()
    with pytest.raises(DeployError, match=r"--resume: the run's coordinator signing key.*key\.pem"):
        _run_settings(_run_opts(resume=True), out, bundle)


def test_medfed_run_hands_flower_the_coordinator_key(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`medfed run` up to the submission, with a stand-in for `flwr run`."""
    from typer.testing import CliRunner

    from medfed.cli.main import app

    submitted: list[RunSettings] = []

    def fake_submit(settings: RunSettings, *args: object, **kwargs: object) -> int:
        submitted.append(settings)
        record = {"status": "completed", "settings": settings.model_dump(), "rounds": []}
        (Path(settings.out_dir) / "run.json").write_text(json.dumps(record))
        return 0

    monkeypatch.setattr(submit_module, "submit", fake_submit)
    out = tmp_path / "out"
    args = ["run", "--bundle", str(pki / "server"), "--out", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (settings,) = submitted
    assert settings.coordinator_key == str(pki / "server" / "coordinator-identity.pem")
