"""De-identification: every identifier the generator wrote is gone, pixels are untouched."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from datetime import date
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from medfed.client.deid import (
    LABELS_NAME,
    REPORT_NAME,
    DeidContext,
    DeidError,
    DeidOptions,
    deidentify_dataset,
    deidentify_tree,
    is_deidentified,
    load_or_create_key,
    resolve_action,
)
from medfed.client.deid_profile import ACTIONS, BASIC_PROFILE, lookup
from medfed.simulations.synthetic_imaging import generate_imaging_sites

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientAddress",
    "OtherPatientIDs",
    "AccessionNumber",
    "ReferringPhysicianName",
    "OperatorsName",
    "InstitutionName",
    "StationName",
    "DeviceSerialNumber",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
)
PYDICOM_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["xray", "ct"])
def sites(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic sites: uncompressed, and two kinds of compressed files."""
    root = tmp_path_factory.mktemp(f"sites-{request.param}")
    return generate_imaging_sites(
        request.param, 3, root, patients_per_site=3, image_size=32, slices=4
    )


@pytest.fixture(scope="module")
def runs(sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """(IN_DIR, OUT_DIR) per site, de-identified once with KEY."""
    out_root = tmp_path_factory.mktemp("deid")
    pairs = []
    for site in sites:
        before = _tree_digest(site)
        deidentify_tree(site, out_root / site.name, KEY)
        assert _tree_digest(site) == before, "IN_DIR changed"
        pairs.append((site, out_root / site.name))
    return pairs


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _dicoms(root: Path) -> list[Path]:
    return sorted(root.rglob("*.dcm"))


def _copy_site(site: Path, tmp_path: Path) -> Path:
    target = tmp_path / "in" / site.name
    shutil.copytree(site, target)
    return target


def _private_tags(ds: Dataset) -> list[int]:
    found: list[int] = []
    ds.walk(lambda _, elem: found.append(elem.tag) if elem.tag.is_private else None)
    return found


def _identifiers(ds: Dataset) -> set[str]:
    values = {str(ds.get(k, "") or "") for k in IDENTIFYING}
    values.add(str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")))
    return {v for v in values if len(v) >= 4}


# -- the profile table ---------------------------------------------------------------


def test_profile_is_the_full_basic_profile_table():
    assert len(BASIC_PROFILE) >= 600
    assert {row.action for row in BASIC_PROFILE} <= ACTIONS
    exact = [row.tag for row in BASIC_PROFILE if row.mask == 0xFFFFFFFF]
    assert len(exact) == len(set(exact)), "a tag is listed twice"
    expected = {
        "PatientName": "Z",
        "PatientID": "Z/D",
        "PatientBirthDate": "Z",
        "PatientAddress": "X",
        "OtherPatientIDs": "X",
        "AccessionNumber": "Z",
        "StudyInstanceUID": "U",
        "SOPInstanceUID": "U",
        "InstitutionName": "X/Z/D",
        "OperatorsName": "X/Z/D",
        "SeriesDate": "X/D",
        "ReferencedImageSequence": "X/Z/U*",
        "ContentSequence": "D",
    }
    for keyword, action in expected.items():
        row = lookup(pydicom.datadict.tag_for_keyword(keyword))
        assert row is not None and row.action == action and row.keyword == keyword
    assert lookup(0x60023000).name == "Overlay Data"
    assert lookup(0x50040010).name == "Curve Data"
    assert lookup(0x7FE00010) is None  # pixel data is not in the profile


def test_compound_actions_resolve_to_the_strictest_sensible_one():
    assert [resolve_action(c) for c in ("X/Z", "X/D", "X/Z/D")] == ["X", "X", "X"]
    assert resolve_action("Z/D") == "Z"
    assert resolve_action("X/Z/U*") == "U*"
    assert resolve_action("C") == "D"
    assert [resolve_action(c) for c in "DZXKU"] == list("DZXKU")


# -- the generated hospitals ---------------------------------------------------------


def test_every_identifying_value_is_gone(runs):
    for site, out in runs:
        inputs = [pydicom.dcmread(p) for p in _dicoms(site)]
        secrets_all = set().union(*(_identifiers(ds) for ds in inputs))
        secrets_all |= {p.name for p in (site / "dicom").iterdir()}  # MRN folder names
        blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
        paths = "\n".join(str(p.relative_to(out)) for p in out.rglob("*"))
        for secret in secrets_all:
            assert secret not in paths
            assert not any(secret.encode() in blob for blob in blobs), secret
        outputs = [pydicom.dcmread(p) for p in _dicoms(out)]
        for ds in outputs:
            for keyword in ("PatientAddress", "OtherPatientIDs", "OperatorsName"):
                assert keyword not in ds
            for keyword in ("InstitutionName", "StationName", "DeviceSerialNumber"):
                assert keyword not in ds
            assert ds.AccessionNumber == "" and ds.ReferringPhysicianName == ""
            assert ds.PatientBirthDate == ""
            assert str(ds.PatientName) == ds.PatientID


def test_original_dates_are_gone_and_shifted_per_patient(runs):
    for site, out in runs:
        by_patient: dict[str, set[int]] = {}
        originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in _dicoms(site)}
        ctx = DeidContext(KEY)
        new_to_old = {ctx.uid(uid): ds for uid, ds in originals.items()}
        for path in _dicoms(out):
            ds = pydicom.dcmread(path)
            old = new_to_old[ds.SOPInstanceUID]
            blob = path.read_bytes()
            for keyword in ("StudyDate", "SeriesDate", "PatientBirthDate"):
                assert str(old.get(keyword)).encode() not in blob
            deltas = {_days(old.StudyDate) - _days(ds.StudyDate)}
            deltas.add(_days(old.SeriesDate) - _days(ds.SeriesDate))
            by_patient.setdefault(ds.PatientID, set()).update(deltas)
            assert ds.StudyTime == old.StudyTime  # whole-day shift keeps times
            assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        for deltas in by_patient.values():
            assert len(deltas) == 1, "one offset per patient keeps intervals"
            assert 1 <= deltas.pop() <= 365


def _days(value: str) -> int:
    return date(int(value[:4]), int(value[4:6]), int(value[6:8])).toordinal()


def test_pixel_data_is_bit_identical_including_compressed_files(runs):
    ctx = DeidContext(KEY)
    syntaxes = set()
    for site, out in runs:
        outputs = {pydicom.dcmread(p).SOPInstanceUID: p for p in _dicoms(out)}
        inputs = _dicoms(site)
        assert len(outputs) == len(inputs)
        for path in inputs:
            before = pydicom.dcmread(path)
            after = pydicom.dcmread(outputs[ctx.uid(before.SOPInstanceUID)])
            assert after.PixelData == before.PixelData
            assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
            syntaxes.add(before.file_meta.TransferSyntaxUID)
    assert any(UID(s).is_compressed for s in syntaxes), "no compressed file was checked"
    assert any(not UID(s).is_compressed for s in syntaxes)


def test_uids_are_valid_and_consistent_within_series_and_file_meta(runs):
    for site, out in runs:
        series: dict[str, set[tuple[str, str, str]]] = {}
        for path in _dicoms(out):
            ds = pydicom.dcmread(path)
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert path.name == f"{ds.SOPInstanceUID}.dcm"
            assert path.parent.name == ds.SeriesInstanceUID
            assert path.parent.parent.name == ds.StudyInstanceUID
            assert path.parent.parent.parent.name == ds.PatientID
            for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
                assert uid.is_valid and uid.startswith("2.25.") and len(uid) <= 64
            key = (ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.PatientID)
            series.setdefault(ds.SeriesInstanceUID, set()).add(key)
        assert all(len(keys) == 1 for keys in series.values())
        in_series = {pydicom.dcmread(p).SeriesInstanceUID for p in _dicoms(site)}
        assert len(series) == len(in_series)


def test_marks_identity_removed_and_method(runs):
    for site, out in runs:
        assert not any(is_deidentified(pydicom.dcmread(p)) for p in _dicoms(site))
        for path in _dicoms(out):
            ds = pydicom.dcmread(path)
            assert is_deidentified(ds)
            assert ds.PatientIdentityRemoved == "YES"
            assert all(len(v) <= 64 for v in ds.DeidentificationMethod)
            codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
            assert codes == ["113100", "113107"]
            assert {i.CodingSchemeDesignator for i in ds.DeidentificationMethodCodeSequence} == {
                "DCM"
            }


def test_labels_are_remapped_and_still_join(runs):
    for site, out in runs:
        with (site / LABELS_NAME).open() as handle:
            before = list(csv.DictReader(handle))
        with (out / LABELS_NAME).open() as handle:
            after = list(csv.DictReader(handle))
        assert [r["label"] for r in after] == [r["label"] for r in before]
        studies = {}
        for path in _dicoms(out):
            ds = pydicom.dcmread(path)
            studies[ds.StudyInstanceUID] = ds.PatientID
        for row in after:
            assert studies[row["StudyInstanceUID"]] == row["PatientID"]
        assert {r["PatientID"] for r in before}.isdisjoint({r["PatientID"] for r in after})


def test_report_names_no_identifier_and_counts(runs):
    for site, out in runs:
        report = (out / REPORT_NAME).read_text()
        for path in _dicoms(site):
            for secret in _identifiers(pydicom.dcmread(path)):
                assert secret not in report
        assert str(site) not in report and "MRN" not in report
        data = json.loads(report)
        assert data["files_written"] == len(_dicoms(site)) == data["files_seen"]
        assert data["files_skipped"] == 0 and data["burned_in_annotation_flags"] == []
        assert data["labels"]["rows_without_a_written_study"] == 0


# -- refusals and bad input ----------------------------------------------------------


def test_refuses_to_write_into_or_around_in_dir(sites, tmp_path):
    site = sites[0]
    for out in (site, site / "deid", site / "dicom" / "x"):
        with pytest.raises(DeidError, match="outside IN_DIR"):
            deidentify_tree(site, out, KEY)
    with pytest.raises(DeidError, match="outside IN_DIR"):
        deidentify_tree(site, site.parent, KEY)  # IN_DIR inside OUT_DIR
    assert not (site / "deid").exists()


def test_refuses_a_non_empty_out_dir_unless_overwrite(sites, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DeidError, match="--overwrite"):
        deidentify_tree(sites[0], out, KEY)
    report = deidentify_tree(sites[0], out, KEY, DeidOptions(overwrite=True))
    assert report.written and (out / "keep.txt").exists()


def test_non_dicom_and_truncated_files_are_reported_not_fatal(sites, tmp_path):
    site = _copy_site(sites[0], tmp_path)
    files = _dicoms(site)
    raw = files[0].read_bytes()
    files[0].write_bytes(raw[: len(raw) - 300])  # cut inside the pixel data
    files[1].write_bytes(raw[:200])  # cut inside the header
    (files[2].parent / "notes.txt").write_text("Patient called back on Tuesday\n")
    (site / "site.toml").write_text("site_id = 'x'\n")
    (site / ".medfed-cache").mkdir()
    (site / ".medfed-cache" / "entry.npy").write_bytes(b"cached array")
    report = deidentify_tree(site, tmp_path / "out", KEY)
    reasons = {str(s.source): s.reason for s in report.skipped}
    assert not [r for r in reasons if ".medfed-cache" in r]  # the site's cache is not input
    assert reasons[str(files[0].relative_to(site))] == "truncated DICOM file"
    assert reasons[str(files[1].relative_to(site))] == "truncated DICOM file"
    notes = files[2].parent.relative_to(site) / "notes.txt"
    assert reasons[str(notes)] == "not a DICOM Part 10 file"
    assert reasons["site.toml"] == "outside the DICOM folder (not copied)"
    assert len(report.written) == len(files) - 2
    assert not list((tmp_path / "out").rglob("notes.txt"))
    data = (tmp_path / "out" / REPORT_NAME).read_text()
    assert "notes.txt" not in data and "site.toml" not in data


def test_private_tags_are_removed_everywhere(sites, tmp_path):
    site = _copy_site(sites[0], tmp_path)
    path = _dicoms(site)[0]
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0009, "ACME PRIVATE", create=True)
    block.add_new(0x01, "LO", "SECRET-PRIVATE-VALUE")
    item = Dataset()
    item.add_new(0x00110010, "LO", "NESTED CREATOR")
    item.add_new(0x00111001, "LO", "NESTED-PRIVATE-VALUE")
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.ReferencedSOPClassUID = ds.SOPClassUID
    ds.ReferencedImageSequence = Sequence([item])
    ds.save_as(path, enforce_file_format=True)
    deidentify_tree(site, tmp_path / "out", KEY)
    for out in _dicoms(tmp_path / "out"):
        blob = out.read_bytes()
        assert b"SECRET-PRIVATE-VALUE" not in blob and b"NESTED-PRIVATE-VALUE" not in blob
        assert _private_tags(pydicom.dcmread(out)) == []


