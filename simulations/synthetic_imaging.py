"""Synthetic imaging hospitals: DICOM Part 10 chest radiographs and CT volumes.

Each site gets its own scanner profile (manufacturer, pixel spacing, bits stored,
rescale slope/intercept, photometric interpretation, transfer syntax), so that sites are
non-IID the way real hospitals are, and realistic *fake* identifying
data in the headers (names, birth dates, addresses, accession numbers), so that
de-identification has something to remove. Every patient is fictional. Patient's Sex
and Patient's Age (whole years at the study date, ``"065Y"``) are set as a modality
would, so that sites can evaluate the model per sex and age band.

Layout of a site::

    site-<i>/dicom/<PatientID>/<study>/<series>/IMG<nnnn>.dcm
    site-<i>/labels.csv          StudyInstanceUID,PatientID,label

Radiographs (``xray``): one CR/DX image per patient; label 1 = a nodule in a lung field.
CT (``ct``): one axial series per patient, values in Hounsfield units after the
Modality LUT; label 1 = a lesion in a lung. Deterministic for a given seed (UIDs are
derived from it, not random).

Transfer syntaxes cycle over the sites (``SITE_SYNTAXES``): site 0 uncompressed, site 1
RLE Lossless, site 2 JPEG-LS Lossless, site 3 JPEG 2000 Lossless, site 4 uncompressed
again, and so on; ``transfer_syntax=`` writes every site in one syntax instead. Only
lossless syntaxes are used, so the pixels (and the labels) are the same whatever the
encoding. Encoding uses pydicom's ``Dataset.compress`` with the encoders of the pixel
data plugins (pylibjpeg-rle, pyjpegls, pylibjpeg-openjpeg).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, timedelta
from io import BytesIO
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from medfed.common.atomic import atomic_write_bytes, atomic_write_text

Modality = Literal["xray", "ct"]
LABELS_NAME = "labels.csv"
UID_ROOT = "1.2.826.0.1.3680043.10.1384."  # private-use style root for synthetic data
MAX_SITES = 26
MIN_J2K_SIZE = 32  # OpenJPEG's lossless encoder uses 6 resolution levels
SITE_SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless)

_FIRST = (
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Eva",
    "Felix",
    "Greta",
    "Hugo",
    "Ida",
    "Jonas",
    "Kira",
    "Lars",
    "Mona",
    "Nils",
    "Olga",
    "Paul",
    "Rosa",
    "Sven",
    "Tara",
    "Ulf",
)
_LAST = (
    "Andersen",
    "Berg",
    "Costa",
    "Dubois",
    "Eklund",
    "Fischer",
    "Garcia",
    "Hansen",
    "Ivanova",
    "Jensen",
    "Keller",
    "Larsen",
    "Moreau",
    "Novak",
    "Olsen",
    "Petrov",
)
_KINDS = ("General", "University", "Regional")
_STREETS = ("Harbour Road", "Mill Lane", "Station Street", "Church Walk", "Park Avenue")
_VENDORS = (
    ("ACME Medical", "Radiant 500"),
    ("Northwind Imaging", "NX-Vision"),
    ("Helix Systems", "HX 64"),
    ("Lumen Diagnostics", "LD Prime"),
)


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner writes its images.

    Parameters
    ----------
    manufacturer, model : str
        Written to Manufacturer and ManufacturerModelName.
    institution : str
        InstitutionName (identifying; removed by de-identification).
    pixel_spacing : float
        In-plane spacing in mm.
    slice_spacing : float
        CT only: distance between slice centres in mm.
    bits_stored : int
        Stored bits per pixel (10, 12 or 14 for radiographs; 12 for CT).
    rescale_slope, rescale_intercept : float
        Modality LUT: value = stored * slope + intercept.
    photometric : {"MONOCHROME1", "MONOCHROME2"}
        MONOCHROME1 displays low values as white (stored values inverted).
    transfer_syntax : str
        Transfer syntax UID of every file of the site (uncompressed or a lossless one).
    patients : int
        Patients at this site.
    prevalence : float
        Share of patients with a nodule or lesion.
    """

    manufacturer: str
    model: str
    institution: str
    pixel_spacing: float
    slice_spacing: float
    bits_stored: int
    rescale_slope: float
    rescale_intercept: float
    photometric: str
    transfer_syntax: str
    patients: int
    prevalence: float


