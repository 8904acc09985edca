"""``medfed server``: keep one SuperLink running and its registered sites equal to the roster."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from medfed.deploy.pki import load_ca_certificate
from medfed.deploy.processes import (
    DeployError,
    flower_env,
    port_in_use,
    sigterm_as_exit,
    start,
    stop,
    wait_for_port,
)
from medfed.deploy.roster import ConsortiumRoster, RosterSignatureError, load_signed_roster
from medfed.deploy.superlink import (
    SuperLinkSettings,
    SyncReport,
    superlink_command,
    sync_registrations,
    write_connection,
)

STARTUP_SECONDS = 120.0
ROSTER_POLL_SECONDS = 2.0


def serve(
    settings: SuperLinkSettings,
    roster_path: Path,
    report: Callable[[str], None],
) -> int:
    """Run the SuperLink until SIGINT/SIGTERM (or until it exits); returns an exit status.

    The roster is verified against the CA before every sync; a roster that fails
    verification is reported and ignored, so the registry never follows a forged file.
    """
    if port_in_use(settings.host, settings.port):
        raise DeployError(f"{settings.address} is already in use (another SuperLink?)")
    ca = load_ca_certificate(settings.ca)
    roster = load_signed_roster(roster_path, ca)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.state_dir.chmod(0o700)
    write_connection(settings.flwr_home, settings.address, settings.ca)
    with sigterm_as_exit():
        proc = start(superlink_command(settings), flower_env(settings.flwr_home))
        try:
            wait_for_port(settings.host, settings.port, STARTUP_SECONDS, proc)
            report(f"SuperLink listening on {settings.address} (TLS, SuperNode authentication)")
            _report_sync(report, sync_registrations(settings, roster), roster.serial)
            _watch(settings, roster_path, roster, ca, proc, report)
            report(f"SuperLink exited with status {proc.returncode}")
            return proc.returncode or 1
        except (KeyboardInterrupt, SystemExit):
            report("stopping the SuperLink")
            return 0
        finally:
            stop(proc)


def _watch(
    settings: SuperLinkSettings,
    roster_path: Path,
    roster: ConsortiumRoster,
    ca: x509.Certificate,
    proc: subprocess.Popen[bytes],
    report: Callable[[str], None],
) -> None:
    """While the SuperLink runs, apply every newer, correctly signed roster."""
    seen = mtime = roster_path.stat().st_mtime_ns
    while proc.poll() is None:
        time.sleep(ROSTER_POLL_SECONDS)
        try:
            mtime = roster_path.stat().st_mtime_ns
        except OSError as exc:
            if mtime != -1:
                report(f"roster unreadable, registrations kept as they are: {exc}")
            mtime = -1
            seen = mtime
            continue
        if mtime == seen:
            continue
        seen = mtime
        try:
            new = load_signed_roster(roster_path, ca)
        except RosterSignatureError as exc:
            report(f"roster not applied: {exc}")
            continue
        if new.serial < roster.serial:
            report(f"roster not applied: serial {new.serial} is older than {roster.serial}")
            continue
        try:
            sync = sync_registrations(settings, new)
        except DeployError as exc:
            report(f"roster serial {new.serial} not applied yet, retrying: {exc}")
            seen = -2
            continue
        roster = new
        _report_sync(report, sync, roster.serial)


def _report_sync(report: Callable[[str], None], sync: SyncReport, serial: int) -> None:
    for name, node_id in sync.registered.items():
        report(f"admitted site {name} (SuperNode {node_id})")
    for name, node_id in sync.unregistered.items():
        report(f"removed site {name} (SuperNode {node_id}): revoked or re-keyed")
    sites = len(sync.registered) + len(sync.kept)
    report(f"roster serial {serial}: {sites} site(s) admitted")
