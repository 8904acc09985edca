"""Real checkpoints for the inference tests: brief non-private training on site data.

A checkpoint is written exactly as the coordinator writes one
(:func:`medfed.server.checkpoint.save_checkpoint` with :func:`medfed.server.app.model_meta`),
and optionally the run's run.json with the sites' aggregate metrics for the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfed.client.data import SiteData, split_train_test
from medfed.client.training import evaluate, fit_full_batch, train_plain
from medfed.common.config import RunSettings
from medfed.common.models import build_model
from medfed.common.params import get_weights
from medfed.server.app import model_meta
from medfed.server.checkpoint import save_checkpoint
from medfed.server.run_record import RoundRecord, RunRecord

SEED = 7
TEST_FRACTION = 0.25
RUN_ID = "inference-test-run"


def settings_for(task: str, model: str, dataset: str = "synthetic") -> RunSettings:
    return RunSettings(
        task=task, dataset=dataset, model=model, seed=SEED, test_fraction=TEST_FRACTION
    )


def train_weights(data: SiteData, model: str) -> tuple[list[np.ndarray], object]:
    """Weights of ``model`` trained on ``data``'s training split (non-private, quick)."""
    train, _ = split_train_test(data, TEST_FRACTION, SEED)
    net = build_model(model, data.spec.model_input, SEED)
    if model == "logreg":
        fit_full_batch(net, train.X, train.y, data.spec.is_binary, max_iter=100)
    else:
        train_plain(net, train.X, train.y, data.spec.is_binary, 60, 32, 0.1, seed=SEED)
    return get_weights(net), net


def write_run(
    out_dir: Path,
    data: SiteData,
    model: str,
    with_run_json: bool = True,
    meta_override: dict | None = None,
) -> Path:
    """Train, write round 1's checkpoint (and run.json); return the checkpoint path."""
    settings = settings_for(data.spec.task, model, data.spec.dataset)
    weights, net = train_weights(data, model)
    meta = {**model_meta(settings), **(meta_override or {})}
    path, digest = save_checkpoint(out_dir, 1, weights, meta)
    if with_run_json:
        _, test = split_train_test(data, TEST_FRACTION, SEED)
        span = 1.0 if data.spec.is_binary else data.spec.target.high - data.spec.target.low
        metrics = evaluate(net, test.X, test.y, data.spec.is_binary, span)
        rnd = RoundRecord(
            round=1,
            status="aggregated",
            participants=["hospital-a"],
            aggregate_metrics=metrics,
            site_metrics={"hospital-a": {"num_examples": len(test), **metrics}},
            checkpoint=str(path.relative_to(out_dir)),
            model_sha256=digest,
        )
        record = RunRecord(
            run_id=RUN_ID,
            settings=settings.model_dump(),
            secure_aggregation={},
            status="finished",
            rounds=[rnd],
            final_metrics=metrics,
        )
        record.write(out_dir)
    return path


def encode_by_hand(spec, raw: dict[str, float]) -> np.ndarray:
    """The scaled features of one synthetic row, written out from the schema's ranges."""
    out = []
    for col in spec.columns:
        value = float(raw[col.name])
        if col.kind == "binary":
            out.append(value)
        else:
            out.append(2.0 * (value - col.low) / (col.high - col.low) - 1.0)
    return np.asarray(out)


def mlp_forward(weights: list[np.ndarray], x: np.ndarray) -> float:
    """The SmallMLP's output recomputed with numpy (Linear-ReLU-Linear-ReLU-Linear)."""
    w1, b1, w2, b2, w3, b3 = (np.asarray(w, dtype=np.float64) for w in weights)
    h = np.maximum(w1 @ x + b1, 0.0)
    h = np.maximum(w2 @ h + b2, 0.0)
    return float((w3 @ h + b3)[0])


def sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-z)))
