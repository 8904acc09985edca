"""Patient consent: which records a site may use at all.

A site's data may carry a consent column (``consent`` by default, set in ``site.toml``)
and the site may keep a list of patients who withdrew (``withdrawn.txt`` beside the data,
one patient id per line, ``#`` comments). A withdrawn patient's record is dropped as soon
as the file is parsed: before its cells are validated, the train/test split, the dataset
fingerprint, training and evaluation. (DICOM is excluded right after its headers are
read; its pixels have then been decoded into the site's local image cache like any
image's, and nothing uses them.) Only the count is kept, so an excluded patient leaves
no trace in the model, the ledger or any report beyond "n withdrawn".

A consent cell that is neither a yes nor a no is not guessed at: the row is not used
(fail closed) and is reported as a bad row with its line, like any other invalid cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONSENT_COLUMN = "consent"
DEFAULT_WITHDRAWN_LIST = "withdrawn.txt"
CONSENT_GIVEN = frozenset({"yes", "y", "true", "1", "given"})
CONSENT_WITHDRAWN = frozenset({"no", "n", "false", "0", "withdrawn", "refused"})


class ConsentError(ValueError):
    """The withdrawn list cannot be read or cannot be honoured; the site will not train."""


@dataclass(frozen=True)
class ConsentRules:
    """What excludes a patient: a consent column and a set of withdrawn patient ids.

    Parameters
    ----------
    column : str or None
        Header of the consent column; a file without it has no per-row consent. None:
        no consent column is read (the input is not a site's training data).
    withdrawn : frozenset of str
        Patient ids from the withdrawn list.
    withdrawn_source : Path or None
        The list's file, for reports; None when the site has no list.
    """

    column: str | None = DEFAULT_CONSENT_COLUMN
    withdrawn: frozenset[str] = frozenset()
    withdrawn_source: Path | None = None

    def require_ids(self, id_column: str | None, data_file: Path) -> None:
        """A withdrawn list needs patient ids; without them withdrawal cannot be honoured."""
        if self.withdrawn and id_column is None:
            raise ConsentError(
                f"{self.withdrawn_source}: lists withdrawn patients but {data_file} has no "
                f"patient id column to match them; record withdrawal in a '{self.column}' "
                "column instead"
            )


@dataclass
class ConsentCount:
    """How many records consent rules excluded, by rule, and list ids not in the data."""

    by_column: int = 0
    by_list: int = 0
    listed_not_found: int = 0
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def withdrawn(self) -> int:
        return self.by_column + self.by_list

    def to_report(self) -> dict[str, object]:
        """The site-local report's consent section: counts only, never who."""
        return {
            "withdrawn": self.withdrawn,
            "withdrawn_by_consent_column": self.by_column,
            "withdrawn_by_list": self.by_list,
            "withdrawn_listed_not_in_data": self.listed_not_found,
            **self.sources,
        }


def read_withdrawn_list(path: Path) -> frozenset[str]:
    """Patient ids in a withdrawn list (one per line; blank lines and ``#`` comments skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConsentError(f"{path}: withdrawn list is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise ConsentError(f"{path}: cannot read the withdrawn list ({exc})") from None
    ids = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return frozenset(i for i in ids if i)


def load_consent_rules(
    data_dir: Path,
    column: str = DEFAULT_CONSENT_COLUMN,
    withdrawn_list: str = DEFAULT_WITHDRAWN_LIST,
) -> ConsentRules:
    """The site's rules: its consent column and, when the file exists, its withdrawn list."""
    path = Path(data_dir) / withdrawn_list
    if not path.exists():
        return ConsentRules(column=column)
    return ConsentRules(column=column, withdrawn=read_withdrawn_list(path), withdrawn_source=path)


def consent_of(raw: object) -> bool | None:
    """True when a consent cell says yes, False when no, None when it says neither."""
    text = str(raw).strip().lower()
    if text in CONSENT_GIVEN:
        return True
    if text in CONSENT_WITHDRAWN:
        return False
    return None
