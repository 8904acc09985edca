"""One hospital's Flower SuperNode, configured from its consortium bundle.

``medfed site --bundle B --data D`` checks the bundle first (the roster's CA signature,
the site's certificate, key file permissions, that the site is enrolled and not
revoked), then runs Flower's ``flower-supernode``: TLS to the SuperLink verified against
the consortium CA, authenticated with the site's SuperNode key, and a node config that
tells medfed's ClientApp where the data, the site's identity key and the roster are.
The SuperNode's own Runtime API, which only its ClientApp processes use, listens on
127.0.0.1. The SuperNode connects out to the SuperLink; nothing connects in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medfed.client.policy import POLICY_NAME, PolicyError, load_policy
from medfed.common.atomic import atomic_write_text
from medfed.deploy.bundles import SiteBundle
from medfed.deploy.processes import (
    DeployError,
    flower_env,
    flower_executable,
    sigterm_as_exit,
    start,
    stop,
)

RUNTIME_HOST = "127.0.0.1"
SERIAL_NAME = ".medfed-roster-serial"


@dataclass(frozen=True)
class SiteSettings:
    """A SuperNode's configuration.

    Parameters
    ----------
    bundle : SiteBundle
        The site's checked consortium bundle.
    data_dir : Path
        The hospital's data folder (``clinical.csv`` or ``dicom/``, ``site.toml``,
        ``ledger.jsonl``).
    superlink : str
        ``HOST:PORT`` of the coordinator's SuperLink (default: the bundle's).
    runtime_port : int
        Local port of the SuperNode's Runtime API (127.0.0.1 only); sites sharing one
        machine need different ones.
    """

    bundle: SiteBundle
    data_dir: Path
    superlink: str
    runtime_port: int = 9094

    @property
    def flwr_home(self) -> Path:
        return self.data_dir / ".medfed-supernode"


def check_site_policy(bundle: SiteBundle, data_dir: Path) -> str:
    """Make sure ``data_dir`` holds this site's own policy; returns a line to show.

    Fail closed: with no ``site.toml`` the site does not start, since the policy is the
    hospital's decision (the bundle's template is a starting point to review and copy).
    A policy naming another site is an error too, since the ledger and reports would be
    filed under the wrong id."""
    if not data_dir.is_dir():
        raise DeployError(f"data folder {data_dir} does not exist")
    policy_path = data_dir / POLICY_NAME
    if not policy_path.exists():
        raise DeployError(
            f"no site policy at {policy_path}: review the consortium's template "
            f"{bundle.policy_template} and copy it there "
            f"(cp {bundle.policy_template} {policy_path})"
        )
    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        raise DeployError(str(exc)) from None
    if policy.site_id != bundle.site_id:
        raise DeployError(
            f"{policy_path}: site_id is {policy.site_id!r} but the bundle is for {bundle.site_id!r}"
        )
    return (
        f"site policy {policy_path}: epsilon budget {policy.epsilon_budget:g}, "
        f"secure aggregation {', '.join(policy.allowed_secure_agg)}"
    )


def check_roster_serial(bundle: SiteBundle, data_dir: Path) -> None:
    """Refuse a roster older than the newest this site has run with (a rollback would
    re-admit a revoked site), and remember the serial of this one."""
    seen_path = data_dir / SERIAL_NAME
    seen = 0
    if seen_path.is_file():
        try:
            seen = int(seen_path.read_text(encoding="utf-8").strip())
        except ValueError:
            raise DeployError(f"{seen_path}: not a roster serial; delete it to reset") from None
    if bundle.serial < seen:
        raise DeployError(
            f"{bundle.roster}: roster serial {bundle.serial} is older than serial {seen} "
            "this site already used; install the consortium's current roster.json"
        )
    if bundle.serial > seen:
        atomic_write_text(seen_path, f"{bundle.serial}\n")


def node_config(settings: SiteSettings) -> str:
    """The ``--node-config`` string medfed's ClientApp reads (see client/site_identity.py)."""
    values = {
        "data-dir": settings.data_dir.resolve(),
        "identity-key": settings.bundle.identity_key.resolve(),
        "roster": settings.bundle.roster.resolve(),
        "ca-cert": settings.bundle.ca_cert.resolve(),
    }
    for key, value in values.items():
        if '"' in str(value):
            raise DeployError(f"{key} path {value} contains a double quote")
    return " ".join(f'{key}="{value}"' for key, value in values.items())


def supernode_command(settings: SiteSettings) -> list[str]:
    """The ``flower-supernode`` command line for ``settings``."""
    return [
        flower_executable("flower-supernode"),
        "--superlink",
        settings.superlink,
        "--root-certificates",
        str(settings.bundle.ca_cert),
        "--auth-supernode-private-key",
        str(settings.bundle.supernode_key),
        "--node-config",
        node_config(settings),
        "--host",
        RUNTIME_HOST,
        "--port",
        str(settings.runtime_port),
    ]


def run_site(settings: SiteSettings, report: Callable[[str], None]) -> int:
    """Run the SuperNode until SIGINT/SIGTERM or until it exits; returns an exit status.

    Flower's SuperNode keeps retrying when the SuperLink is away, so a site outlives a
    coordinator restart and rejoins by itself."""
    settings.flwr_home.mkdir(parents=True, exist_ok=True)
    settings.flwr_home.chmod(0o700)
    with sigterm_as_exit():
        proc = start(supernode_command(settings), flower_env(settings.flwr_home))
        report(
            f"site {settings.bundle.site_id}: SuperNode connecting to {settings.superlink} "
            "(TLS verified by the consortium CA, authenticated by its SuperNode key)"
        )
        try:
            return proc.wait()
        except (KeyboardInterrupt, SystemExit):
            report(f"site {settings.bundle.site_id}: stopping the SuperNode")
            return 0
        finally:
            stop(proc)
