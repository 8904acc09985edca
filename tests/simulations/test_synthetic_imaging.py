"""Synthetic imaging hospitals: valid DICOM Part 10, non-IID scanners, fake identities."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from medfed.simulations.synthetic_imaging import generate_imaging_sites, scanner_profiles

IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientAddress",
    "OtherPatientIDs",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
    "OperatorsName",
)


@pytest.fixture(scope="module")
def ct_sites(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("ct")
    return generate_imaging_sites(
        "ct", 3, out, seed=3, patients_per_site=4, slices=6, image_size=32
    )


@pytest.fixture(scope="module")
def xray_sites(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("xray")
    return generate_imaging_sites("xray", 3, out, seed=3, patients_per_site=12, image_size=48)


def _files(site: Path) -> list[Path]:
    return sorted((site / "dicom").rglob("*.dcm"))


def test_files_are_dicom_part10_with_hierarchy(xray_sites):
    for site in xray_sites:
        for path in _files(site):
            assert path.read_bytes()[128:132] == b"DICM"
            ds = pydicom.dcmread(path)
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            patient, study, series = path.parts[-4:-1]
            assert patient == ds.PatientID and study.startswith("ST") and series == "SE0001"
            assert ds.pixel_array.shape == (48, 48)


def test_labels_match_the_studies(xray_sites):
    for site in xray_sites:
        rows = list(csv.DictReader((site / "labels.csv").open()))
        studies = {pydicom.dcmread(p).StudyInstanceUID for p in _files(site)}
        assert {r["StudyInstanceUID"] for r in rows} == studies
        assert {r["label"] for r in rows} <= {"0", "1"}


def test_ct_is_in_hounsfield_units_after_rescale(ct_sites):
    files = _files(ct_sites[0])
    assert len(files) == 4 * 6
    ds = pydicom.dcmread(files[0])
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.min() < -900  # air
    assert np.any((hu > 0) & (hu < 100))  # soft tissue
    z = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in files[:6]]
    assert np.allclose(np.diff(z), ds.SpacingBetweenSlices)


def test_sites_have_different_scanners(xray_sites):
    headers = [pydicom.dcmread(_files(s)[0]) for s in xray_sites]
    assert len({h.Manufacturer for h in headers}) == 3
    assert len({int(h.BitsStored) for h in headers}) > 1
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}
    syntaxes = {
        pydicom.dcmread(p).file_meta.TransferSyntaxUID for s in xray_sites for p in _files(s)
    }
    assert RLELossless in syntaxes and len(syntaxes) == 2


def test_headers_carry_fake_identifying_data(xray_sites):
    ds = pydicom.dcmread(_files(xray_sites[1])[0])
    for keyword in IDENTIFYING:
        assert str(getattr(ds, keyword)).strip(), keyword


def test_same_seed_gives_identical_files(tmp_path):
    a = generate_imaging_sites("xray", 1, tmp_path / "a", seed=9, patients_per_site=3)
    b = generate_imaging_sites("xray", 1, tmp_path / "b", seed=9, patients_per_site=3)
    c = generate_imaging_sites("xray", 1, tmp_path / "c", seed=10, patients_per_site=3)
    read = lambda d: [p.read_bytes() for p in _files(d)]  # noqa: E731
    assert read(a[0]) == read(b[0])
    assert read(a[0]) != read(c[0])


def test_nodule_images_are_brighter_in_the_lungs(tmp_path):
    (site,) = generate_imaging_sites("xray", 1, tmp_path, seed=1, patients_per_site=30)
    labels = {r["PatientID"]: int(r["label"]) for r in csv.DictReader((site / "labels.csv").open())}
    peaks: dict[int, list[float]] = {0: [], 1: []}
    for p in _files(site):
        ds = pydicom.dcmread(p)
        size = ds.Rows
        y, x = np.mgrid[0:size, 0:size] / size
        lungs = np.zeros((size, size), bool)
        for cx in (0.3, 0.7):
            lungs |= ((x - cx) / 0.12) ** 2 + ((y - 0.5) / 0.25) ** 2 < 1
        peaks[labels[ds.PatientID]].append(float(ds.pixel_array[lungs].max()))
    assert np.mean(peaks[1]) > np.mean(peaks[0]) + 100


def test_refuses_to_overwrite_and_checks_arguments(tmp_path):
    generate_imaging_sites("xray", 1, tmp_path, patients_per_site=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_imaging_sites("xray", 1, tmp_path, patients_per_site=2)
    with pytest.raises(ValueError, match="modality"):
        generate_imaging_sites("mri", 1, tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_sites"):
        scanner_profiles("ct", 0)
