"""Loading a trained global model: a checkpoint ``.npz`` or a run folder.

A run folder means the checkpoint of its last aggregated round, whose hash must be the
one run.json recorded. A checkpoint given directly is checked against its own stored
hash and, when it sits in a run's ``checkpoints/`` folder, against what that run's
run.json recorded for it. The run's aggregate metrics for this very model (the sites'
released test metrics, e.g. the rehab RMSE) are kept for prediction intervals.

The checkpoint format and run.json are read with :mod:`medfed.server.checkpoint` and
:mod:`medfed.server.run_record` (both light: numpy and json), so that one module
defines each format. ``medfed.inference`` is a top layer beside ``medfed.cli``: it
may use client and server code, and nothing below it imports it.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.common.tasks import IMAGING_MODELS, TABULAR_MODELS, get_task_spec
from medfed.inference.errors import PredictError
from medfed.server.checkpoint import load_checkpoint
from medfed.server.run_record import RUN_RECORD_NAME, RunRecord, RunRecordError, read_run_record

_UNREADABLE = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile)
_ZIP_MAGIC = b"PK\x03\x04"  # every .npz is a zip archive


@dataclass(frozen=True)
class LoadedModel:
    """A verified global model and what its run recorded about it.

    ``metrics`` are the aggregate metrics the sites released for this model (the
    latest round of the run whose model hash is this one); ``final_metrics`` the run's
    last released metrics; both are empty without a run record. ``notes`` say what
    could not be used (a run.json that does not record this model, say).
    """

    weights: list[np.ndarray]
    meta: dict[str, Any]
    checkpoint: Path
    sha256: str
    run_dir: Path | None = None
    run_id: str = ""
    round: int | None = None
    metrics_round: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    final_metrics: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def task(self) -> str:
        return str(self.meta["task"])

    @property
    def dataset(self) -> str:
        return str(self.meta["dataset"])

    @property
    def model_name(self) -> str:
        return str(self.meta["model"])

    @property
    def is_imaging(self) -> bool:
        return self.model_name in IMAGING_MODELS

    def describe(self) -> str:
        """'logreg for risk on synthetic' — what the model is, for messages."""
        return f"{self.model_name} for {self.task} on {self.dataset}"

    def summary(self) -> dict[str, Any]:
        """Stable JSON keys identifying the model (no patient data)."""
        return {
            "sha256": self.sha256,
            "checkpoint": str(self.checkpoint),
            "run_id": self.run_id or None,
            "round": self.round,
            "task": self.task,
            "dataset": self.dataset,
            "model": self.model_name,
        }


def load_model(path: Path) -> LoadedModel:
    """Load and verify the model at ``path``; PredictError naming the file if unusable."""
    path = Path(path)
    if path.is_dir():
        return _from_run_folder(path)
    if not path.is_file():
        raise PredictError(f"{path}: no such checkpoint (.npz) or run folder")
    return _from_checkpoint(path)


def _from_run_folder(run_dir: Path) -> LoadedModel:
    record = _read_record(run_dir)
    done = [r for r in record.rounds if r.status == "aggregated" and r.checkpoint]
    if not done:
        raise PredictError(f"{run_dir / RUN_RECORD_NAME}: no aggregated round with a checkpoint")
    last = max(done, key=lambda r: r.round)
    checkpoint = run_dir / last.checkpoint
    weights, meta = _read_checkpoint(checkpoint, last.model_sha256 or None)
    return _with_record(weights, meta, checkpoint, run_dir, record)


def _from_checkpoint(checkpoint: Path) -> LoadedModel:
    weights, meta = _read_checkpoint(checkpoint, None)
    run_dir = checkpoint.resolve().parent.parent
    if not (run_dir / RUN_RECORD_NAME).is_file():
        return _checked(weights, meta, checkpoint)
    try:
        record = read_run_record(run_dir)
    except RunRecordError as exc:
        note = f"run record not used: {exc}"
        return _checked(weights, meta, checkpoint, notes=(note,))
    for rnd in record.rounds:
        recorded = rnd.checkpoint and (run_dir / rnd.checkpoint).resolve()
        if recorded == checkpoint.resolve() and rnd.model_sha256 != meta["sha256"]:
            raise PredictError(
                f"{checkpoint}: model hash {meta['sha256'][:16]}… is not the "
                f"{rnd.model_sha256[:16]}… recorded for round {rnd.round} in "
                f"{run_dir / RUN_RECORD_NAME} (checkpoint replaced or tampered with)"
            )
    if not any(r.model_sha256 == meta["sha256"] for r in record.rounds):
        note = f"{run_dir / RUN_RECORD_NAME} does not record this model; its metrics are not used"
        return _checked(weights, meta, checkpoint, notes=(note,))
    return _with_record(weights, meta, checkpoint, run_dir, record)


def _read_record(run_dir: Path) -> RunRecord:
    try:
        return read_run_record(run_dir)
    except RunRecordError as exc:
        raise PredictError(str(exc)) from None


def _read_checkpoint(path: Path, expected: str | None) -> tuple[list[np.ndarray], dict]:
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(_ZIP_MAGIC))
    except OSError as exc:
        raise PredictError(f"{path}: cannot read the checkpoint ({exc})") from None
    if magic != _ZIP_MAGIC:
        raise PredictError(f"{path}: not a medfed checkpoint (not an .npz archive)")
    try:
        weights, meta = load_checkpoint(path, expected)
    except _UNREADABLE as exc:
        text = str(exc)
        if not text.startswith(str(path)):
            text = f"{path}: not a readable medfed checkpoint ({type(exc).__name__}: {text})"
        raise PredictError(text) from None
    return weights, meta


def _with_record(
    weights: list[np.ndarray],
    meta: dict,
    checkpoint: Path,
    run_dir: Path,
    record: RunRecord,
) -> LoadedModel:
    mine = [r for r in record.rounds if r.model_sha256 == meta["sha256"]]
    released = [r for r in mine if r.aggregate_metrics]
    source = max(released, key=lambda r: r.round) if released else None
    return _checked(
        weights,
        meta,
        checkpoint,
        run_dir=run_dir,
        run_id=record.run_id,
        settings=dict(record.settings),
        metrics={**source.aggregate_metrics, **_pooled_rmse(source.site_metrics)} if source else {},
        metrics_round=source.round if source else None,
        final_metrics=dict(record.final_metrics),
    )


def _pooled_rmse(site_metrics: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The RMSE over all released test patients, exact from each site's RMSE and count.

    ``sqrt(sum n_s rmse_s^2 / sum n_s)``: the aggregate ``rmse`` (a weighted mean of the
    sites' RMSEs) can only be smaller.
    """
    pairs = [
        (float(m["num_examples"]), float(m["rmse"]))
        for m in site_metrics.values()
        if isinstance(m.get("rmse"), (int, float)) and float(m.get("num_examples") or 0) > 0
    ]
    total = sum(n for n, _ in pairs)
    if not pairs or not np.isfinite(total):
        return {}
    return {"pooled_rmse": float(np.sqrt(sum(n * r * r for n, r in pairs) / total))}


def _checked(weights: list[np.ndarray], meta: dict, checkpoint: Path, **extra: Any) -> LoadedModel:
    """Refuse a checkpoint whose meta does not describe a medfed model."""
    missing = [k for k in ("task", "dataset", "model", "sha256") if k not in meta]
    if missing:
        raise PredictError(
            f"{checkpoint}: not a medfed model checkpoint (meta lacks {', '.join(missing)})"
        )
    try:
        get_task_spec(str(meta["task"]), str(meta["dataset"]))
    except ValueError as exc:
        raise PredictError(f"{checkpoint}: {exc}") from None
    if meta["model"] not in (*TABULAR_MODELS, *IMAGING_MODELS):
        raise PredictError(f"{checkpoint}: unknown model {meta['model']!r}")
    round_no = meta.get("round")
    return LoadedModel(
        weights=weights,
        meta=meta,
        checkpoint=checkpoint,
        sha256=str(meta["sha256"]),
        round=round_no if isinstance(round_no, int) else None,
        **extra,
    )
