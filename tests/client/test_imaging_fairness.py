"""Imaging sites evaluate per subgroup: sex and age from the DICOM headers, aggregates only."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy.special import expit
from sklearn.metrics import confusion_matrix, roc_auc_score

from medfed.client import dicom_data
from medfed.client.deid import deidentify_tree
from medfed.client.dicom_data import (
    Header,
    Preprocess,
    header_key,
    load_images,
    patient_age_years,
    patient_sex,
)
from medfed.client.fairness import (
    fairness_metrics,
    imaging_fairness,
    imaging_group_index,
    releasable,
)
from medfed.client.imaging_data import ImagingData, load_imaging_data, split_by_patient
from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
from medfed.client.site import Site
from medfed.client.training import predict
from medfed.common.config import RunSettings
from medfed.common.messages import FAIRNESS_KEY
from medfed.common.models import build_model
from medfed.common.params import get_weights, set_weights
from medfed.common.tasks import SYNTHETIC_CT, SYNTHETIC_XRAY
from medfed.server.fairness import combine
from medfed.simulations.synthetic_imaging import generate_imaging_sites

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
EDGES = (50, 65)
PREP = Preprocess(size=16, depth=4)
KEY = bytes(range(32))
PATIENTS = 48


@pytest.fixture(scope="module")
def ct_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (site,) = generate_imaging_sites(
        "ct", 1, tmp_path_factory.mktemp("ct"), seed=3, patients_per_site=3, image_size=32, slices=4
    )
    return site


@pytest.fixture(scope="module")
def xray_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (site,) = generate_imaging_sites(
        "xray", 1, tmp_path_factory.mktemp("xray"), seed=9, patients_per_site=PATIENTS
    )
    return site


def _copy(site: Path, tmp_path: Path) -> Path:
    shutil.copytree(site, tmp_path / "site", ignore=shutil.ignore_patterns(".medfed-cache"))
    return tmp_path / "site"


def _header_attributes(dicom_root: Path) -> dict[str, tuple[str, float | None]]:
    """Patient id -> (PatientSex, PatientAge in years), read straight with pydicom."""
    out = {}
    for path in sorted(dicom_root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        age = str(ds.get("PatientAge", "") or "")
        out[str(ds.PatientID)] = (str(ds.get("PatientSex", "")), float(age[:3]) if age else None)
    return out


def _set(path: Path, **values: str) -> None:
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about invalid AS/CS values
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


# -- header values -> attributes ---------------------------------------------------------


SEX_VALUES = [
    ("F", "F"), ("M", "M"), (" m ", "M"), ("O", ""), ("", ""), (None, ""), ("X", ""),
    (["F", "M"], ""), ("FEMALE", ""),
]  # fmt: skip


@pytest.mark.parametrize(("value", "expected"), SEX_VALUES)
def test_patient_sex_is_f_m_or_unknown(value, expected) -> None:
    assert patient_sex(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("065Y", 65.0),
        ("65Y", 65.0),
        ("000Y", 0.0),
        ("006M", 0.5),
        ("002W", 14 / 365.25),
        ("010D", 10 / 365.25),
        ("150Y", 150.0),
    ],
)
def test_patient_age_in_years(value, expected) -> None:
    assert patient_age_years(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value", [None, "", "065", "65 years", "ABCY", "-05Y", "999Y", "1234Y", "65.5Y", b"065Y"]
)
def test_bad_patient_ages_are_unknown(value) -> None:
    assert patient_age_years(value) is None


def test_items_carry_sex_and_age_and_bad_values_never_quarantine(ct_site, tmp_path) -> None:
    site = _copy(ct_site, tmp_path)
    truth = _header_attributes(site / "dicom")
    items, quarantined = load_images(site / "dicom", PREP)
    assert quarantined == [] and len(items) == 3
    for item in items:
        sex, age = truth[item.patient_id]
        assert (item.sex, item.age_years) == (sex, age) and sex in ("F", "M") and age > 18
    # A volume takes its first file's values; bad values are unknown, not an error.
    first, second = items[0], items[1]
    _set(Path(first.files[0]), PatientAge="041Y", PatientSex="O")
    for path in first.files[1:]:
        _set(Path(path), PatientAge="077Y", PatientSex="M")
    for path in second.files:
        _set(Path(path), PatientAge="sixty", PatientSex="unknown")
    again, quarantined = load_images(site / "dicom", PREP)
    assert quarantined == [] and [i.files for i in again] == [i.files for i in items]
    assert (again[0].sex, again[0].age_years) == ("", 41.0)
    assert (again[1].sex, again[1].age_years) == ("", None)
    assert (again[2].sex, again[2].age_years) == truth[items[2].patient_id]


# -- the header cache --------------------------------------------------------------------


def _count_reads(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = pydicom.dcmread

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return calls


def _attributes(items) -> list[tuple[str, str, float | None]]:
    return [(i.patient_id, i.sex, i.age_years) for i in items]


def test_cached_headers_keep_sex_and_age(ct_site, tmp_path, monkeypatch) -> None:
    site = _copy(ct_site, tmp_path)
    first, _ = load_images(site / "dicom", PREP, tmp_path / "cache")
    reads = _count_reads(monkeypatch)
    again, _ = load_images(site / "dicom", PREP, tmp_path / "cache")
    assert reads == []  # served from the cache, no DICOM parsed
    assert _attributes(again) == _attributes(first)
    assert {i.sex for i in again} <= {"F", "M"} and all(i.age_years for i in again)


def test_an_older_header_cache_is_not_misread(ct_site, tmp_path, monkeypatch) -> None:
    """Records of an older header version, even well-formed, are never served: the
    namespace changes with the version (and with the record's fields)."""
    site = _copy(ct_site, tmp_path)
    cache = tmp_path / "cache"
    truth = _attributes(load_images(site / "dicom", PREP)[0])
    monkeypatch.setattr(dicom_data, "HEADER_VERSION", "1")
    old_key = header_key()
    load_images(site / "dicom", PREP, cache)
    (batch,) = cache.rglob("batch-*.json")
    records = json.loads(batch.read_text())["records"]
    for record in records.values():
        record["header"].update(sex="", age_years=None)  # what an older reader stored
    batch.write_text(json.dumps({"records": records}))
    monkeypatch.undo()
    assert header_key() != old_key and "sex,age_years" in header_key()
    reads = _count_reads(monkeypatch)
    items, _ = load_images(site / "dicom", PREP, cache)
    assert reads  # parsed again, not served from the old records
    assert _attributes(items) == truth


def test_a_cache_from_before_sex_and_age_is_not_read(ct_site, tmp_path, monkeypatch) -> None:
    """The layout before this change (``headers/``, records without sex or age)."""
    site = _copy(ct_site, tmp_path)
    cache = tmp_path / "cache"
    truth = _attributes(load_images(site / "dicom", PREP, cache)[0])
    (batch,) = cache.rglob("batch-*.json")
    records = json.loads(batch.read_text())["records"]
    for record in records.values():
        del record["header"]["sex"], record["header"]["age_years"]
    legacy = batch.parent.parent / "headers"
    legacy.mkdir()
    (legacy / batch.name).write_text(json.dumps({"records": records}))
    batch.unlink()
    reads = _count_reads(monkeypatch)
    items, _ = load_images(site / "dicom", PREP, cache)
    assert reads and _attributes(items) == truth


def test_header_records_without_valid_attributes_are_rebuilt() -> None:
    header = Header(
        **{
            "patient_id": "p", "study_uid": "1.2", "study_date": "", "series_uid": "1.2.3",
            "series_number": 1, "instance_uid": "1.2.3.4", "instance_number": 1,
            "modality": "DX", "frames": 1, "rows": 4, "columns": 4, "pixel_spacing": None,
            "orientation": None, "position": None, "frame_positions": None,
            "frame_offsets": None, "identity_removed": False, "transfer_syntax": "",
            "sex": "F", "age_years": 65.0,
        }
    )  # fmt: skip
    record = header.to_record()
    assert Header.from_record(record) == header
    for bad in ({"sex": "O"}, {"sex": 1}, {"age_years": -1.0}, {"age_years": "65Y"}):
        assert Header.from_record({**record, **bad}) is None
    assert Header.from_record({k: v for k, v in record.items() if k != "sex"}) is None


# -- samples -------------------------------------------------------------------------


def test_imaging_data_keeps_attributes_through_the_split(xray_site) -> None:
    data = load_imaging_data(xray_site, SYNTHETIC_XRAY, use_cache=False)
    truth = _header_attributes(xray_site / "dicom")
    assert list(zip(data.sex, data.age_years, strict=True)) == [truth[p] for p in data.ids]
    train, test = split_by_patient(data, 0.25, seed=1)
    for part in (train, test):
        assert list(zip(part.sex, part.age_years, strict=True)) == [truth[p] for p in part.ids]
    with pytest.raises(ValueError, match="one entry per sample"):
        ImagingData(
            SYNTHETIC_XRAY, xray_site, ["a", "b"], np.zeros((2, 1, 4, 4)), np.zeros(2),
            [(), ()], [False, False], 2, sex=["F"], age_years=[None],
        )  # fmt: skip


# -- per-group metrics -------------------------------------------------------------------


def _cohort(n: int = 160, seed: int = 4):
    rng = np.random.default_rng(seed)
    sex = rng.choice(["F", "M", ""], n, p=[0.45, 0.45, 0.1]).tolist()
    ages = [None if rng.random() < 0.1 else float(a) for a in rng.integers(20, 90, n)]
    y = rng.integers(0, 2, n).astype(np.float32)
    logits = rng.normal(size=n) + 1.5 * (y - 0.5)
    return sex, ages, y, logits


def _expected(y: np.ndarray, prob: np.ndarray) -> dict:
    tn, fp, fn, tp = confusion_matrix(y, prob >= 0.5, labels=[0, 1]).ravel()
    return {"n": len(y), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "auc": roc_auc_score(y, prob)}


def test_imaging_group_metrics_match_sklearn() -> None:
    sex, ages, y, logits = _cohort()
    payload = imaging_fairness(y, logits, SYNTHETIC_XRAY, sex, ages, ("sex", "age"), EDGES, 1)
    assert payload["kind"] == "binary" and "unavailable" not in payload
    s = np.asarray(sex)
    a = np.asarray([np.nan if v is None else v for v in ages])
    masks = {
        "sex=female": s == "F",
        "sex=male": s == "M",
        "age=<50": a < 50,
        "age=50-64": (a >= 50) & (a < 65),
        "age=65+": a >= 65,
    }
    assert list(payload["groups"]) == list(masks) and payload["suppressed"] == []
    prob = expit(logits)
    for name, mask in masks.items():
        got, want = payload["groups"][name], _expected(y[mask], prob[mask])
        assert {k: got[k] for k in ("n", "tp", "fp", "tn", "fn")} == {
            k: want[k] for k in ("n", "tp", "fp", "tn", "fn")
        }
        assert got["auc"] == pytest.approx(want["auc"])
        assert got["observed_rate"] == pytest.approx(y[mask].mean())
        assert got["mean_predicted"] == pytest.approx(prob[mask].mean())
    # Unknown samples are in no group.
    assert payload["groups"]["sex=female"]["n"] + payload["groups"]["sex=male"]["n"] < len(y)


def test_unknown_samples_count_as_withheld_for_the_complement_rule() -> None:
    """30 women, 30 men and 2 of unknown sex, cohort 20: releasing both groups would
    reveal the 2 as the total minus them, so one group is withheld too."""
    sex = ["F"] * 30 + ["M"] * 30 + ["", ""]
    y = np.asarray([0, 1] * 31, dtype=np.float32)
    ages = [None] * 62
    payload = imaging_fairness(y, np.zeros(62), SYNTHETIC_XRAY, sex, ages, ("sex",), EDGES, 20)
    assert len(payload["groups"]) == 1 and len(payload["suppressed"]) == 1
    assert releasable([30, 30], 20, hidden=2) == [False, True]
    assert releasable([30, 30], 20, hidden=20) == [True, True]
    assert releasable([30, 30], 20, hidden=0) == [True, True]


def test_group_index_from_header_values() -> None:
    names, index = imaging_group_index(["F", "M", "", "F"], [None] * 4, "sex", EDGES)
    assert names == ["sex=female", "sex=male"] and index.tolist() == [0, 1, -1, 0]
    ages = [49.99, 50.0, 64.9, 65.0, None, 0.5]
    names, index = imaging_group_index([""] * 6, ages, "age", EDGES)
    assert names == ["age=<50", "age=50-64", "age=65+"]
    assert index.tolist() == [0, 1, 1, 2, -1, 0]
    with pytest.raises(ValueError, match="not a subgroup attribute of imaging"):
        imaging_group_index([], [], "smoking", EDGES)


def test_an_attribute_unknown_everywhere_is_unavailable_naming_the_tag() -> None:
    _, ages, y, logits = _cohort()
    payload = imaging_fairness(
        y, logits, SYNTHETIC_XRAY, [""] * len(y), ages, ("sex", "age"), EDGES, 1
    )
    assert set(payload["groups"]) == {"age=<50", "age=50-64", "age=65+"}
    reason = payload["unavailable_attributes"]["sex"]
    assert "Patient's Sex (0010,0040)" in reason and "Retain Patient Characteristics" in reason
    assert payload["unavailable"] == f"sex: {reason}"
    # The coordinator pools the age groups and states why sex is missing.
    combined = combine({"h1": {FAIRNESS_KEY: json.dumps(payload)}}, ("sex", "age"))
    assert set(combined["groups"]) == set(payload["groups"])
    assert "(0010,0040)" in combined["unavailable"]["h1"] and "(0010,0040)" in combined["note"]


def test_nothing_known_means_no_groups() -> None:
    test = ImagingData(
        SYNTHETIC_XRAY, Path("."), ["a", "b"], np.zeros((2, 1, 4, 4), np.float32),
        np.zeros(2, np.float32), [(), ()], [True, True], 2,
    )  # fmt: skip
    metric = fairness_metrics(np.zeros(2, np.float32), test, ("sex", "age"), EDGES, 1)
    payload = json.loads(metric[FAIRNESS_KEY])
    assert payload["groups"] == {} and payload["suppressed"] == []
    assert set(payload["unavailable_attributes"]) == {"sex", "age"}
    assert "(0010,1010)" in payload["unavailable_attributes"]["age"]
    assert "(0010,0040)" in payload["unavailable"] and "(0010,1010)" in payload["unavailable"]


# -- a site, end to end ------------------------------------------------------------------


def _settings(tmp_path: Path, task: str = "xray") -> RunSettings:
    return RunSettings(
        task=task,
        model="cnn2d",
        num_rounds=1,
        epsilon=8.0,
        batch_size=4,
        min_sites=2,
        out_dir=str(tmp_path / "out"),
    )


def test_site_evaluate_releases_groups_from_the_headers(xray_site, tmp_path) -> None:
    site_dir = _copy(xray_site, tmp_path)
    write_policy(site_dir / POLICY_NAME, SitePolicy(site_id="h1", min_cohort=2))
    settings = _settings(tmp_path)
    weights = get_weights(build_model("cnn2d", SYNTHETIC_XRAY.model_input, seed=3))
    _, n, metrics = Site(site_dir).evaluate(settings, weights)
    payload = json.loads(str(metrics[FAIRNESS_KEY]))
    assert "unavailable" not in payload and payload["groups"]
    # The same figures by hand: the site's test split, its headers read with pydicom.
    data = load_imaging_data(site_dir, SYNTHETIC_XRAY, use_cache=False)
    _, test = split_by_patient(data, settings.test_fraction, settings.seed)
    assert len(test) == n
    model = build_model("cnn2d", SYNTHETIC_XRAY.model_input, settings.seed)
    set_weights(model, weights)
    prob = expit(predict(model, test.X))
    truth = _header_attributes(site_dir / "dicom")
    sex = np.asarray([truth[p][0] for p in test.ids])
    age = np.asarray([truth[p][1] for p in test.ids], dtype=np.float64)
    masks = {"sex=female": sex == "F", "sex=male": sex == "M", "age=<50": age < 50}
    masks |= {"age=50-64": (age >= 50) & (age < 65), "age=65+": age >= 65}
    assert set(payload["groups"]) | set(payload["suppressed"]) == set(masks)
    for name, group in payload["groups"].items():
        mask = masks[name]
        assert group["n"] == mask.sum() >= 2
        assert group["tp"] == int(np.sum((test.y[mask] == 1) & (prob[mask] >= 0.5)))
        assert group["mean_predicted"] == pytest.approx(prob[mask].mean(), rel=1e-5)


@pytest.mark.parametrize("retain", [False, True])
def test_deidentified_sites_need_the_option_for_subgroups(xray_site, tmp_path, retain) -> None:
    from medfed.client.deid import DeidOptions

    out = tmp_path / "deid"
    deidentify_tree(xray_site, out, KEY, DeidOptions(retain_patient_characteristics=retain))
    data = load_imaging_data(out, SYNTHETIC_XRAY, use_cache=False)
    original = load_imaging_data(xray_site, SYNTHETIC_XRAY, use_cache=False)
    y, logits = data.y, np.zeros(len(data))
    payload = imaging_fairness(
        y, logits, SYNTHETIC_XRAY, data.sex, data.age_years, ("sex", "age"), EDGES, 1
    )
    if retain:
        assert sorted(zip(data.sex, data.age_years, strict=True)) == sorted(
            zip(original.sex, original.age_years, strict=True)
        )
        assert "unavailable" not in payload and len(payload["groups"]) == 5
    else:
        assert set(data.sex) == {""} and set(data.age_years) == {None}
        assert payload["groups"] == {} and set(payload["unavailable_attributes"]) == {"sex", "age"}


def test_ct_volumes_are_grouped_too(ct_site) -> None:
    data = load_imaging_data(ct_site, SYNTHETIC_CT, use_cache=False)
    payload = imaging_fairness(
        data.y, np.zeros(len(data)), SYNTHETIC_CT, data.sex, data.age_years, ("sex", "age"),
        EDGES, 1,
    )  # fmt: skip
    sizes = {name: g["n"] for name, g in payload["groups"].items()}
    assert sum(n for name, n in sizes.items() if name.startswith("sex=")) == len(data) == 3
    assert sum(n for name, n in sizes.items() if name.startswith("age=")) == 3
