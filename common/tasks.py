"""Task schemas: which columns a site's clinical.csv holds and how they become features.

Both sides must agree on the feature layout (it fixes the model's input size), so it
lives here. Scaling uses *public* clinical ranges written in this file, never statistics
fitted on a site's private data: a fitted mean or median would itself be a release of
private information outside the DP mechanism. Missing values, where a schema allows
them, are filled with a public default and flagged with an indicator feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TASKS = ("risk", "rehab", "xray", "ct")
DATASETS = ("synthetic", "heart-disease")
# The models :mod:`medfed.common.models` builds. Named here, where nothing needs torch, so
# that the site policy (read for every Flower message) can list them.
TABULAR_MODELS = ("logreg", "mlp")
IMAGING_MODELS = ("cnn2d", "cnn3d")
MODELS = TABULAR_MODELS + IMAGING_MODELS


@dataclass(frozen=True)
class Column:
    """One input column of a site's CSV.

    Parameters
    ----------
    name : str
        Column header in the CSV.
    low, high : float
        Public, clinically plausible range; values outside it are rejected. Numeric
        columns are scaled to [-1, 1] over this range.
    kind : {"numeric", "binary", "categorical"}
        Numeric columns are scaled, binary columns pass as 0/1, categorical columns are
        one-hot encoded over ``categories``.
    categories : tuple of int
        Allowed codes of a categorical column.
    nullable : bool
        Whether an empty cell is allowed; it is then filled with ``fill`` and flagged
        by an extra ``<name>_missing`` indicator feature.
    fill : float
        Public default used for a missing value (a typical healthy value).
    zero_is_missing : bool
        Treat 0 as "not measured" (serum cholesterol in two UCI files).
    """

    name: str
    low: float
    high: float
    kind: Literal["numeric", "binary", "categorical"] = "numeric"
    categories: tuple[int, ...] = ()
    nullable: bool = False
    fill: float = 0.0
    zero_is_missing: bool = False

    def feature_names(self) -> list[str]:
        """Names of the model inputs this column expands into."""
        if self.kind == "categorical":
            names = [f"{self.name}={c}" for c in self.categories]
        else:
            names = [self.name]
        if self.nullable:
            names.append(f"{self.name}_missing")
        return names


@dataclass(frozen=True)
class TaskSpec:
    """What a site trains on for one (task, dataset) pair.

    Parameters
    ----------
    task : str
        ``risk`` (binary outcome) or ``rehab`` (continuous progress score).
    dataset : str
        ``synthetic`` or ``heart-disease``.
    columns : tuple of Column
        Input columns, in model order.
    target : Column
        Target column; for binary tasks ``positive_above`` turns it into 0/1.
    id_column : str or None
        Patient identifier column; ``None`` means one row is one patient (UCI files).
    positive_above : float or None
        For a binary task whose target is graded (UCI ``num`` 0-4): label = value > this.
    """

    task: str
    dataset: str
    columns: tuple[Column, ...]
    target: Column
    id_column: str | None = "patient_id"
    positive_above: float | None = None
    csv_name: str = "clinical.csv"
    extra_columns: tuple[str, ...] = field(default=())

    @property
    def is_binary(self) -> bool:
        return self.task == "risk"

    @property
    def target_span(self) -> float:
        """Scaled target to clinical units: 1 for a binary task, the target's range else."""
        return 1.0 if self.is_binary else float(self.target.high - self.target.low)

    def feature_names(self) -> list[str]:
        return [n for c in self.columns for n in c.feature_names()]

    @property
    def num_features(self) -> int:
        return len(self.feature_names())

    @property
    def model_input(self) -> int:
        """What fixes the model's input layer: the number of features."""
        return self.num_features

    @property
    def models(self) -> tuple[str, ...]:
        return TABULAR_MODELS

    def required_columns(self) -> list[str]:
        cols = [c.name for c in self.columns] + [self.target.name]
        return ([self.id_column] if self.id_column else []) + cols