def scanner_profiles(
    modality: Modality, num_sites: int, seed: int = 42, transfer_syntax: str | None = None
) -> list[ScannerProfile]:
    """One scanner profile per site; sites differ in vendor, geometry, encoding and mix.

    ``transfer_syntax`` (a UID from ``SITE_SYNTAXES``) overrides the per-site cycle.
    """
    if not 1 <= num_sites <= MAX_SITES:
        raise ValueError(f"num_sites must be between 1 and {MAX_SITES}, got {num_sites}")
    if transfer_syntax is not None and transfer_syntax not in SITE_SYNTAXES:
        names = ", ".join(UID(s).name for s in SITE_SYNTAXES)
        raise ValueError(f"transfer_syntax must be one of {names}, got {transfer_syntax!r}")
    rng = np.random.default_rng([seed, 7])
    profiles = []
    for i in range(num_sites):
        vendor, model = _VENDORS[i % len(_VENDORS)]
        if modality == "xray":
            bits = (10, 12, 14)[i % 3]
            slope, intercept = (1.0, 0.0) if i % 2 == 0 else (0.5, 0.0)
            photometric = "MONOCHROME1" if i % 3 == 1 else "MONOCHROME2"
            spacing = float(rng.choice([0.139, 0.143, 0.16, 0.175]))
            slice_spacing = 0.0
        else:
            bits, slope, intercept = 12, 1.0, -1024.0
            photometric = "MONOCHROME2"
            spacing = float(rng.choice([0.6, 0.7, 0.8]))
            slice_spacing = float(rng.choice([1.0, 1.25, 2.5]))
        profiles.append(
            ScannerProfile(
                manufacturer=vendor,
                model=model,
                institution=f"{_LAST[i % len(_LAST)]} {_KINDS[i % 3]} Hospital",
                pixel_spacing=spacing,
                slice_spacing=slice_spacing,
                bits_stored=bits,
                rescale_slope=slope,
                rescale_intercept=intercept,
                photometric=photometric,
                transfer_syntax=transfer_syntax or SITE_SYNTAXES[i % len(SITE_SYNTAXES)],
                patients=int(rng.integers(24, 40)),
                prevalence=float(rng.uniform(0.3, 0.5)),
            )
        )
    return profiles


def generate_imaging_sites(
    modality: Modality,
    num_sites: int,
    out_dir: Path,
    seed: int = 42,
    image_size: int = 64,
    slices: int = 12,
    patients_per_site: int | None = None,
    overwrite: bool = False,
    transfer_syntax: str | None = None,
) -> list[Path]:
    """Write ``num_sites`` synthetic imaging hospitals under ``out_dir``; return their dirs.

    ``transfer_syntax`` writes every site in that syntax instead of the per-site cycle.
    """
    if modality not in ("xray", "ct"):
        raise ValueError(f"modality must be 'xray' or 'ct', got {modality!r}")
    if image_size < 16 or slices < 4:
        raise ValueError("image_size must be >= 16 and slices >= 4")
    profiles = scanner_profiles(modality, num_sites, seed, transfer_syntax)
    j2k = [i for i, p in enumerate(profiles) if p.transfer_syntax == JPEG2000Lossless]
    if j2k and image_size < MIN_J2K_SIZE:
        raise ValueError(
            f"image_size must be >= {MIN_J2K_SIZE} for sites written as JPEG 2000 (site "
            f"{', '.join(map(str, j2k))}; the encoder needs 6 resolution levels), got "
            f"{image_size}; use fewer sites or another transfer_syntax"
        )
    site_dirs = [Path(out_dir) / f"site-{i}" for i in range(num_sites)]
    existing = [d / LABELS_NAME for d in site_dirs if (d / LABELS_NAME).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} already exists; pass overwrite=True to replace the sites"
        )
    for i, (site_dir, profile) in enumerate(zip(site_dirs, profiles, strict=True)):
        if patients_per_site is not None:
            profile = _with_patients(profile, patients_per_site)
        _write_site(modality, i, site_dir, profile, seed, image_size, slices)
    return site_dirs


