"""A site's clinical CSV: validation, encoding, train/test split and fingerprint.

Rows that fail validation are skipped and *counted*, each with the file line and column
that was wrong; missing columns or an unreadable file stop the site with a
:class:`DataError`. One row is one patient: a repeated patient id is skipped, so that
DP-SGD's unit of privacy is a patient and not a record.

pandas and scikit-learn are imported where they are used: the ClientApp imports this
module in the fresh process each Flower message starts, most of which never read the CSV.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medfed.client.consent import ConsentCount, ConsentError, ConsentRules, consent_of
from medfed.common.tasks import Column, TaskSpec

if TYPE_CHECKING:
    import pandas as pd

HEADER_LINES = 1


class DataError(ValueError):
    """The site's data cannot be used at all (missing file or columns, no valid rows)."""


class MissingColumnsError(DataError):
    """Required columns are absent from the CSV; ``missing`` names them."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class SkippedRow:
    """A row left out of training, with the file line, column and reason.

    ``reason`` may quote the offending cell and stays at the site (data_report.json);
    ``problem`` says what was wrong without the value, for messages that can reach the
    coordinator (a decline reason).
    """

    line: int
    column: str
    reason: str
    problem: str = ""

    def __str__(self) -> str:
        return f"line {self.line}, column '{self.column}': {self.reason}"

    def public(self) -> str:
        """Line, column and problem, never the patient's value."""
        return f"line {self.line}, column '{self.column}': {self.problem or self.reason}"


@dataclass
class SiteData:
    """Validated, encoded records of one site.

    ``X`` holds features scaled by public ranges, ``y`` the target (0/1 for risk, the
    progress score scaled to [0, 1] for rehab), ``ids`` the patient identifiers (which
    never leave the site).
    """

    spec: TaskSpec
    path: Path
    ids: list[str]
    X: np.ndarray
    y: np.ndarray
    total_rows: int
    skipped: list[SkippedRow] = field(default_factory=list)
    consent: ConsentCount = field(default_factory=ConsentCount)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> SiteData:
        return SiteData(
            spec=self.spec,
            path=self.path,
            ids=[self.ids[i] for i in index],
            X=self.X[index],
            y=self.y[index],
            total_rows=len(index),
        )


def load_site_data(
    path: Path, spec: TaskSpec, strict: bool = False, consent: ConsentRules | None = None
) -> SiteData:
    """Read and validate ``path`` against ``spec``.

    With ``strict`` the first bad row raises DataError instead of being skipped. Rows of
    patients who withdrew (``consent``) are dropped before any of their cells is read
    and only counted; the data then equals that of the file without those rows, row ids
    of a file without a patient id column included.
    """
    data = read_clinical_csv(path, spec, strict=strict, consent=consent)
    if not len(data):
        raise DataError(
            f"{path}: no valid rows ({len(data.skipped)} skipped; first: "
            f"{data.skipped[0].public() if data.skipped else 'file is empty'})"
        )
    return data


