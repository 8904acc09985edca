"""Empirical privacy audit of a site's training pipeline: a canary-based one-run audit.

The audit follows Steinke, Nasr and Jagielski (2023), "Privacy Auditing with One (1)
Training Run" (statistics in :mod:`medfed.audit.one_run`). It runs the site's own
pipeline once, at the run's settings, with ``m`` canary records each added to the
training set independently with probability 1/2, then tries to tell from the trained
model which canaries were in. The number of right guesses gives an epsilon lower bound
at 95% confidence, reported beside the accountant's epsilon for the same training:

- with DP, a lower bound above the accountant's epsilon is a bug (in the accounting, the
  noise calibration, or the DP-SGD implementation);
- without DP (the same pipeline with the noise multiplier set to 0: Poisson sampling and
  clipping stay, only the noise goes), a bound above 0 is leakage that DP must remove.

What is the site's own: the site policy (``site.toml``, for the site id and how bad rows
are treated), the CSV loaded and encoded by :func:`~medfed.client.data.load_site_data`,
the patient-level train/test split with the run's test fraction and seed, the model
built by :func:`~medfed.common.models.build_model` from the run's seed, and DP-SGD by
:func:`~medfed.client.training.train_dp` (Opacus, Poisson sampling, per-sample
clipping, Gaussian noise) called once per round on a fresh model holding the previous
round's weights, exactly as the site trains, for ``num_rounds`` rounds of
``local_epochs``. The noise multiplier is the site's calibration,
:func:`~medfed.common.privacy.calibrate_noise` for the run's (epsilon, delta) over all
planned steps, with the sample rate of the audit's own dataset (site records plus the
canaries drawn in). The accountant's epsilon is :func:`~medfed.common.privacy.epsilon_of`
over the spends Opacus reports. Not audited: the site's lifetime-budget top-up of the
noise (a site with little budget left trains with more noise, so auditing at the run's
target is the worst case) and what happens after training (secure aggregation).

Canaries (fixed before training): fresh out-of-distribution records in pairs. Each pair
shares one point of the model's input (encoded feature) space, in a uniformly random
direction at norm :data:`CANARY_NORM` times the norm of the farthest valid record
(``sqrt(num_features)``), and the two canaries of a pair carry opposite labels (0 and 1;
for the regression task, the two ends of the scaled target range). Far outside the data,
a canary is pulled little by the site's records; within a pair, when only one canary is
drawn in, the model fits its label and the other's loss rises, which makes both guesses
easy, while pairs with both or neither drawn in pull nothing and are abstained on. The
canaries are rows of the encoded training matrix, not CSV lines (the loader would reject
their values): DP-SGD's guarantee holds for every row it is given, so they are valid
canaries for the mechanism, and the theorem allows any fixed canaries as long as each is
drawn in independently with probability 1/2.

Score: minus the trained model's loss on each canary (lower loss = guess "in"). Guesses:
the top and bottom ``k`` scores for each fraction of
:data:`~medfed.audit.one_run.DEFAULT_GUESS_FRACTIONS`, a grid fixed in advance; the best
bound is reported with the Bonferroni correction of
:func:`~medfed.audit.one_run.audit_scores`.

What to expect: the audit detects leakage only where training lets single records move
the model. At ``medfed simulate``'s defaults (about three passes of clipped SGD over a
thousand records) a record barely moves it, and even training without DP typically
gives a bound of 0 (bench/bench_empirical_audit.py measures it); the linear ``logreg``
model, with one weight per feature, cannot hold many canaries apart at all. A small site
trained for many epochs with the ``mlp`` model shows clear leakage without DP.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.audit.one_run import DEFAULT_GUESS_FRACTIONS, audit_scores
from medfed.client.data import DataError, SiteData, load_site_data, split_train_test
from medfed.client.policy import POLICY_NAME, SitePolicy, load_policy
from medfed.client.site import consent_rules_of
from medfed.common.config import RunSettings
from medfed.common.privacy import Spend, calibrate_noise, epsilon_of, steps_per_round
from medfed.common.tasks import TaskSpec, get_task_spec

#: Canaries lie at this multiple of the largest norm a valid encoded record can have.
CANARY_NORM = 2.0
DEFAULT_CANARIES = 200
#: Fewer canaries leave too few guesses for a useful bound (10 of 10 right gives 0.54).
MIN_CANARIES = 10
DEFAULT_CONFIDENCE = 0.95

CONSISTENT = "consistent"
BUG = "BUG: lower bound above the accountant's epsilon"
LEAKAGE = "leakage without DP"
NO_LEAKAGE = "no leakage detected without DP"

Progress = Callable[[str], None]


class AuditError(ValueError):
    """The audit cannot run with these settings (the message says why)."""


@dataclass(frozen=True)
class EmpiricalAuditResult:
    """Outcome of one empirical audit of one site's pipeline.

    ``canaries`` (m), ``guesses`` (r) and ``correct`` (v) are the one-run audit's
    counts; ``guesses_each_way`` is the k of the winning guess fraction (k "in" and k
    "out"). ``accountant_epsilon`` is None without DP, where no epsilon is claimed.
    ``sample_rate`` and ``steps`` are per round as Opacus recorded them (``steps`` is
    the total over all rounds).
    """

    site_id: str
    task: str
    model: str
    dp: bool
    canaries: int
    canaries_included: int
    guesses: int
    guesses_each_way: int
    correct: int
    confidence: float
    epsilon_lower_bound: float
    accountant_epsilon: float | None
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    rounds: int
    max_grad_norm: float
    train_records: int
    seed: int
    seconds: float
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Canaries:
    """The auditor's canaries: encoded features, targets and the secret inclusion bits."""

    X: np.ndarray
    y: np.ndarray
    included: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def make_canaries(spec: TaskSpec, m: int, rng: np.random.Generator) -> Canaries:
    """Draw ``m`` out-of-distribution canaries and their inclusion bits (probability 1/2).

    Canaries come in pairs at one uniformly random direction of the encoded feature
    space, scaled to ``CANARY_NORM * sqrt(num_features)``, with targets 0 and 1 (an odd
    ``m`` leaves the last canary without its twin). Inclusion is independent for every
    canary, twins included.
    """
    d = spec.num_features
    points = math.ceil(m / 2)
    directions = rng.standard_normal((points, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    X = np.repeat(CANARY_NORM * math.sqrt(d) * directions, 2, axis=0)[:m].astype(np.float32)
    y = np.tile(np.array([0.0, 1.0], dtype=np.float32), points)[:m]
    included = rng.random(m) < 0.5
    return Canaries(X=X, y=y, included=included)


def canary_scores(model: Any, canaries: Canaries, binary: bool) -> np.ndarray:
    """Minus each canary's loss under ``model``: higher means "more likely trained on"."""
    import torch
    from torch.nn import functional

    from medfed.client.training import predict

    out = torch.from_numpy(predict(model, canaries.X))
    target = torch.from_numpy(canaries.y)
    if binary:
        loss = functional.binary_cross_entropy_with_logits(out, target, reduction="none")
    else:
        loss = (out - target) ** 2
    return -loss.numpy().astype(float)


def run_empirical_audit(
    site_dir: Path,
    settings: RunSettings,
    *,
    dp: bool = True,
    canaries: int = DEFAULT_CANARIES,
    seed: int | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    progress: Progress | None = None,
) -> EmpiricalAuditResult:
    """Audit the site in ``site_dir`` training at ``settings``; see the module docstring.

    ``dp=False`` trains the same pipeline with noise multiplier 0. ``seed`` fixes the
    canaries, their inclusion and the training randomness (for tests and reruns); None
    draws a fresh seed from :mod:`secrets`, recorded in the result.

    Raises
    ------
    PolicyError
        ``site.toml`` is missing or invalid.
    DataError
        The site's CSV is missing or unreadable, or its training split is too small for
        ``canaries`` canaries (at least ``canaries / 2`` records are needed).
    AuditError
        The task is not a tabular one, or ``canaries`` is below :data:`MIN_CANARIES`.
    """
    started = time.perf_counter()
    say = progress or (lambda _message: None)
    if canaries < MIN_CANARIES:
        raise AuditError(f"the audit needs at least {MIN_CANARIES} canaries, got {canaries}")
    if seed is None:
        seed = secrets.randbits(63)
    site_dir = Path(site_dir)
    policy = load_policy(site_dir / POLICY_NAME)
    spec = get_task_spec(settings.task, settings.dataset)
    if not isinstance(spec, TaskSpec):
        raise AuditError(
            f"the empirical audit covers the tabular tasks (risk, rehab), not {settings.task!r}"
        )
    train = _site_training_split(site_dir, spec, settings, policy)
    if len(train) < canaries / 2:
        raise DataError(
            f"{train.path}: {len(train)} training records are too few for {canaries} "
            f"canaries (need at least {math.ceil(canaries / 2)}; use fewer canaries)"
        )
    rng = np.random.default_rng(seed)
    canary_set = make_canaries(spec, canaries, rng)
    torch_seed = int(rng.integers(2**62))
    X = np.concatenate([train.X, canary_set.X[canary_set.included]])
    y = np.concatenate([train.y, canary_set.y[canary_set.included]])
    say(
        f"site {policy.site_id}: {len(train)} training records + "
        f"{int(canary_set.included.sum())} of {canaries} canaries, "
        f"{settings.num_rounds} round(s), {'DP-SGD' if dp else 'no DP (noise 0)'}"
    )
    rate, steps = steps_per_round(len(X), settings.batch_size, settings.local_epochs)
    noise = (
        calibrate_noise(settings.epsilon, settings.delta, rate, steps * settings.num_rounds)
        if dp
        else 0.0
    )
    model, spends = _train_rounds(settings, spec, X, y, noise, torch_seed, say)
    accountant = epsilon_of(spends, settings.delta) if dp else None
    scores = canary_scores(model, canary_set, spec.is_binary)
    outcome = audit_scores(
        scores, canary_set.included, settings.delta, confidence, DEFAULT_GUESS_FRACTIONS
    )
    bound = outcome.epsilon_lower_bound
    if dp:
        verdict = BUG if accountant is not None and bound > accountant else CONSISTENT
    else:
        verdict = LEAKAGE if bound > 0 else NO_LEAKAGE
    say(f"epsilon lower bound {bound:.3f} ({outcome.v} of {outcome.r} guesses right): {verdict}")
    return EmpiricalAuditResult(
        site_id=policy.site_id,
        task=settings.task,
        model=settings.model,
        dp=dp,
        canaries=canaries,
        canaries_included=int(canary_set.included.sum()),
        guesses=outcome.r,
        guesses_each_way=outcome.k,
        correct=outcome.v,
        confidence=confidence,
        epsilon_lower_bound=bound,
        accountant_epsilon=accountant,
        target_epsilon=settings.epsilon,
        delta=settings.delta,
        noise_multiplier=noise,
        sample_rate=spends[0].sample_rate,
        steps=sum(s.steps for s in spends),
        rounds=settings.num_rounds,
        max_grad_norm=settings.max_grad_norm,
        train_records=len(train),
        seed=seed,
        seconds=time.perf_counter() - started,
        verdict=verdict,
    )


def _site_training_split(
    site_dir: Path, spec: TaskSpec, settings: RunSettings, policy: SitePolicy
) -> SiteData:
    """The site's training split, loaded and split as the site does (consent included)."""
    data = load_site_data(
        site_dir / spec.csv_name,
        spec,
        strict=policy.on_bad_row == "error",
        consent=consent_rules_of(site_dir, policy),
    )
    train, _test = split_train_test(data, settings.test_fraction, settings.seed)
    return train


def _train_rounds(
    settings: RunSettings,
    spec: TaskSpec,
    X: np.ndarray,
    y: np.ndarray,
    noise: float,
    torch_seed: int,
    say: Progress,
) -> tuple[Any, list[Spend]]:
    """``num_rounds`` calls of ``train_dp``, each on a fresh model with the last weights.

    The training randomness (Poisson sampling, noise) comes from torch's default
    generator, seeded from the audit's seed inside ``fork_rng`` so that the caller's
    generator state is left as it was.
    """
    import torch

    from medfed.client.training import DPSettings, train_dp
    from medfed.common.models import build_model
    from medfed.common.params import get_weights, set_weights

    dp = DPSettings(
        noise_multiplier=noise,
        max_grad_norm=settings.max_grad_norm,
        batch_size=settings.batch_size,
        local_epochs=settings.local_epochs,
        learning_rate=settings.learning_rate,
    )
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    weights = get_weights(build_model(settings.model, spec.model_input, settings.seed))
    spends: list[Spend] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        for server_round in range(1, settings.num_rounds + 1):
            model = build_model(settings.model, spec.model_input, settings.seed)
            set_weights(model, weights)
            spend, loss = train_dp(model, X, y, spec.is_binary, dp)
            spends.append(spend)
            weights = get_weights(model)
            say(f"round {server_round}/{settings.num_rounds}: mean training loss {loss:.4f}")
    model = build_model(settings.model, spec.model_input, settings.seed)
    set_weights(model, weights)
    return model, spends
