"""Build an audit folder as a federation writes it, without training: for audit tests.

Sites sign real ledger entries (with epsilons replayed by the real accountant), the
coordinator signs real round records anchoring the sites' ledger heads; only the model
hashes are stand-ins. ``decline`` puts declined rounds in one site's ledger.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.common.ledger import LedgerEntry, append_entry
from medfed.common.privacy import Spend, epsilon_of
from medfed.common.secagg.identity import Roster, generate_identity, public_key_bytes
from medfed.server.round_log import (
    COORDINATOR_PUBLIC_NAME,
    ROUND_LOG_NAME,
    RoundAttestation,
    append_round,
)

DELTA = 1e-5
BUDGET = 10.0
SPEND = Spend(1.1, 0.05, 20)
FINGERPRINT = "f" * 64
EVIDENCE = {
    "poisson_sampling": True,
    "sampler": "UniformWithReplacementSampler",
    "noise_secure_rng": False,
    "noise_generator": "torch default generator (Mersenne Twister), Opacus secure_mode off",
    "batchnorm_layers": 0,
    "module_validator": "Opacus ModuleValidator: no errors",
    "normalisation": "features: fixed public clinical ranges from the task schema",
    "train_test_patient_overlap": 0,
    "min_cohort": 20,
}


@dataclass
class Trail:
    root: Path
    site_keys: dict[str, Ed25519PrivateKey]
    coordinator: Ed25519PrivateKey
    decline: dict[str, set[int]] = field(default_factory=dict)

    def ledger(self, site: str) -> Path:
        return self.root / "ledgers" / f"{site}.jsonl"

    @property
    def rounds(self) -> Path:
        return self.root / ROUND_LOG_NAME


def model_hash(server_round: int) -> str:
    return hashlib.sha256(f"model after round {server_round}".encode()).hexdigest()


def build_trail(
    root: Path, sites: int = 3, rounds: int = 10, decline: dict[str, set[int]] | None = None
) -> Trail:
    """Write roster.json, coordinator.pub.pem, ledgers/ and rounds.jsonl under ``root``."""
    names = [f"hospital-{chr(97 + i)}" for i in range(sites)]
    trail = Trail(root, {n: generate_identity() for n in names}, generate_identity())
    trail.decline = decline or {}
    roster = Roster(
        {i: public_key_bytes(trail.site_keys[n]) for i, n in enumerate(names)},
        dict(enumerate(names)),
    )
    roster.save(root / "roster.json")
    pem = trail.coordinator.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (root / COORDINATOR_PUBLIC_NAME).write_bytes(pem)
    history: dict[str, list[Spend]] = {n: [] for n in names}
    for server_round in range(1, rounds + 1):
        anchors, participants, declined = {}, [], {}
        for name in names:
            if server_round in trail.decline.get(name, set()):
                written = _decline(trail, name, server_round, history[name])
                declined[name] = written.reason
                anchors[name] = {"decision": "decline"}
            else:
                history[name].append(SPEND)
                written = _train(trail, name, server_round, history[name])
                participants.append(name)
                anchors[name] = {"decision": "accept", "train_entry": written.entry_hash}
            length = sum(1 for _ in trail.ledger(name).open())
            anchors[name].update(ledger_length=length, ledger_head=written.entry_hash)
        append_round(
            trail.rounds,
            RoundAttestation(
                run_id="run-1",
                flower_run_id="123",
                round=server_round,
                status="aggregated",
                participants=participants,
                declined=declined,
                dropped=[],
                sites=anchors,
                secure_aggregation="medfed",
                model_sha256_in=model_hash(server_round - 1),
                model_sha256=model_hash(server_round),
                timestamp="2026-11-30T10:00:00Z",
            ),
            trail.coordinator,
        )
    return trail


def entry(
    site: str, server_round: int, kind: str = "train", epsilon: float = 0.0, spend: Spend = SPEND
) -> LedgerEntry:
    train = kind == "train"
    return LedgerEntry(
        kind=kind,  # type: ignore[arg-type]
        site_id=site,
        run_id="run-1",
        round=server_round,
        dataset_fingerprint=FINGERPRINT if train else "",
        accountant="rdp",
        noise_multiplier=spend.noise_multiplier if train else 0.0,
        sample_rate=spend.sample_rate if train else 0.0,
        steps=spend.steps if train else 0,
        max_grad_norm=1.0 if train else 0.0,
        delta=DELTA if train else 0.0,
        epsilon=epsilon,
        num_samples=400 if train else 0,
        samples_per_patient=1,
        reason="" if train else "site policy: maintenance window",
        timestamp="2026-11-30T10:00:00+00:00",
        epsilon_budget=BUDGET,
        model_sha256_in=model_hash(server_round - 1) if train else "",
        evidence=dict(EVIDENCE) if train else {},
    )


def _train(trail: Trail, site: str, server_round: int, history: list[Spend]) -> LedgerEntry:
    made = entry(site, server_round, epsilon=epsilon_of(history, DELTA))
    return append_entry(trail.ledger(site), made, trail.site_keys[site])


def _decline(trail: Trail, site: str, server_round: int, history: list[Spend]) -> LedgerEntry:
    made = entry(site, server_round, kind="decline", epsilon=epsilon_of(history, DELTA))
    return append_entry(trail.ledger(site), made, trail.site_keys[site])
