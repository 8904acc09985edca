"""One hospital site: decides whether to join a round, trains with DP-SGD, keeps its ledger.

Every decision is taken here, at the site, from the site's own policy and ledger. The
accountant is rebuilt from the ledger before every round (so epsilon composes across
rounds, runs and restarts) and the noise multiplier is calibrated from the run's target
epsilon over all planned rounds, once per run: a round of a run already in the ledger
reuses that run's recorded noise. Anything that cannot be read fails closed.

The training code, the models and the imaging loader (torch, Opacus, pydicom) are
imported by the methods that need them: each Flower message starts a fresh ClientApp
process, and most messages (the round offer, secure aggregation) need none of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.client.consent import ConsentError, ConsentRules, load_consent_rules
from medfed.client.data import (
    DataError,
    SiteData,
    fingerprint,
    load_site_data,
    split_train_test,
)
from medfed.client.policy import POLICY_NAME, PolicyError, SitePolicy, load_policy
from medfed.common.atomic import atomic_write_json
from medfed.common.config import SIM_IDENTITY_NAME, RunSettings
from medfed.common.ledger import (
    LEDGER_NAME,
    LedgerEntry,
    LedgerError,
    append_entry,
    ledger_head,
    read_ledger,
    spends_for,
)
from medfed.common.messages import (
    LEDGER_ENTRY_KEY,
    LEDGER_HEAD_KEY,
    LEDGER_LENGTH_KEY,
    SITE_ID_KEY,
    SUPPRESSED_KEY,
)
from medfed.common.privacy import (
    ACCOUNTANT,
    Spend,
    calibrate_noise,
    calibrate_noise_within,
    epsilon_of,
    steps_per_round,
)
from medfed.common.secagg.identity import generate_identity, load_identity, save_identity
from medfed.common.tasks import ImagingSpec, get_task_spec

if TYPE_CHECKING:
    from medfed.client.imaging_data import ImagingData

DATA_REPORT_NAME = "data_report.json"


def consent_rules_of(site_dir: Path, policy: SitePolicy | None = None) -> ConsentRules:
    """The consent rules ``policy`` (else the site's own policy, else the defaults) names.

    Used by the site's rounds and by every tool that reads a site's data outside a round
    (``medfed data check``, the empirical audit, the pooled reference), so none uses a
    patient the site's training may not. DataError when the withdrawn list is unreadable.
    """
    if policy is None:
        try:
            policy = load_policy(Path(site_dir) / POLICY_NAME)
        except PolicyError:
            policy = None
    try:
        if policy is None:
            return load_consent_rules(site_dir)
        return load_consent_rules(site_dir, policy.consent_column, policy.withdrawn_list)
    except ConsentError as exc:
        raise DataError(str(exc)) from None


class SiteRefusal(RuntimeError):
    """The site will not train this round; the message says why."""


@dataclass(frozen=True)
class Decision:
    """A site's answer to "will you train round r of run X with these settings?"."""

    site_id: str
    accept: bool
    reason: str
    epsilon_spent: float
    epsilon_after: float
    epsilon_budget: float
    noise_multiplier: float
    records_used: int
    records_skipped: int
    train_records: int = 0

    def to_config(self) -> dict[str, bool | float | int | str]:
        return {
            "site-id": self.site_id,
            "accept": self.accept,
            "reason": self.reason,
            "epsilon-spent": self.epsilon_spent,
            "epsilon-after": self.epsilon_after,
            "epsilon-budget": self.epsilon_budget,
            "noise-multiplier": self.noise_multiplier,
            "records-used": self.records_used,
            "records-skipped": self.records_skipped,
            "train-records": self.train_records,
        }


@dataclass
class _Prepared:
    policy: SitePolicy
    train: SiteData | ImagingData
    test: SiteData | ImagingData
    all_data: SiteData | ImagingData
    fingerprint: str
    entries: list[LedgerEntry]
    key: Ed25519PrivateKey

    @property
    def samples_per_patient(self) -> int:
        return getattr(self.all_data, "samples_per_patient", 1)


class Site:
    """A hospital's data directory: ``site.toml``, ``ledger.jsonl`` and the data.

    The data is ``clinical.csv`` for the tabular tasks, ``dicom/`` and ``labels.csv``
    for the imaging tasks. Ledger entries are signed with the site's Ed25519 identity
    key: ``identity_key`` (a deployment's enrolled key, which must exist), else
    ``site-identity.pem`` in the data directory, created on first use (a simulation or
    a stand-alone site). A key that cannot be read means no training (fail closed).
    """

    def __init__(self, data_dir: Path, identity_key: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.ledger_path = self.data_dir / LEDGER_NAME
        self.policy_path = self.data_dir / POLICY_NAME
        self.identity_path = Path(identity_key or self.data_dir / SIM_IDENTITY_NAME)
        self._create_key = identity_key is None

    def signing_key(self) -> Ed25519PrivateKey:
        """The key that signs this site's ledger entries; LedgerError if unusable."""
        if self._create_key and not self.identity_path.exists():
            save_identity(self.identity_path, generate_identity())
        try:
            return load_identity(self.identity_path)
        except (OSError, ValueError) as exc:
            raise LedgerError(f"cannot sign ledger entries: {exc}") from None

    def ledger_head(self) -> dict[str, int | str]:
        """The ledger's length and last hash, for the coordinator's signed round record."""
        length, head = ledger_head(read_ledger(self.ledger_path))
        return {LEDGER_LENGTH_KEY: length, LEDGER_HEAD_KEY: head}

    # -- decisions -------------------------------------------------------------------
    def decide(self, settings: RunSettings, run_id: str, server_round: int) -> Decision:
        """Whether the site trains this round, with the reason and its budget position."""
        try:
            prep = self._prepare(settings)
        except (PolicyError, DataError, LedgerError) as exc:
            return Decision(
                site_id=self._site_id_or_dir(),
                accept=False,
                reason=str(exc),
                epsilon_spent=0.0,
                epsilon_after=0.0,
                epsilon_budget=0.0,
                noise_multiplier=0.0,
                records_used=0,
                records_skipped=0,
            )
        spent = epsilon_of(spends_for(prep.entries, prep.fingerprint), prep.policy.delta)
        base = dict(
            site_id=prep.policy.site_id,
            epsilon_spent=spent,
            epsilon_budget=prep.policy.epsilon_budget,
            records_used=len(prep.all_data),
            records_skipped=len(prep.all_data.skipped),
            train_records=len(prep.train),
        )
        try:
            noise, after = self._plan(settings, prep, run_id, server_round)
        except SiteRefusal as refusal:
            return Decision(
                accept=False,
                reason=str(refusal),
                epsilon_after=spent,
                noise_multiplier=0.0,
                **base,
            )
        return Decision(accept=True, reason="", epsilon_after=after, noise_multiplier=noise, **base)

    def _plan(
        self, settings: RunSettings, prep: _Prepared, run_id: str, server_round: int
    ) -> tuple[float, float]:
        """The round's noise multiplier and the epsilon after it; SiteRefusal if declined.

        The privacy rule for restarts: a site never trains the same (medfed run id,
        round) twice. ``run_id`` is the run's name when it has one, so a coordinator that
        is restarted and resumes the run asks again under the same id: a round this site
        already trained (a ``train`` entry for this run and round, say the round that was
        interrupted) is declined with "round k of run X is already in the ledger", and
        :meth:`record_decline` writes no second entry for it. Rounds outside the planned
        ``1..num_rounds`` are declined too, so restarts never buy a run more than its
        planned rounds of releases from this site, and the run's noise is the one the
        ledger recorded for it (:meth:`_noise_for_run`), unchanged by a restart.
        """
        policy = prep.policy
        reason = policy.refusal(settings)
        if reason:
            raise SiteRefusal(reason)
        if not 1 <= server_round <= settings.num_rounds:
            raise SiteRefusal(
                f"round {server_round} is outside the planned 1..{settings.num_rounds}"
            )
        if any(
            e.kind == "train" and e.run_id == run_id and e.round == server_round
            for e in prep.entries
        ):
            raise SiteRefusal(f"round {server_round} of run {run_id} is already in the ledger")
        if len(prep.train) > settings.max_weight:
            raise SiteRefusal(f"{len(prep.train)} records exceed the run's max weight")
        noise = self._noise_for_run(settings, prep, run_id)
        if noise < policy.min_noise_multiplier:
            raise SiteRefusal(
                f"noise multiplier {noise:.3f} is below the site minimum "
                f"{policy.min_noise_multiplier:g}"
            )
        rate, steps = steps_per_round(len(prep.train), settings.batch_size, settings.local_epochs)
        history = [*spends_for(prep.entries, prep.fingerprint), Spend(noise, rate, steps)]
        after = epsilon_of(history, policy.delta)
        if after > policy.epsilon_budget:
            raise SiteRefusal(
                f"privacy budget: this round would bring epsilon to {after:.3f}, "
                f"over the site budget {policy.epsilon_budget:g} (delta {policy.delta:g})"
            )
        return noise, after

    def _noise_for_run(self, settings: RunSettings, prep: _Prepared, run_id: str) -> float:
        """The run's noise multiplier, calibrated once per run and then read from the ledger.

        It is the larger of the noise that keeps this run within the run's epsilon and
        the noise that keeps every planned round within what is left of the site's
        lifetime budget, so a site with little budget left joins the whole run with more
        noise rather than stopping half way.
        """
        for entry in prep.entries:
            if entry.kind == "train" and entry.run_id == run_id:
                return entry.noise_multiplier
        rate, steps = steps_per_round(len(prep.train), settings.batch_size, settings.local_epochs)
        total = steps * settings.num_rounds
        noise = calibrate_noise(settings.epsilon, settings.delta, rate, total)
        history = spends_for(prep.entries, prep.fingerprint)
        policy = prep.policy
        if epsilon_of([*history, Spend(noise, rate, total)], policy.delta) <= policy.epsilon_budget:
            return noise
        fitted = calibrate_noise_within(
            history,
            policy.epsilon_budget,
            policy.delta,
            rate,
            total,
            policy.max_noise_multiplier,
        )
        if fitted is None:
            spent = epsilon_of(history, policy.delta)
            raise SiteRefusal(
                f"privacy budget: epsilon {spent:.3f} of {policy.epsilon_budget:g} is spent; "
                f"{settings.num_rounds} more round(s) would need a noise multiplier above "
                f"the site maximum {policy.max_noise_multiplier:g}"
            )
        return max(noise, fitted)

    # -- training and evaluation -----------------------------------------------------
    def train_round(
        self,
        settings: RunSettings,
        run_id: str,
        server_round: int,
        weights: list[np.ndarray],
    ) -> tuple[list[np.ndarray], int, dict[str, float | int | str]]:
        """Train one round with DP-SGD and record the spend; raise SiteRefusal if declined."""
        from medfed.client.training import DPSettings, train_dp
        from medfed.common.models import build_model
        from medfed.common.params import get_weights, set_weights, weights_digest

        prep = self._prepare(settings)
        noise, _ = self._plan(settings, prep, run_id, server_round)
        spec = prep.train.spec
        model = build_model(settings.model, spec.model_input, settings.seed)
        set_weights(model, weights)
        dp = DPSettings(
            noise_multiplier=noise,
            max_grad_norm=settings.max_grad_norm,
            batch_size=settings.batch_size,
            local_epochs=settings.local_epochs,
            learning_rate=settings.learning_rate,
        )
        evidence = self._evidence(prep, spec)
        spend, loss = train_dp(model, prep.train.X, prep.train.y, spec.is_binary, dp, evidence)
        history = [*spends_for(prep.entries, prep.fingerprint), spend]
        epsilon = epsilon_of(history, prep.policy.delta)
        written = self._record(
            prep,
            run_id,
            server_round,
            spend,
            epsilon,
            settings.max_grad_norm,
            model_in=weights_digest(weights),
            evidence=evidence,
        )
        if epsilon > prep.policy.epsilon_budget * (1 + 1e-9):
            # Recorded (never under-count), but the update is not released.
            raise SiteRefusal(
                f"DP-SGD spent more than planned: epsilon {epsilon:.4f} is over the "
                f"budget {prep.policy.epsilon_budget:g}; update withheld"
            )
        metrics: dict[str, float | int | str] = {
            "site-id": prep.policy.site_id,
            "epsilon": epsilon,
            "epsilon-budget": prep.policy.epsilon_budget,
            "noise-multiplier": spend.noise_multiplier,
            "records-used": len(prep.all_data),
            "records-skipped": len(prep.all_data.skipped),
            LEDGER_ENTRY_KEY: written.entry_hash,
            LEDGER_LENGTH_KEY: len(prep.entries) + 1,
        }
        if len(prep.train) >= prep.policy.min_cohort:
            metrics["train-loss"] = loss
        return get_weights(model), len(prep.train), metrics

    def evaluate(
        self, settings: RunSettings, weights: list[np.ndarray]
    ) -> tuple[float, int, dict[str, float | int | str]]:
        """Evaluate the global model on the site's test split.

        Metrics are released only when the site's policy allows the run (the same
        check as for training: a run the site declines learns nothing from its data)
        and the test split holds at least the policy's minimum cohort; otherwise only
        the site id and the suppression reason leave. With the run's fairness groups
        set, the released metrics include per-subgroup aggregates (``fairness``, see
        :mod:`medfed.client.fairness`), each group over at least the minimum cohort.
        """
        from medfed.client.training import evaluate, predict
        from medfed.common.models import build_model
        from medfed.common.params import set_weights

        try:
            prep = self._prepare(settings)
        except (PolicyError, DataError, LedgerError) as exc:
            return 0.0, 0, {SITE_ID_KEY: self._site_id_or_dir(), SUPPRESSED_KEY: str(exc)}
        info: dict[str, float | int | str] = {"site-id": prep.policy.site_id}
        refusal = prep.policy.refusal(settings)
        if refusal:
            info[SUPPRESSED_KEY] = f"not evaluated: {refusal}"
            return 0.0, 0, info
        spec = prep.test.spec
        model = build_model(settings.model, spec.model_input, settings.seed)
        set_weights(model, weights)
        n = len(prep.test)
        if n < prep.policy.min_cohort:
            info[SUPPRESSED_KEY] = f"test split of {n} is below the minimum cohort"
            return 0.0, 0, info
        outputs = predict(model, prep.test.X)
        metrics = evaluate(
            model, prep.test.X, prep.test.y, spec.is_binary, spec.target_span, outputs
        )
        attributes = settings.fairness_attributes()
        if attributes:
            # Per-subgroup aggregates; groups under the minimum cohort are withheld.
            from medfed.client.fairness import fairness_metrics

            info.update(
                fairness_metrics(
                    outputs,
                    prep.test,
                    attributes,
                    settings.age_band_edges(),
                    prep.policy.min_cohort,
                )
            )
        return metrics.pop("loss"), n, {**info, **metrics}

    # -- internals -------------------------------------------------------------------
    def _prepare(self, settings: RunSettings) -> _Prepared:
        policy = load_policy(self.policy_path)
        spec = get_task_spec(settings.task, settings.dataset)
        if isinstance(spec, ImagingSpec):
            return self._prepare_imaging(settings, policy, spec)
        data = load_site_data(
            self.data_dir / spec.csv_name,
            spec,
            strict=policy.on_bad_row == "error",
            consent=consent_rules_of(self.data_dir, policy),
        )
        self._write_data_report(data)
        train, test = split_train_test(data, settings.test_fraction, settings.seed)
        entries = read_ledger(self.ledger_path)
        return _Prepared(policy, train, test, data, fingerprint(train), entries, self.signing_key())

    def _prepare_imaging(
        self, settings: RunSettings, policy: SitePolicy, spec: ImagingSpec
    ) -> _Prepared:
        from medfed.client.imaging_data import (
            imaging_fingerprint,
            imaging_report,
            load_imaging_data,
            split_by_patient,
        )

        data = load_imaging_data(
            self.data_dir,
            spec,
            settings.samples_per_patient,
            consent=consent_rules_of(self.data_dir, policy),
        )
        self._write_report(imaging_report(data, self.data_dir))
        if policy.require_deidentified and not all(data.identity_removed):
            missing = data.identity_removed.count(False)
            raise DataError(
                f"site policy requires de-identified data: {missing} of {len(data)} "
                "sample(s) lack PatientIdentityRemoved=YES (run `medfed data deid`)"
            )
        train, test = split_by_patient(data, settings.test_fraction, settings.seed)
        entries = read_ledger(self.ledger_path)
        return _Prepared(
            policy, train, test, data, imaging_fingerprint(train), entries, self.signing_key()
        )

    @staticmethod
    def _evidence(prep: _Prepared, spec: object) -> dict[str, str | int | float | bool]:
        """What the site attests besides the mechanism: split, scaling, cohort rule."""
        overlap = len(set(prep.train.ids) & set(prep.test.ids))
        scaling = (
            "images: fixed VOI window and size from the task definition"
            if isinstance(spec, ImagingSpec)
            else "features: fixed public clinical ranges from the task schema"
        )
        return {
            "train_test_patient_overlap": overlap,
            "split": "by patient, seeded, before training",
            "normalisation": f"{scaling}; nothing fitted on site data",
            "min_cohort": prep.policy.min_cohort,
        }

    def _record(
        self,
        prep: _Prepared,
        run_id: str,
        server_round: int,
        spend: Spend,
        epsilon: float,
        max_grad_norm: float,
        model_in: str,
        evidence: dict[str, str | int | float | bool],
    ) -> LedgerEntry:
        entry = LedgerEntry(
            kind="train",
            site_id=prep.policy.site_id,
            run_id=run_id,
            round=server_round,
            dataset_fingerprint=prep.fingerprint,
            accountant=ACCOUNTANT,
            noise_multiplier=spend.noise_multiplier,
            sample_rate=spend.sample_rate,
            steps=spend.steps,
            max_grad_norm=max_grad_norm,
            delta=prep.policy.delta,
            epsilon=epsilon,
            num_samples=len(prep.train),
            samples_per_patient=prep.samples_per_patient,
            reason="",
            timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
            epsilon_budget=prep.policy.epsilon_budget,
            model_sha256_in=model_in,
            evidence=evidence,
        )
        return append_entry(self.ledger_path, entry, prep.key)

    def record_decline(self, decision: Decision, run_id: str, server_round: int) -> None:
        """Write a declined round to the ledger (when the ledger itself is readable).

        Nothing is written when the ledger already holds an entry for this run and round
        (a round trained before a coordinator restart, or declined before): one entry
        per (run, round).
        """
        try:
            entries = read_ledger(self.ledger_path)
            key = self.signing_key()
        except LedgerError:
            return
        if any(e.run_id == run_id and e.round == server_round for e in entries):
            return
        entry = LedgerEntry(
            kind="decline",
            site_id=decision.site_id,
            run_id=run_id,
            round=server_round,
            dataset_fingerprint="",
            accountant=ACCOUNTANT,
            noise_multiplier=0.0,
            sample_rate=0.0,
            steps=0,
            max_grad_norm=0.0,
            delta=0.0,
            epsilon=decision.epsilon_spent,
            num_samples=0,
            samples_per_patient=1,
            reason=decision.reason,
            timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
            epsilon_budget=decision.epsilon_budget,
        )
        append_entry(self.ledger_path, entry, key)

    def _write_data_report(self, data: SiteData) -> None:
        """Site-local record of used and skipped rows (stays at the site)."""
        self._write_report(
            {
                "file": str(data.path),
                "rows": data.total_rows,
                "used": len(data),
                "skipped": len(data.skipped),
                "consent": data.consent.to_report(),
                "skipped_rows": [
                    {"line": s.line, "column": s.column, "reason": s.reason} for s in data.skipped
                ],
            }
        )

    def _write_report(self, report: dict) -> None:
        path = self.data_dir / DATA_REPORT_NAME
        try:
            if path.exists() and json.loads(path.read_text()) == report:
                return
        except (OSError, ValueError):
            pass
        atomic_write_json(path, report)

    def _site_id_or_dir(self) -> str:
        try:
            return load_policy(self.policy_path).site_id
        except PolicyError:
            return self.data_dir.name
