"""Synthetic imaging hospitals: valid DICOM Part 10, non-IID scanners, fake identities."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from medfed.simulations.synthetic_imaging import (
    SITE_SYNTAXES,
    generate_imaging_sites,
    scanner_profiles,
)

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
    return generate_imaging_sites("xray", 4, out, seed=3, patients_per_site=12, image_size=48)


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
    assert len({h.Manufacturer for h in headers}) == 4
    assert len({int(h.BitsStored) for h in headers}) > 1
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}


def test_each_site_writes_its_own_lossless_syntax(xray_sites):
    expected = [ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless]
    assert list(SITE_SYNTAXES) == expected
    for site, syntax in zip(xray_sites, expected, strict=True):
        found = {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in _files(site)}
        assert found == {syntax}


@pytest.mark.parametrize("syntax", SITE_SYNTAXES[1:], ids=lambda s: s.name)
@pytest.mark.parametrize("modality", ["xray", "ct"])
def test_compressed_sites_hold_the_same_pixels_and_headers(tmp_path, syntax, modality):
    kwargs = dict(seed=4, patients_per_site=2, image_size=32, slices=4)
    (plain,) = generate_imaging_sites(modality, 1, tmp_path / "a", **kwargs)
    (packed,) = generate_imaging_sites(
        modality, 1, tmp_path / "b", transfer_syntax=syntax, **kwargs
    )
    assert (plain / "labels.csv").read_text() == (packed / "labels.csv").read_text()
    for a, b in zip(_files(plain), _files(packed), strict=True):
        ds_a, ds_b = pydicom.dcmread(a), pydicom.dcmread(b)
        assert ds_b.file_meta.TransferSyntaxUID == syntax
        assert ds_a.PatientName == ds_b.PatientName and ds_a.SOPInstanceUID == ds_b.SOPInstanceUID
        np.testing.assert_array_equal(ds_a.pixel_array, ds_b.pixel_array)


def test_headers_carry_fake_identifying_data(xray_sites):
    ds = pydicom.dcmread(_files(xray_sites[1])[0])
    for keyword in IDENTIFYING:
        assert str(getattr(ds, keyword)).strip(), keyword


def test_same_seed_gives_identical_files(tmp_path):
    a = generate_imaging_sites("xray", 4, tmp_path / "a", seed=9, patients_per_site=3)
    b = generate_imaging_sites("xray", 4, tmp_path / "b", seed=9, patients_per_site=3)
    c = generate_imaging_sites("xray", 4, tmp_path / "c", seed=10, patients_per_site=3)
    read = lambda d: [p.read_bytes() for p in _files(d)]  # noqa: E731
    for site_a, site_b, site_c in zip(a, b, c, strict=True):  # every syntax is deterministic
        assert read(site_a) == read(site_b)
        assert read(site_a) != read(site_c)


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
    with pytest.raises(ValueError, match="transfer_syntax"):
        generate_imaging_sites("xray", 1, tmp_path / "y", transfer_syntax="1.2.840.10008.1.2.4.50")
    with pytest.raises(ValueError, match="JPEG 2000"):
        generate_imaging_sites("xray", 4, tmp_path / "z", image_size=16)
