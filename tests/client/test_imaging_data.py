"""A site's imaging dataset: labels, one sample per patient, quarantine, patient splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfed.client.data import DataError
from medfed.client.dicom_data import ImageItem
from medfed.client.imaging_data import (
    CACHE_DIR_NAME,
    Labels,
    imaging_fingerprint,
    imaging_report,
    load_imaging_data,
    read_labels,
    select_per_patient,
    split_by_patient,
)
from medfed.common.tasks import SYNTHETIC_CT, SYNTHETIC_XRAY
from medfed.simulations.synthetic_imaging import generate_imaging_sites


def _item(patient: str, study: str, date: str = "", series: int = 1, inst: str = "1") -> ImageItem:
    return ImageItem(
        patient_id=patient,
        study_uid=study,
        study_date=date,
        series_uid=f"{study}.{series}",
        series_number=series,
        instance_uid=inst,
        modality="DX",
        files=(f"/{patient}/{study}/{series}/{inst}.dcm",),
        identity_removed=False,
        array=np.zeros((4, 4), np.float32),
    )


def test_earliest_study_is_the_one_sample_per_patient():
    items = [
        _item("p1", "1.3", "20240105"),
        _item("p1", "1.2", "20230101"),
        _item("p1", "1.1", ""),  # no date: sorts last
        _item("p2", "2.1", "20240101"),
    ]
    labels = Labels(by_study={"1.1": 1, "1.2": 0, "1.3": 1}, by_patient={"p2": 1})
    chosen, no_label, beyond = select_per_patient(items, labels, cap=1)
    assert [(i.study_uid, y) for i, y in chosen] == [("1.2", 0), ("2.1", 1)]
    assert not no_label
    assert sorted(i.study_uid for i in beyond) == ["1.1", "1.3"]
    # the order does not depend on the order the files were found in
    again, _, _ = select_per_patient(list(reversed(items)), labels, cap=1)
    assert [i.study_uid for i, _ in again] == ["1.2", "2.1"]


def test_cap_k_and_no_label():
    items = [_item("p1", "1.1", "20200101"), _item("p1", "1.2", "20210101"), _item("p9", "9.1")]
    labels = Labels(by_study={"1.1": 1, "1.2": 1}, by_patient={})
    chosen, no_label, beyond = select_per_patient(items, labels, cap=2)
    assert [i.study_uid for i, _ in chosen] == ["1.1", "1.2"] and not beyond
    assert [q.kind for q in no_label] == ["no label"]
    assert no_label[0].path.endswith("9.1/1/1.dcm")


def test_labels_rows_with_problems_are_skipped_with_line_and_column(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(
        "StudyInstanceUID,PatientID,label\n1.1,p1,1\n1.2,p2,maybe\n,,1\n1.1,p1,0\n,p3,0\n"
    )
    labels = read_labels(path)
    assert labels.by_study == {"1.1": 1} and labels.by_patient == {"p3": 0}
    assert [(s.line, s.column) for s in labels.skipped] == [
        (3, "label"),
        (4, "StudyInstanceUID"),
        (5, "StudyInstanceUID"),
    ]


def test_labels_file_without_key_columns_is_an_error(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("id,label\n1,0\n")
    with pytest.raises(DataError, match=r"labels\.csv: expected a 'label' column"):
        read_labels(path)
    with pytest.raises(DataError, match="not found"):
        read_labels(tmp_path / "missing.csv")


@pytest.fixture(scope="module")
def xray_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("xray")
    (site,) = generate_imaging_sites("xray", 1, root, seed=3, patients_per_site=16, image_size=32)
    return site


def _copy(site: Path, tmp_path: Path) -> Path:
    target = tmp_path / "site"
    shutil.copytree(site, target)
    return target


def test_site_loads_one_sample_per_patient_and_quarantines_with_reasons(xray_site, tmp_path):
    site = _copy(xray_site, tmp_path)
    files = sorted((site / "dicom").rglob("*.dcm"))
    (site / "dicom" / "readme.txt").write_text("not an image")
    files[0].write_bytes(files[0].read_bytes()[:-300])  # pixel data cut short
    lines = (site / "labels.csv").read_text().splitlines()
    (site / "labels.csv").write_text("\n".join(lines[:-1]) + "\n")  # last patient unlabelled
    data = load_imaging_data(site, SYNTHETIC_XRAY)
    kinds = sorted(q.kind for q in data.quarantined)
    assert kinds == ["no label", "not DICOM", "truncated"]
    assert len(data) == 14 and data.patients == 14
    assert data.X.shape == (14, 1, SYNTHETIC_XRAY.size, SYNTHETIC_XRAY.size)
    assert data.X.dtype == np.float32 and data.X.min() >= 0 and data.X.max() <= 1
    assert set(np.unique(data.y)) <= {0.0, 1.0}
    report = imaging_report(data, site)
    assert report["samples_used"] == 14 and report["files_quarantined"] == 3
    assert report["quarantined_by_reason"] == {"no label": 1, "not DICOM": 1, "truncated": 1}
    assert all(not q["file"].startswith("/") for q in report["quarantined"])
    assert (site / CACHE_DIR_NAME).is_dir()


def test_second_load_uses_the_cache_and_gives_the_same_samples(xray_site, tmp_path, monkeypatch):
    site = _copy(xray_site, tmp_path)
    first = load_imaging_data(site, SYNTHETIC_XRAY)

    def no_read(*args, **kwargs):
        raise AssertionError("DICOM decoded again despite the cache")

    monkeypatch.setattr(pydicom, "dcmread", no_read)
    second = load_imaging_data(site, SYNTHETIC_XRAY)
    np.testing.assert_array_equal(first.X, second.X)
    assert imaging_fingerprint(first) == imaging_fingerprint(second)


def test_ct_site_yields_volumes(tmp_path):
    (site,) = generate_imaging_sites(
        "ct", 1, tmp_path, seed=4, patients_per_site=3, image_size=32, slices=6
    )
    data = load_imaging_data(site, SYNTHETIC_CT, use_cache=False)
    assert data.X.shape == (3, 1, SYNTHETIC_CT.depth, SYNTHETIC_CT.size, SYNTHETIC_CT.size)
    # An x-ray task on a CT site has nothing it can use: the volumes are quarantined.
    with pytest.raises(DataError, match="no usable labelled image"):
        load_imaging_data(site, SYNTHETIC_XRAY, use_cache=False)


def test_patient_split_keeps_a_patients_samples_together(xray_site, tmp_path):
    site = _copy(xray_site, tmp_path)
    data = load_imaging_data(site, SYNTHETIC_XRAY)
    doubled = data.subset(np.concatenate([np.arange(len(data)), np.arange(len(data))]))
    train, test = split_by_patient(doubled, 0.25, seed=1)
    assert not set(train.ids) & set(test.ids)
    assert len(train) + len(test) == len(doubled)
    again, _ = split_by_patient(doubled, 0.25, seed=1)
    assert again.ids == train.ids
    assert imaging_fingerprint(train) != imaging_fingerprint(test)


def test_missing_dicom_folder_is_an_error(tmp_path):
    (tmp_path / "labels.csv").write_text("PatientID,label\np,1\n")
    with pytest.raises(DataError, match="DICOM folder not found"):
        load_imaging_data(tmp_path, SYNTHETIC_XRAY)
