"""A site's imaging dataset: DICOM images joined to ``labels.csv``, one sample per patient.

The unit of privacy is the patient, so the dataset yields at most ``k`` samples per
patient (``k = 1`` by default). Which samples are used is deterministic and depends only
on the headers: a patient's candidate images (or volumes) are ordered by

1. StudyDate, earliest first (a study without a date sorts last),
2. StudyInstanceUID, then SeriesNumber, SeriesInstanceUID and SOPInstanceUID,

and the first ``k`` are used. With ``k = 1`` that is the first image of the patient's
earliest study. Images without a label are quarantined with the reason "no label";
images beyond the cap are counted as not used.

``labels.csv`` has a ``label`` column (0 or 1) and a ``StudyInstanceUID`` and/or
``PatientID`` column; a row keyed by StudyInstanceUID labels that study, a row with only
a PatientID labels every study of the patient. Rows that cannot be used are skipped with
their file line and column, like the clinical CSV.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from medfed.client.consent import ConsentCount, ConsentRules, consent_of
from medfed.client.data import DataError, SkippedRow
from medfed.client.dicom_data import ImageItem, Preprocess, Quarantined, Window, load_images
from medfed.client.image_cache import CACHE_DIR_NAME
from medfed.common.tasks import ImagingSpec

STUDY_KEY, PATIENT_KEY, LABEL_KEY = "StudyInstanceUID", "PatientID", "label"


@dataclass(frozen=True)
class Labels:
    """Labels by study UID and by patient id, and the rows that could not be used."""

    by_study: dict[str, int]
    by_patient: dict[str, int]
    skipped: list[SkippedRow] = field(default_factory=list)
    withdrawn_patients: frozenset[str] = frozenset()
    withdrawn_studies: frozenset[str] = frozenset()

    def withdrew(self, item: ImageItem) -> bool:
        """Whether a labels.csv row says no consent for the item's patient or study."""
        return (
            item.patient_id in self.withdrawn_patients or item.study_uid in self.withdrawn_studies
        )

    def label_of(self, item: ImageItem) -> int | None:
        if item.study_uid in self.by_study:
            return self.by_study[item.study_uid]
        return self.by_patient.get(item.patient_id)


