"""Consent: withdrawn patients are dropped before their records are used, and only counted.

The central test trains one DP round at a site whose data holds withdrawn patients and
at a site whose data never held them, under the same seed: the updates must be
bit-identical. A control run with the same rows *consenting* must differ, so the test
can fail.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.client.consent import ConsentError, ConsentRules, consent_of, read_withdrawn_list
from medfed.client.data import DataError, load_site_data, split_train_test
from medfed.client.deid import deidentify_tree
from medfed.client.imaging_data import load_imaging_data, read_labels
from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
from medfed.client.site import DATA_REPORT_NAME, Site
from medfed.common.config import RunSettings
from medfed.common.ledger import read_ledger
from medfed.common.models import build_model
from medfed.common.params import get_weights
from medfed.common.tasks import HEART_DISEASE_RISK, SYNTHETIC_RISK, SYNTHETIC_XRAY
from medfed.simulations.synthetic_imaging import generate_imaging_sites

from .conftest import csv_text, row

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_rows(path: Path, rows: list[dict[str, str]], header: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


# -- the rules -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [("yes", True), (" Y ", True), ("1", True), ("no", False), ("Withdrawn", False), ("0", False)],
)
def test_consent_cells(raw: str, expected: bool) -> None:
    assert consent_of(raw) is expected


@pytest.mark.parametrize("raw", ["", "maybe", "2", "nan"])
def test_unclear_consent_is_neither(raw: str) -> None:
    assert consent_of(raw) is None


def test_withdrawn_list_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "withdrawn.txt"
    path.write_text("# withdrawn on request\nP001\n\n  P002  # by letter\n")
    assert read_withdrawn_list(path) == {"P001", "P002"}
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConsentError, match=r"withdrawn\.txt: withdrawn list is not UTF-8"):
        read_withdrawn_list(path)


# -- the clinical CSV ------------------------------------------------------------------------
def _with_consent(rows: list[dict[str, str]], consent: dict[str, str]) -> str:
    header = (*rows[0], "consent")
    return csv_text([{**r, "consent": consent.get(r["patient_id"], "yes")} for r in rows], header)


def test_consent_column_drops_rows_and_counts_them(tmp_path: Path) -> None:
    rows = [row(f"P{i:03d}") for i in range(6)]
    path = tmp_path / "clinical.csv"
    path.write_text(_with_consent(rows, {"P001": "no", "P004": "withdrawn"}))
    data = load_site_data(path, SYNTHETIC_RISK, consent=ConsentRules())
    assert data.ids == ["P000", "P002", "P003", "P005"]
    assert data.consent.by_column == 2 and data.consent.withdrawn == 2
    assert not data.skipped and data.total_rows == 6


def test_withdrawn_rows_are_not_even_validated(tmp_path: Path) -> None:
    """A withdrawn patient's bad cells are not read: no skipped row names them."""
    rows = [row("P000"), row("P001", age="old"), row("P002")]
    path = tmp_path / "clinical.csv"
    path.write_text(_with_consent(rows, {"P001": "no"}))
    data = load_site_data(path, SYNTHETIC_RISK, strict=True, consent=ConsentRules())
    assert data.ids == ["P000", "P002"] and not data.skipped


def test_unclear_consent_is_a_bad_row_naming_line_and_column(tmp_path: Path) -> None:
    rows = [row("P000"), row("P001"), row("P002")]
    path = tmp_path / "clinical.csv"
    path.write_text(_with_consent(rows, {"P001": "maybe"}))
    data = load_site_data(path, SYNTHETIC_RISK, consent=ConsentRules())
    assert data.ids == ["P000", "P002"]
    [skip] = data.skipped
    assert (skip.line, skip.column) == (3, "consent") and "yes or no" in skip.reason
    with pytest.raises(DataError, match=r"clinical\.csv: line 3, column 'consent'"):
        load_site_data(path, SYNTHETIC_RISK, strict=True, consent=ConsentRules())


def test_withdrawn_list_drops_listed_patients(tmp_path: Path) -> None:
    from medfed.client.consent import load_consent_rules

    path = tmp_path / "clinical.csv"
    path.write_text(csv_text([row(f"P{i:03d}") for i in range(5)]))
    (tmp_path / "withdrawn.txt").write_text("P003\nP000\nP999\n")
    rules = load_consent_rules(tmp_path, "consent", "withdrawn.txt")
    data = load_site_data(path, SYNTHETIC_RISK, consent=rules)
    assert data.ids == ["P001", "P002", "P004"]
    assert data.consent.by_list == 2 and data.consent.listed_not_found == 1
    report = data.consent.to_report()
    assert report["withdrawn"] == 2 and report["withdrawn_list"].endswith("withdrawn.txt")


