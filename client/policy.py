"""Site policy: what a hospital allows a federated run to do with its data.

The policy lives in ``site.toml`` in the site's data directory and is owned by the
hospital, not the coordinator. It is validated on load (types, ranges, unknown keys are
errors naming the key and the file); a missing or invalid policy means the site does
not train (fail closed).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medfed.client.consent import DEFAULT_CONSENT_COLUMN, DEFAULT_WITHDRAWN_LIST
from medfed.common.atomic import atomic_write_text
from medfed.common.config import RunSettings, describe_validation_error
from medfed.common.tasks import MODELS, TASKS

POLICY_NAME = "site.toml"


class PolicyError(ValueError):
    """The site policy is missing or invalid."""


class SitePolicy(BaseModel):
    """A hospital's rules for federated training on its data.

    Parameters
    ----------
    site_id : str
        Name the site reports to the coordinator (never a patient identifier).
    epsilon_budget : float
        Lifetime epsilon for one dataset, over every run that ever touches it.
    delta : float
        Delta at which the site states and limits its epsilon; a run may not ask for
        a larger one.
    min_noise_multiplier : float
        Smallest DP-SGD noise multiplier the site accepts.
    max_noise_multiplier : float
        When the remaining budget would need more noise than this for a whole run, the
        site declines (its update would be mostly noise).
    allowed_tasks, allowed_models : list of str
        Tasks and model families the site agrees to train.
    max_rounds_per_run : int
        Longest run the site joins.
    min_cohort : int
        Fewest patients any released metric may be computed over.
    on_bad_row : {"skip", "error"}
        Skip-and-count invalid CSV rows, or refuse to train on the first one.
    require_deidentified : bool
        Imaging: train only on DICOM that has passed de-identification (every file
        used has PatientIdentityRemoved = YES and a DeidentificationMethod, as
        `medfed data deid` writes them).
    max_samples_per_patient : int
        Imaging: the largest per-patient cap k a run may ask for; 1 means DP protects
        each patient directly.
    allowed_secure_agg : list of {"medfed", "flower", "off"}
        How the site lets its updates be combined. The default accepts only medfed's
        secure aggregation (authenticated keys, masks from a cryptographic generator);
        "flower" (Flower's SecAgg+, unauthenticated keys) and "off" (the coordinator
        sees each DP update) must be allowed explicitly.
    consent_column : str
        Column of the site's data (clinical.csv, or labels.csv for imaging) saying
        whether the patient consents (yes/no); a row saying no is excluded before any
        of its cells is validated or used. A file without the column has no per-row
        consent.
    withdrawn_list : str
        File in the data directory listing patients who withdrew (one patient id per
        line); their records are excluded before they are validated or used. Optional.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    site_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    epsilon_budget: float = Field(10.0, gt=0, le=100)
    delta: float = Field(1e-5, gt=0, lt=1)
    min_noise_multiplier: float = Field(0.3, ge=0)
    max_noise_multiplier: float = Field(20.0, gt=0, le=1000)
    allowed_tasks: list[str] = Field(default_factory=lambda: list(TASKS))
    allowed_models: list[str] = Field(default_factory=lambda: list(MODELS))
    max_rounds_per_run: int = Field(100, ge=1)
    min_cohort: int = Field(20, ge=1)
    on_bad_row: str = Field("skip", pattern="^(skip|error)$")
    require_deidentified: bool = False
    max_samples_per_patient: int = Field(1, ge=1, le=100)
    allowed_secure_agg: list[Literal["medfed", "flower", "off"]] = Field(
        default_factory=lambda: ["medfed"], min_length=1
    )
    consent_column: str = Field(DEFAULT_CONSENT_COLUMN, min_length=1, max_length=64)
    withdrawn_list: str = Field(DEFAULT_WITHDRAWN_LIST, min_length=1, pattern=r"^[^/\\]+$")

    def refusal(self, settings: RunSettings) -> str | None:
        """Why this policy forbids ``settings``, or None if it allows them."""
        if settings.task not in self.allowed_tasks:
            return f"task '{settings.task}' not allowed by site policy"
        if settings.model not in self.allowed_models:
            return f"model '{settings.model}' not allowed by site policy"
        if settings.num_rounds > self.max_rounds_per_run:
            return (
                f"{settings.num_rounds} rounds requested, site policy allows at most "
                f"{self.max_rounds_per_run} per run"
            )
        if settings.delta > self.delta:
            return f"delta {settings.delta:g} requested exceeds site policy delta {self.delta:g}"
        if settings.samples_per_patient > self.max_samples_per_patient:
            return (
                f"{settings.samples_per_patient} samples per patient requested, site policy "
                f"allows at most {self.max_samples_per_patient}"
            )
        if settings.secure_agg not in self.allowed_secure_agg:
            return (
                f"secure aggregation '{settings.secure_agg}' not allowed by site policy "
                f"(allowed: {', '.join(self.allowed_secure_agg)})"
            )
        return None


def load_policy(path: Path) -> SitePolicy:
    """Read and validate ``path``; raise PolicyError naming the file and key."""
    if not path.is_file():
        raise PolicyError(f"{path}: site policy not found (the site will not train)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{path}: cannot parse site policy: {exc}") from None
    try:
        return SitePolicy(**raw)
    except ValidationError as exc:
        raise PolicyError(describe_validation_error(exc, str(path))) from None


def write_policy(path: Path, policy: SitePolicy) -> None:
    """Write ``policy`` as TOML (atomically)."""
    lines = ["# medfed site policy: enforced by this site before every round."]
    for key, value in policy.model_dump().items():
        lines.append(f"{key} = {_toml_value(value)}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
