"""``predict_imaging``: training's preprocessing, saliency PNGs, and every input error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from matplotlib.image import imread

from medfed.client.imaging_data import load_imaging_data
from medfed.common.config import RunSettings
from medfed.common.models import build_model
from medfed.common.params import get_weights, set_weights
from medfed.common.tasks import ImagingSpec
from medfed.inference.errors import ModelInputMismatch, PredictError
from medfed.inference.imaging import (
    ImagingPrediction,
    NoDicomFound,
    UnusableDicom,
    predict_imaging,
)
from medfed.inference.saliency_png import PNG_SIZE
from medfed.server.app import model_meta
from medfed.simulations.synthetic_imaging import generate_imaging_sites

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SIZE, DEPTH = 32, 10


def meta_for(task: str, size: int = SIZE, depth: int = 0, seed: int = 1) -> dict:
    """A checkpoint meta shaped as ``medfed.server.app.model_meta`` writes it."""
    volume = task == "ct"
    return {
        "task": task,
        "dataset": "synthetic",
        "model": "cnn3d" if volume else "cnn2d",
        "seed": seed,
        "input_shape": [1, depth, size, size] if volume else [1, size, size],
        "preprocessing": {
            "size": size,
            "depth": depth if volume else 0,
            # Not the synthetic headers' window (-600, 1500): the meta's must be the one used.
            "window_center": -500 if volume else None,
            "window_width": 1400 if volume else None,
        },
    }


XRAY_META = meta_for("xray")
CT_META = meta_for("ct", depth=DEPTH)


def spec_of(meta: dict) -> ImagingSpec:
    prep = meta["preprocessing"]
    return ImagingSpec(
        task=meta["task"],
        dataset=meta["dataset"],
        size=prep["size"],
        depth=prep["depth"],
        window_center=prep["window_center"],
        window_width=prep["window_width"],
    )


def trained_like_weights(meta: dict) -> list[np.ndarray]:
    """Weights unlike the meta seed's initial ones, so predictions differ per image."""
    model = build_model(meta["model"], tuple(meta["input_shape"]), seed=meta["seed"] + 6)
    rng = np.random.default_rng(5)
    return [w + rng.normal(0, 0.3, w.shape).astype(w.dtype) for w in get_weights(model)]


def training_probabilities(site: Path, meta: dict, weights: list[np.ndarray]) -> dict:
    """First source file -> the model's probability on the training data path's array."""
    data = load_imaging_data(site, spec_of(meta), use_cache=False)
    model = build_model(meta["model"], tuple(meta["input_shape"]), seed=0)
    set_weights(model, weights)
    with torch.no_grad():
        probs = torch.sigmoid(model.eval()(torch.from_numpy(data.X))).tolist()
    return {files[0]: p for files, p in zip(data.files, probs, strict=True)}


@pytest.fixture(scope="module")
def xray_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("xray")
    (site,) = generate_imaging_sites("xray", 1, root, seed=4, image_size=SIZE, patients_per_site=4)
    return site


@pytest.fixture(scope="module")
def ct_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    (site,) = generate_imaging_sites(
        "ct", 1, root, seed=4, image_size=SIZE, slices=6, patients_per_site=2
    )
    return site


def series_folders(site: Path) -> list[Path]:
    return sorted({p.parent for p in (site / "dicom").rglob("*.dcm")})


