"""The ``medfed`` command: simulations and synthetic data (more commands arrive per issue)."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console

from medfed.cli.audit_commands import audit_app
from medfed.cli.card_command import register as register_card_command
from medfed.cli.data_commands import data_app
from medfed.cli.deploy_commands import register as register_deploy_commands
from medfed.cli.predict_command import register as register_predict_commands
from medfed.cli.provision_command import provision_app

app = typer.Typer(
    name="medfed",
    help="Federated, privacy-preserving learning for hospitals (Flower + Opacus DP-SGD "
    "+ secure aggregation + a per-site privacy ledger).",
    no_args_is_help=True,
    add_completion=False,
)
synth_app = typer.Typer(
    help="Generate synthetic hospitals (fictional patients).", no_args_is_help=True
)
app.add_typer(synth_app, name="synth")
app.add_typer(data_app, name="data")
app.add_typer(provision_app, name="provision")
app.add_typer(audit_app, name="audit")
register_deploy_commands(app)
register_predict_commands(app)
register_card_command(app)

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line


class Task(StrEnum):
    risk = "risk"
    rehab = "rehab"
    xray = "xray"
    ct = "ct"


class Dataset(StrEnum):
    synthetic = "synthetic"
    heart_disease = "heart-disease"


class Model(StrEnum):
    logreg = "logreg"
    mlp = "mlp"
    cnn2d = "cnn2d"
    cnn3d = "cnn3d"


class SecureAgg(StrEnum):
    medfed = "medfed"
    flower = "flower"
    off = "off"


DEFAULT_MODEL = {"risk": "logreg", "rehab": "logreg", "xray": "cnn2d", "ct": "cnn3d"}


DATASET_DEFAULTS = {
    # test_fraction 0.34 follows FLamby's per-site 66/34 split on heart-disease.
    "synthetic": {
        "epsilon": 3.0,
        "rounds": 3,
        "test_fraction": 0.25,
        "batch_size": 64,
        "learning_rate": 0.5,
        "local_epochs": 1,
    },
    "heart-disease": {
        "epsilon": 1.0,
        "rounds": 5,
        "test_fraction": 0.34,
        "batch_size": 16,
        "learning_rate": 0.2,
        "local_epochs": 2,
    },
}
# Imaging tasks (synthetic DICOM hospitals): chosen with bench/bench_utility.py.
IMAGING_DEFAULTS = {
    "xray": {
        "epsilon": 8.0,
        "rounds": 5,
        "test_fraction": 0.25,
        "batch_size": 64,
        "learning_rate": 0.5,
        "local_epochs": 2,
    },
    "ct": {
        "epsilon": 8.0,
        "rounds": 5,
        "test_fraction": 0.25,
        "batch_size": 32,
        "learning_rate": 0.2,
        "local_epochs": 3,
    },
}


def run_defaults(task: str, dataset: str) -> dict[str, float | int]:
    """Defaults of `medfed simulate` for a task on a dataset."""
    return IMAGING_DEFAULTS.get(task) or DATASET_DEFAULTS[dataset]


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def simulate(
    task: Task = typer.Option(
        Task.risk,
        help="risk: binary disease risk; rehab: rehabilitation progress (regression); "
        "xray: nodule on chest radiographs (DICOM); ct: lesion in chest CT volumes (DICOM).",
    ),
    dataset: Dataset = typer.Option(
        Dataset.synthetic,
        help="synthetic hospitals, or the four real UCI heart-disease hospitals.",
    ),
    sites: int = typer.Option(
        3,
        min=2,
        max=26,
        help="Synthetic hospitals to create (heart-disease always has 4).",
    ),
    rounds: int | None = typer.Option(
        None,
        min=1,
        help="Federated rounds [default: 3 synthetic, 5 heart-disease, 5 xray/ct].",
    ),
    epsilon: float | None = typer.Option(
        None,
        help="Epsilon each site may spend in this run "
        "[default: 3 synthetic, 1 heart-disease, 8 xray/ct].",
    ),
    delta: float = typer.Option(1e-5, help="Delta of the (epsilon, delta) guarantee."),
    model: Model | None = typer.Option(
        None,
        help="logreg or mlp for risk/rehab, cnn2d for xray, cnn3d for ct "
        "[default: logreg, cnn2d, cnn3d].",
    ),
    seed: int = typer.Option(42, help="Seed for data generation, splits and model init."),
    out: Path | None = typer.Option(
        None, help="Output folder [default: medfed-runs/sim-<timestamp>]."
    ),
    data_dir: Path | None = typer.Option(
        None,
        help="Site folders (site-0, site-1, ...) "
        "to use or create; reuse it to keep the sites' "
        "ledgers across runs [default: <out>/sites].",
    ),
    site_budget: float = typer.Option(
        10.0, help="Lifetime epsilon budget written into newly created site policies."
    ),
    local_epochs: int | None = typer.Option(None, min=1, help="Local epochs per round."),
    batch_size: int | None = typer.Option(None, min=1, help="Expected DP-SGD batch size."),
    learning_rate: float | None = typer.Option(None, help="Site SGD learning rate."),
    max_grad_norm: float = typer.Option(1.0, help="Per-sample clipping norm."),
    patients: int | None = typer.Option(
        None,
        min=1,
        help="Synthetic imaging hospitals: patients per site [default: 600 xray, 200 ct].",
    ),
    samples_per_patient: int = typer.Option(
        1,
        min=1,
        help="Imaging: most images (studies) one patient contributes; >1 is recorded in "
        "the ledger and weakens protection to that of a group of k samples.",
    ),
    secure_agg: SecureAgg = typer.Option(
        SecureAgg.medfed,
        "--secure-agg",
        help="medfed: secure aggregation with roster-signed keys and ChaCha20 masks "
        "(fresh site identities per run); flower: Flower 1.42 SecAgg+, for comparison; "
        "off: the coordinator sees each site's DP update. New site policies allow the "
        "chosen mode; existing ones decide for themselves.",
    ),
    reference: bool = typer.Option(
        True, help="Also train the pooled non-private reference (simulation only)."
    ),
    fairness_groups: str | None = typer.Option(
        None,
        help="Subgroups each site evaluates the model by, comma-separated: binary or "
        "categorical columns of the task, or age (in --age-bands); '' turns it off "
        "[default: sex,age].",
    ),
    age_bands: str | None = typer.Option(
        None, help="Age band edges in years: 50,65 gives <50, 50-64, 65+ [default: 50,65]."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower/Ray logs."),
) -> None:
    """Run a federation of hospitals on this machine (Flower simulation engine).

    With no options: three synthetic hospitals train a disease-risk model with DP-SGD
    (epsilon 3 each) and secure aggregation for 3 rounds, then a summary shows each
    site's privacy spend and the model's metrics next to a pooled non-private reference.
    """
    from medfed.cli.display import RoundProgress, summary_tables
    from medfed.common.config import ConfigError, RunSettings
    from medfed.simulations.runner import SimulationError, SimulationPlan, run

    defaults = run_defaults(task.value, dataset.value)
    out_dir = out or Path("medfed-runs") / datetime.now().strftime("sim-%Y%m%d-%H%M%S")
    try:
        settings = RunSettings.from_mapping(
            {
                "task": task.value,
                "dataset": dataset.value,
                "model": model.value if model else DEFAULT_MODEL[task.value],
                "num_rounds": rounds or defaults["rounds"],
                "epsilon": epsilon if epsilon is not None else defaults["epsilon"],
                "delta": delta,
                "seed": seed,
                "local_epochs": local_epochs or defaults["local_epochs"],
                "batch_size": batch_size or defaults["batch_size"],
                "learning_rate": learning_rate or defaults["learning_rate"],
                "max_grad_norm": max_grad_norm,
                "test_fraction": defaults["test_fraction"],
                "data_root": str(data_dir or out_dir / "sites"),
                "out_dir": str(out_dir),
                "samples_per_patient": samples_per_patient,
                "secure_agg": secure_agg.value,
                **({} if fairness_groups is None else {"fairness_groups": fairness_groups}),
                **({} if age_bands is None else {"age_bands": age_bands}),
            }
        )
    except ConfigError as exc:
        fail(str(exc))
    plan = SimulationPlan(
        settings=settings,
        num_sites=sites,
        site_budget=site_budget,
        reference=reference,
        verbose=verbose,
        patients_per_site=patients,
    )
    try:
        if json_out:
            result = run(plan)
        else:
            console.print(
                f"[bold]medfed simulate[/]: {task.value} on {dataset.value}, "
                f"{settings.num_rounds} rounds, epsilon {settings.epsilon:g} per "
                f"site, secure aggregation {settings.secure_agg}, output in {out_dir}"
            )
            with RoundProgress(console, settings.num_rounds) as progress:
                result = run(plan, on_event=progress)
    except (SimulationError, ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if json_out:
        typer.echo(json.dumps(json.loads((result.out_dir / "summary.json").read_text()), indent=2))
        return
    for table in summary_tables(result):
        console.print(table)
    rounds = result.run["rounds"]
    done = sum(r["status"] == "aggregated" for r in rounds)
    if done < len(rounds):
        for r in rounds:
            if r["status"] != "aggregated":
                console.print(f"[yellow]round {r['round']} {r['status']}[/]: {r['note']}")
    console.print(f"{done} of {len(rounds)} rounds aggregated.")
    console.print(
        f"Finished in {result.seconds:.1f}s. Run record: "
        f"{result.out_dir / 'run.json'}; site ledgers: "
        f"{Path(settings.data_root) / 'site-*' / 'ledger.jsonl'}"
    )
    console.print(
        f"Audit: medfed audit verify {result.out_dir}; medfed audit report {result.out_dir}",
        highlight=False,
    )
    card = result.out_dir / "model_card.md"
    if card.exists():
        console.print(f"Model card: {card} (and model_card.json)", highlight=False)


@synth_app.command("risk")
def synth_risk(
    sites: int = typer.Option(3, min=1, max=26, help="Number of hospitals."),
    out: Path = typer.Option(..., help="Folder to create site-0, site-1, ... in."),
    seed: int = typer.Option(42, help="Seed; the same seed gives identical files."),
    size_scale: float = typer.Option(1.0, help="Multiply every site's patient count."),
    site_budget: float = typer.Option(
        10.0, help="Lifetime epsilon budget in each site's policy (site.toml)."
    ),
    overwrite: bool = typer.Option(False, help="Replace existing clinical.csv files."),
) -> None:
    """Write synthetic hospitals with clinical.csv (risk + rehab columns) and site.toml."""
    from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
    from medfed.simulations.synthetic import generate_risk_sites

    try:
        site_dirs = generate_risk_sites(
            sites, out, seed=seed, size_scale=size_scale, overwrite=overwrite
        )
    except (ValueError, FileExistsError, OSError) as exc:
        fail(str(exc))
    for i, site_dir in enumerate(site_dirs):
        if not (site_dir / POLICY_NAME).exists():
            write_policy(
                site_dir / POLICY_NAME,
                SitePolicy(site_id=f"hospital-{chr(97 + i)}", epsilon_budget=site_budget),
            )
        rows = sum(1 for _ in (site_dir / "clinical.csv").open()) - 1
        console.print(f"{site_dir}: {rows} patients")
    _write_identities(site_dirs, out)


def _write_identities(site_dirs: list[Path], root: Path) -> None:
    from medfed.common.config import SIM_ROSTER_NAME
    from medfed.simulations.identities import write_simulation_identities

    try:
        roster = write_simulation_identities(site_dirs, root / SIM_ROSTER_NAME)
    except (ValueError, OSError) as exc:
        fail(f"cannot write secure-aggregation identities: {exc}")
    console.print(
        f"{root / SIM_ROSTER_NAME}: roster of {len(roster.keys)} site identities "
        "(each site's key in its folder)"
    )


@synth_app.command("identities")
def synth_identities(
    data_dir: Path = typer.Option(
        ..., "--data-dir", help="Folder holding the site folders site-0, site-1, ..."
    ),
) -> None:
    """Write identities for simulated sites (for `flwr run .`).

    Each site-<i> folder without one gets a new Ed25519 key (site-identity.pem, mode
    0600; an existing key is kept: it signs the site's privacy ledger) and
    DATA_DIR/roster.json lists their public keys. `medfed simulate` does this itself
    before every run; in a deployment the consortium issues identities instead.
    """
    site_dirs = sorted(
        (d for d in data_dir.glob("site-*") if d.is_dir() and d.name[5:].isdigit()),
        key=lambda d: int(d.name[5:]),
    )
    if [int(d.name[5:]) for d in site_dirs] != list(range(len(site_dirs))) or not site_dirs:
        fail(f"{data_dir}: expected site folders site-0, site-1, ... without gaps")
    _write_identities(site_dirs, data_dir)


def _synth_imaging(
    modality: str,
    sites: int,
    out: Path,
    seed: int,
    patients: int | None,
    image_size: int,
    overwrite: bool,
) -> None:
    from medfed.simulations.synthetic_imaging import generate_imaging_sites

    try:
        site_dirs = generate_imaging_sites(
            modality,
            sites,
            out,
            seed=seed,
            image_size=image_size,
            patients_per_site=patients,
            overwrite=overwrite,
        )
    except (ValueError, FileExistsError, OSError) as exc:
        fail(str(exc))
    for site_dir in site_dirs:
        files = sum(1 for _ in (site_dir / "dicom").rglob("*.dcm"))
        patients_n = sum(1 for _ in (site_dir / "labels.csv").open()) - 1
        console.print(f"{site_dir}: {patients_n} patients, {files} DICOM files")
    _write_identities(site_dirs, out)


@synth_app.command("xray")
def synth_xray(
    sites: int = typer.Option(3, min=1, max=26, help="Number of hospitals."),
    out: Path = typer.Option(..., help="Folder to create site-0, site-1, ... in."),
    seed: int = typer.Option(42, help="Seed; the same seed gives identical files."),
    patients: int | None = typer.Option(
        None, min=1, help="Patients per site [default: 24-40, differing by site]."
    ),
    image_size: int = typer.Option(64, min=16, help="Rows and columns of each image."),
    overwrite: bool = typer.Option(False, help="Replace existing sites."),
) -> None:
    """Write synthetic chest radiographs (DICOM DX, some RLE-compressed) + labels.csv."""
    _synth_imaging("xray", sites, out, seed, patients, image_size, overwrite)


@synth_app.command("ct")
def synth_ct(
    sites: int = typer.Option(3, min=1, max=26, help="Number of hospitals."),
    out: Path = typer.Option(..., help="Folder to create site-0, site-1, ... in."),
    seed: int = typer.Option(42, help="Seed; the same seed gives identical files."),
    patients: int | None = typer.Option(
        None, min=1, help="Patients per site [default: 24-40, differing by site]."
    ),
    image_size: int = typer.Option(64, min=16, help="Rows and columns of each slice."),
    overwrite: bool = typer.Option(False, help="Replace existing sites."),
) -> None:
    """Write synthetic chest CT series (DICOM CT, HU via rescale) + labels.csv."""
    _synth_imaging("ct", sites, out, seed, patients, image_size, overwrite)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
