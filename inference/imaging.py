"""Predictions of an imaging model on a DICOM file or folder, with Grad-CAM PNGs.

The input is read and preprocessed by the training code itself
(:func:`medfed.client.dicom_data.load_images` with
:func:`medfed.client.imaging_data.preprocess_for` of the checkpoint's preprocessing), so
an image gives the model the very array it would have given in training, and a bad file
fails for the same reasons (the quarantine kinds). What is predicted on:

- ``xray`` (``cnn2d``): a DICOM file is one image; a folder gives one prediction per
  image in it;
- ``ct`` (``cnn3d``): a series folder is one volume; a folder holding several series
  gives one prediction per series; a multi-frame file is one volume.

Training skips a bad file and goes on; a prediction does not: any file of the input that
cannot be used raises :class:`UnusableDicom`, naming it, rather than predicting on part
of what was given. Only clearly unrelated files in a folder are passed over: hidden files,
a DICOMDIR, and non-DICOM files whose suffix is not a DICOM one (a ``labels.csv``).

An input that is valid but not what the model was trained on raises
:class:`~medfed.inference.errors.ModelInputMismatch`: a volume for the radiograph model or
a single slice for the CT model, a modality the task does not take
(``TASK_MODALITIES``; stricter than training, which reads any modality), a CSV or other
file, or a checkpoint of a tabular model.

Prediction and saliency run where the image is; nothing is sent anywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medfed.common.tasks import IMAGING_MODELS, TABULAR_MODELS, ImagingSpec
from medfed.inference.errors import ModelInputMismatch, PredictError

if TYPE_CHECKING:
    from medfed.client.dicom_data import ImageItem, Quarantined

# What each imaging task was trained on: radiographs (computed and digital), CT.
TASK_MODALITIES = {"xray": ("CR", "DX"), "ct": ("CT",)}
DICOM_SUFFIXES = frozenset({"", ".dcm", ".dicom", ".dic", ".ima"})
BATCH = 16  # images per forward pass


@dataclass(frozen=True)
class ImagingPrediction:
    """One image's or series' prediction; stays where the image is (it names files)."""

    source: str  # the file or series folder, as given
    study_uid: str
    series_uid: str
    probability: float
    label: int  # probability >= 0.5
    saliency_png: str | None

    def to_dict(self) -> dict:
        return asdict(self)


class UnusableDicom(PredictError):
    """A file of the input cannot be used (not DICOM, truncated, undecodable, ...).

    ``quarantined`` lists every file left out, with the same kinds and details as the
    training's quarantine.
    """

    def __init__(self, message: str, quarantined: list[Quarantined]) -> None:
        super().__init__(message)
        self.quarantined = quarantined


class NoDicomFound(PredictError):
    """The folder holds no DICOM image."""


def predict_imaging(
    weights: list[np.ndarray], meta: dict, input_path: Path, saliency_dir: Path | None
) -> list[ImagingPrediction]:
    """Predict on a DICOM file or folder; with ``saliency_dir``, write a Grad-CAM PNG each.

    ``weights`` and ``meta`` are a checkpoint's parameters and its ``model_meta``.
    Raises PredictError (or ModelInputMismatch) naming the file and what was wrong.
    """
    spec = imaging_spec(meta, input_path)
    items = read_input(Path(input_path), spec, str(meta.get("model")))
    model = load_model(weights, meta, spec)
    probabilities = _probabilities(model, [item.array for item in items])
    names: set[str] = set()
    predictions = []
    for item, probability in zip(items, probabilities, strict=True):
        png = None
        if saliency_dir is not None:
            png = _write_saliency(model, item, probability, Path(saliency_dir), names)
        predictions.append(
            ImagingPrediction(
                source=_source(Path(input_path), item),
                study_uid=item.study_uid,
                series_uid=item.series_uid,
                probability=probability,
                label=int(probability >= 0.5),
                saliency_png=png,
            )
        )
    return predictions


# -- the model ----------------------------------------------------------------------------
def imaging_spec(meta: dict, input_path: Path) -> ImagingSpec:
    """The imaging spec a checkpoint's meta describes; raise if it is not an imaging model."""
    task, model = meta.get("task"), meta.get("model")
    if model in TABULAR_MODELS or ("preprocessing" not in meta and "features" in meta):
        features = meta.get("features")
        count = f", {len(features)} features" if isinstance(features, list) else ""
        raise ModelInputMismatch(
            f"{input_path}: the model is a tabular {task!r} model ({model}{count}); it takes "
            "rows of a clinical CSV, not DICOM"
        )
    if task not in TASK_MODALITIES:
        raise PredictError(
            f"model meta: task {task!r} is not an imaging task ({', '.join(TASK_MODALITIES)})"
        )
    prep = meta.get("preprocessing")
    if not isinstance(prep, dict):
        raise PredictError("model meta: 'preprocessing' missing (size, depth, window)")
    spec = ImagingSpec(
        task=task,
        dataset=str(meta.get("dataset", "")),
        size=_meta_int(prep, "size", 1),
        depth=_meta_int(prep, "depth", 0),
        window_center=_meta_float(prep, "window_center"),
        window_width=_meta_float(prep, "window_width"),
    )
    _check_spec(spec, model, meta.get("input_shape"))
    return spec