@dataclass
class ImagingData:
    """Training-ready samples of one site and what was left out.

    ``X`` holds images (N, 1, S, S) or volumes (N, 1, D, S, S) in [0, 1], ``y`` the 0/1
    labels, ``ids`` the patient ids (which never leave the site; repeated when a patient
    contributes k > 1 samples), ``files`` each sample's source files. ``sex`` ("F", "M"
    or "" for unknown) and ``age_years`` (None for unknown) are each sample's patient
    attributes from the DICOM header, used only for per-subgroup aggregates; when not
    given they are unknown for every sample.
    """

    spec: ImagingSpec
    path: Path
    ids: list[str]
    X: np.ndarray
    y: np.ndarray
    files: list[tuple[str, ...]]
    identity_removed: list[bool]
    total_rows: int
    samples_per_patient: int = 1
    quarantined: list[Quarantined] = field(default_factory=list)
    label_rows_skipped: list[SkippedRow] = field(default_factory=list)
    beyond_cap: list[tuple[str, ...]] = field(default_factory=list)
    consent: ConsentCount = field(default_factory=ConsentCount)
    sex: list[str] = field(default_factory=list)
    age_years: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sex and not self.age_years:
            self.sex, self.age_years = [""] * len(self.ids), [None] * len(self.ids)
        if not len(self.sex) == len(self.age_years) == len(self.ids):
            raise ValueError(
                f"ImagingData: sex ({len(self.sex)}) and age_years ({len(self.age_years)}) "
                f"must have one entry per sample ({len(self.ids)})"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def skipped(self) -> list[Quarantined]:
        """Quarantined files: counted as skipped in the run summary."""
        return self.quarantined

    @property
    def patients(self) -> int:
        return len(set(self.ids))

    def subset(self, index: np.ndarray) -> ImagingData:
        return ImagingData(
            spec=self.spec,
            path=self.path,
            ids=[self.ids[i] for i in index],
            X=self.X[index],
            y=self.y[index],
            files=[self.files[i] for i in index],
            identity_removed=[self.identity_removed[i] for i in index],
            total_rows=len(index),
            samples_per_patient=self.samples_per_patient,
            sex=[self.sex[i] for i in index],
            age_years=[self.age_years[i] for i in index],
        )


def preprocess_for(spec: ImagingSpec) -> Preprocess:
    """The preprocessing a task's model expects (public, configured constants)."""
    window = Window(center=spec.window_center, width=spec.window_width)
    return Preprocess(size=spec.size, depth=max(spec.depth, 1), window=window)


def read_labels(path: Path, consent_column: str = "consent") -> Labels:
    """Read ``labels.csv``; raise DataError if the file or its columns are unusable.

    A row whose ``consent_column`` says no withdraws its patient (its study when the row
    names only a study) and gives no label; an unclear consent cell skips the row.
    """
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if LABEL_KEY not in frame.columns or not {STUDY_KEY, PATIENT_KEY} & set(frame.columns):
        raise DataError(
            f"{path}: expected a '{LABEL_KEY}' column and a '{STUDY_KEY}' or '{PATIENT_KEY}' "
            f"column (found: {', '.join(frame.columns) or 'none'})"
        )
    by_study: dict[str, int] = {}
    by_patient: dict[str, int] = {}
    skipped: list[SkippedRow] = []
    patients: set[str] = set()
    studies: set[str] = set()
    for i, row in enumerate(frame.to_dict("records")):
        line = i + 2
        consent = consent_of(row[consent_column]) if consent_column in row else True
        if consent is None and any(str(v).strip() for v in row.values()):
            problem = "expected a consent of yes or no; row not used"
            skipped.append(SkippedRow(line, consent_column, problem, problem))
            continue
        if consent is False:
            patient = str(row.get(PATIENT_KEY, "")).strip()
            study = str(row.get(STUDY_KEY, "")).strip()
            if patient:
                patients.add(patient)
            elif study:
                studies.add(study)
            else:
                problem = f"consent withdrawn but no {STUDY_KEY} or {PATIENT_KEY} to match"
                skipped.append(SkippedRow(line, STUDY_KEY, problem, problem))
            continue
        problem = _add_label(row, by_study, by_patient)
        if problem:
            skipped.append(SkippedRow(line, problem[0], problem[1], problem[1]))
    return Labels(by_study, by_patient, skipped, frozenset(patients), frozenset(studies))


def _add_label(
    row: dict[str, str], by_study: dict[str, int], by_patient: dict[str, int]
) -> tuple[str, str] | None:
    if all(str(v).strip() == "" for v in row.values()):
        return None
    raw = str(row[LABEL_KEY]).strip()
    if raw not in ("0", "1", "0.0", "1.0"):
        return LABEL_KEY, "expected 0 or 1"
    label = int(float(raw))
    study = str(row.get(STUDY_KEY, "")).strip()
    patient = str(row.get(PATIENT_KEY, "")).strip()
    key, table = (STUDY_KEY, by_study) if study else (PATIENT_KEY, by_patient)
    value = study or patient
    if not value:
        return STUDY_KEY, f"empty {STUDY_KEY} and {PATIENT_KEY}"
    if table.get(value, label) != label:
        return key, "conflicting labels for the same key"
    table[value] = label
    return None


def candidate_order(item: ImageItem) -> tuple:
    """The documented, deterministic order in which a patient's samples are chosen."""
    return (
        item.study_date or "99999999",
        item.study_uid,
        item.series_number,
        item.series_uid,
        item.instance_uid,
    )


def select_per_patient(
    items: list[ImageItem], labels: Labels, cap: int
) -> tuple[list[tuple[ImageItem, int]], list[Quarantined], list[ImageItem]]:
    """Chosen (item, label) pairs, items quarantined for no label, items beyond the cap."""
    by_patient: dict[str, list[tuple[ImageItem, int]]] = defaultdict(list)
    no_label: list[Quarantined] = []
    for item in items:
        label = labels.label_of(item)
        if label is None:
            no_label += [
                Quarantined(f, "no label", f"study not in {LABEL_KEY}s") for f in item.files
            ]
        else:
            by_patient[item.patient_id].append((item, label))
    chosen, beyond = [], []
    for patient in sorted(by_patient):
        ordered = sorted(by_patient[patient], key=lambda pair: candidate_order(pair[0]))
        chosen += ordered[:cap]
        beyond += [item for item, _ in ordered[cap:]]
    return chosen, no_label, beyond


def load_imaging_data(
    site_dir: Path,
    spec: ImagingSpec,
    samples_per_patient: int = 1,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
    consent: ConsentRules | None = None,
) -> ImagingData:
    """Read a site's DICOM tree and labels into training-ready samples.

    Images of patients who withdrew (``consent``'s list, or a labels.csv row saying no)
    are dropped right after the headers are read (their pixels are decoded into the
    local image cache like any image's, and then not used), before selection, the split or any
    use of their pixels, and counted per patient. Raises DataError when the site has no
    DICOM folder, no usable labels or no sample.
    """
    site_dir = Path(site_dir)
    dicom_root = site_dir / spec.dicom_dir
    if not dicom_root.is_dir():
        raise DataError(f"{dicom_root}: DICOM folder not found")
    rules = consent or ConsentRules()
    labels = read_labels(site_dir / spec.labels_name, rules.column)
    cache = site_dir / CACHE_DIR_NAME if use_cache else None
    items, quarantined = load_images(dicom_root, preprocess_for(spec), cache, progress)
    items, count = _drop_withdrawn(items, labels, rules)
    fitting = [i for i in items if i.is_volume == spec.is_volume]
    wrong_kind = (
        "a 2D image where the task expects volumes"
        if spec.is_volume
        else ("a volume where the task expects 2D images")
    )
    misfits = [
        Quarantined(f, "inconsistent series", wrong_kind)
        for i in items
        if i.is_volume != spec.is_volume
        for f in i.files
    ]
    chosen, no_label, beyond = select_per_patient(fitting, labels, samples_per_patient)
    quarantined = quarantined + misfits + no_label
    if not chosen:
        # Kinds and counts only: details can name patient folders, and a decline reason
        # reaches the coordinator.
        kinds = Counter(q.kind for q in quarantined)
        raise DataError(
            f"{dicom_root}: no usable labelled image ({len(items)} image(s) read; "
            f"quarantined: {', '.join(f'{k} {n}' for k, n in sorted(kinds.items())) or 'none'})"
        )
    X = np.stack([item.array for item, _ in chosen])[:, None].astype(np.float32)
    return ImagingData(
        spec=spec,
        path=dicom_root,
        ids=[item.patient_id for item, _ in chosen],
        X=X,
        y=np.asarray([label for _, label in chosen], dtype=np.float32),
        files=[item.files for item, _ in chosen],
        identity_removed=[item.identity_removed for item, _ in chosen],
        total_rows=len(chosen) + len(quarantined),
        samples_per_patient=samples_per_patient,
        quarantined=quarantined,
        label_rows_skipped=labels.skipped,
        beyond_cap=[item.files for item in beyond],
        consent=count,
        sex=[item.sex for item, _ in chosen],
        age_years=[item.age_years for item, _ in chosen],
    )


def _drop_withdrawn(
    items: list[ImageItem], labels: Labels, rules: ConsentRules
) -> tuple[list[ImageItem], ConsentCount]:
    """The items of patients who did not withdraw, and the withdrawn patients counted."""
    by_list = {i.patient_id for i in items if i.patient_id in rules.withdrawn}
    by_column = {i.patient_id for i in items if labels.withdrew(i)} - by_list
    count = ConsentCount(by_column=len(by_column), by_list=len(by_list))
    if rules.withdrawn_source is not None:
        count.sources["withdrawn_list"] = str(rules.withdrawn_source)
        count.listed_not_found = len(rules.withdrawn - {i.patient_id for i in items})
    if labels.withdrawn_patients or labels.withdrawn_studies:
        count.sources["consent_column"] = f"labels.csv:{rules.column}"
    gone = by_list | by_column
    return [i for i in items if i.patient_id not in gone], count


def split_by_patient(
    data: ImagingData, test_fraction: float, seed: int
) -> tuple[ImagingData, ImagingData]:
    """Deterministic patient-level split: all of a patient's samples fall on one side.

    Stratified by each patient's first label where both classes have at least 3
    patients, so that small sites still get positives in their test split.
    """
    patients = sorted(set(data.ids))
    first_label = {}
    for pid, label in zip(data.ids, data.y, strict=True):
        first_label.setdefault(pid, label)
    strata = np.asarray([first_label[p] for p in patients])
    _, counts = np.unique(strata, return_counts=True)
    stratify = strata if len(counts) == 2 and counts.min() >= 3 else None
    train_p, _ = train_test_split(
        patients, test_size=test_fraction, random_state=seed, shuffle=True, stratify=stratify
    )
    train_set = set(train_p)
    ids = np.asarray(data.ids, dtype=object)
    in_train = np.asarray([pid in train_set for pid in ids])
    return data.subset(np.flatnonzero(in_train)), data.subset(np.flatnonzero(~in_train))


def imaging_fingerprint(data: ImagingData) -> str:
    """SHA-256 over the task, the patients, their source files and labels.

    It names the dataset by *which patients and files* are used, not by their
    preprocessed pixels, so that changing the preprocessing does not give the same
    patients a fresh privacy budget.
    """
    h = hashlib.sha256(f"imaging/{data.spec.task}/{data.spec.dataset}".encode())
    for pid, files, label in sorted(zip(data.ids, data.files, data.y.tolist(), strict=True)):
        rel = [os.path.relpath(f, data.path) for f in files]
        h.update(json.dumps([pid, rel, label]).encode())
    return h.hexdigest()


def imaging_report(data: ImagingData, site_dir: Path) -> dict:
    """Site-local account of what is used and what is quarantined, with reasons.

    It holds file paths, so it stays at the site (data_report.json, `medfed data check`).
    """
    site_dir = Path(site_dir)

    def rel(path: str) -> str:
        try:
            return str(Path(path).relative_to(site_dir))
        except ValueError:
            return path

    kinds: dict[str, int] = defaultdict(int)
    for q in data.quarantined:
        kinds[q.kind] += 1
    return {
        "site_dir": str(site_dir),
        "task": data.spec.task,
        "samples_used": len(data),
        "patients": data.patients,
        "samples_per_patient": data.samples_per_patient,
        "files_used": sum(len(f) for f in data.files),
        "files_quarantined": len(data.quarantined),
        "quarantined_by_reason": dict(sorted(kinds.items())),
        "not_used_beyond_cap": len(data.beyond_cap),
        "label_rows_skipped": [
            {"line": s.line, "column": s.column, "reason": s.reason}
            for s in data.label_rows_skipped
        ],
        "identity_removed": all(data.identity_removed),
        "consent": data.consent.to_report(),
        "used": [{"sample": i, "files": [rel(f) for f in fs]} for i, fs in enumerate(data.files)],
        "quarantined": [
            {"file": rel(q.path), "kind": q.kind, "detail": q.detail} for q in data.quarantined
        ],
    }
