"""Simulation helpers that do not need a Flower run: site preparation and the reference."""

from __future__ import annotations

import json
import time

import pytest

from medfed.client.policy import load_policy
from medfed.common.config import RunSettings
from medfed.simulations.reference import pooled_reference
from medfed.simulations.runner import SimulationPlan, _EventWatcher, prepare_sites
from medfed.simulations.synthetic import generate_risk_sites


def test_prepare_sites_creates_synthetic_sites_with_policies(tmp_path):
    settings = RunSettings(data_root=str(tmp_path / "sites"))
    dirs = prepare_sites(SimulationPlan(settings=settings, num_sites=3, site_budget=7.0))
    assert [d.name for d in dirs] == ["site-0", "site-1", "site-2"]
    policies = [load_policy(d / "site.toml") for d in dirs]
    assert [p.site_id for p in policies] == ["hospital-a", "hospital-b", "hospital-c"]
    assert all(p.epsilon_budget == 7.0 for p in policies)


def test_prepare_sites_reuses_existing_sites_and_keeps_their_policy(tmp_path):
    settings = RunSettings(data_root=str(tmp_path))
    first = prepare_sites(SimulationPlan(settings=settings, num_sites=2, site_budget=3.0))
    again = prepare_sites(SimulationPlan(settings=settings, num_sites=5, site_budget=9.0))
    assert again == first
    assert load_policy(first[0] / "site.toml").epsilon_budget == 3.0


def test_prepare_sites_heart_disease_names_the_hospitals(tmp_path):
    settings = RunSettings(dataset="heart-disease", data_root=str(tmp_path))
    dirs = prepare_sites(SimulationPlan(settings=settings))
    ids = [load_policy(d / "site.toml").site_id for d in dirs]
    assert ids == ["cleveland", "hungarian", "switzerland", "va"]


def test_pooled_reference_learns_and_leaves_out_unusable_sites(tmp_path):
    dirs = generate_risk_sites(3, tmp_path, seed=2, size_scale=0.3)
    (dirs[2] / "clinical.csv").write_text("patient_id,age\nx,50\n")
    ref = pooled_reference(dirs, RunSettings(data_root=str(tmp_path)))
    assert ref["auc"] > 0.65
    assert ref["sites"] == 2
    assert list(ref["sites_left_out"]) == [str(dirs[2])]
    assert "L-BFGS" in ref["optimizer"]


def test_pooled_reference_for_the_mlp_and_rehab(tmp_path):
    dirs = generate_risk_sites(2, tmp_path, seed=2, size_scale=0.2)
    ref = pooled_reference(dirs, RunSettings(task="rehab", model="mlp"))
    assert ref["mae"] < 15 and ref["r2"] > 0.3


def test_event_watcher_passes_complete_lines_in_order(tmp_path):
    path = tmp_path / "events.jsonl"
    seen = []
    watcher = _EventWatcher(path, seen.append)
    with path.open("w") as handle:
        handle.write(json.dumps({"event": "a"}) + "\n")
        handle.flush()
        time.sleep(0.5)
        handle.write(json.dumps({"event": "b"}) + "\n" + '{"event": "c"')  # c is partial
    watcher.stop()
    assert [e["event"] for e in seen] == ["a", "b"]


def test_event_watcher_skips_events_already_in_the_file(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"event": "old"}) + "\n")  # a resumed run's earlier events
    seen = []
    watcher = _EventWatcher(path, seen.append)
    with path.open("a") as handle:
        handle.write(json.dumps({"event": "new"}) + "\n")
    watcher.stop()
    assert [e["event"] for e in seen] == ["new"]


def test_too_few_sites_is_a_clear_error(tmp_path):
    from medfed.simulations.runner import SimulationError, run

    generate_risk_sites(1, tmp_path, seed=1, size_scale=0.1)
    settings = RunSettings(data_root=str(tmp_path), out_dir=str(tmp_path / "out"))
    with pytest.raises(SimulationError, match="at least 2 needed"):
        run(SimulationPlan(settings=settings))


def test_pooled_reference_uses_no_withdrawn_patient(tmp_path):
    """The reference reads each site's data with the site's consent rules."""
    dirs = generate_risk_sites(3, tmp_path, seed=2, size_scale=0.3)
    lines = (dirs[2] / "clinical.csv").read_text().splitlines()[1:]
    (dirs[2] / "withdrawn.txt").write_text("\n".join(line.split(",")[0] for line in lines))
    ref = pooled_reference(dirs, RunSettings(data_root=str(tmp_path)))
    assert ref["sites"] == 2
    assert "no valid rows" in ref["sites_left_out"][str(dirs[2])]