def read_clinical_csv(
    path: Path,
    spec: TaskSpec,
    strict: bool = False,
    with_target: bool = True,
    consent: ConsentRules | None = None,
) -> SiteData:
    """Validate and encode every row of ``path``; unlike :func:`load_site_data` the
    result may hold no rows (each invalid one is in ``skipped``).

    ``with_target=False`` reads patients to predict for, with the same checks of every
    input cell as training: the target column is optional and never read (``y`` is
    NaN), and so is the id column (rows without one are named ``row-<line>``).
    """
    frame = _read_csv(path)
    required = spec.required_columns()
    if not with_target:
        required = [c.name for c in spec.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise MissingColumnsError(
            f"{path}: missing required column(s) {', '.join(missing)} "
            f"(found: {', '.join(frame.columns) or 'none'})",
            missing,
        )
    id_column = spec.id_column if spec.id_column in frame.columns else None
    rules = consent if consent is not None else ConsentRules(column=None)
    try:
        rules.require_ids(id_column, path)
    except ConsentError as exc:
        raise DataError(str(exc)) from None
    count = _consent_count(rules, path, frame, id_column)
    ids, rows, targets, skipped = [], [], [], []
    seen: set[str] = set()
    for i, record in enumerate(frame.to_dict("records")):
        line = i + 1 + HEADER_LINES
        if all(str(v).strip() == "" for v in record.values()):
            continue  # a blank line holds no patient; it only keeps line numbers right
        try:
            if _withdrawn(record, rules, id_column, count):
                continue
            pid = _patient_id(record, id_column, line - count.withdrawn, seen)
            features = [_encode(col, record[col.name]) for col in spec.columns]
            target = _encode_target(spec, record[spec.target.name]) if with_target else np.nan
        except _BadCell as bad:
            skip = SkippedRow(line, bad.column, bad.reason, bad.problem)
            if strict:
                raise DataError(f"{path}: {skip.public()}") from None
            skipped.append(skip)
            continue
        seen.add(pid)
        ids.append(pid)
        rows.append(np.concatenate(features))
        targets.append(target)
    return SiteData(
        spec=spec,
        path=path,
        ids=ids,
        X=np.asarray(rows, dtype=np.float32).reshape(len(rows), spec.num_features),
        y=np.asarray(targets, dtype=np.float32),
        total_rows=len(ids) + len(skipped) + count.withdrawn,
        skipped=skipped,
        consent=count,
    )


def _consent_count(
    rules: ConsentRules, path: Path, frame: pd.DataFrame, id_column: str | None
) -> ConsentCount:
    """An empty count naming the rules in force, and how many listed ids the file lacks."""
    count = ConsentCount()
    if rules.column is not None and rules.column in frame.columns:
        count.sources["consent_column"] = f"{path.name}:{rules.column}"
    if rules.withdrawn_source is not None:
        count.sources["withdrawn_list"] = str(rules.withdrawn_source)
        if id_column is not None:
            present = {str(v).strip() for v in frame[id_column]}
            count.listed_not_found = len(rules.withdrawn - present)
    return count


def _withdrawn(
    record: dict, rules: ConsentRules, id_column: str | None, count: ConsentCount
) -> bool:
    """Whether the row's patient withdrew (counted); a consent cell that is unclear is bad."""
    if id_column is not None and str(record[id_column]).strip() in rules.withdrawn:
        count.by_list += 1
        return True
    if rules.column is None or rules.column not in record:
        return False
    given = consent_of(record[rules.column])
    if given is None:
        problem = "expected a consent of yes or no; row not used"
        raise _BadCell(rules.column, problem, repr(record[rules.column]))
    if not given:
        count.by_column += 1
    return not given


def _read_csv(path: Path) -> pd.DataFrame:
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: site data file not found")
    try:
        frame = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            skipinitialspace=True,
            skip_blank_lines=False,  # keeps row i on file line i + 2
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())  # pandas' messages span lines
        raise DataError(f"{path}: not a readable CSV file ({reason})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


class _BadCell(Exception):
    def __init__(self, column: str, problem: str, value: object = None) -> None:
        reason = problem if value is None else f"{problem}, got {value}"
        super().__init__(reason)
        self.column, self.problem, self.reason = column, problem, reason


def _patient_id(record: dict, id_column: str | None, line: int, seen: set[str]) -> str:
    if id_column is None:
        return f"row-{line}"
    pid = str(record[id_column]).strip()
    if not pid:
        raise _BadCell(id_column, "empty patient id")
    if pid in seen:
        raise _BadCell(id_column, "duplicate patient id (one record per patient)")
    return pid


def _number(col: Column, raw: object) -> float | None:
    text = str(raw).strip()
    if text == "" or text.lower() in {"nan", "na", "?"}:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _BadCell(col.name, "expected a number", repr(text)) from None
    if not np.isfinite(value):
        raise _BadCell(col.name, "expected a finite number", repr(text))
    if col.zero_is_missing and value == 0:
        return None
    return value


def _checked(col: Column, raw: object) -> float | None:
    value = _number(col, raw)
    if value is None:
        if not col.nullable:
            raise _BadCell(col.name, "missing value")
        return None
    if col.kind == "categorical" and value not in col.categories:
        raise _BadCell(col.name, f"expected one of {list(col.categories)}", f"{value:g}")
    if col.kind == "binary" and value not in (0, 1):
        raise _BadCell(col.name, "expected 0 or 1", f"{value:g}")
    if not col.low <= value <= col.high:
        raise _BadCell(col.name, f"value outside [{col.low:g}, {col.high:g}]", f"{value:g}")
    return value


def _encode(col: Column, raw: object) -> np.ndarray:
    value = _checked(col, raw)
    is_missing = value is None
    if is_missing:
        value = col.fill
    if col.kind == "categorical":
        out = [1.0 if (not is_missing and value == c) else 0.0 for c in col.categories]
    elif col.kind == "binary":
        out = [float(value)]
    else:
        out = [2.0 * (value - col.low) / (col.high - col.low) - 1.0]
    if col.nullable:
        out.append(1.0 if is_missing else 0.0)
    return np.asarray(out, dtype=np.float32)


def _encode_target(spec: TaskSpec, raw: object) -> float:
    value = _checked(spec.target, raw)
    assert value is not None
    if spec.positive_above is not None:
        return float(value > spec.positive_above)
    if spec.is_binary:
        return float(value)
    return (value - spec.target.low) / (spec.target.high - spec.target.low)


def decode_target(spec: TaskSpec, y: np.ndarray) -> np.ndarray:
    """Map a scaled regression target back to its clinical units."""
    return y * (spec.target.high - spec.target.low) + spec.target.low


def split_train_test(data: SiteData, test_fraction: float, seed: int) -> tuple[SiteData, SiteData]:
    """Deterministic patient-level split (stratified for binary targets where possible).

    The split depends only on the data and ``seed``, so the training set, and with it
    the dataset fingerprint, is the same in every run.
    """
    from sklearn.model_selection import train_test_split

    order = np.argsort(np.asarray(data.ids, dtype=object).astype(str), kind="stable")
    stratify = None
    if data.spec.is_binary:
        _, counts = np.unique(data.y[order], return_counts=True)
        if len(counts) == 2 and counts.min() >= 3:
            stratify = data.y[order]
    train_idx, test_idx = train_test_split(
        order, test_size=test_fraction, random_state=seed, shuffle=True, stratify=stratify
    )
    return data.subset(np.sort(train_idx)), data.subset(np.sort(test_idx))


def fingerprint(data: SiteData) -> str:
    """SHA-256 of the training records, independent of row order."""
    h = hashlib.sha256(f"{data.spec.task}/{data.spec.dataset}".encode())
    for i in sorted(range(len(data)), key=lambda k: data.ids[k]):
        h.update(data.ids[i].encode())
        h.update(data.X[i].tobytes())
        h.update(data.y[i : i + 1].tobytes())
    return h.hexdigest()
