"""``medfed data deid``: summary, JSON output, one-line errors, the key file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from medfed.cli.deid_command import deid
from medfed.client.deid import REPORT_NAME
from medfed.simulations.synthetic_imaging import generate_imaging_sites

runner = CliRunner()
app = typer.Typer()
app.command("deid")(deid)


@app.command("noop")
def _noop() -> None:
    """A second command so that ``deid`` stays a subcommand, as under ``data``."""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sites")
    [site_dir] = generate_imaging_sites("ct", 1, root, patients_per_site=2, image_size=32, slices=4)
    (site_dir / "dicom" / "README.txt").write_text("not an image\n")
    return site_dir


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def _invoke(*args: str | Path) -> object:
    return runner.invoke(app, ["deid", *map(str, args)], terminal_width=160)


def test_help_lists_arguments_and_options():
    result = _invoke("--help")
    assert result.exit_code == 0
    for text in ("IN_DIR", "OUT_DIR", "--key-file", "--overwrite", "--json", "--remove-dates"):
        assert text in result.output


def test_deid_writes_summary_key_and_report(site, tmp_path):
    before = _digest(site)
    result = _invoke(site, tmp_path / "out", "--key-file", tmp_path / "keys" / "site.key")
    assert result.exit_code == 0, result.output
    assert "de-identified" in result.output and "8" in result.output
    assert "not a DICOM Part 10 file" in result.output  # the README, shown locally
    assert "Created a new site key" in result.output
    key = tmp_path / "keys" / "site.key"
    assert os.stat(key).st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    assert (tmp_path / "out" / REPORT_NAME).is_file()
    assert len(list((tmp_path / "out" / "dicom").rglob("*.dcm"))) == 8
    assert _digest(site) == before


def test_json_output_is_the_report_and_names_no_identifier(site, tmp_path):
    key = tmp_path / "k"
    key.write_text("ab" * 32)
    result = _invoke(site, tmp_path / "out", "--key-file", key, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["files_written"] == 8 and data["files_skipped"] == 1
    assert data["key_file_created"] is False
    assert data["skipped_by_reason"] == {"not a DICOM Part 10 file": 1}
    assert "MRN" not in result.output and "README" not in result.output


def test_same_key_gives_the_same_output(site, tmp_path):
    key = tmp_path / "k"
    for out in ("a", "b"):
        assert _invoke(site, tmp_path / out, "--key-file", key, "--json").exit_code == 0
    names = [sorted(p.name for p in (tmp_path / o).rglob("*.dcm")) for o in "ab"]
    assert names[0] == names[1]


@pytest.mark.parametrize("where", ["inside", "same"])
def test_refuses_out_dir_in_in_dir_with_one_line(site, tmp_path, where):
    before = _digest(site)
    out = site / "deid" if where == "inside" else site
    result = _invoke(site, out, "--key-file", tmp_path / "k")
    assert result.exit_code == 1
    assert "error" in result.output and "outside IN_DIR" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _digest(site) == before and not (tmp_path / "k").exists()


def test_refuses_non_empty_out_dir_without_overwrite(site, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    result = _invoke(site, out, "--key-file", tmp_path / "k")
    assert result.exit_code == 1 and "--overwrite" in result.output
    result = _invoke(site, out, "--key-file", tmp_path / "k", "--overwrite", "--json")
    assert result.exit_code == 0, result.output


def test_refuses_a_key_inside_out_dir(site, tmp_path):
    result = _invoke(site, tmp_path / "out", "--key-file", tmp_path / "out" / "site.key")
    assert result.exit_code == 1 and "must not be inside" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_in_dir_is_an_error(tmp_path):
    result = _invoke(tmp_path / "nope", tmp_path / "out", "--key-file", tmp_path / "k")
    assert result.exit_code == 1 and "not a directory" in result.output


def test_retain_patient_characteristics_flag_keeps_sex_and_age(site, tmp_path):
    import pydicom

    def first_file(out: Path) -> pydicom.Dataset:
        return pydicom.dcmread(next((out / "dicom").rglob("*.dcm")))

    key = tmp_path / "keys" / "site.key"
    plain = _invoke(site, tmp_path / "plain", "--key-file", key, "--json")
    kept = _invoke(
        site, tmp_path / "kept", "--key-file", key, "--retain-patient-characteristics", "--json"
    )
    assert plain.exit_code == 0 and kept.exit_code == 0, kept.output
    assert first_file(tmp_path / "plain").get("PatientSex", "") == ""
    assert "PatientAge" not in first_file(tmp_path / "plain")
    retained = first_file(tmp_path / "kept")
    assert retained.PatientSex in ("F", "M") and retained.PatientAge.endswith("Y")
    codes = [item.CodeValue for item in retained.DeidentificationMethodCodeSequence]
    assert "113108" in codes
