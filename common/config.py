"""Run settings shared by the coordinator and the sites.

The coordinator reads them from Flower's run config (``[tool.flwr.app.config]`` or the
values `medfed simulate` passes) and sends the parts a site needs with every round; the
site checks them against its own policy before it trains. Validation happens on load:
wrong types, out-of-range values and unknown keys are errors that name the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medfed.common.subgroups import (
    check_age_edges,
    check_attributes,
    parse_age_bands,
    parse_attributes,
)
from medfed.common.tasks import get_task_spec

#: ``medfed simulate`` writes fresh identities for every run: the roster in the data root,
#: each site's Ed25519 key in its data directory.
SIM_ROSTER_NAME = "roster.json"
SIM_IDENTITY_NAME = "site-identity.pem"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, out of range or unknown."""


class RunSettings(BaseModel):
    """Everything a federated run is configured with.

    Parameters
    ----------
    task : {"risk", "rehab", "xray", "ct"}
        Binary disease-risk classification or rehabilitation-progress regression from
        a clinical CSV; nodule detection on radiographs or lesion detection on CT
        volumes from the site's DICOM.
    dataset : {"synthetic", "heart-disease"}
        Which CSV schema the sites hold.
    model : {"logreg", "mlp", "cnn2d", "cnn3d"}
        Linear model or a small MLP for the CSV tasks (a regressor for ``rehab``); a
        2D CNN for ``xray``, a 3D CNN for ``ct``.
    num_rounds : int
        Planned federated rounds; the sites calibrate their noise over all of them.
    min_sites : int
        Fewest sites that must accept a round for it to run (at least 2, since secure
        aggregation of a single update would reveal it).
    epsilon, delta : float
        Target (epsilon, delta) that this run may spend at each site over all planned
        rounds; each site also checks its lifetime budget.
    local_epochs : int
        Passes over the site's training set per round (in expectation, under Poisson
        sampling).
    batch_size : int
        Expected batch size; the sampling rate is ``batch_size / n`` at each site.
    learning_rate : float
        SGD learning rate at the sites.
    max_grad_norm : float
        Per-sample gradient clipping norm.
    seed : int
        Seed for model initialisation and the sites' train/test splits.
    test_fraction : float
        Share of each site's patients held out for evaluation.
    data_root : str
        Simulation only: folder holding ``site-<i>`` data directories.
    out_dir : str
        Where the coordinator writes run.json, checkpoints and progress events.
    secure_agg : {"medfed", "flower", "off"}
        How site updates are combined: medfed's secure aggregation (authenticated keys,
        masks from ChaCha20; the default), Flower 1.42's SecAgg+ (kept for comparison),
        or plain FedAvg of unmasked updates. Each site's policy says which it accepts.
    secagg_timeout : float
        Seconds each secure-aggregation stage (and evaluation) waits for replies.
    train_timeout : float
        Seconds the coordinator waits for sites to train and return their (masked)
        update, under medfed secure aggregation or none (Flower's SecAgg+ uses
        ``secagg_timeout`` for every stage).
    ask_timeout : float
        Seconds the coordinator waits for sites to answer "will you train this round?";
        longer, because a site's first message also starts its ClientApp.
    secagg_threshold : float
        Share of a site's neighbours needed to unmask (SecAgg+ reconstruction threshold).
    max_weight : float
        Largest sample count a site may report (SecAgg+ weight quantisation bound).
    secagg_clip : float
        medfed secure aggregation: each coordinate of a site's update (new weights minus
        the global model) is clipped to [-clip, clip] before fixed-point encoding.
    secagg_roster : str
        medfed secure aggregation: the consortium roster (site id -> Ed25519 identity
        key) the coordinator checks key bundles against; empty means
        ``<data_root>/roster.json``, which ``medfed simulate`` writes afresh for every
        run. Sites in a deployment read their own copy from their node config.
    samples_per_patient : int
        Imaging: most samples (studies/images) one patient contributes. 1 makes DP
        protect patients directly; k > 1 is recorded in the ledger, and a patient's
        protection is then that of a group of k samples.
    run_name : str
        The run's medfed id (0 to 64 characters of ``A-Z a-z 0-9 . _ -``): the key of
        every site's ledger entries and of its once-per-run noise calibration, and the
        ``run_id`` in run.json. Empty means Flower's run id, which is new for every
        Flower run; a named run keeps its id when the coordinator is restarted (see
        :meth:`medfed_run_id`).
    coordinator_key : str
        The coordinator's Ed25519 key that signs its per-round records
        (``<out_dir>/rounds.jsonl``); empty means ``<data_root>/coordinator-identity.pem``,
        created on first use. Kept out of ``out_dir``, which is handed to auditors.
    resume : bool
        Continue the run recorded in ``<out_dir>/run.json`` after the last round whose
        checkpoint verifies, instead of starting at round 1. Needs ``run_name``, and
        every other setting except ``num_rounds`` (which may only stay or shrink) must
        be what the run was started with. Sites never train a round of the run twice.
    fairness_groups : str
        Comma-separated subgroup attributes each site evaluates the global model by on
        its test split (``"sex,age"``; empty turns fairness evaluation off): binary or
        categorical columns of the task's schema, or ``age`` in ``age_bands``. Groups
        under a site's minimum cohort are withheld (see :mod:`medfed.client.fairness`).
    age_bands : str
        Comma-separated band edges in whole years: ``"50,65"`` gives <50, 50-64, 65+.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    task: Literal["risk", "rehab", "xray", "ct"] = "risk"
    dataset: Literal["synthetic", "heart-disease"] = "synthetic"
    model: Literal["logreg", "mlp", "cnn2d", "cnn3d"] = "logreg"
    num_rounds: int = Field(3, ge=1, le=1000)
    min_sites: int = Field(2, ge=2)
    epsilon: float = Field(3.0, gt=0, le=100)
    delta: float = Field(1e-5, gt=0, lt=1)
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(0.5, gt=0, le=100)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    test_fraction: float = Field(0.25, gt=0, lt=1)
    data_root: str = "medfed-data/synthetic-risk"
    out_dir: str = "medfed-runs/latest"
    secure_agg: Literal["medfed", "flower", "off"] = "medfed"
    secagg_timeout: float = Field(60.0, gt=0)
    train_timeout: float = Field(600.0, gt=0)
    ask_timeout: float = Field(300.0, gt=0)
    secagg_threshold: float = Field(0.66, gt=0, le=1)
    max_weight: float = Field(100000.0, gt=1)
    samples_per_patient: int = Field(1, ge=1, le=100)
    secagg_clip: float = Field(4.0, gt=0, le=1e6)
    secagg_roster: str = ""
    run_name: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9._-]*$")
    coordinator_key: str = ""
    resume: bool = False
    fairness_groups: str = "sex,age"
    age_bands: str = "50,65"

    @model_validator(mode="after")
    def _task_matches_dataset(self) -> RunSettings:
        spec = get_task_spec(self.task, self.dataset)
        if self.model not in spec.models:
            raise ValueError(
                f"model {self.model!r} does not fit task {self.task!r} "
                f"(expected one of {', '.join(spec.models)})"
            )
        return self

    @model_validator(mode="after")
    def _resume_needs_a_name(self) -> RunSettings:
        if self.resume and not self.run_name:
            raise ValueError(
                "'resume' needs the run's 'run-name': the sites key their ledgers by it, "
                "and a fresh Flower run id would make them spend the run's epsilon again"
            )
        return self

    @model_validator(mode="after")
    def _fairness_groups_fit_the_task(self) -> RunSettings:
        spec = get_task_spec(self.task, self.dataset)
        check_attributes(spec, self.fairness_attributes())
        check_age_edges(spec, self.age_band_edges())
        return self

    def fairness_attributes(self) -> tuple[str, ...]:
        """The subgroup attributes, in order; empty when fairness evaluation is off."""
        return parse_attributes(self.fairness_groups)

    def age_band_edges(self) -> tuple[int, ...]:
        """The age band edges in years (``"50,65"`` -> ``(50, 65)``)."""
        return parse_age_bands(self.age_bands)

    def medfed_run_id(self, flower_run_id: int | str) -> str:
        """The run id sites key their ledgers by: ``run_name``, else Flower's run id.

        The coordinator records it as run.json's ``run_id``. Secure aggregation binds its
        keys to Flower's own run id instead, which is fresh for every Flower run.
        """
        return self.run_name or str(flower_run_id)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Build settings from a Flower run config (keys use hyphens)."""
        values = {k.replace("-", "_"): v for k, v in run_config.items()}
        return cls.from_mapping(values, hyphenate=True)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], hyphenate: bool = False) -> RunSettings:
        """Validate ``values``; raise ConfigError naming every bad key.

        ``hyphenate`` names keys as Flower's run config spells them (``num-rounds``).
        """
        try:
            return cls(**dict(values))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, "run config", hyphenate)) from None
        except ValueError as exc:
            raise ConfigError(f"run config: {exc}") from None

    def roster_path(self) -> Path:
        """The coordinator's roster file: ``secagg_roster``, else the simulation's."""
        return Path(self.secagg_roster or Path(self.data_root) / SIM_ROSTER_NAME)

    def to_flower(self) -> dict[str, Any]:
        """Return the settings as a Flower run config (hyphenated keys)."""
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}


def _describe(exc: ValidationError, where: str, hyphenate: bool = False) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        if hyphenate:
            key = key.replace("_", "-")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif not err["loc"]:
            # A check across keys: its message names them; the input is the whole config.
            parts.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            parts.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
    return f"{where}: " + "; ".join(parts)


def describe_validation_error(exc: ValidationError, where: str) -> str:
    """One-line description of a pydantic error, naming each bad key and ``where``."""
    return _describe(exc, where)
