"""`medfed server`, `medfed site` and `medfed run`: a real deployment over Flower.

Each command checks its consortium bundle (see `medfed provision`), then runs Flower's
own processes: `flower-superlink`, `flower-supernode`, `flwr run`.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from cryptography.hazmat.primitives import serialization
from rich.console import Console

from medfed.common.atomic import atomic_write_json
from medfed.common.config import ConfigError, RunSettings
from medfed.common.secagg.identity import IdentityError, load_identity
from medfed.deploy.bundles import (
    BundleError,
    ServerBundle,
    load_server_bundle,
    load_site_bundle,
)
from medfed.deploy.pki import CertificateError, same_public_key
from medfed.deploy.processes import DeployError
from medfed.deploy.roster import RosterSignatureError
from medfed.server.round_log import COORDINATOR_PUBLIC_NAME

console = Console()
err_console = Console(stderr=True)
SETUP_ERRORS = (BundleError, DeployError, RosterSignatureError, CertificateError, ConfigError)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _say(message: str) -> None:
    console.print(f"[bold]medfed[/] {message}", highlight=False)


def server(
    bundle: Path = typer.Option(..., help="The coordinator's bundle (`server/` from provision)."),
    host: str | None = typer.Option(
        None, help="Address to bind; must be in the server certificate (default: its first host)."
    ),
    port: int | None = typer.Option(None, help="Port to bind (default: the bundle's)."),
    state_dir: Path | None = typer.Option(
        None,
        help="SuperLink database, Flower home, node registry (default: <bundle>/state). "
        "Flower's log goes to standard output.",
    ),
) -> None:
    """Run the coordinator's Flower SuperLink: TLS, SuperNode authentication, roster sites.

    Binds only HOST:PORT (Fleet, Control and Runtime APIs share it). Registers the
    SuperNode key of every active roster site, and follows the roster file: a site
    revoked with `medfed provision revoke-site` is removed within seconds. Runs until
    Ctrl-C or SIGTERM.
    """
    from medfed.deploy.coordinator import serve
    from medfed.deploy.superlink import SuperLinkSettings

    try:
        checked = load_server_bundle(bundle)
        bind = host or checked.hosts[0]
        if bind not in checked.hosts:
            raise DeployError(
                f"--host {bind} is not in the server certificate ({', '.join(checked.hosts)})"
            )
        settings = SuperLinkSettings(
            host=bind,
            port=port or checked.port,
            cert=checked.server_cert,
            key=checked.server_key,
            ca=checked.ca_cert,
            state_dir=(state_dir or checked.bundle_dir / "state").resolve(),
        )
        status = serve(settings, checked.roster, _say)
    except SETUP_ERRORS as exc:
        _fail(str(exc))
    raise typer.Exit(status)


def site(
    bundle: Path = typer.Option(..., help="This hospital's bundle (`sites/<ID>/`)."),
    data: Path = typer.Option(..., help="The hospital's data folder (CSV or DICOM, site.toml)."),
    superlink: str | None = typer.Option(
        None, help="Coordinator HOST:PORT (default: the bundle's)."
    ),
    runtime_port: int = typer.Option(
        9094, help="Local port (127.0.0.1) for the SuperNode's app processes."
    ),
) -> None:
    """Run one hospital's Flower SuperNode.

    Checks the bundle (CA signature on the roster, the site's certificate, key file
    permissions, enrolment) and the site's own policy DATA/site.toml (start from the
    bundle's template), then connects out to the coordinator over TLS. Patient data stays in
    DATA; only masked model updates and cohort-level metrics leave. Runs until Ctrl-C
    or SIGTERM, and keeps reconnecting while the coordinator is away.
    """
    from medfed.deploy.supernode import (
        SiteSettings,
        check_roster_serial,
        check_site_policy,
        run_site,
    )

    try:
        checked = load_site_bundle(bundle)
        _say(check_site_policy(checked, data))
        check_roster_serial(checked, data)
        settings = SiteSettings(
            bundle=checked,
            data_dir=data.resolve(),
            superlink=superlink or checked.superlink,
            runtime_port=runtime_port,
        )
        status = run_site(settings, _say)
    except SETUP_ERRORS as exc:
        _fail(str(exc))
    raise typer.Exit(status)


def run(
    bundle: Path = typer.Option(..., help="The coordinator's bundle (`server/`)."),
    task: str = typer.Option("risk", help="risk, rehab, xray or ct."),
    dataset: str = typer.Option("synthetic", help="The sites' CSV schema."),
    model: str | None = typer.Option(None, help="logreg/mlp, cnn2d, cnn3d [task default]."),
    rounds: int = typer.Option(3, min=1, help="Federated rounds."),
    epsilon: float = typer.Option(3.0, help="Epsilon each site may spend in this run."),
    delta: float = typer.Option(1e-5, help="Delta of the (epsilon, delta) guarantee."),
    min_sites: int = typer.Option(2, min=2, help="Sites needed before round 1 and per round."),
    secure_agg: str = typer.Option("medfed", help="medfed, flower or off (sites decide)."),
    out: Path | None = typer.Option(
        None, help="Output folder on this host (default: medfed-runs/run-<timestamp>)."
    ),
    run_name: str | None = typer.Option(
        None,
        help="Run name the sites key their ledgers by (default: the out folder's name "
        "plus a random suffix, so two runs never share one).",
    ),
    resume: bool = typer.Option(
        False,
        help="Continue the run in --out after its last completed round (after a "
        "coordinator restart), with the settings it was started with.",
    ),
    fairness_groups: str = typer.Option(
        "sex,age",
        help="Subgroups each site evaluates the model by, comma-separated: binary or "
        "categorical columns of the task, or age (in --age-bands); '' turns it off.",
    ),
    age_bands: str = typer.Option(
        "50,65", help="Age band edges in years: 50,65 gives <50, 50-64, 65+."
    ),
    superlink: str | None = typer.Option(None, help="HOST:PORT (default: the bundle's)."),
    timeout: float | None = typer.Option(None, help="Give up after this many seconds."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Submit a medfed run to the coordinator's SuperLink and stream its progress.

    Runs on the coordinator's host: the ServerApp writes run.json, events.jsonl and
    checkpoints/ into --out, and the same summary as `medfed simulate` is printed at
    the end (without the pooled reference, which needs every site's data).
    """
    from medfed.cli.display import summary_tables
    from medfed.deploy.submit import submit
    from medfed.deploy.superlink import write_connection
    from medfed.simulations.runner import SimulationResult

    out_dir = (out or Path("medfed-runs") / datetime.now().strftime("run-%Y%m%d-%H%M%S")).resolve()
    try:
        checked = load_server_bundle(bundle)
        opts = {
            "task": task,
            "dataset": dataset,
            "model": model,
            "rounds": rounds,
            "epsilon": epsilon,
            "delta": delta,
            "min_sites": min_sites,
            "secure_agg": secure_agg,
            "run_name": run_name,
            "resume": resume,
            "fairness_groups": fairness_groups,
            "age_bands": age_bands,
        }
        settings = _run_settings(opts, out_dir, checked)
        flwr_home = out_dir / ".flwr-home"
        write_connection(flwr_home, superlink or checked.address, checked.ca_cert)
        if not json_out:
            _say(
                f"run {settings.run_name}: {settings.task}, {settings.num_rounds} rounds, "
                f"epsilon {settings.epsilon:g}, secure aggregation {settings.secure_agg}"
                f"{' (resuming)' if settings.resume else ''}; output in {out_dir}"
            )
        started = datetime.now().timestamp()
        status = submit(
            settings,
            out_dir / ".app",
            flwr_home,
            (lambda line: None) if json_out else (lambda line: console.print(line, markup=False)),
            timeout=timeout,
        )
    except SETUP_ERRORS as exc:
        _fail(str(exc))
    record_path = out_dir / "run.json"
    if not record_path.is_file():
        _fail(f"flwr run exited with status {status} and no {record_path} was written", 1)
    record = json.loads(record_path.read_text(encoding="utf-8"))
    atomic_write_json(out_dir / "summary.json", {"run": record, "reference": None})
    if json_out:
        typer.echo(json.dumps({"run": record, "reference": None}, indent=2))
    else:
        result = SimulationResult(out_dir, [], record, None, datetime.now().timestamp() - started)
        for table in summary_tables(result):
            console.print(table)
        _print_rounds(record)
    raise typer.Exit(0 if record.get("status") == "completed" else 1)