def _heart_rows(tmp_path: Path) -> tuple[list[dict[str, str]], list[str]]:
    from importlib.resources import files

    source = files("medfed.simulations") / "data" / "uci-heart-disease" / "cleveland.csv"
    rows = list(csv.DictReader(io.StringIO(source.read_text(encoding="utf-8"))))
    return rows, list(rows[0])


def test_rows_without_ids_match_the_file_without_the_withdrawn_rows(tmp_path: Path) -> None:
    """UCI files have no patient id: row ids must not shift when withdrawn rows are dropped."""
    rows, header = _heart_rows(tmp_path)
    withdrawn = {3, 10, 11, 150}
    with_col = tmp_path / "with.csv"
    _write_rows(
        with_col,
        [{**r, "consent": "no" if i in withdrawn else "yes"} for i, r in enumerate(rows)],
        [*header, "consent"],
    )
    without = tmp_path / "without.csv"
    _write_rows(without, [r for i, r in enumerate(rows) if i not in withdrawn], header)
    a = load_site_data(with_col, HEART_DISEASE_RISK, consent=ConsentRules())
    b = load_site_data(without, HEART_DISEASE_RISK)
    assert a.consent.withdrawn == 4 and b.consent.withdrawn == 0
    assert a.ids == b.ids
    assert np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y)
    (a_train, a_test), (b_train, b_test) = (split_train_test(d, 0.34, 42) for d in (a, b))
    assert a_train.ids == b_train.ids and a_test.ids == b_test.ids


def test_withdrawn_list_without_patient_ids_fails_closed(tmp_path: Path) -> None:
    from medfed.client.consent import load_consent_rules

    rows, header = _heart_rows(tmp_path)
    path = tmp_path / "clinical.csv"
    _write_rows(path, rows, header)
    (tmp_path / "withdrawn.txt").write_text("row-5\n")
    rules = load_consent_rules(tmp_path, "consent", "withdrawn.txt")
    with pytest.raises(DataError, match=r"no patient id column .* 'consent' column instead"):
        load_site_data(path, HEART_DISEASE_RISK, consent=rules)


# -- a site's DP update ------------------------------------------------------------------------
def _site_with(
    tmp_path: Path, name: str, source: Path, rows: list[dict], header: list[str]
) -> Site:
    site_dir = tmp_path / name
    shutil.copytree(source, site_dir)
    _write_rows(site_dir / "clinical.csv", rows, header)
    write_policy(site_dir / POLICY_NAME, SitePolicy(site_id=name, epsilon_budget=10.0))
    return Site(site_dir)


