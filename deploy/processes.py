"""Starting and stopping Flower's own processes (SuperLink, SuperNode, ``flwr`` CLI).

medfed does not implement a transport: ``medfed server`` and ``medfed site`` run Flower's
``flower-superlink`` and ``flower-supernode`` with the right TLS, authentication and
address settings, and ``medfed run`` drives Flower's ``flwr`` CLI. This module holds what
they share: finding the executables next to the running interpreter, the environment
Flower runs in, waiting for a listener, and stopping a process (Flower starts a SuperExec
beside each SuperLink and SuperNode, and one process per ServerApp/ClientApp message;
those watch their parent and exit with it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path


class DeployError(RuntimeError):
    """A deployment process could not be started or configured; the message says why."""


def flower_executable(name: str) -> str:
    """Path of a Flower console script (``flower-superlink``, ``flwr``...).

    The one installed beside the running interpreter wins, so a virtual environment
    works without being activated."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found: is flwr installed in this environment?")
    return found


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: its own ``FLWR_HOME``, the current
    interpreter's scripts first on ``PATH``, no runtime dependency installation (it
    would build a new environment with ``uv`` and fetch packages), no telemetry."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {
        **os.environ,
        "PATH": path,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        # Flower's SuperExec looks for new app tasks once a second by default; every
        # message starts an app process, so a shorter interval shortens every stage.
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
    }
    env.update(extra or {})
    return env


def start(command: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start ``command`` in this process's group, its output on this one's.

    Staying in the group means that whatever stops the medfed command (Ctrl-C in its
    terminal, a service manager, ``kill -9`` of the group) stops the Flower process too;
    Flower's own helpers (SuperExec, app processes) exit when their parent does."""
    return subprocess.Popen(list(command), env=dict(env), stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
    """Stop ``proc``: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10.0)
    return proc.poll()


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts TCP connections on ``host:port``.

    Raise :class:`DeployError` when ``timeout`` passes or ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"process exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise DeployError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def port_in_use(host: str, port: int) -> bool:
    """Whether a listener already holds ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Inside, SIGTERM raises SystemExit, so ``finally`` blocks stop child processes."""

    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