def _run_settings(opts: dict[str, Any], out_dir: Path, bundle: ServerBundle) -> RunSettings:
    """The run's settings: from the options and the bundle (its roster and the
    coordinator's signing key, as absolute paths), or from run.json when resuming."""
    if opts["resume"]:
        path = out_dir / "run.json"
        if not path.is_file():
            raise DeployError(f"--resume: {path} does not exist")
        recorded = json.loads(path.read_text(encoding="utf-8"))["settings"]
        settings = RunSettings.from_mapping({**recorded, "resume": True})
        _check_resumed_key(settings, out_dir)
        return settings
    from medfed.cli.main import DEFAULT_MODEL, run_defaults

    defaults = run_defaults(opts["task"], opts["dataset"])
    return RunSettings.from_mapping(
        {
            "task": opts["task"],
            "dataset": opts["dataset"],
            "model": opts["model"] or DEFAULT_MODEL[opts["task"]],
            "num_rounds": opts["rounds"],
            "epsilon": opts["epsilon"],
            "delta": opts["delta"],
            "min_sites": opts["min_sites"],
            "local_epochs": defaults["local_epochs"],
            "batch_size": defaults["batch_size"],
            "learning_rate": defaults["learning_rate"],
            "test_fraction": defaults["test_fraction"],
            "secure_agg": opts["secure_agg"],
            **{k: opts[k] for k in ("fairness_groups", "age_bands") if k in opts},
            "data_root": "",
            "out_dir": str(out_dir),
            "secagg_roster": str(bundle.roster.resolve()),
            "coordinator_key": str(bundle.coordinator_key.resolve()),
            "run_name": opts["run_name"] or f"{out_dir.name[:55]}-{secrets.token_hex(4)}",
        }
    )


