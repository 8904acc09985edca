"""The coordinator's Flower SuperLink: TLS, SuperNode authentication, the roster's sites.

``medfed server`` runs Flower's ``flower-superlink`` with the consortium-issued TLS
certificate and ``--enable-supernode-auth``, bound to one configured address, with its
state in a database file (so a restarted coordinator keeps its registered SuperNodes).
It then makes Flower's registry of SuperNode keys equal the CA-signed roster: every
active site's SuperNode public key is registered with ``flwr supernode register``, and a
revoked site's node is removed with ``flwr supernode unregister``. A SuperNode whose key
is not registered is refused by Flower itself. The roster file is watched: when
``medfed provision revoke-site`` rewrites it, the registry follows within seconds.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from medfed.common.atomic import atomic_write_json, atomic_write_text
from medfed.deploy.processes import DeployError, flower_env, flower_executable
from medfed.deploy.roster import ConsortiumRoster

CONNECTION = "medfed"
REGISTRY_NAME = "registrations.json"


@dataclass(frozen=True)
class SuperLinkSettings:
    """Where and how the SuperLink listens.

    Parameters
    ----------
    host, port : str, int
        The one address the SuperLink binds (Fleet, Control and Runtime APIs share it
        in Flower 1.42). ``host`` must be a name or address in the server certificate.
    cert, key, ca : Path
        The server's TLS certificate and key, and the consortium CA certificate.
    state_dir : Path
        The SuperLink's database, Flower home, logs and the node registry.
    """

    host: str
    port: int
    cert: Path
    key: Path
    ca: Path
    state_dir: Path

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def registry_path(self) -> Path:
        return self.state_dir / REGISTRY_NAME


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    """The ``flower-superlink`` command line for ``settings``."""
    return [
        flower_executable("flower-superlink"),
        "--ssl-certfile",
        str(settings.cert),
        "--ssl-keyfile",
        str(settings.key),
        "--ssl-ca-certfile",
        str(settings.ca),
        "--enable-supernode-auth",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--database",
        str(settings.database),
        "--disable-runtime-dependency-installation",
    ]


def write_connection(flwr_home: Path, address: str, ca: Path) -> None:
    """Write the ``flwr`` CLI's connection to the SuperLink (TLS, verified by ``ca``)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        flwr_home / "config.toml",
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca.resolve()}"\n',
    )


def flwr_cli(flwr_home: Path, *args: str, timeout: float = 60.0) -> dict:
    """Run ``flwr ARGS --format json`` against the configured connection; its JSON."""
    command = [flower_executable("flwr"), *args, CONNECTION, "--format", "json"]
    try:
        proc = subprocess.run(
            command,
            env=flower_env(flwr_home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        what = " ".join(args[:2])
        raise DeployError(f"`flwr {what}` did not answer in {timeout:.0f} s") from None
    out = proc.stdout
    try:
        reply = json.loads(out[out.index("{") :])
    except ValueError:
        reply = {}
    if proc.returncode != 0 or not reply.get("success", False):
        detail = reply.get("error-message") or (proc.stderr or out).strip()[-500:]
        raise DeployError(f"`flwr {' '.join(args[:2])}` failed: {detail}")
    return reply


@dataclass(frozen=True)
class SyncReport:
    """What :func:`sync_registrations` changed."""

    registered: dict[str, int]
    unregistered: dict[str, int]
    kept: dict[str, int]


def _read_registry(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeployError(f"{path}: unreadable node registry ({exc})") from None
    if not isinstance(data, dict):
        raise DeployError(f"{path}: node registry must be a JSON object")
    return data


def _live_node_ids(flwr_home: Path) -> set[int]:
    nodes = flwr_cli(flwr_home, "supernode", "list").get("nodes", [])
    return {int(n["node-id"]) for n in nodes if n.get("status") not in ("unregistered", "deleted")}


def sync_registrations(settings: SuperLinkSettings, roster: ConsortiumRoster) -> SyncReport:
    """Make the SuperLink's registered SuperNode keys exactly the roster's active sites.

    The registry file maps each site to the Flower node id its key was registered
    under and the key itself, so a changed key is re-registered and a revoked site
    unregistered."""
    registry = _read_registry(settings.registry_path)
    live = _live_node_ids(settings.flwr_home)
    wanted = {site.name: site.supernode_public_key.strip() for site in roster.sites}
    report = SyncReport({}, {}, {})
    for name, entry in sorted(registry.items()):
        node_id = int(entry["node_id"])
        if wanted.get(name) == entry.get("supernode_key") and node_id in live:
            report.kept[name] = node_id
            continue
        if node_id in live:
            flwr_cli(settings.flwr_home, "supernode", "unregister", str(node_id))
            report.unregistered[name] = node_id
        del registry[name]
        atomic_write_json(settings.registry_path, registry)
    for name, key in sorted(wanted.items()):
        if name in registry:
            continue
        key_file = settings.state_dir / "keys" / f"{name}.pub"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key + "\n", encoding="utf-8")
        reply = flwr_cli(settings.flwr_home, "supernode", "register", str(key_file), "--name", name)
        node_id = int(reply["node-id"])
        registry[name] = {"node_id": node_id, "supernode_key": key}
        atomic_write_json(settings.registry_path, registry)
        report.registered[name] = node_id
    return report