@dataclass(frozen=True)
class ImagingSpec:
    """What a site trains on for an imaging task: its DICOM tree and a labels file.

    Parameters
    ----------
    task : {"xray", "ct"}
        Radiographs (one 2D image per sample) or CT volumes (one series per sample).
    dataset : str
        ``synthetic`` (the generated hospitals) or a site's own DICOM in the same layout.
    size : int
        In-plane size the images are resampled to (size x size).
    depth : int
        Volumes only: slices the volume is resampled to; 0 for 2D tasks.
    window_center, window_width : float or None
        VOI window in modality units (HU for CT): a public, configured constant; None
        uses each image's own header window.
    dicom_dir, labels_name : str
        The site's DICOM folder and label file, relative to the site directory.
    """

    task: str
    dataset: str
    size: int
    depth: int = 0
    window_center: float | None = None
    window_width: float | None = None
    dicom_dir: str = "dicom"
    labels_name: str = "labels.csv"

    @property
    def is_binary(self) -> bool:
        return True

    @property
    def target_span(self) -> float:
        return 1.0

    @property
    def is_volume(self) -> bool:
        return self.depth > 0

    @property
    def model_input(self) -> tuple[int, ...]:
        """Input shape of one sample (channels first), without the batch."""
        plane = (self.size, self.size)
        return (1, self.depth, *plane) if self.is_volume else (1, *plane)

    @property
    def models(self) -> tuple[str, ...]:
        return ("cnn3d",) if self.is_volume else ("cnn2d",)


SYNTHETIC_XRAY = ImagingSpec(task="xray", dataset="synthetic", size=64)
# Lung window (centre -600 HU, width 1500 HU): a public radiological convention.
SYNTHETIC_CT = ImagingSpec(
    task="ct", dataset="synthetic", size=64, depth=16, window_center=-600, window_width=1500
)

_AGE = Column("age", 18, 100)
_SEX = Column("sex", 0, 1, kind="binary")

SYNTHETIC_RISK = TaskSpec(
    task="risk",
    dataset="synthetic",
    columns=(
        _AGE,
        _SEX,
        Column("bmi", 12, 70),
        Column("family_history", 0, 1, kind="binary"),
        Column("smoking", 0, 1, kind="binary"),
        Column("systolic_bp", 70, 250),
    ),
    target=Column("outcome", 0, 1, kind="binary"),
)

SYNTHETIC_REHAB = TaskSpec(
    task="rehab",
    dataset="synthetic",
    columns=(
        _AGE,
        _SEX,
        Column("treatment_time", 0, 52),
        Column("severity", 1, 10),
    ),
    target=Column("progress", 0, 100),
)

HEART_DISEASE_RISK = TaskSpec(
    task="risk",
    dataset="heart-disease",
    columns=(
        Column("age", 18, 100),
        _SEX,
        Column("cp", 1, 4, kind="categorical", categories=(1, 2, 3, 4)),
        Column("trestbps", 60, 240, nullable=True, fill=130, zero_is_missing=True),
        Column("chol", 80, 700, nullable=True, fill=220, zero_is_missing=True),
        Column("fbs", 0, 1, kind="binary", nullable=True, fill=0),
        Column("restecg", 0, 2, kind="categorical", categories=(0, 1, 2), nullable=True),
        Column("thalach", 50, 230, nullable=True, fill=140),
        Column("exang", 0, 1, kind="binary", nullable=True, fill=0),
        Column("oldpeak", -3, 7, nullable=True, fill=0),
        Column("slope", 1, 3, kind="categorical", categories=(1, 2, 3), nullable=True),
        Column("ca", 0, 3, nullable=True, fill=0),
        Column("thal", 3, 7, kind="categorical", categories=(3, 6, 7), nullable=True),
    ),
    target=Column("num", 0, 4),
    id_column=None,
    positive_above=0,
)

_SPECS = {
    ("risk", "synthetic"): SYNTHETIC_RISK,
    ("rehab", "synthetic"): SYNTHETIC_REHAB,
    ("risk", "heart-disease"): HEART_DISEASE_RISK,
    ("xray", "synthetic"): SYNTHETIC_XRAY,
    ("ct", "synthetic"): SYNTHETIC_CT,
}


def get_task_spec(task: str, dataset: str) -> TaskSpec | ImagingSpec:
    """Return the schema for ``task`` on ``dataset``; raise ValueError naming both."""
    try:
        return _SPECS[(task, dataset)]
    except KeyError:
        known = ", ".join(f"{t} on {d}" for t, d in _SPECS)
        raise ValueError(
            f"unknown task/dataset combination: task={task!r}, dataset={dataset!r} (known: {known})"
        ) from None
