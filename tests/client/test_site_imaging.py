"""An imaging site: DP-SGD on DICOM, the per-patient cap in the ledger, de-identification policy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from medfed.client.deid import deidentify_tree
from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
from medfed.client.site import Site
from medfed.common.config import RunSettings
from medfed.common.ledger import LEDGER_NAME, read_ledger
from medfed.common.models import build_model
from medfed.common.params import get_weights
from medfed.common.tasks import SYNTHETIC_XRAY
from medfed.simulations.synthetic_imaging import generate_imaging_sites

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
PATIENTS = 12


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("xray-site")
    (site,) = generate_imaging_sites("xray", 1, root, seed=9, patients_per_site=PATIENTS)
    _add_second_studies(site)
    return site


def _add_second_studies(site: Path) -> None:
    """Give every patient a later, second study with its own UIDs and label row."""
    rows = []
    for path in sorted((site / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, keyword, getattr(ds, keyword) + ".2")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = "20991231"
        target = path.parent.parent.parent / "ST-later" / "SE0001" / path.name
        target.parent.mkdir(parents=True)
        ds.save_as(target)
        rows.append(f"{ds.StudyInstanceUID},{ds.PatientID},1")
    with (site / "labels.csv").open("a") as handle:
        handle.write("\n".join(rows) + "\n")


@pytest.fixture
def site_dir(generated: Path, tmp_path: Path) -> Path:
    target = tmp_path / "site"
    shutil.copytree(generated, target)
    return target


def _settings(tmp_path: Path, k: int = 1) -> RunSettings:
    return RunSettings(
        task="xray",
        model="cnn2d",
        num_rounds=2,
        epsilon=8.0,
        batch_size=4,
        min_sites=2,
        samples_per_patient=k,
        out_dir=str(tmp_path / "out"),
    )


def _weights() -> list:
    return get_weights(build_model("cnn2d", SYNTHETIC_XRAY.model_input, seed=42))


def test_one_sample_per_patient_is_trained_and_recorded(site_dir, tmp_path):
    write_policy(site_dir / POLICY_NAME, SitePolicy(site_id="h1", min_cohort=2))
    site = Site(site_dir)
    decision = site.decide(_settings(tmp_path), "run-1", 1)
    assert decision.accept, decision.reason
    assert decision.records_used == PATIENTS  # the earlier study of each patient
    weights, n, metrics = site.train_round(_settings(tmp_path), "run-1", 1, _weights())
    assert n == decision.train_records and len(weights) == len(_weights())
    (entry,) = read_ledger(site_dir / LEDGER_NAME)
    assert entry.samples_per_patient == 1 and entry.num_samples == n
    assert 0 < metrics["epsilon"] <= 8.0


def test_cap_k_needs_the_policy_and_is_recorded(site_dir, tmp_path):
    write_policy(site_dir / POLICY_NAME, SitePolicy(site_id="h1", min_cohort=2))
    site = Site(site_dir)
    refused = site.decide(_settings(tmp_path, k=2), "run-1", 1)
    assert not refused.accept and "samples per patient" in refused.reason
    write_policy(
        site_dir / POLICY_NAME, SitePolicy(site_id="h1", min_cohort=2, max_samples_per_patient=2)
    )
    decision = site.decide(_settings(tmp_path, k=2), "run-2", 1)
    assert decision.accept, decision.reason
    assert decision.records_used == 2 * PATIENTS
    site.train_round(_settings(tmp_path, k=2), "run-2", 1, _weights())
    (entry,) = read_ledger(site_dir / LEDGER_NAME)
    assert entry.samples_per_patient == 2


def test_policy_can_require_deidentified_data(site_dir, tmp_path):
    write_policy(
        site_dir / POLICY_NAME,
        SitePolicy(site_id="h1", min_cohort=2, require_deidentified=True),
    )
    decision = Site(site_dir).decide(_settings(tmp_path), "run-1", 1)
    assert not decision.accept and "de-identified" in decision.reason
    clean = tmp_path / "clean"
    deidentify_tree(site_dir, clean, b"k" * 32)
    shutil.copy(site_dir / POLICY_NAME, clean / POLICY_NAME)
    decision = Site(clean).decide(_settings(tmp_path), "run-1", 1)
    assert decision.accept, decision.reason
    assert decision.records_used == PATIENTS