def _with_patients(profile: ScannerProfile, patients: int) -> ScannerProfile:
    if patients < 1:
        raise ValueError(f"patients_per_site must be positive, got {patients}")
    return ScannerProfile(**{**profile.__dict__, "patients": patients})


def _write_site(
    modality: Modality,
    index: int,
    site_dir: Path,
    profile: ScannerProfile,
    seed: int,
    image_size: int,
    slices: int,
) -> None:
    rng = np.random.default_rng([seed, index, 11])
    rows = ["StudyInstanceUID,PatientID,label"]
    for p in range(profile.patients):
        label = int(rng.random() < profile.prevalence)
        patient = _fake_patient(rng, index, p)
        study_uid = _uid(seed, index, p, "study")
        series_uid = _uid(seed, index, p, "series")
        series_dir = site_dir / "dicom" / patient["PatientID"] / f"ST{p:04d}" / "SE0001"
        rng.random()  # was the per-file compression draw; kept so a seed gives the same pixels
        if modality == "xray":
            image = _radiograph(rng, image_size, label)
            ds = _base_dataset(DigitalXRayImageStorageForPresentation, seed, index, p, 1)
            _fill_common(ds, patient, profile, study_uid, series_uid, "DX", 1)
            _fill_pixels(ds, image, profile, instance=1)
            _save(ds, series_dir / "IMG0001.dcm", profile.transfer_syntax)
        else:
            volume = _ct_volume(rng, image_size, slices, label)
            for k in range(slices):
                ds = _base_dataset(CTImageStorage, seed, index, p, k + 1)
                _fill_common(ds, patient, profile, study_uid, series_uid, "CT", k + 1)
                _fill_ct_geometry(ds, profile, k, image_size)
                _fill_pixels(ds, volume[k], profile, instance=k + 1)
                _save(ds, series_dir / f"IMG{k + 1:04d}.dcm", profile.transfer_syntax)
        rows.append(f"{study_uid},{patient['PatientID']},{label}")
    atomic_write_text(site_dir / LABELS_NAME, "\n".join(rows) + "\n")


def _uid(seed: int, site: int, patient: int, kind: str, instance: int = 0) -> str:
    digest = hashlib.sha256(f"{seed}/{site}/{patient}/{kind}/{instance}".encode()).digest()
    return UID_ROOT + str(int.from_bytes(digest[:12], "big"))[:30]


def _fake_patient(rng: np.random.Generator, site: int, p: int) -> dict[str, str]:
    born = date(1935, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 65)))
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    patient = {
        "PatientName": f"{last}^{first}",
        "PatientID": f"MRN{chr(65 + site)}{100000 + p}",
        "PatientBirthDate": born.strftime("%Y%m%d"),
        "PatientSex": str(rng.choice(["F", "M"])),
        "PatientAddress": f"{int(rng.integers(1, 200))} {rng.choice(_STREETS)}",
        "OtherPatientIDs": f"NHS{int(rng.integers(10**8, 10**9))}",
        "AccessionNumber": f"ACC{site}{p:06d}",
        "ReferringPhysicianName": f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}^^Dr",
        "OperatorsName": f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}",
        "StudyDate": (date(2024, 1, 1) + timedelta(days=int(rng.integers(0, 600)))).strftime(
            "%Y%m%d"
        ),
    }
    # Derived, not drawn: the random stream (and so every pixel) is unchanged.
    patient["PatientAge"] = age_string(born, _date(patient["StudyDate"]))
    return patient


def age_string(born: date, on: date) -> str:
    """Patient's Age (AS) on a date, in whole years: ``"065Y"``."""
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return f"{years:03d}Y"


