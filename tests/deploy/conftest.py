"""A consortium of real processes on 127.0.0.1: `medfed server`, `medfed site` x3, `medfed run`.

Every process runs in its own session and is stopped (with everything it spawned:
Flower's SuperExec, ServerApp and ClientApp processes) when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medfed.deploy.provision import provision
from medfed.simulations.synthetic import generate_risk_sites

SITES = ("hospital-a", "hospital-b", "hospital-c")
MEDFED = str(Path(sys.executable).with_name("medfed"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Consortium:
    """Provisioned PKI, three site data folders and the processes started so far."""

    root: Path
    port: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def server_bundle(self) -> Path:
        return self.pki / "server"

    def bundle(self, site: str) -> Path:
        return self.pki / "sites" / site

    def data(self, site: str) -> Path:
        return self.root / "sites" / f"site-{SITES.index(site)}"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Start ``medfed ARGS`` as ``name``, output to ``logs/<name>.log``."""
        self.log(name).parent.mkdir(exist_ok=True)
        with self.log(name).open("ab") as out:
            proc = subprocess.Popen(
                [MEDFED, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "COLUMNS": "200"},
            )
        self.procs[name] = proc
        return proc

    def start_server(self) -> subprocess.Popen:
        proc = self.start("server", "server", "--bundle", str(self.server_bundle))
        wait_for(lambda: "site(s) admitted" in self.log("server").read_text(), 120, proc)
        return proc

    def start_site(self, site: str) -> subprocess.Popen:
        policy = self.data(site) / "site.toml"
        if not policy.exists():  # the hospital adopts the consortium's template
            shutil.copyfile(self.bundle(site) / "site.toml", policy)
        return self.start(
            site,
            "site",
            "--bundle",
            str(self.bundle(site)),
            "--data",
            str(self.data(site)),
            "--runtime-port",
            str(free_port()),
        )

    def start_sites(self) -> None:
        """Start every site and wait until each SuperNode is connected."""
        for site in SITES:
            self.start_site(site)
        for site in SITES:
            wait_for(
                lambda s=site: "SuperNode ID" in self.log(s).read_text(), 180, self.procs[site]
            )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill ``name`` and every process of its session."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """``medfed run --bundle server ARGS --json``; its result (stdout is the summary)."""
        return subprocess.run(
            [MEDFED, "run", "--bundle", str(self.server_bundle), "--json", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "COLUMNS": "200"},
        )

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


def wait_for(
    condition: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (OSError, ValueError):
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting")
        time.sleep(0.5)
    raise AssertionError(f"condition not met within {timeout:.0f} s")


def events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ledger(data_dir: Path) -> list[dict]:
    path = data_dir / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def consortium(tmp_path: Path) -> Iterator[Consortium]:
    """Three small synthetic hospitals and their PKI (SuperLink on a free port)."""
    port = free_port()
    generate_risk_sites(3, tmp_path / "sites", seed=11, size_scale=0.3)
    provision(tmp_path / "pki", "test-consortium", ["127.0.0.1", "localhost"], list(SITES), port)
    c = Consortium(tmp_path, port)
    try:
        yield c
    finally:
        c.stop_all()
