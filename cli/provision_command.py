"""`medfed provision`: the consortium CA, the SuperLink's certificate and the site bundles.

Run once by whoever operates the consortium CA, on a machine that keeps OUT/ca/ca.key
offline. Each OUT/sites/<ID> folder then goes to that hospital, OUT/server to the
coordinator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

DEFAULT_OUT = Path("medfed-pki")

# The help text is the callback's docstring.
provision_app = typer.Typer()


def _fail(message: str) -> None:
    from medfed.cli.main import fail

    fail(message, code=2)


def _split_hosts(values: list[str]) -> list[str]:
    return [h.strip() for value in values for h in value.split(",") if h.strip()]


@provision_app.callback(invoke_without_command=True)
def provision(
    ctx: typer.Context,
    consortium: str | None = typer.Option(
        None,
        "--consortium",
        help="Consortium name (goes into every certificate's organisation field).",
        show_default=False,
    ),
    server: list[str] = typer.Option(
        [],
        "--server",
        help="Host names and IP addresses the sites use to reach the SuperLink, "
        "comma-separated or repeated (all go into its TLS certificate; the first is "
        "written into the site bundles).",
        show_default=False,
    ),
    site: list[str] = typer.Option(
        [],
        "--site",
        help="A site id (1-64 letters, digits, '.', '_', '-'); repeat for each "
        "hospital, at least two. Node ids are 1, 2, ... in this order.",
        show_default=False,
    ),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder to create the PKI in."),
    port: int = typer.Option(9092, "--port", help="SuperLink port the sites connect to."),
    days: int = typer.Option(825, "--days", help="Validity of the certificates, in days."),
    force: bool = typer.Option(
        False, "--force", help="Overwrite existing keys and certificates in --out."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Create a consortium's PKI (CA, SuperLink certificate, site bundles, signed roster).

    Writes OUT/ca (the CA key: keep it offline, it is in no bundle), OUT/server (the
    coordinator's TLS key and certificate, and the Ed25519 key that signs its round
    records, with its certificate), OUT/sites/<ID> for every site (its Ed25519
    identity key and certificate, its Flower SuperNode key pair, the CA certificate,
    the roster and a site.toml policy template) and OUT/roster.json, the list of sites
    and their public keys signed by the CA. Private keys are written with mode 0600 and
    are never overwritten without --force.

    Example: medfed provision --consortium "North Imaging" --server fl.example.org,10.0.0.5
    --site hospital-a --site hospital-b --site hospital-c. Later: `medfed provision
    add-site ID` and `medfed provision revoke-site ID` update the roster.
    """
    if ctx.invoked_subcommand is not None:
        return
    if consortium is None and not server and not site:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    if consortium is None:
        _fail("missing option --consortium NAME (see `medfed provision --help`)")
    hosts = _split_hosts(server)
    if not hosts:
        _fail("missing option --server HOST[,HOST...]: the SuperLink's names or addresses")
    from medfed.deploy.provision import provision as run_provision

    try:
        result = run_provision(out, consortium, hosts, site, port=port, days=days, force=force)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    console = Console()
    table = Table(title=f"consortium {result.consortium!r}: PKI written to {result.out_dir}")
    table.add_column("bundle")
    table.add_column("node id", justify="right")
    table.add_column("folder")
    table.add_row("SuperLink (server)", "-", str(result.server_dir))
    for entry in result.sites:
        table.add_row(f"site {entry.site_id}", str(entry.node_id), str(entry.bundle_dir))
    console.print(table)
    console.print(
        f"SuperLink address in the site bundles: {result.superlink}; roster serial "
        f"{result.serial} ({result.roster})."
    )
    _reminders(console, result.out_dir)


def _reminders(console: Console, out_dir: Path) -> None:
    console.print(
        f"[bold]Keep {out_dir / 'ca'} offline[/]: ca.key signs certificates and rosters "
        "and belongs in no bundle."
    )
    console.print(
        f"Give each {out_dir / 'sites' / '<ID>'} folder to that hospital only (it holds "
        f"the site's private keys); {out_dir / 'server'} goes to the coordinator."
    )


def _print_update(update: Any, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(update.to_json(), indent=2))
        return
    console = Console()
    table = Table(title=f"consortium {update.consortium!r}: roster serial {update.serial}")
    table.add_column("roster copy updated")
    for path in update.updated_rosters:
        table.add_row(str(path))
    if update.action == "add-site":
        console.print(
            f"Enrolled site {update.site.site_id!r} as node {update.site.node_id}: bundle "
            f"in {update.site.bundle_dir}."
        )
    else:
        console.print(
            f"Revoked site {update.site.site_id!r} (node {update.site.node_id}); its node "
            "id will never be reused."
        )
    console.print(table)
    console.print(
        "Active sites: " + (", ".join(update.active_sites) or "none") + ". Send the new "
        "roster.json to the coordinator and to every site."
    )
    if len(update.active_sites) < 2:
        console.print(
            "[yellow]warning:[/] fewer than two active sites: secure aggregation cannot run."
        )
    if update.action == "add-site":
        _reminders(console, update.out_dir)


@provision_app.command("add-site")
def add_site(
    site_id: str = typer.Argument(..., help="The new site's id.", show_default=False),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder made by `medfed provision`."),
    force: bool = typer.Option(
        False, "--force", help="Overwrite keys already in OUT/sites/SITE_ID."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Enrol one more site: a new bundle in OUT/sites/SITE_ID and a re-signed roster.

    The site gets the next node id (one above every id ever issued, revoked ones
    included). The roster's serial goes up by one and the new roster is written into
    every bundle; send it to the coordinator and to every site.
    """
    from medfed.deploy.provision import add_site as run_add_site

    try:
        update = run_add_site(out, site_id, force=force)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    _print_update(update, json_out)


@provision_app.command("revoke-site")
def revoke_site(
    site_id: str = typer.Argument(..., help="The site to revoke.", show_default=False),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder made by `medfed provision`."),
    reason: str = typer.Option("", "--reason", help="Why (recorded in the roster)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Remove a site from the consortium: it moves to the roster's revoked list.

    The roster's serial goes up by one and the new roster is written into every bundle
    (the revoked site's folder stays, with the new roster that no longer lists it).
    Its node id is never issued again. A running `medfed server` whose bundle is in
    OUT picks the new roster up within seconds and unregisters the site's SuperNode
    key; otherwise copy roster.json into the coordinator's bundle. Send it to every
    site as well.
    """
    from medfed.deploy.provision import revoke_site as run_revoke_site

    try:
        update = run_revoke_site(out, site_id, reason)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    _print_update(update, json_out)


@provision_app.command("coordinator-key")
def coordinator_key(
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder made by `medfed provision`."),
    force: bool = typer.Option(
        False, "--force", help="Replace a coordinator key already in OUT/server."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Add the coordinator's round-record signing key to an older server bundle.

    For a consortium provisioned before `medfed provision` wrote this key.
    Writes OUT/server/coordinator-identity.pem (Ed25519, 0600) and coordinator.pem (its
    certificate from the consortium CA); copy both into the coordinator's bundle. The
    roster and the site bundles are unchanged. A run must be resumed with the key it
    started with: do not replace the key (--force) while a run may still be resumed.
    """
    from medfed.deploy.provision import add_coordinator_key

    try:
        result = add_coordinator_key(out, force=force)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    Console().print(
        f"Wrote the coordinator's signing key {result.key} (keep it secret, mode 0600) and "
        f"its certificate {result.certificate}; copy both into the coordinator's bundle."
    )