# -- predictions equal the training path ---------------------------------------------------
def test_xray_folder_gives_the_training_arrays_prediction_per_image(xray_site):
    weights = trained_like_weights(XRAY_META)
    predictions = predict_imaging(weights, XRAY_META, xray_site / "dicom", None)
    expected = training_probabilities(xray_site, XRAY_META, weights)
    assert sorted(p.source for p in predictions) == sorted(expected)
    for p in predictions:
        assert p.probability == pytest.approx(expected[p.source], abs=1e-6)
        assert p.label == int(p.probability >= 0.5)
        ds = pydicom.dcmread(p.source)
        assert (p.study_uid, p.series_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
        assert p.saliency_png is None
    assert np.ptp([p.probability for p in predictions]) > 1e-3  # the weights matter


def test_a_single_xray_file_gives_one_prediction_with_the_path_as_given(xray_site):
    weights = trained_like_weights(XRAY_META)
    file = sorted((xray_site / "dicom").rglob("*.dcm"))[1]
    (prediction,) = predict_imaging(weights, XRAY_META, file, None)
    expected = training_probabilities(xray_site, XRAY_META, weights)[str(file)]
    assert prediction.source == str(file)
    assert prediction.probability == pytest.approx(expected, abs=1e-6)
    record = prediction.to_dict()
    assert set(record) == set(ImagingPrediction.__dataclass_fields__)
    assert record["probability"] == prediction.probability


def test_ct_folder_gives_one_volume_prediction_per_series(ct_site):
    weights = trained_like_weights(CT_META)
    predictions = predict_imaging(weights, CT_META, ct_site / "dicom", None)
    expected = training_probabilities(ct_site, CT_META, weights)
    folders = series_folders(ct_site)
    assert sorted(p.source for p in predictions) == [str(f) for f in folders]
    for p in predictions:
        first = str(sorted(Path(p.source).glob("*.dcm"))[0])
        assert p.probability == pytest.approx(expected[first], abs=1e-6)
    (one,) = predict_imaging(weights, CT_META, folders[0], None)
    assert one.source == str(folders[0])
    assert one.series_uid == pydicom.dcmread(next(folders[0].glob("*.dcm"))).SeriesInstanceUID


def test_the_meta_of_a_real_checkpoint_is_accepted(tmp_path):
    meta = model_meta(RunSettings(task="xray", model="cnn2d", seed=3))
    (site,) = generate_imaging_sites("xray", 1, tmp_path, seed=2, patients_per_site=1)
    weights = trained_like_weights(meta)
    (prediction,) = predict_imaging(weights, meta, site / "dicom", None)
    (expected,) = training_probabilities(site, meta, weights).values()
    assert prediction.probability == pytest.approx(expected, abs=1e-6)


# -- saliency PNGs -------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["xray", "ct"])
def test_saliency_pngs_are_written_per_prediction_named_by_uid(task, xray_site, ct_site, tmp_path):
    site, meta = (xray_site, XRAY_META) if task == "xray" else (ct_site, CT_META)
    out = tmp_path / "saliency"
    predictions = predict_imaging(trained_like_weights(meta), meta, site / "dicom", out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(Path(p.saliency_png).name for p in predictions)
    for p in predictions:
        ds = pydicom.dcmread(next(Path(p.source).rglob("*.dcm")) if task == "ct" else p.source)
        uid = ds.SeriesInstanceUID if task == "ct" else ds.SOPInstanceUID
        assert Path(p.saliency_png).name == f"saliency-{uid}.png"
        assert str(ds.PatientID) not in p.saliency_png
        assert str(ds.PatientName).split("^")[0] not in Path(p.saliency_png).name
        assert imread(p.saliency_png).shape == (PNG_SIZE[1], PNG_SIZE[0], 4)


# -- mismatches ----------------------------------------------------------------------------
def test_a_ct_series_for_the_xray_model_is_a_mismatch_naming_the_file(ct_site):
    folder = series_folders(ct_site)[0]
    with pytest.raises(ModelInputMismatch, match="volume") as caught:
        predict_imaging(trained_like_weights(XRAY_META), XRAY_META, folder, None)
    assert str(sorted(folder.glob("*.dcm"))[0]) in str(caught.value)


def test_a_single_ct_slice_for_the_ct_model_is_a_mismatch_naming_the_file():
    path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    with pytest.raises(ModelInputMismatch, match="single 2D CT image") as caught:
        predict_imaging(trained_like_weights(CT_META), CT_META, path, None)
    assert str(path) in str(caught.value)


def test_a_modality_the_task_does_not_take_is_a_mismatch():
    path = Path(pydicom.data.get_testdata_file("MR_small.dcm"))
    with pytest.raises(ModelInputMismatch, match="modality MR; the xray model") as caught:
        predict_imaging(trained_like_weights(XRAY_META), XRAY_META, path, None)
    assert str(path) in str(caught.value)


def test_a_csv_for_an_imaging_model_is_a_mismatch_naming_the_file(xray_site):
    path = xray_site / "labels.csv"
    with pytest.raises(ModelInputMismatch, match=r"\.csv file, not DICOM") as caught:
        predict_imaging(trained_like_weights(XRAY_META), XRAY_META, path, None)
    assert str(path) in str(caught.value)


def test_a_tabular_model_is_a_mismatch_for_dicom(xray_site):
    meta = model_meta(RunSettings(task="risk", model="logreg"))
    weights = get_weights(build_model("logreg", len(meta["features"]), seed=1))
    with pytest.raises(ModelInputMismatch, match="tabular 'risk' model") as caught:
        predict_imaging(weights, meta, xray_site / "dicom", None)
    assert str(xray_site / "dicom") in str(caught.value)


def test_weights_or_meta_that_do_not_fit_are_errors(xray_site):
    with pytest.raises(PredictError, match="weights do not fit cnn2d"):
        predict_imaging(trained_like_weights(CT_META), XRAY_META, xray_site / "dicom", None)
    bad = {**XRAY_META, "input_shape": [1, 64, 64]}
    with pytest.raises(PredictError, match="input_shape"):
        predict_imaging(trained_like_weights(XRAY_META), bad, xray_site / "dicom", None)
    bad = {**XRAY_META, "model": "cnn3d"}
    with pytest.raises(PredictError, match="model 'cnn3d' does not fit task 'xray'"):
        predict_imaging(trained_like_weights(XRAY_META), bad, xray_site / "dicom", None)


# -- unusable input ------------------------------------------------------------------------
def test_a_truncated_dicom_file_is_an_error_naming_the_file_and_reason(xray_site, tmp_path):
    source = sorted((xray_site / "dicom").rglob("*.dcm"))[0]
    folder = tmp_path / "in"
    shutil.copytree(source.parent, folder)
    broken = folder / source.name
    broken.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    for given in (broken, folder):
        with pytest.raises(UnusableDicom, match="truncated") as caught:
            predict_imaging(trained_like_weights(XRAY_META), XRAY_META, given, None)
        assert str(broken) in str(caught.value)
        assert not isinstance(caught.value, ModelInputMismatch)
        assert [q.kind for q in caught.value.quarantined] == ["truncated"]


def test_garbage_with_a_dicom_name_is_not_dicom_in_a_folder_of_good_images(xray_site, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(xray_site / "dicom", folder)
    garbage = folder / "IMG9999.dcm"
    garbage.write_bytes(b"\x00" * 200 + b"not an image")
    with pytest.raises(UnusableDicom, match="not DICOM") as caught:
        predict_imaging(trained_like_weights(XRAY_META), XRAY_META, folder, None)
    assert str(garbage) in str(caught.value)


def test_a_folder_without_dicom_is_an_error_and_unrelated_files_are_passed_over(
    xray_site, tmp_path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "labels.csv").write_text("StudyInstanceUID,label\n1.2,1\n")
    with pytest.raises(NoDicomFound, match="no DICOM image found") as caught:
        predict_imaging(trained_like_weights(XRAY_META), XRAY_META, empty, None)
    assert str(empty) in str(caught.value) and "labels.csv" in str(caught.value)
    # A site folder: the label file beside the images is not an error.
    predictions = predict_imaging(trained_like_weights(XRAY_META), XRAY_META, xray_site, None)
    assert len(predictions) == 4
    with pytest.raises(PredictError, match="no such file or folder"):
        predict_imaging(trained_like_weights(XRAY_META), XRAY_META, tmp_path / "nope", None)