def _check_spec(spec: ImagingSpec, model: Any, input_shape: Any) -> None:
    if spec.is_volume != (spec.task == "ct"):
        raise PredictError(
            f"model meta: preprocessing.depth {spec.depth} does not fit task {spec.task!r} "
            "(0 for 2D radiographs, > 0 for CT volumes)"
        )
    if model not in IMAGING_MODELS or model not in spec.models:
        raise PredictError(
            f"model meta: model {model!r} does not fit task {spec.task!r} "
            f"(expected {', '.join(spec.models)})"
        )
    shape_ok = isinstance(input_shape, list | tuple) and list(input_shape) == list(spec.model_input)
    if input_shape is not None and not shape_ok:
        raise PredictError(
            f"model meta: input_shape {input_shape!r} does not match the preprocessing "
            f"(expected {list(spec.model_input)})"
        )
    if spec.window_width is not None and not spec.window_width > 0:
        raise PredictError(
            f"model meta: preprocessing.window_width must be > 0, got {spec.window_width}"
        )


def _meta_int(prep: dict, key: str, minimum: int) -> int:
    value = prep.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PredictError(
            f"model meta: preprocessing.{key} must be an integer >= {minimum}, got {value!r}"
        )
    return value


def _meta_float(prep: dict, key: str) -> float | None:
    value = prep.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise PredictError(f"model meta: preprocessing.{key} must be a number, got {value!r}")
    return float(value)


def load_model(weights: list[np.ndarray], meta: dict, spec: ImagingSpec) -> Any:
    """The checkpoint's model (eval mode) with ``weights``; raise if they do not fit."""
    from medfed.common.models import build_model
    from medfed.common.params import set_weights

    seed = meta.get("seed")  # the weights replace the initial ones: any seed will do
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    model = build_model(str(meta["model"]), spec.model_input, seed)
    try:
        set_weights(model, weights)
    except ValueError as exc:
        raise PredictError(
            f"model weights do not fit {meta['model']} for input {list(spec.model_input)}: {exc}"
        ) from None
    return model.eval()


def _probabilities(model: Any, arrays: list[np.ndarray]) -> list[float]:
    import torch

    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(arrays), BATCH):
            batch = torch.from_numpy(np.stack(arrays[start : start + BATCH])[:, None])
            out += torch.sigmoid(model(batch.float())).reshape(-1).tolist()
    return out


# -- the input ----------------------------------------------------------------------------
def read_input(path: Path, spec: ImagingSpec, model: str) -> list[ImageItem]:
    """The images or volumes of a DICOM file or folder, preprocessed as in training.

    Raises PredictError for a missing path, UnusableDicom for a file that cannot be used,
    NoDicomFound for a folder without DICOM, ModelInputMismatch for the wrong kind.
    """
    from medfed.client.dicom_data import load_images
    from medfed.client.imaging_data import preprocess_for

    if not path.exists():
        raise PredictError(f"{path}: no such file or folder")
    items, quarantined = load_images(path, preprocess_for(spec))
    if path.is_file():
        _check_single_file(path, quarantined, spec, model)
        ignored: list[Quarantined] = []
    else:
        ignored = [q for q in quarantined if _unrelated(q)]
        quarantined = [q for q in quarantined if not _unrelated(q)]
    if quarantined:
        first = quarantined[0]
        others = len(quarantined) - 1
        more = f" (and {others} more file(s) left out)" if others else ""
        raise UnusableDicom(f"{first.path}: {first.reason}{more}", quarantined)
    if not items:
        other = f" ({len(ignored)} other file(s), e.g. {ignored[0].path})" if ignored else ""
        raise NoDicomFound(f"{path}: no DICOM image found{other}")
    for item in items:
        _check_fits(item, spec, model)
    return items


