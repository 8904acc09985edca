"""Checkpoints of the global model, one per completed round, written atomically."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from medfed.common.atomic import atomic_write_bytes
from medfed.common.params import weights_digest


def checkpoint_path(out_dir: Path, server_round: int) -> Path:
    return out_dir / "checkpoints" / f"round-{server_round:04d}.npz"


def save_checkpoint(
    out_dir: Path, server_round: int, weights: list[np.ndarray], meta: dict
) -> tuple[Path, str]:
    """Write the global model after ``server_round``; return the path and model hash.

    ``meta`` (task, model, feature names, ...) is stored beside the arrays so that the
    checkpoint can be loaded without the run's configuration.
    """
    digest = weights_digest(weights)
    buffer = io.BytesIO()
    arrays = {f"param_{i:03d}": w for i, w in enumerate(weights)}
    full_meta = {**meta, "round": server_round, "sha256": digest}
    np.savez(buffer, meta=np.frombuffer(json.dumps(full_meta).encode(), np.uint8), **arrays)
    path = checkpoint_path(out_dir, server_round)
    atomic_write_bytes(path, buffer.getvalue())
    return path, digest


def load_checkpoint(
    path: Path, expected_sha256: str | None = None
) -> tuple[list[np.ndarray], dict]:
    """Read a checkpoint; raise ValueError naming the file if it is damaged.

    The model hash is recomputed from the arrays as :func:`save_checkpoint` computes it
    and must equal the one stored in the file and, when given, ``expected_sha256`` (the
    hash run.json recorded for the round): a checkpoint replaced by another model, even
    one with a self-consistent hash, is refused.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            keys = sorted(k for k in data.files if k.startswith("param_"))
            weights = [data[k] for k in keys]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable medfed checkpoint ({exc})") from None
    digest = weights_digest(weights)
    if digest != meta.get("sha256"):
        raise ValueError(f"{path}: checkpoint hash does not match its parameters")
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(
            f"{path}: model hash {digest[:16]}… is not the {expected_sha256[:16]}… "
            "recorded for this round in run.json (checkpoint replaced or tampered with)"
        )
    return weights, meta
