"""Run a whole federation on one machine with Flower's Simulation Engine.

``run`` prepares the site directories (synthetic or the shipped UCI hospitals, each
with a site policy), starts Flower's simulation with the medfed ServerApp and
ClientApp, and returns the coordinator's run record plus, optionally, the pooled
non-private reference. Progress is reported through a callback fed from the
coordinator's ``events.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.client.app import build_client_app
from medfed.client.policy import POLICY_NAME, PolicyError, SitePolicy, load_policy, write_policy
from medfed.common.atomic import atomic_write_bytes, atomic_write_json
from medfed.common.config import RunSettings
from medfed.common.ledger import LEDGER_NAME
from medfed.common.tasks import ImagingSpec, get_task_spec
from medfed.server.app import build_server_app
from medfed.server.run_record import EVENTS_NAME, RUN_RECORD_NAME
from medfed.simulations.heart_disease import HOSPITALS, prepare_heart_disease_sites
from medfed.simulations.identities import write_simulation_identities
from medfed.simulations.reference import pooled_reference
from medfed.simulations.synthetic import generate_risk_sites
from medfed.simulations.synthetic_imaging import generate_imaging_sites

SUMMARY_NAME = "summary.json"
LEDGERS_DIR = "ledgers"


class SimulationError(RuntimeError):
    """The simulation could not run or did not complete; the message says why."""


@dataclass(frozen=True)
class SimulationPlan:
    """What `medfed simulate` runs.

    Parameters
    ----------
    settings : RunSettings
        The run's settings (its ``data_root`` and ``out_dir`` are filled in by
        :func:`prepare`).
    num_sites : int
        Synthetic hospitals to create (heart-disease always has four).
    site_budget : float
        Lifetime epsilon budget written into newly created site policies.
    min_cohort : int
        Minimum cohort for released metrics in newly created site policies.
    reference : bool
        Also train the pooled non-private reference.
    verbose : bool
        Show Flower's and Ray's logs.
    patients_per_site : int or None
        Synthetic imaging hospitals: patients per site (None: the task's default).
    """

    settings: RunSettings
    num_sites: int = 3
    site_budget: float = 10.0
    min_cohort: int = 20
    reference: bool = True
    verbose: bool = False
    patients_per_site: int | None = None


@dataclass
class SimulationResult:
    out_dir: Path
    site_dirs: list[Path]
    run: dict[str, Any]
    reference: dict[str, Any] | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


# Synthetic imaging sites for `medfed simulate`: larger than the scanner profiles' default
# (24-40 patients), since DP-SGD needs enough patients per site for the signal to rise
# above the noise (bench/bench_imaging_utility.py); CT volumes cost more to read and train.
IMAGING_PATIENTS = {"xray": 600, "ct": 200}


def prepare_sites(plan: SimulationPlan) -> list[Path]:
    """Create (or reuse) the site directories under ``settings.data_root``."""
    settings = plan.settings
    root = Path(settings.data_root)
    spec = get_task_spec(settings.task, settings.dataset)
    marker = spec.labels_name if isinstance(spec, ImagingSpec) else spec.csv_name
    existing = sorted(root.glob(f"site-*/{marker}"))
    if existing:
        site_dirs = sorted((p.parent for p in existing), key=_site_index)
    elif isinstance(spec, ImagingSpec):
        site_dirs = generate_imaging_sites(
            spec.task,
            plan.num_sites,
            root,
            seed=settings.seed,
            image_size=spec.size,
            slices=max(spec.depth, 4),
            patients_per_site=plan.patients_per_site or IMAGING_PATIENTS[spec.task],
        )
    elif settings.dataset == "heart-disease":
        site_dirs = prepare_heart_disease_sites(root)
    else:
        site_dirs = generate_risk_sites(plan.num_sites, root, seed=settings.seed)
    names = HOSPITALS if settings.dataset == "heart-disease" else None
    for i, site_dir in enumerate(site_dirs):
        if not (site_dir / POLICY_NAME).exists():
            site_id = names[i] if names and i < len(names) else f"hospital-{chr(97 + i)}"
            write_policy(
                site_dir / POLICY_NAME,
                SitePolicy(
                    site_id=site_id,
                    epsilon_budget=plan.site_budget,
                    delta=max(settings.delta, 1e-5),
                    min_cohort=plan.min_cohort,
                    max_samples_per_patient=settings.samples_per_patient,
                    allowed_secure_agg=sorted({"medfed", settings.secure_agg}),
                ),
            )
    return site_dirs


def _site_index(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return 1 << 30


def run(
    plan: SimulationPlan, on_event: Callable[[dict[str, Any]], None] | None = None
) -> SimulationResult:
    """Prepare the sites, run the federation, and collect the results."""
    settings = plan.settings
    get_task_spec(settings.task, settings.dataset)
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not settings.resume:  # a resumed run appends to the events of the run it continues
        (out_dir / EVENTS_NAME).unlink(missing_ok=True)
    site_dirs = prepare_sites(plan)
    if len(site_dirs) < settings.min_sites:
        raise SimulationError(
            f"{len(site_dirs)} site(s) under {settings.data_root}, at least "
            f"{settings.min_sites} needed"
        )
    # Every site signs its ledger with its identity key, whatever the secure aggregation.
    write_simulation_identities(site_dirs, settings.roster_path())
    started = time.time()
    watcher = _EventWatcher(out_dir / EVENTS_NAME, on_event) if on_event else None
    try:
        _run_flower(settings, len(site_dirs), plan.verbose)
    finally:
        if watcher:
            watcher.stop()
    seconds = time.time() - started
    publish_ledgers(site_dirs, out_dir / LEDGERS_DIR)
    record = _read_run_record(out_dir)
    reference = pooled_reference(site_dirs, settings) if plan.reference else None
    result = SimulationResult(out_dir, site_dirs, record, reference, seconds)
    atomic_write_json(
        out_dir / SUMMARY_NAME,
        {
            "seconds": round(seconds, 2),
            "site_dirs": [str(d) for d in site_dirs],
            "run": record,
            "pooled_reference": reference,
        },
    )
    return result


def publish_ledgers(site_dirs: list[Path], dest: Path) -> None:
    """Copy each site's signed ledger to ``dest/<site id>.jsonl`` for ``medfed audit``.

    In a deployment each hospital sends its ledger.jsonl to the auditor itself; signed
    entries are what may leave a site (see the README's privacy model).
    """
    for site_dir in site_dirs:
        ledger = site_dir / LEDGER_NAME
        if ledger.is_file():
            name = _site_name(site_dir)
            atomic_write_bytes(dest / f"{name}.jsonl", ledger.read_bytes())


def _site_name(site_dir: Path) -> str:
    try:
        return load_policy(site_dir / POLICY_NAME).site_id
    except PolicyError:
        return site_dir.name


def _run_flower(settings: RunSettings, num_sites: int, verbose: bool) -> None:
    from flwr.simulation import run_simulation

    config = settings.to_flower()
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(1, min(num_sites, os.cpu_count() or 1)),
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": "INFO" if verbose else "ERROR",
        },
    }
    levels = _quiet_logs(verbose)
    try:
        run_simulation(
            server_app=build_server_app(config, expected_sites=num_sites),
            client_app=build_client_app(config),
            num_supernodes=num_sites,
            backend_config=backend,
        )
    except Exception as exc:
        raise SimulationError(f"federated run failed: {exc}") from exc
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _quiet_logs(verbose: bool) -> dict[str, int]:
    names = ("flwr", "ray")
    levels = {n: logging.getLogger(n).level for n in names}
    if not verbose:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    return levels


def _read_run_record(out_dir: Path) -> dict[str, Any]:
    path = out_dir / RUN_RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SimulationError(f"{path}: the coordinator wrote no run record ({exc})") from None
    if record.get("status") != "completed":
        raise SimulationError(f"run {record.get('status')}: {record.get('error') or '?'}")
    return record


class _EventWatcher:
    """Tails events.jsonl in a thread and passes each event to a callback."""

    def __init__(self, path: Path, callback: Callable[[dict[str, Any]], None]) -> None:
        self.path, self.callback = path, callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._offset = path.stat().st_size if path.exists() else 0  # only new events
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            self._drain()

    def _drain(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("r", encoding="utf-8") as handle:
            handle.seek(self._offset)
            while line := handle.readline():
                if not line.endswith("\n"):
                    break
                self._offset += len(line.encode("utf-8"))
                try:
                    self.callback(json.loads(line))
                except ValueError:
                    continue
