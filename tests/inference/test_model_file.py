"""Loading a model: run folder or checkpoint, hashes checked, run metrics kept."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medfed.common.params import weights_digest
from medfed.inference.errors import PredictError
from medfed.inference.model_file import load_model
from medfed.server.checkpoint import save_checkpoint
from tests.inference.helpers import RUN_ID

CHECKPOINT = Path("checkpoints") / "round-0001.npz"


def test_run_folder_gives_the_recorded_checkpoint_and_its_metrics(trained_run):
    run = trained_run("rehab", "logreg")
    loaded = load_model(run)
    record = json.loads((run / "run.json").read_text())
    assert loaded.checkpoint == run / CHECKPOINT
    assert loaded.sha256 == record["rounds"][0]["model_sha256"]
    assert loaded.sha256 == weights_digest(loaded.weights)
    assert loaded.run_id == RUN_ID and loaded.round == 1
    assert loaded.metrics["rmse"] == record["rounds"][0]["aggregate_metrics"]["rmse"]
    assert loaded.final_metrics == record["final_metrics"]
    assert loaded.settings["test_fraction"] == record["settings"]["test_fraction"]
    assert (loaded.task, loaded.dataset, loaded.model_name) == ("rehab", "synthetic", "logreg")


def test_run_folder_uses_the_last_aggregated_round(run_copy):
    run = run_copy("risk", "logreg")
    loaded = load_model(run)
    path, digest = save_checkpoint(run, 2, [w + 0.5 for w in loaded.weights], loaded.meta)
    record = json.loads((run / "run.json").read_text())
    first = record["rounds"][0]
    second = {**first, "round": 2, "checkpoint": str(path.relative_to(run)), "model_sha256": digest}
    skipped = {**second, "round": 3, "status": "skipped", "checkpoint": "checkpoints/gone.npz"}
    record["rounds"] += [second, skipped]
    (run / "run.json").write_text(json.dumps(record))
    again = load_model(run)
    assert (again.sha256, again.round) == (digest, 2)
    assert again.sha256 != loaded.sha256


def test_checkpoint_in_its_run_folder_finds_run_json(trained_run):
    run = trained_run("rehab", "logreg")
    loaded = load_model(run / CHECKPOINT)
    assert loaded.run_dir is not None and loaded.run_dir.resolve() == run.resolve()
    assert "rmse" in loaded.metrics


def test_checkpoint_alone_has_no_run_metrics(tmp_path, trained_run):
    lone = tmp_path / "model.npz"
    shutil.copy(trained_run("rehab", "logreg") / CHECKPOINT, lone)
    loaded = load_model(lone)
    assert loaded.run_dir is None and loaded.metrics == {} and loaded.settings == {}


def test_replaced_checkpoint_is_refused_against_run_json(run_copy):
    run = run_copy("risk", "logreg")
    loaded = load_model(run)
    # Another model with a self-consistent hash, written over the recorded file.
    save_checkpoint(run, 1, [w * 2 for w in loaded.weights], loaded.meta)
    for target in (run, run / CHECKPOINT):
        with pytest.raises(PredictError, match="tampered"):
            load_model(target)


def test_edited_arrays_fail_the_checkpoints_own_hash(run_copy):
    run = run_copy("risk", "logreg")
    path = run / CHECKPOINT
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["param_000"] = arrays["param_000"] + 1.0
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(PredictError, match="hash does not match") as info:
        load_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, not a model\n", b"PK\x03\x04truncated zip"],
    ids=["empty", "text", "truncated-zip"],
)
def test_unreadable_file_is_named(tmp_path, content):
    path = tmp_path / "model.npz"
    path.write_bytes(content)
    with pytest.raises(PredictError, match="not a") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_npz_that_is_not_a_medfed_checkpoint(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.ones(3))
    with pytest.raises(PredictError, match="not a readable medfed checkpoint"):
        load_model(path)


def test_missing_model_and_empty_run_folder(tmp_path):
    with pytest.raises(PredictError, match="no such checkpoint"):
        load_model(tmp_path / "absent.npz")
    with pytest.raises(PredictError, match="no run record"):
        load_model(tmp_path)


def test_pooled_rmse_is_exact_over_the_sites_released_patients():
    from medfed.inference.model_file import _pooled_rmse

    sites = {
        "a": {"num_examples": 100, "rmse": 4.0},
        "b": {"num_examples": 300, "rmse": 8.0},
        "c": {"suppressed": "test split of 5 is below the minimum cohort"},
    }
    pooled = _pooled_rmse(sites)["pooled_rmse"]
    assert pooled == pytest.approx(((100 * 16 + 300 * 64) / 400) ** 0.5)
    assert pooled > (100 * 4 + 300 * 8) / 400  # the weighted mean understates it
    assert _pooled_rmse({"c": sites["c"]}) == {}