def test_same_key_same_output_other_key_different(sites, tmp_path):
    site = sites[0]
    deidentify_tree(site, tmp_path / "a", KEY)
    deidentify_tree(site, tmp_path / "b", KEY)
    deidentify_tree(site, tmp_path / "c", OTHER_KEY)
    names = {k: {p.relative_to(tmp_path / k) for p in _dicoms(tmp_path / k)} for k in "abc"}
    assert names["a"] == names["b"]
    assert names["a"].isdisjoint(names["c"])
    for rel in names["a"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / LABELS_NAME).read_text() == (tmp_path / "b" / LABELS_NAME).read_text()


def test_burned_in_annotation_yes_or_absent_is_flagged(sites, tmp_path):
    site = _copy_site(sites[0], tmp_path)
    first, second = _dicoms(site)[:2]
    for path, value in ((first, "YES"), (second, None)):
        ds = pydicom.dcmread(path)
        if value is None:
            del ds.BurnedInAnnotation
        else:
            ds.BurnedInAnnotation = value
        ds.save_as(path, enforce_file_format=True)
    report = deidentify_tree(site, tmp_path / "out", KEY)
    assert sorted(w.burned_in_annotation for w in report.flagged) == ["YES", "absent"]
    flagged = {w.path for w in report.flagged}
    data = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert set(data["burned_in_annotation_flags"]) == flagged