def _date(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def _base_dataset(sop_class: str, seed: int, site: int, patient: int, instance: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = _uid(seed, site, patient, "sop", instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def _fill_common(
    ds: Dataset,
    patient: dict[str, str],
    profile: ScannerProfile,
    study_uid: str,
    series_uid: str,
    modality: str,
    instance: int,
) -> None:
    for key, value in patient.items():
        setattr(ds, key, value)
    ds.StudyTime = "101500"
    ds.SeriesDate = ds.StudyDate
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = series_uid + ".1"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.Modality = modality
    ds.Manufacturer = profile.manufacturer
    ds.ManufacturerModelName = profile.model
    ds.InstitutionName = profile.institution
    ds.StationName = f"{profile.model.replace(' ', '')}-01"
    ds.DeviceSerialNumber = "SN" + hashlib.sha256(profile.model.encode()).hexdigest()[:8]
    ds.BodyPartExamined = "CHEST"
    ds.BurnedInAnnotation = "NO"


def _fill_ct_geometry(ds: Dataset, profile: ScannerProfile, k: int, size: int) -> None:
    origin = -size * profile.pixel_spacing / 2
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [origin, origin, -100.0 + k * profile.slice_spacing]
    ds.SliceThickness = profile.slice_spacing
    ds.SpacingBetweenSlices = profile.slice_spacing
    ds.KVP = 120
    ds.WindowCenter = -600
    ds.WindowWidth = 1500


def _fill_pixels(ds: Dataset, values: np.ndarray, profile: ScannerProfile, instance: int) -> None:
    """Store modality values (HU or display units) through the inverse Modality LUT."""
    top = (1 << profile.bits_stored) - 1
    stored = np.rint((values - profile.rescale_intercept) / profile.rescale_slope)
    stored = np.clip(stored, 0, top)
    if profile.photometric == "MONOCHROME1":
        stored = top - stored
    ds.Rows, ds.Columns = values.shape
    ds.PixelSpacing = [profile.pixel_spacing, profile.pixel_spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = profile.rescale_slope
    ds.RescaleIntercept = profile.rescale_intercept
    ds.PixelData = stored.astype(np.uint16).tobytes()


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    if transfer_syntax != ExplicitVRLittleEndian:
        try:
            ds.compress(transfer_syntax, generate_instance_uid=False)  # UIDs stay seeded
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            # Name the file and syntax; pydicom's message names neither.
            raise RuntimeError(
                f"{path}: cannot encode as {UID(transfer_syntax).name}: {exc}"
            ) from exc
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue())


def _radiograph(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """Display-unit image in [0, 1000]: body, two dark lung fields, ribs, maybe a nodule."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = 700 + 80 * rng.standard_normal() - 200 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)
    for cx in (0.3, 0.7):
        lung = ((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1
        image = np.where(lung, image - 350, image)
    image += 40 * (np.sin(y * size * 0.9) > 0.6)
    if label:
        cx = rng.choice([0.3, 0.7]) + rng.uniform(-0.06, 0.06)
        cy = rng.uniform(0.35, 0.65)
        r = rng.uniform(0.035, 0.06)
        image += 260 * np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2)))
    image += rng.normal(0, 25, image.shape)
    return np.clip(image, 0, 1000)


def _ct_volume(rng: np.random.Generator, size: int, slices: int, label: int) -> np.ndarray:
    """HU volume: soft-tissue body, air-filled lungs, maybe a soft-tissue lesion."""
    z, y, x = (
        np.mgrid[0:slices, 0:size, 0:size] / np.array([slices, size, size])[:, None, None, None]
    )
    body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.5) / 0.35) ** 2 < 1
    volume = np.where(body, 40.0, -1000.0)
    for cx in (0.32, 0.68):
        lung = ((x - cx) / 0.14) ** 2 + ((y - 0.5) / 0.25) ** 2 < 1
        volume = np.where(lung & body, -820.0, volume)
    if label:
        cx = rng.choice([0.32, 0.68]) + rng.uniform(-0.04, 0.04)
        cy, cz = rng.uniform(0.4, 0.6), rng.uniform(0.3, 0.7)
        r = rng.uniform(0.05, 0.08)
        lesion = ((x - cx) ** 2 + (y - cy) ** 2 + ((z - cz) * slices / size) ** 2) < r**2
        volume = np.where(lesion, 35.0, volume)
    return volume + rng.normal(0, 12, volume.shape)
