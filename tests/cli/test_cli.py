"""The medfed command: help everywhere, synthetic data, one-line errors."""

import pytest
from typer.testing import CliRunner

from medfed.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [[], ["--help"], ["simulate", "--help"], ["synth", "--help"], ["synth", "risk", "--help"]],
)
def test_help_everywhere(args):
    result = runner.invoke(app, args)
    assert "Usage" in result.output
    assert result.exit_code in (0, 2)


def test_simulate_help_lists_the_options():
    out = runner.invoke(app, ["simulate", "--help"], terminal_width=200).output
    for option in (
        "--task",
        "--dataset",
        "--sites",
        "--rounds",
        "--epsilon",
        "--delta",
        "--seed",
        "--out",
    ):
        assert option in out


def test_synth_risk_writes_sites_with_policies(tmp_path):
    result = runner.invoke(
        app, ["synth", "risk", "--sites", "2", "--out", str(tmp_path), "--size-scale", "0.1"]
    )
    assert result.exit_code == 0, result.output
    for i in (0, 1):
        assert (tmp_path / f"site-{i}" / "clinical.csv").is_file()
        assert "site_id" in (tmp_path / f"site-{i}" / "site.toml").read_text()


def test_synth_refuses_to_overwrite(tmp_path):
    args = ["synth", "risk", "--sites", "2", "--out", str(tmp_path), "--size-scale", "0.1"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "error" in result.output and "overwrite" in result.output


def test_bad_settings_fail_with_one_line_naming_the_key(tmp_path):
    result = runner.invoke(app, ["simulate", "--epsilon", "-1", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "epsilon" in result.output
    assert not (tmp_path / "run.json").exists()


def test_rehab_on_heart_disease_is_rejected(tmp_path):
    result = runner.invoke(
        app, ["simulate", "--task", "rehab", "--dataset", "heart-disease", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "rehab" in result.output and "heart-disease" in result.output


@pytest.mark.parametrize("modality", ["xray", "ct"])
def test_synth_imaging_writes_dicom_sites(tmp_path, modality):
    result = runner.invoke(
        app, ["synth", modality, "--sites", "2", "--patients", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "DICOM files" in result.output
    for i in (0, 1):
        assert (tmp_path / f"site-{i}" / "labels.csv").is_file()
        assert any((tmp_path / f"site-{i}" / "dicom").rglob("*.dcm"))


def test_synth_identities_gives_each_site_a_key_in_the_roster(tmp_path):
    from medfed.client.site_identity import load_site_identity
    from medfed.common.secagg.identity import Roster

    args = ["synth", "risk", "--sites", "3", "--size-scale", "0.1", "--out", str(tmp_path)]
    assert runner.invoke(app, args).exit_code == 0
    first = Roster.load(tmp_path / "roster.json")
    (tmp_path / "site-1" / "site-identity.pem").unlink()
    result = runner.invoke(app, ["synth", "identities", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    roster = Roster.load(tmp_path / "roster.json")
    assert set(roster.keys) == {0, 1, 2}
    # Existing keys are kept (they have signed the sites' ledgers); a lost one is replaced.
    assert roster.keys[0] == first.keys[0] and roster.keys[2] == first.keys[2]
    assert roster.keys[1] != first.keys[1]
    for i in range(3):
        identity = load_site_identity(
            tmp_path / f"site-{i}" / "site-identity.pem", tmp_path / "roster.json"
        )
        assert identity.node_id == i
        assert identity.name == f"site 'hospital-{chr(97 + i)}' (node {i})"


def test_synth_identities_needs_site_folders(tmp_path):
    result = runner.invoke(app, ["synth", "identities", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "site-0" in result.output


def test_simulate_rejects_an_unknown_secure_agg_mode(tmp_path):
    result = runner.invoke(app, ["simulate", "--secure-agg", "none", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "medfed" in result.output


@pytest.mark.parametrize(
    ("args", "argument_help"),
    [
        (["predict", "--help"], "A checkpoint (.npz) or a run folder"),
        (["audit", "verify", "--help"], "Audit folder: a run's output folder"),
    ],
)
def test_help_explains_the_arguments(args, argument_help):
    """Positional arguments carry their help (click 8.5 blanked it under flwr's typer)."""
    out = runner.invoke(app, args, terminal_width=200).output
    assert argument_help in " ".join(out.split())