def test_remove_dates_option(sites, tmp_path):
    report = deidentify_tree(sites[0], tmp_path / "out", KEY, DeidOptions(shift_dates=False))
    assert report.written
    for path in _dicoms(tmp_path / "out"):
        ds = pydicom.dcmread(path)
        assert ds.StudyDate == "" and "SeriesDate" not in ds
        assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100"]
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def _by_source(site: Path, out: Path) -> list[tuple[Dataset, Dataset]]:
    """(input, output) data sets, matched by the keyed SOP Instance UID."""
    ctx = DeidContext(KEY)
    outputs = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in _dicoms(out)}
    inputs = [pydicom.dcmread(p) for p in _dicoms(site)]
    return [(ds, outputs[ctx.uid(ds.SOPInstanceUID)]) for ds in inputs]


def test_basic_profile_empties_sex_and_removes_age(runs):
    for site, out in runs:
        data = json.loads((out / REPORT_NAME).read_text())
        assert "Retain Patient Characteristics" not in json.dumps(data["options"])
        assert data["patient_characteristics"].startswith("Patient's Sex emptied")
        for before, after in _by_source(site, out):
            assert before.PatientSex in ("F", "M") and before.PatientAge.endswith("Y")
            assert after.PatientSex == "" and "PatientAge" not in after