def _check_resumed_key(settings: RunSettings, out_dir: Path) -> None:
    """A resumed run signs its round records with the key it started with (recorded in
    run.json, like the roster): refuse early if that key is gone or replaced, since
    round records signed by another key would not verify as one chain."""
    if not settings.coordinator_key:
        return
    key_path = Path(settings.coordinator_key)
    try:
        key = load_identity(key_path)
    except IdentityError as exc:
        raise DeployError(
            f"--resume: the run's coordinator signing key (coordinator-key in "
            f"{out_dir / 'run.json'}) cannot be used: {exc}"
        ) from None
    published = out_dir / COORDINATOR_PUBLIC_NAME
    if not published.is_file():
        return
    try:
        signer = serialization.load_pem_public_key(published.read_bytes())
    except ValueError:
        signer = None
    if signer is None or not same_public_key(signer, key.public_key()):
        raise DeployError(
            f"--resume: {key_path} is not the key that signed this run's round records "
            f"({published}); a resumed run must sign with the key it started with"
        )


def _print_rounds(record: dict[str, Any]) -> None:
    rounds = record.get("rounds", [])
    done = sum(r["status"] == "aggregated" for r in rounds)
    for r in rounds:
        if r["status"] != "aggregated":
            console.print(f"[yellow]round {r['round']} {r['status']}[/]: {r.get('note', '')}")
        for name, reason in (r.get("declined") or {}).items():
            console.print(f"round {r['round']}: {name} declined: {reason}", highlight=False)
    console.print(f"{done} of {len(rounds)} rounds aggregated; run {record.get('status')}.")


def register(app: typer.Typer) -> None:
    """Add the deployment commands to the `medfed` app."""
    app.command()(server)
    app.command()(site)
    app.command("run")(run)
