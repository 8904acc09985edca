"""The fixed wording of a model card: intended use, provenance and limitations per task.

Kept apart from :mod:`medfed.server.model_card`, which computes everything else from a
run record, so that the claims a card makes are easy to review in one place. Nothing
here is computed; each sentence holds for every run of its task on its dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Where the UCI files come from (the same attribution as medfed.simulations.heart_disease,
#: which the server must not import: simulations depend on the server, not the reverse).
HEART_DISEASE_PROVENANCE = (
    "UCI Machine Learning Repository, Heart Disease data set (Janosi, Steinbrunn, "
    "Pfisterer, Detrano, 1988), doi:10.24432/C52P4X, licensed CC BY 4.0. Four "
    "institutions, one file each: Cleveland Clinic Foundation (303 records), Hungarian "
    "Institute of Cardiology, Budapest (294), University Hospitals of Zurich and Basel "
    "(123), V.A. Medical Center, Long Beach (200). Values as in the processed UCI files; "
    "only the header and the missing-value marker were normalised."
)


@dataclass(frozen=True)
class TaskText:
    """What a card says, for one (task, dataset), about use, data and limitations."""

    purpose: str
    intended: tuple[str, ...]
    out_of_scope: tuple[str, ...]
    provenance: str
    limitations: tuple[str, ...] = field(default=())


_NOT_A_DEVICE = (
    "Diagnosis, screening or any decision about an individual patient: this model is not "
    "a medical device and has no regulatory clearance (CE marking, FDA or similar)."
)
_SYNTHETIC_ONLY = (
    "Any clinical use, or any conclusion about real patients: the training data are "
    "fictional, so these metrics say nothing about performance on real patients."
)
_SYNTHETIC_LIMIT = (
    "Synthetic data: fictional patients from medfed's generator, whose relationships were "
    "chosen by its authors. The metrics show that the federated DP pipeline learns what "
    "the generator put in, not that a model would work in a hospital."
)
_DEMO = "Demonstration and testing of medfed's federated, differentially private training"

_TEXTS: dict[tuple[str, str], TaskText] = {
    ("risk", "heart-disease"): TaskText(
        purpose="Probability of coronary artery disease (UCI `num` > 0: more than 50% "
        "narrowing of a major vessel at angiography) from 13 routine clinical attributes.",
        intended=(
            "Research on federated, differentially private learning across hospitals, on "
            "a public benchmark with real patients (FLamby's Fed-Heart-Disease split).",
            "Evaluation of decision support: an input to a clinician's judgment, next to "
            "the usual work-up, after local validation.",
        ),
        out_of_scope=(
            _NOT_A_DEVICE,
            "Populations unlike the four 1988 cohorts of patients referred for "
            "angiography (e.g. screening of the general population, women and younger "
            "patients, who are few in the data, other countries or eras).",
            "Inputs measured or coded differently from the processed UCI files (units, "
            "chest-pain or ECG coding, how a missing value is marked).",
        ),
        provenance=HEART_DISEASE_PROVENANCE,
        limitations=(
            "Small data: 920 patients in four cohorts from 1988; each hospital's test "
            "split holds a few dozen to about a hundred patients, so every per-site and "
            "per-group figure is uncertain (no confidence intervals are given).",
            "Few women: 194 of 920 patients (10 of 123 in Switzerland, 6 of 200 at the "
            "V.A.); figures for women rest on few patients and, outside Cleveland and "
            "Hungary, on almost none.",
            "Case mix differs sharply between hospitals: Switzerland has 8 patients "
            "without disease among 123, so its AUC and specificity rest on a handful of "
            "negatives.",
            "Missing values differ by hospital (ca and thal are nearly always missing "
            "outside Cleveland; cholesterol 0 means not measured in the Swiss and V.A. "
            "files); they are filled with public defaults and flagged, not imputed.",
            "The UCI files carry no patient identifier: one row is taken to be one "
            "patient (the unit of privacy), and a repeated patient cannot be detected.",
            "Referred patients with angiography (verification bias): not a screening "
            "population, and the outcome definition is the 1988 one.",
        ),
    ),
    ("risk", "synthetic"): TaskText(
        purpose="Probability of a binary disease outcome from age, sex, BMI, family "
        "history, smoking and systolic blood pressure (synthetic hospitals).",
        intended=(f"{_DEMO} on synthetic hospitals whose patients are fictional.",),
        out_of_scope=(_SYNTHETIC_ONLY, _NOT_A_DEVICE),
        provenance="Synthetic hospitals generated by medfed.simulations.synthetic from the "
        "run's seed: fictional patients, no real record.",
        limitations=(_SYNTHETIC_LIMIT,),
    ),
    ("rehab", "synthetic"): TaskText(
        purpose="Rehabilitation progress score (0-100) from age, sex, treatment time and "
        "severity (synthetic hospitals; a regression).",
        intended=(f"{_DEMO} on synthetic hospitals whose patients are fictional.",),
        out_of_scope=(_SYNTHETIC_ONLY, _NOT_A_DEVICE),
        provenance="Synthetic hospitals generated by medfed.simulations.synthetic from the "
        "run's seed: fictional patients, no real record.",
        limitations=(_SYNTHETIC_LIMIT,),
    ),
    ("xray", "synthetic"): TaskText(
        purpose="Whether a chest radiograph (DICOM) shows a nodule (synthetic images).",
        intended=(f"{_DEMO} on synthetic DICOM radiographs of fictional patients.",),
        out_of_scope=(_SYNTHETIC_ONLY, _NOT_A_DEVICE, "Reading real radiographs."),
        provenance="Synthetic DICOM studies generated by medfed.simulations.synthetic_imaging "
        "from the run's seed (simulated scanners, fictional patients).",
        limitations=(_SYNTHETIC_LIMIT,),
    ),
    ("ct", "synthetic"): TaskText(
        purpose="Whether a chest CT volume (DICOM series) shows a lesion (synthetic images).",
        intended=(f"{_DEMO} on synthetic DICOM CT series of fictional patients.",),
        out_of_scope=(_SYNTHETIC_ONLY, _NOT_A_DEVICE, "Reading real CT examinations."),
        provenance="Synthetic DICOM series generated by medfed.simulations.synthetic_imaging "
        "from the run's seed (simulated scanners, fictional patients).",
        limitations=(_SYNTHETIC_LIMIT,),
    ),
}


def task_text(task: str, dataset: str) -> TaskText:
    """The fixed wording for ``task`` on ``dataset`` (a cautious default for others)."""
    known = _TEXTS.get((task, dataset))
    if known is not None:
        return known
    return TaskText(
        purpose=f"Task {task!r} on dataset {dataset!r}.",
        intended=("Research on federated, differentially private learning.",),
        out_of_scope=(_NOT_A_DEVICE, "Any use without validation on the intended population."),
        provenance=f"Dataset {dataset!r}: provenance not recorded by medfed.",
        limitations=("No task-specific limitations are on file for this task and dataset.",),
    )


#: What the DP guarantee of a run does not cover, whatever its settings (cf. the audit
#: report's statement, medfed.audit.statements, which reads the signed ledgers).
NOT_COVERED = (
    "Evaluation metrics (loss, AUC, accuracy, per site, overall and per group) are "
    "released without DP noise; each site releases them only over at least its minimum "
    "cohort, which limits but does not bound what they reveal.",
    "Sample counts: each site's number of training and test records travels in the clear.",
    "Inference from the final model beyond what the DP bound limits: the bound caps what "
    "can be learnt about one patient, not population-level information.",
    "Malicious sites: a site can poison the model or misstate its own ledger; signatures "
    "prove who wrote an entry, not that the site ran the code it attests.",
    "The DP noise and Poisson sampling draws come from torch's default (non-cryptographic) "
    "generator: medfed runs Opacus with secure_mode off. The proof assumes truly random "
    "draws.",
)

#: What each secure-aggregation protocol protects, and what it leaves open.
SECAGG_WORDS: dict[str, tuple[str, str]] = {
    "medfed": (
        "The coordinator sees only the masked sum of the sites' updates (pairwise "
        "ChaCha20 masks from X25519 keys signed by each site's identity key and checked "
        "against the roster; Shamir shares for dropouts).",
        "Secure aggregation assumes an honest-but-curious coordinator: one colluding with "
        "all but one site, or lying about which sites survived a round, is not covered.",
    ),
    "flower-secagg+": (
        "Flower 1.42 SecAgg+ (for comparison): the coordinator receives masked updates "
        "and unmasks only their sum.",
        "Flower 1.42 SecAgg+ as configured does not authenticate key-agreement keys and "
        "expands masks from a 32-bit-folded seed with numpy's RandomState: a malicious "
        "coordinator can read individual updates.",
    ),
    "off": (
        "None: the coordinator saw each site's DP update in the clear.",
        "Secure aggregation was off: only each site's DP noise protects its update from "
        "the coordinator.",
    ),
}