def test_retain_patient_characteristics_option_keeps_sex_and_age(sites, tmp_path):
    out = tmp_path / "out"
    options = DeidOptions(retain_patient_characteristics=True)
    report = deidentify_tree(sites[0], out, KEY, options)
    assert report.written and not report.skipped
    for before, after in _by_source(sites[0], out):
        assert (after.PatientSex, after.PatientAge) == (before.PatientSex, before.PatientAge)
        assert after.PatientBirthDate == "" and after.PatientID != before.PatientID
        assert is_deidentified(after)
        codes = [item.CodeValue for item in after.DeidentificationMethodCodeSequence]
        assert codes == ["113100", "113107", "113108"]
        meanings = [i.CodeMeaning for i in after.DeidentificationMethodCodeSequence]
        assert meanings[-1] == "Retain Patient Characteristics Option"
        assert "patient sex, age, size and weight kept" in after.DeidentificationMethod
        assert all(len(v) <= 64 for v in after.DeidentificationMethod)
    data = json.loads((out / REPORT_NAME).read_text())
    assert "Retain Patient Characteristics Option (DCM 113108)" in data["options"]
    assert data["patient_characteristics"] == (
        "kept: Patient's Sex, Patient's Age, Patient's Size, Patient's Weight"
    )


@pytest.mark.parametrize("retain", [False, True])
def test_patient_characteristics_of_one_data_set(retain):
    ds = Dataset()
    ds.PatientID = "MRN-2"
    ds.PatientSex = "F"
    ds.PatientAge = "071Y"
    ds.PatientSize = "1.62"
    ds.PatientWeight = "58"
    ds.EthnicGroup = "group"
    ds.SmokingStatus = "NO"
    deidentify_dataset(ds, DeidContext(KEY, retain_patient_characteristics=retain))
    kept = ("PatientSex", "PatientAge", "PatientSize", "PatientWeight")
    if retain:
        assert [str(ds.get(k)) for k in kept] == ["F", "071Y", "1.62", "58"]
    else:
        assert "PatientSex" in ds and not ds.PatientSex  # Z: emptied, not removed
        assert not any(k in ds for k in kept[1:])
    # Only these four: other characteristics keep the Basic Profile's action.
    assert "EthnicGroup" not in ds and "SmokingStatus" not in ds