def _check_single_file(
    path: Path, quarantined: list[Quarantined], spec: ImagingSpec, model: str
) -> None:
    """A lone non-DICOM file with another suffix (a CSV, a PNG) is the wrong kind of input."""
    if quarantined and quarantined[0].kind == "not DICOM":
        suffix = path.suffix.lower()
        if suffix not in DICOM_SUFFIXES:
            raise ModelInputMismatch(
                f"{path}: a {suffix} file, not DICOM; the {spec.task} model ({model}) "
                "takes a DICOM file or a folder of DICOM files"
            )


def _unrelated(q: Quarantined) -> bool:
    """A folder's file that is plainly not an image for the model: skipped, not an error."""
    name = Path(q.path).name
    if name.startswith("."):
        return True
    if name.upper() == "DICOMDIR" and q.kind == "missing pixel data":
        return True
    return q.kind == "not DICOM" and Path(name).suffix.lower() not in DICOM_SUFFIXES


def _check_fits(item: ImageItem, spec: ImagingSpec, model: str) -> None:
    """Raise ModelInputMismatch unless ``item`` is the kind of image the model takes."""
    where = _files_text(item)
    modality = item.modality or "no Modality"
    accepted = ", ".join(TASK_MODALITIES[spec.task])
    if spec.is_volume and not item.is_volume:
        raise ModelInputMismatch(
            f"{where}: a single 2D {modality} image where the {spec.task} model ({model}) "
            f"takes a volume ({accepted}): a series folder or a multi-frame file"
        )
    if not spec.is_volume and item.is_volume:
        kind = f"a series of {len(item.files)} files" if len(item.files) > 1 else "multi-frame"
        raise ModelInputMismatch(
            f"{where}: a {modality} volume ({kind}) where the {spec.task} model ({model}) "
            f"takes 2D images ({accepted}), one per file"
        )
    if item.modality not in TASK_MODALITIES[spec.task]:
        raise ModelInputMismatch(
            f"{where}: modality {modality}; the {spec.task} model ({model}) takes {accepted}"
        )


def _files_text(item: ImageItem) -> str:
    more = len(item.files) - 1
    return item.files[0] + (f" (and {more} more file(s) of its series)" if more else "")


def _source(input_path: Path, item: ImageItem) -> str:
    """The file given, else the image's file or the folder holding the series."""
    if input_path.is_file() or len(item.files) == 1:
        return str(input_path) if input_path.is_file() else item.files[0]
    return os.path.commonpath(item.files)


# -- saliency -----------------------------------------------------------------------------
def _write_saliency(
    model: Any, item: ImageItem, probability: float, folder: Path, names: set[str]
) -> str:
    """Grad-CAM of one item drawn to a PNG in ``folder``; the PNG's path.

    The PNG's title says the method, and why when it is gradient saliency.
    """
    from medfed.inference.gradcam import explain
    from medfed.inference.saliency_png import write_saliency_png

    saliency = explain(model, item.array)
    path = folder / png_name(item, names)
    try:
        write_saliency_png(path, item.array, saliency, probability)
    except OSError as exc:
        raise PredictError(f"{path}: cannot write the saliency map ({exc})") from None
    return str(path)


def png_name(item: ImageItem, taken: set[str]) -> str:
    """``saliency-<UID>.png`` from the series (volume) or SOP instance UID, never from the
    patient's name or ID; a hash of the files when the UID is missing; made unique."""
    uid = item.series_uid if item.is_volume else (item.instance_uid or item.series_uid)
    stem = re.sub(r"[^0-9A-Za-z.-]", "_", uid)[:96].strip("._")
    if not stem:
        stem = hashlib.sha256("\0".join(item.files).encode()).hexdigest()[:16]
    name, n = f"saliency-{stem}.png", 1
    while name in taken:
        n += 1
        name = f"saliency-{stem}-{n}.png"
    taken.add(name)
    return name
