"""Synthetic hospitals for the clinical ``risk`` and ``rehab`` tasks.

Every site draws its patients from its own population (age mix, sex mix, smoking,
BMI, blood pressure, treatment length, severity), but the *outcome mechanisms* are
shared by all sites and known exactly:

- ``outcome`` (0/1) follows one logistic model, :data:`TRUE_RISK_MODEL`, on centred and
  scaled features (:data:`RISK_FEATURE_SCALING`)::

      logit P(outcome = 1) = intercept
                             + age            * (age - 55) / 10
                             + sex            * sex                   (1 = male)
                             + bmi            * (bmi - 27) / 5
                             + family_history * family_history
                             + smoking        * smoking
                             + systolic_bp    * (systolic_bp - 130) / 20

  The model is evaluated on the values *as written to the CSV* (rounded and clipped),
  so it is the exact data-generating model of the file. Sites differ in prevalence only
  through covariate shift (an elderly site has more positives than a young one).

- ``progress`` (0-100) follows one linear model, :data:`TRUE_REHAB_MODEL`, plus
  Gaussian noise, clipped to [0, 100]::

      progress = intercept
                 + treatment_time * (treatment_time - 16)
                 + severity       * (severity - 5)
                 + age            * (age - 55)
                 + sex            * sex
                 + Normal(0, noise_sd)

The data are entirely fictional (no real patient is behind any row) and are generated
with ``numpy.random.default_rng`` seeded from ``(seed, site index)``: the same
``(num_sites, seed, size_scale)`` always gives byte-identical files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medfed.common.atomic import atomic_write_text
from medfed.common.tasks import SYNTHETIC_REHAB, SYNTHETIC_RISK

CSV_NAME = "clinical.csv"
MODEL_JSON = "synthetic_model.json"

#: Columns of every synthetic ``clinical.csv``, in file order.
COLUMNS: tuple[str, ...] = (
    "patient_id",
    "age",
    "sex",
    "bmi",
    "family_history",
    "smoking",
    "systolic_bp",
    "outcome",
    "treatment_time",
    "severity",
    "progress",
)

#: One site letter per site (patient ids are ``MRN-<letter><6 digits>``).
MAX_SITES = 26

#: Centre and scale of each risk feature inside the logit: term = (x - centre) / scale.
RISK_FEATURE_SCALING: dict[str, tuple[float, float]] = {
    "age": (55.0, 10.0),
    "sex": (0.0, 1.0),
    "bmi": (27.0, 5.0),
    "family_history": (0.0, 1.0),
    "smoking": (0.0, 1.0),
    "systolic_bp": (130.0, 20.0),
}

#: The one logistic model behind ``outcome`` at every site: the intercept and one
#: coefficient per feature, applied to ``(x - centre) / scale`` from
#: :data:`RISK_FEATURE_SCALING` (so ``age`` is per decade over 55, ``bmi`` per 5 kg/m^2
#: over 27, ``systolic_bp`` per 20 mm Hg over 130; binary features are used as 0/1).
TRUE_RISK_MODEL: dict[str, float] = {
    "intercept": -1.95,
    "age": 0.35,
    "sex": 0.50,
    "bmi": 0.40,
    "family_history": 0.95,
    "smoking": 1.00,
    "systolic_bp": 0.45,
}

#: Centre of each rehab feature inside the linear progress model.
REHAB_FEATURE_CENTRES: dict[str, float] = {
    "treatment_time": 16.0,
    "severity": 5.0,
    "age": 55.0,
    "sex": 0.0,
}

#: The one linear model behind ``progress`` (points on the 0-100 scale): intercept,
#: one slope per centred feature (:data:`REHAB_FEATURE_CENTRES`; treatment_time in
#: weeks, severity in grades, age in years), and the sd of the Gaussian noise.
TRUE_REHAB_MODEL: dict[str, float] = {
    "intercept": 50.0,
    "treatment_time": 1.2,
    "severity": -4.0,
    "age": -0.25,
    "sex": 1.0,
    "noise_sd": 8.0,
}

_RISK_COLS = {c.name: c for c in SYNTHETIC_RISK.columns}
_REHAB_COLS = {c.name: c for c in SYNTHETIC_REHAB.columns}


def _bounds(name: str) -> tuple[float, float]:
    col = _RISK_COLS.get(name) or _REHAB_COLS.get(name)
    if col is None:
        col = SYNTHETIC_REHAB.target if name == "progress" else SYNTHETIC_RISK.target
    return float(col.low), float(col.high)


@dataclass(frozen=True)
class SiteProfile:
    """The patient population of one synthetic hospital.

    Parameters
    ----------
    name : str
        Fictional institution name.
    letter : str
        Site letter used in patient ids (``MRN-<letter><6 digits>``).
    size : int
        Number of patients at ``size_scale`` 1.0.
    age_mean, age_sd : float
        Age distribution (normal, truncated to the public range 18-100).
    female_share : float
        Share of female patients.
    smoking_rate : float
        Share of current smokers.
    bmi_mean, bmi_sd : float
        BMI distribution (log-normal with this mean and about this sd, truncated to
        12-70; the mean rises slightly with age).
    family_history_rate : float
        Share with a family history of the disease.
    sbp_base : float
        Mean systolic blood pressure (mm Hg) of a 55-year-old woman with BMI 27; blood
        pressure also rises with age, BMI and male sex.
    treatment_weeks_mean : float
        Mean rehab treatment length in weeks at median severity.
    severity_mean : float
        Mean rehab severity grade (1-10).
    """

    name: str
    letter: str
    size: int
    age_mean: float
    age_sd: float
    female_share: float
    smoking_rate: float
    bmi_mean: float
    bmi_sd: float
    family_history_rate: float
    sbp_base: float
    treatment_weeks_mean: float
    severity_mean: float


# The first three sites are fixed archetypes (the default three-hospital scenario):
# a young urban hospital, a general hospital, and an elderly regional hospital.
_ARCHETYPES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="Harbourside Urban Medical Center",
        letter="A",
        size=1500,
        age_mean=40.0,
        age_sd=14.0,
        female_share=0.56,
        smoking_rate=0.28,
        bmi_mean=25.8,
        bmi_sd=4.8,
        family_history_rate=0.20,
        sbp_base=124.0,
        treatment_weeks_mean=12.0,
        severity_mean=4.2,
    ),
    SiteProfile(
        name="Northfield General Hospital",
        letter="B",
        size=2500,
        age_mean=55.0,
        age_sd=15.0,
        female_share=0.52,
        smoking_rate=0.21,
        bmi_mean=27.4,
        bmi_sd=5.2,
        family_history_rate=0.25,
        sbp_base=127.0,
        treatment_weeks_mean=16.0,
        severity_mean=5.0,
    ),
    SiteProfile(
        name="Valley Regional Health Centre",
        letter="C",
        size=4000,
        age_mean=66.0,
        age_sd=11.0,
        female_share=0.47,
        smoking_rate=0.16,
        bmi_mean=28.6,
        bmi_sd=5.4,
        family_history_rate=0.30,
        sbp_base=129.0,
        treatment_weeks_mean=20.0,
        severity_mean=5.8,
    ),
)

_PLACES = (
    "Lakeshore",
    "Eastbrook",
    "Pinecrest",
    "Westmoor",
    "Silverton",
    "Redcliff",
    "Brightwater",
    "Oakridge",
    "Stonebridge",
    "Highgate",
    "Millbrook",
    "Fairhaven",
    "Ashford",
    "Kingsport",
    "Elmwood",
    "Greystone",
    "Marlow",
    "Thornbury",
    "Wyndham",
    "Clearwater",
    "Birchfield",
    "Hollins",
    "Juniper Bay",
)
_KINDS = (
    "Community Hospital",
    "University Hospital",
    "Regional Medical Centre",
    "General Hospital",
    "District Hospital",
)

_MIN_SIZE, _MAX_SIZE = 800, 5000
_MIN_ROWS = 20  # floor for small size_scale, so every site has both outcome classes
_ID_SPACE = 900_000  # 6-digit numbers 100000..999999


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_num_sites(num_sites: int) -> None:
    if (
        isinstance(num_sites, bool)
        or not isinstance(num_sites, (int, np.integer))
        or not 1 <= num_sites <= MAX_SITES
    ):
        raise ValueError(
            f"num_sites must be an integer between 1 and {MAX_SITES}, got {num_sites!r}"
        )


def site_profiles(num_sites: int, seed: int = 42) -> list[SiteProfile]:
    """Return the populations of ``num_sites`` synthetic hospitals.

    Sites 0-2 are fixed archetypes (young urban, general, elderly regional; 1500, 2500
    and 4000 patients), so the default three-site scenario does not depend on ``seed``.
    Further sites are drawn from ``seed``: each sits somewhere on the young-urban to
    elderly-regional axis, with 800-5000 patients.
    """
    _check_num_sites(num_sites)
    _check_seed(seed)
    profiles = list(_ARCHETYPES[:num_sites])
    rng = np.random.default_rng([int(seed), 0x5EED_0F11])
    places = rng.permutation(len(_PLACES))
    for i in range(len(profiles), num_sites):
        t = float(rng.uniform(0.0, 1.0))  # 0 = young urban, 1 = elderly regional
        size = math.exp(rng.uniform(math.log(_MIN_SIZE), math.log(_MAX_SIZE)))
        place = _PLACES[int(places[(i - 3) % len(_PLACES)])]
        kind = _KINDS[int(rng.integers(len(_KINDS)))]
        profiles.append(
            SiteProfile(
                name=f"{place} {kind}",
                letter=chr(ord("A") + i),
                size=int(min(_MAX_SIZE, max(_MIN_SIZE, round(size)))),
                age_mean=round(38.0 + 30.0 * t + float(rng.normal(0.0, 2.0)), 1),
                age_sd=round(float(rng.uniform(11.0, 15.0)), 1),
                female_share=round(float(rng.uniform(0.45, 0.58)), 3),
                smoking_rate=round(
                    float(np.clip(0.28 - 0.12 * t + rng.normal(0.0, 0.02), 0.08, 0.4)), 3
                ),
                bmi_mean=round(25.8 + 2.8 * t + float(rng.normal(0.0, 0.5)), 1),
                bmi_sd=round(float(rng.uniform(4.6, 5.6)), 1),
                family_history_rate=round(float(rng.uniform(0.18, 0.32)), 3),
                sbp_base=round(124.0 + 5.0 * t + float(rng.normal(0.0, 2.0)), 1),
                treatment_weeks_mean=round(12.0 + 8.0 * t + float(rng.normal(0, 1.0)), 1),
                severity_mean=round(4.2 + 1.6 * t + float(rng.normal(0.0, 0.3)), 2),
            )
        )
    return profiles


def true_risk_logit(values: Mapping[str, np.ndarray]) -> np.ndarray:
    """Logit of P(outcome = 1) under :data:`TRUE_RISK_MODEL` for raw feature columns."""
    logit = np.full(np.shape(values["age"]), TRUE_RISK_MODEL["intercept"], dtype=float)
    for name, (centre, scale) in RISK_FEATURE_SCALING.items():
        x = np.asarray(values[name], dtype=float)
        logit = logit + TRUE_RISK_MODEL[name] * (x - centre) / scale
    return logit


def true_rehab_mean(values: Mapping[str, np.ndarray]) -> np.ndarray:
    """Expected progress (before noise and clipping) under :data:`TRUE_REHAB_MODEL`."""
    mean = np.full(np.shape(values["age"]), TRUE_REHAB_MODEL["intercept"], dtype=float)
    for name, centre in REHAB_FEATURE_CENTRES.items():
        x = np.asarray(values[name], dtype=float)
        mean = mean + TRUE_REHAB_MODEL[name] * (x - centre)
    return mean


def _truncated_normal(
    rng: np.random.Generator,
    mean: float | np.ndarray,
    sd: float,
    low: float,
    high: float,
    n: int,
) -> np.ndarray:
    """Normal draws redrawn until inside [low, high] (deterministic given ``rng``)."""
    mean = np.broadcast_to(np.asarray(mean, dtype=float), (n,))
    out = mean + sd * rng.standard_normal(n)
    bad = (out < low) | (out > high)
    while bad.any():
        out[bad] = mean[bad] + sd * rng.standard_normal(int(bad.sum()))
        bad = (out < low) | (out > high)
    return out


def _round1(x: np.ndarray, name: str) -> np.ndarray:
    low, high = _bounds(name)
    # Adding 0.0 turns a rounded -0.0 into 0.0, so the file never holds "-0.0".
    return np.clip(np.round(x, 1), low, high) + 0.0


def _round_int(x: np.ndarray, name: str) -> np.ndarray:
    low, high = _bounds(name)
    return np.clip(np.rint(x), low, high).astype(np.int64)


def _site_rows(
    profile: SiteProfile, index: int, n: int, seed: int
) -> dict[str, np.ndarray | list[str]]:
    """Draw the ``n`` patients of one site."""
    rng = np.random.default_rng([int(seed), index])
    p = profile
    numbers = rng.choice(_ID_SPACE, size=n, replace=False) + 100_000
    ids = [f"MRN-{p.letter}{int(k):06d}" for k in numbers]

    age = _round_int(_truncated_normal(rng, p.age_mean, p.age_sd, 18, 100, n), "age")
    sex = (rng.random(n) >= p.female_share).astype(np.int64)
    bmi_mean = p.bmi_mean + 0.03 * (age - p.age_mean)
    # BMI is right-skewed: log-normal with the profile's mean and (approximate) sd.
    log_sd = p.bmi_sd / p.bmi_mean
    log_bmi = _truncated_normal(
        rng, np.log(bmi_mean) - log_sd**2 / 2, log_sd, math.log(12), math.log(70), n
    )
    bmi = _round1(np.exp(log_bmi), "bmi")
    family_history = (rng.random(n) < p.family_history_rate).astype(np.int64)
    smoke_logit = math.log(p.smoking_rate / (1 - p.smoking_rate)) + 0.3 * (sex - 0.5)
    smoking = (rng.random(n) < 1 / (1 + np.exp(-smoke_logit))).astype(np.int64)
    sbp = (
        p.sbp_base
        + 0.5 * (age - 55)
        + 0.8 * (bmi - 27)
        + 4.0 * sex
        + 3.0 * smoking
        + rng.normal(0.0, 14.0, n)
    )
    systolic_bp = _round_int(sbp, "systolic_bp")

    cols = {
        "age": age,
        "sex": sex,
        "bmi": bmi,
        "family_history": family_history,
        "smoking": smoking,
        "systolic_bp": systolic_bp,
    }
    prob = 1.0 / (1.0 + np.exp(-true_risk_logit(cols)))
    outcome = (rng.random(n) < prob).astype(np.int64)

    sev_p = (p.severity_mean - 1.0) / 9.0
    severity = _round_int(1 + rng.binomial(9, sev_p, n), "severity")
    weeks_mean = p.treatment_weeks_mean * (0.7 + 0.06 * severity)
    treatment_time = _round1(rng.gamma(2.5, weeks_mean / 2.5), "treatment_time")
    rehab_cols = {
        "treatment_time": treatment_time,
        "severity": severity,
        "age": age,
        "sex": sex,
    }
    noise = rng.normal(0.0, TRUE_REHAB_MODEL["noise_sd"], n)
    progress = _round1(true_rehab_mean(rehab_cols) + noise, "progress")

    return {
        "patient_id": ids,
        **cols,
        "outcome": outcome,
        "treatment_time": treatment_time,
        "severity": severity,
        "progress": progress,
    }


_FLOAT_COLUMNS = frozenset({"bmi", "treatment_time", "progress"})


def _to_csv(rows: Mapping[str, np.ndarray | list[str]]) -> str:
    formatted = []
    for name in COLUMNS:
        values = rows[name]
        if name == "patient_id":
            formatted.append(list(values))
        elif name in _FLOAT_COLUMNS:
            formatted.append([f"{float(v):.1f}" for v in values])
        else:
            formatted.append([str(int(v)) for v in values])
    lines = [",".join(COLUMNS)]
    lines.extend(",".join(cells) for cells in zip(*formatted, strict=True))
    return "\n".join(lines) + "\n"


def generate_risk_sites(
    num_sites: int,
    out_dir: Path,
    seed: int = 42,
    size_scale: float = 1.0,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``out_dir/site-<i>/clinical.csv`` for ``num_sites`` synthetic hospitals.

    Also writes ``out_dir/synthetic_model.json`` with the true risk and rehab models,
    the seed, the size scale and every site's profile and observed summary. Each site
    holds ``round(profile.size * size_scale)`` patients (at least 20). Returns the site
    directories in site order.

    Raises
    ------
    ValueError
        If ``num_sites`` is not in 1..26, ``size_scale`` is not a positive finite
        number, or ``seed`` is not a non-negative integer.
    FileExistsError
        If a target file already exists and ``overwrite`` is false; nothing is written.
    """
    _check_num_sites(num_sites)
    _check_seed(seed)
    if (
        isinstance(size_scale, bool)
        or not isinstance(size_scale, (int, float, np.integer, np.floating))
        or not math.isfinite(size_scale)
        or size_scale <= 0
    ):
        raise ValueError(f"size_scale must be a positive number, got {size_scale!r}")
    out_dir = Path(out_dir)
    profiles = site_profiles(num_sites, seed)
    sizes = [max(_MIN_ROWS, round(p.size * float(size_scale))) for p in profiles]
    if max(sizes) > _ID_SPACE:
        raise ValueError(
            f"size_scale={size_scale!r} gives {max(sizes)} patients at one site; "
            f"at most {_ID_SPACE} fit the 6-digit patient id space"
        )

    site_dirs = [out_dir / f"site-{i}" for i in range(num_sites)]
    targets = [d / CSV_NAME for d in site_dirs] + [out_dir / MODEL_JSON]
    if not overwrite:
        existing = [str(t) for t in targets if t.exists()]
        if existing:
            raise FileExistsError(
                "refusing to overwrite existing synthetic data: "
                + ", ".join(existing)
                + " (pass overwrite=True to replace it)"
            )

    sites_meta = []
    for i, (profile, n, site_dir) in enumerate(zip(profiles, sizes, site_dirs, strict=True)):
        rows = _site_rows(profile, i, n, seed)
        atomic_write_text(site_dir / CSV_NAME, _to_csv(rows))
        sites_meta.append(
            {
                "site": site_dir.name,
                "profile": asdict(profile),
                "patients": n,
                "observed": {
                    "prevalence": round(float(np.mean(rows["outcome"])), 4),
                    "mean_age": round(float(np.mean(rows["age"])), 2),
                    "male_share": round(float(np.mean(rows["sex"])), 4),
                    "mean_progress": round(float(np.mean(rows["progress"])), 2),
                },
            }
        )

    model = {
        "description": (
            "Fictional patients; outcome ~ Bernoulli(sigmoid(logit)) with one logistic "
            "model shared by all sites, progress = clip(linear model + noise, 0, 100)."
        ),
        "seed": int(seed),
        "size_scale": float(size_scale),
        "num_sites": int(num_sites),
        "columns": list(COLUMNS),
        "risk_model": {
            "link": "logit",
            "formula": (
                "logit P(outcome=1) = intercept + sum_f coef[f] * (x_f - centre_f) / scale_f"
            ),
            "coefficients": dict(TRUE_RISK_MODEL),
            "scaling": {k: {"centre": c, "scale": s} for k, (c, s) in RISK_FEATURE_SCALING.items()},
        },
        "rehab_model": {
            "formula": (
                "progress = clip(intercept + sum_f coef[f] * (x_f - centre_f) "
                "+ Normal(0, noise_sd), 0, 100), rounded to 0.1"
            ),
            "coefficients": {k: v for k, v in TRUE_REHAB_MODEL.items() if k != "noise_sd"},
            "centres": dict(REHAB_FEATURE_CENTRES),
            "noise_sd": TRUE_REHAB_MODEL["noise_sd"],
        },
        "sites": sites_meta,
    }
    atomic_write_text(out_dir / MODEL_JSON, json.dumps(model, indent=2) + "\n")
    return site_dirs