def test_labels_with_extra_columns_drop_them_and_bad_labels_fail_early(sites, tmp_path):
    site = _copy_site(sites[0], tmp_path)
    text = (site / LABELS_NAME).read_text().splitlines()
    rows = [text[0] + ",name"] + [line + ",Someone^Secret" for line in text[1:]]
    (site / LABELS_NAME).write_text("\n".join(rows) + "\n")
    report = deidentify_tree(site, tmp_path / "out", KEY)
    assert report.labels["dropped_columns"] == ["name"]
    assert "Secret" not in (tmp_path / "out" / LABELS_NAME).read_text()
    (site / LABELS_NAME).write_text("a,b\n1,2\n")
    with pytest.raises(DeidError, match="label"):
        deidentify_tree(site, tmp_path / "out2", KEY)
    assert not (tmp_path / "out2").exists()


def test_bare_tree_of_dicom_files(sites, tmp_path):
    report = deidentify_tree(sites[0] / "dicom", tmp_path / "out", KEY)
    assert report.written and report.labels is None
    assert all(not w.path.startswith("dicom/") for w in report.written)


# -- one data set --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_deidentify_dataset_handles_sequences_dates_and_overlays():
    ds = Dataset()
    ds.PatientID = "MRN-1"
    ds.PatientName = "Doe^Jane"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.AcquisitionDateTime = "20240310101500.000000+0100"
    ds.ContentDate = "2024.03.10"
    ds.ContentTime = "101500"
    ds.AdmittingDate = "20240301"
    ds.add_new(0x60000010, "US", 32)
    ds.add_new(0x60003000, "OW", b"\x00" * 8)
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = "1.2.3.5"
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.InstanceCreationDate = "20240310"
    ds.ReferencedImageSequence = Sequence([ref])
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    content = Dataset()
    content.TextValue = "Jane Doe, see MRN-1"
    ds.ContentSequence = Sequence([content])
    ds.PersonName = "Doe^John"
    ctx = DeidContext(KEY)
    deidentify_dataset(ds, ctx)
    shift = ctx.day_shift("MRN-1")
    expected = date.fromordinal(date(2024, 3, 10).toordinal() - shift).strftime("%Y%m%d")
    assert ds.AcquisitionDateTime == expected + "101500.000000"
    assert ds.ContentDate == expected and ds.ContentTime == "101500"
    assert "AdmittingDate" not in ds  # X in the profile: removed, not shifted
    assert 0x60000010 not in ds and 0x60003000 not in ds
    [item] = ds.ReferencedImageSequence
    assert item.ReferencedSOPInstanceUID == ctx.uid("1.2.3.5")
    assert item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert "InstanceCreationDate" in item and item.InstanceCreationDate == expected
    assert "OtherPatientIDsSequence" not in ds
    assert len(ds.ContentSequence) == 0  # D on a sequence: emptied, content not kept
    assert ds.PersonName == "DEIDENTIFIED"
    assert ds.PatientID == ds.PatientName == ctx.pseudonym("MRN-1")
    assert ds.SOPInstanceUID == ctx.uid("1.2.3.4")
    assert is_deidentified(ds)


