import numpy as np
import pytest

from medfed.server.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint


def test_round_trip_keeps_arrays_and_meta(tmp_path):
    weights = [np.arange(6, dtype=np.float32).reshape(1, 6), np.array([0.5], np.float32)]
    path, digest = save_checkpoint(tmp_path, 3, weights, {"task": "risk"})
    assert path == checkpoint_path(tmp_path, 3)
    loaded, meta = load_checkpoint(path)
    assert meta == {"task": "risk", "round": 3, "sha256": digest}
    for a, b in zip(weights, loaded, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files


def test_tampered_parameters_are_rejected(tmp_path):
    weights = [np.zeros((1, 3), np.float32)]
    path, _ = save_checkpoint(tmp_path, 1, weights, {})
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["param_000"] = arrays["param_000"] + 1
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="hash does not match"):
        load_checkpoint(path)


def test_garbage_file_names_the_path(tmp_path):
    bad = tmp_path / "round-0001.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=str(bad)):
        load_checkpoint(bad)