def _extra_patients(base: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """New patients unlike the others (old, high blood pressure, all positive)."""
    return [
        {**base[i], "patient_id": f"W{i:03d}", "age": "95", "systolic_bp": "240", "outcome": "1"}
        for i in range(n)
    ]


def _train(site: Site, settings: RunSettings) -> tuple[list[np.ndarray], dict]:
    torch.manual_seed(1234)
    weights = get_weights(build_model("logreg", SYNTHETIC_RISK.num_features, seed=42))
    new, n, metrics = site.train_round(settings, "run-c", 1, weights)
    return new, {"n": n, **metrics}


@pytest.fixture
def consent_settings(tmp_path: Path) -> RunSettings:
    return RunSettings(
        data_root=str(tmp_path), out_dir=str(tmp_path / "out"), num_rounds=2, batch_size=16
    )


def test_withdrawn_patients_do_not_influence_the_update(
    tmp_path: Path, generated_site: Path, consent_settings: RunSettings
) -> None:
    base = _read_rows(generated_site / "clinical.csv")
    header = list(base[0])
    extra = _extra_patients(base, 12)
    # Withdrawn patients spread through the file: at the start, in the middle, at the end;
    # half by the consent column, half by the withdrawn list.
    mixed = [*extra[:4], *base[:150], *extra[4:8], *base[150:], *extra[8:]]
    by_column = {r["patient_id"] for r in extra[::2]}
    by_list = {r["patient_id"] for r in extra[1::2]}
    flagged = [{**r, "consent": "no" if r["patient_id"] in by_column else "yes"} for r in mixed]

    clean = _site_with(tmp_path, "clean", generated_site, base, header)
    withdrawn = _site_with(tmp_path, "withdrawn", generated_site, flagged, [*header, "consent"])
    (withdrawn.data_dir / "withdrawn.txt").write_text("\n".join(sorted(by_list)) + "\n")
    consenting = _site_with(
        tmp_path,
        "consenting",
        generated_site,
        [{**r, "consent": "yes"} for r in mixed],
        [*header, "consent"],
    )

    clean_w, clean_m = _train(clean, consent_settings)
    withdrawn_w, withdrawn_m = _train(withdrawn, consent_settings)
    consenting_w, _ = _train(consenting, consent_settings)

    assert all(np.array_equal(a, b) for a, b in zip(clean_w, withdrawn_w, strict=True))
    assert clean_m["n"] == withdrawn_m["n"]
    assert clean_m["noise-multiplier"] == withdrawn_m["noise-multiplier"]
    [clean_entry] = read_ledger(clean.ledger_path)
    [withdrawn_entry] = read_ledger(withdrawn.ledger_path)
    assert clean_entry.dataset_fingerprint == withdrawn_entry.dataset_fingerprint
    assert clean_entry.num_samples == withdrawn_entry.num_samples
    # The control: the same rows, consenting, change the update.
    assert not all(np.array_equal(a, b) for a, b in zip(clean_w, consenting_w, strict=True))

    report = json.loads((withdrawn.data_dir / DATA_REPORT_NAME).read_text())
    assert report["consent"]["withdrawn"] == 12
    assert report["consent"]["withdrawn_by_consent_column"] == 6
    assert report["consent"]["withdrawn_by_list"] == 6
    assert report["used"] == len(base)


def test_withdrawn_patients_are_not_evaluated(
    tmp_path: Path, generated_site: Path, consent_settings: RunSettings
) -> None:
    base = _read_rows(generated_site / "clinical.csv")
    header = list(base[0])
    flagged = [*base, *({**r, "consent": "no"} for r in _extra_patients(base, 20))]
    clean = _site_with(tmp_path, "clean", generated_site, base, header)
    withdrawn = _site_with(
        tmp_path,
        "withdrawn",
        generated_site,
        [{"consent": "yes", **r} for r in flagged],
        [*header, "consent"],
    )
    rng = np.random.default_rng(7)
    zero = get_weights(build_model("logreg", SYNTHETIC_RISK.num_features, seed=7))
    weights = [rng.normal(size=w.shape).astype(w.dtype) for w in zero]
    clean_loss, clean_n, clean_metrics = clean.evaluate(consent_settings, weights)
    loss, n, metrics = withdrawn.evaluate(consent_settings, weights)
    assert (loss, n) == (clean_loss, clean_n) and abs(metrics["auc"] - 0.5) > 0.05
    assert {**metrics, "site-id": "clean"} == clean_metrics


def test_unreadable_withdrawn_list_declines(
    tmp_path: Path, generated_site: Path, consent_settings: RunSettings
) -> None:
    base = _read_rows(generated_site / "clinical.csv")
    site = _site_with(tmp_path, "h", generated_site, base, list(base[0]))
    (site.data_dir / "withdrawn.txt").write_bytes(b"\xff\xfe\x00")
    decision = site.decide(consent_settings, "run-c", 1)
    assert not decision.accept and "withdrawn list is not UTF-8" in decision.reason


# -- imaging -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xray_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("xray-consent")
    (site,) = generate_imaging_sites("xray", 1, root, seed=5, patients_per_site=12, image_size=32)
    return site


def _patients(site: Path) -> list[str]:
    return sorted({r["PatientID"] for r in _read_rows(site / "labels.csv")})


def test_imaging_withdrawal_by_list_and_labels_column(tmp_path: Path, xray_site: Path) -> None:
    from medfed.client.consent import load_consent_rules

    site = tmp_path / "site"
    shutil.copytree(xray_site, site)
    patients = _patients(site)
    rows = _read_rows(site / "labels.csv")
    header = [*rows[0], "consent"]
    _write_rows(
        site / "labels.csv",
        [{**r, "consent": "no" if r["PatientID"] == patients[0] else "yes"} for r in rows],
        header,
    )
    (site / "withdrawn.txt").write_text(f"{patients[1]}\n{patients[2]}\n")
    rules = load_consent_rules(site, "consent", "withdrawn.txt")
    data = load_imaging_data(site, SYNTHETIC_XRAY, use_cache=False, consent=rules)
    assert set(data.ids) == set(patients[3:])
    assert data.consent.by_column == 1 and data.consent.by_list == 2
    assert not data.quarantined  # withdrawn images are not "quarantined": they are not read on
    labels = read_labels(site / "labels.csv")
    assert patients[0] in labels.withdrawn_patients and patients[0] not in labels.by_patient


def test_deidentification_carries_withdrawal(tmp_path: Path, xray_site: Path) -> None:
    """The withdrawn list is rewritten with the pseudonyms the de-identified DICOM carry."""
    from medfed.client.consent import load_consent_rules

    site = tmp_path / "site"
    shutil.copytree(xray_site, site)
    patients = _patients(site)
    (site / "withdrawn.txt").write_text(f"{patients[0]}\n{patients[5]}\n")
    out = tmp_path / "deid"
    deidentify_tree(site, out, b"k" * 32)
    listed = read_withdrawn_list(out / "withdrawn.txt")
    assert len(listed) == 2 and not listed & set(patients)
    rules = load_consent_rules(out, "consent", "withdrawn.txt")
    data = load_imaging_data(out, SYNTHETIC_XRAY, use_cache=False, consent=rules)
    assert data.consent.by_list == 2 and data.patients == len(patients) - 2
