"""End to end: imaging federations (DICOM x-ray and CT) through Flower, DP-SGD and SecAgg+.

Tiny synthetic hospitals; one site requires de-identified data and so declines, one has
a corrupt file and an unlabelled patient, which are quarantined while the rest trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfed.client.policy import SitePolicy, write_policy
from medfed.common.config import RunSettings
from medfed.common.ledger import read_ledger
from medfed.server.checkpoint import load_checkpoint
from medfed.simulations.runner import SimulationPlan, run
from medfed.simulations.synthetic_imaging import generate_imaging_sites

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

ROUNDS = 2


def _sites(task: str, root: Path, patients: int) -> list[Path]:
    site_dirs = generate_imaging_sites(
        task, 3, root, seed=11, patients_per_site=patients, image_size=64, slices=8
    )
    for i, d in enumerate(site_dirs):
        write_policy(
            d / "site.toml",
            SitePolicy(
                site_id=f"h{i}", epsilon_budget=20.0, min_cohort=4, require_deidentified=i == 2
            ),
        )
    return site_dirs


def _run(task: str, model: str, data: Path, out: Path):
    settings = RunSettings(
        task=task,
        model=model,
        num_rounds=ROUNDS,
        epsilon=8.0,
        batch_size=8,
        learning_rate=0.5,
        data_root=str(data),
        out_dir=str(out),
        seed=3,
    )
    return run(SimulationPlan(settings=settings, num_sites=3, reference=True, min_cohort=4))


@pytest.fixture(scope="module")
def xray_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("xray-fed")
    site_dirs = _sites("xray", root / "sites", patients=24)
    files = sorted((site_dirs[1] / "dicom").rglob("*.dcm"))
    files[0].write_bytes(files[0].read_bytes()[:-300])
    labels = (site_dirs[1] / "labels.csv").read_text().splitlines()
    (site_dirs[1] / "labels.csv").write_text("\n".join(labels[:-1]) + "\n")
    return site_dirs, _run("xray", "cnn2d", root / "sites", root / "run")


def test_xray_run_completes_with_the_sites_that_may_train(xray_run):
    _, result = xray_run
    record = result.run
    assert record["status"] == "completed"
    assert [r["status"] for r in record["rounds"]] == ["aggregated"] * ROUNDS
    for rnd in record["rounds"]:
        assert rnd["participants"] == ["h0", "h1"]
        assert "de-identified" in rnd["declined"]["h2"]
    assert "auc" in record["final_metrics"]
    assert result.reference is not None and "auc" in result.reference


def test_xray_run_reports_used_and_quarantined_counts(xray_run):
    site_dirs, result = xray_run
    sites = result.run["sites"]
    assert sites["h1"]["records_skipped"] == 2  # the truncated file, the unlabelled one
    assert sites["h1"]["records_used"] == 22
    report = json.loads((site_dirs[1] / "data_report.json").read_text())
    assert report["quarantined_by_reason"] == {"no label": 1, "truncated": 1}


def test_xray_ledger_records_one_sample_per_patient(xray_run):
    site_dirs, result = xray_run
    entries = [e for e in read_ledger(site_dirs[0] / "ledger.jsonl") if e.kind == "train"]
    assert len(entries) == ROUNDS
    assert all(e.samples_per_patient == 1 for e in entries)
    assert 0 < entries[-1].epsilon <= 8.0 + 1e-6
    weights, meta = load_checkpoint(result.out_dir / result.run["rounds"][-1]["checkpoint"])
    assert meta["model"] == "cnn2d" and meta["input_shape"] == [1, 64, 64]
    assert weights


def test_ct_run_trains_a_volume_model(tmp_path):
    site_dirs = _sites("ct", tmp_path / "sites", patients=12)
    result = _run("ct", "cnn3d", tmp_path / "sites", tmp_path / "run")
    assert result.run["status"] == "completed"
    assert [r["status"] for r in result.run["rounds"]] == ["aggregated"] * ROUNDS
    _, meta = load_checkpoint(result.out_dir / result.run["rounds"][-1]["checkpoint"])
    assert meta["input_shape"] == [1, 16, 64, 64]
    assert (site_dirs[0] / ".medfed-cache").is_dir()