def test_is_deidentified_needs_both_marks():
    ds = Dataset()
    assert not is_deidentified(ds)
    ds.PatientIdentityRemoved = "YES"
    assert not is_deidentified(ds)
    ds.DeidentificationMethod = "manual"
    assert is_deidentified(ds)
    ds.PatientIdentityRemoved = "NO"
    assert not is_deidentified(ds)


def test_keyed_mappings_are_well_formed():
    ctx = DeidContext(KEY)
    uid = ctx.uid("1.2.3")
    assert UID(uid).is_valid and len(uid) <= 64 and uid == ctx.uid("1.2.3")
    assert uid != DeidContext(OTHER_KEY).uid("1.2.3")
    assert {ctx.day_shift(f"P{i}") for i in range(200)} <= set(range(1, 366))
    assert len(ctx.pseudonym("P1")) <= 64
    with pytest.raises(DeidError):
        DeidContext(b"short")


# -- the key -------------------------------------------------------------------------


def test_key_file_is_created_private_and_reused(tmp_path):
    path = tmp_path / "keys" / "site.key"
    key, created = load_or_create_key(path)
    assert created and len(key) == 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_or_create_key(path) == (key, False)
    hex_path = tmp_path / "hex.key"
    hex_path.write_text(KEY.hex() + "\n")
    assert load_or_create_key(hex_path) == (KEY, False)
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    with pytest.raises(DeidError, match="at least"):
        load_or_create_key(short)
    with pytest.raises(DeidError, match="must not be inside"):
        load_or_create_key(tmp_path / "out" / "k", forbidden=(tmp_path / "out",))
    assert not (tmp_path / "out").exists()


# -- pydicom's own test files --------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pydicom_test_files_never_crash_and_keep_pixels(tmp_path):
    """The whole bundled tree in one run: nothing crashes, every file is accounted for."""
    files = sorted(p for p in PYDICOM_TEST_FILES.rglob("*") if p.is_file())
    report = deidentify_tree(PYDICOM_TEST_FILES, tmp_path / "out", KEY)
    assert report.files_seen == len(files) == len(report.written) + len(report.skipped)
    assert len(report.written) > 40
    for written in report.written:
        ds = pydicom.dcmread(tmp_path / "out" / written.path)
        assert is_deidentified(ds) and _private_tags(ds) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pydicom_test_files_one_by_one_keep_pixels_and_transfer_syntax(tmp_path):
    """Each bundled file alone (several share a SOP Instance UID): pixels bit-identical."""
    syntaxes = set()
    for i, path in enumerate(sorted(p for p in PYDICOM_TEST_FILES.rglob("*.dcm"))):
        (tmp_path / "in" / str(i)).mkdir(parents=True)
        shutil.copy(path, tmp_path / "in" / str(i) / path.name)
        report = deidentify_tree(tmp_path / "in" / str(i), tmp_path / "out" / str(i), KEY)
        if not report.written:
            continue
        before = pydicom.dcmread(path)
        [written] = report.written
        after = pydicom.dcmread(tmp_path / "out" / str(i) / written.path)
        assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
        for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
            assert (tag in after) == (tag in before)
            if tag in before:
                assert after[tag].value == before[tag].value, path.name
        blob = (tmp_path / "out" / str(i) / written.path).read_bytes()
        assert blob[:132] == b"\x00" * 128 + b"DICM"  # preamble zeroed
        kept = str(before.get("Manufacturer", ""))  # not identifying; MR_small repeats it
        for secret in _identifiers(before):
            assert secret in kept or secret.encode() not in blob, (path.name, secret)
        syntaxes.add(before.file_meta.TransferSyntaxUID)
    expected = {
        pydicom.uid.RLELossless,
        pydicom.uid.JPEG2000Lossless,
        pydicom.uid.JPEGBaseline8Bit,
        pydicom.uid.JPEGLSLossless,
        pydicom.uid.ExplicitVRBigEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
    }
    assert expected <= syntaxes
