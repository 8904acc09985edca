"""The report's plain-word privacy statement and the threat model in force.

Every sentence is built from what the verified records show (the accountant named in
the ledgers, the sampler the sites attest, the group size k, the secure-aggregation
protocol the coordinator recorded); nothing is claimed that they do not show.
"""

from __future__ import annotations

from typing import Any

from medfed.common.ledger import LedgerEntry

NOT_COVERED = [
    "Aggregate evaluation metrics (loss, AUC, accuracy per site and overall) are released "
    "without DP noise; each is computed over at least the site's minimum cohort.",
    "Sample counts: each site's number of training records travels in the clear (it "
    "weights the average).",
    "Attacks on the final model beyond what the DP bound limits: the bound caps what any "
    "attack can learn about one patient, it does not make the model free of population-"
    "level information.",
    "Malicious sites: a site can poison the model or misstate its own ledger; signatures "
    "prove who wrote an entry, not that the site ran the code it attests.",
]


def privacy_statement(
    ledgers: dict[str, list[LedgerEntry]], protocol: str | None
) -> dict[str, Any]:
    """Summary, what is covered and what is not, in plain words."""
    spends = [e for entries in ledgers.values() for e in entries if e.kind == "train"]
    k = max((e.samples_per_patient for e in spends), default=1)
    deltas = sorted({e.delta for e in spends})
    poisson = bool(spends) and all(e.evidence.get("poisson_sampling") is True for e in spends)
    accountants = sorted({e.accountant for e in spends}) or ["none"]
    unit = (
        "one patient"
        if k == 1
        else f"one patient, who may contribute up to {k} samples: the guarantee below is "
        f"for one sample, and one patient has the (weaker) protection of a group of {k} "
        "samples (group privacy)"
    )
    summary = (
        f"Unit of privacy: {unit}. Each hospital's training is differentially private under "
        "add/remove-one adjacency (adding or removing one patient's records from that "
        f"hospital's data), at delta = {', '.join(f'{d:g}' for d in deltas) or 'n/a'} per "
        "site, with each site's epsilon as shown below. Epsilon is composed by the "
        f"{'/'.join(a.upper() for a in accountants)} accountant (Opacus) over every DP-SGD "
        "step the site took on the same dataset, across all rounds, runs and restarts."
    )
    covered = [
        "Every update a site released, and so every global checkpoint (a function of those "
        "updates only), is covered by the site's epsilon: post-processing cannot weaken it.",
        "Poisson sampling: each record joins each batch independently, as the accountant "
        "assumes (attested in every signed spend)."
        if poisson
        else "Poisson sampling is NOT shown by every spend (see the pitfall checks); the "
        "accountant's figure assumes it.",
        "Per-sample gradient clipping to the recorded norm and Gaussian noise of the "
        "recorded multiplier times that norm (Opacus DP-SGD).",
    ]
    not_covered = list(NOT_COVERED)
    if spends and not all(e.evidence.get("noise_secure_rng") is True for e in spends):
        not_covered.append(
            "The noise and the Poisson sampling draws come from a non-cryptographic "
            "generator (torch's default Mersenne Twister; Opacus secure_mode needs "
            "torchcsprng, not installed): the DP proof assumes truly random draws, which an "
            "attacker able to predict the generator could undo. See the pitfall checks."
        )
    if protocol == "off":
        not_covered.append(
            "Secure aggregation was off: the coordinator saw each site's (DP) update."
        )
    return {"summary": summary, "covered": covered, "not_covered": not_covered}


def threat_model(protocol: str | None, anchored: bool) -> dict[str, list[str]]:
    """What the run's configuration protects against, and what it does not."""
    covered = [
        "Tampering with the records: site ledgers and the coordinator's round records are "
        "hash-chained and Ed25519-signed, and checked by `medfed audit verify`."
        + ("" if anchored else " (site keys taken from the roster as found, not CA-checked)"),
        "Sites dropping out mid-round: the round completes when enough sites remain, "
        "otherwise it is aborted and recorded.",
    ]
    not_covered = [
        "A malicious site poisoning the model.",
        "Inference from the final model beyond what the DP bound limits.",
    ]
    if protocol == "medfed":
        covered.insert(
            0,
            "An honest-but-curious coordinator: it sees only the masked sum of the sites' "
            "updates (pairwise ChaCha20 masks from X25519 keys signed by each site's "
            "identity key, checked against the roster; Shamir shares for dropouts).",
        )
        not_covered += [
            "The coordinator colluding with all but one site.",
            "An actively malicious coordinator lying about which sites survived a round "
            "(no survivor-set consistency round).",
        ]
    elif protocol == "flower":
        not_covered.append(
            "Flower 1.42 SecAgg+ (as configured): key-agreement keys are not authenticated "
            "and masks come from a 32-bit-folded seed; a malicious coordinator can read "
            "updates."
        )
    else:
        not_covered.append(
            "The coordinator sees each site's update: secure aggregation was off, so only "
            "each site's DP noise protects it."
        )
    covered.append(
        "In a deployment: a network attacker (TLS from the consortium CA) and an "
        "unregistered site (Flower SuperNode authentication against the roster's keys)."
    )
    return {"covered": covered, "not_covered": not_covered}
