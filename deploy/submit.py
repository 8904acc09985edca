"""Submitting a medfed run to a running SuperLink with Flower's ``flwr run``.

Flower runs an app from a Flower App Bundle (FAB) built from a folder with a
``pyproject.toml``. The bundle medfed submits holds that file only: its components name
the installed ``medfed.server.app:app`` and ``medfed.client.app:app``, so the code that
runs at each hospital is the medfed the hospital installed, never code shipped with the
run. Its ``[tool.flwr.app.config]`` lists every run setting with its default (Flower
drops run-config keys an app does not declare).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medfed import __version__ as medfed_version
from medfed.common.atomic import atomic_write_text
from medfed.common.config import RunSettings
from medfed.deploy.processes import DeployError, flower_env, flower_executable
from medfed.deploy.superlink import CONNECTION

APP_NAME = "medfed-app"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if any(c in text for c in '"\\\n'):
        raise DeployError(f"run setting value {text!r} cannot be passed to Flower")
    return f'"{text}"'


def app_pyproject(settings: RunSettings) -> str:
    """The FAB's ``pyproject.toml``: medfed's components, every setting as a default."""
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        f'version = "{medfed_version}"',
        'description = "medfed federated run (the apps are the installed medfed package)"',
        'license = "Apache-2.0"',
        f'dependencies = ["medfed=={medfed_version}"]',
        "",
        "[tool.flwr.app]",
        'publisher = "medfed"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "medfed.server.app:app"',
        'clientapp = "medfed.client.app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {_toml(value)}" for key, value in settings.to_flower().items()]
    return "\n".join(lines) + "\n"


def write_app(app_dir: Path, settings: RunSettings) -> Path:
    """Write the app folder that ``flwr run`` bundles; returns it."""
    app_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(app_dir / "pyproject.toml", app_pyproject(settings))
    return app_dir


def run_config_arg(settings: RunSettings) -> str:
    """``--run-config`` text carrying every setting (the FAB's defaults are the same)."""
    return " ".join(f"{k}={_toml(v)}" for k, v in settings.to_flower().items())


def submit(
    settings: RunSettings,
    app_dir: Path,
    flwr_home: Path,
    on_line: Callable[[str], None],
    timeout: float | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> int:
    """Run ``flwr run APP medfed --stream`` and pass each output line to ``on_line``.

    Returns the exit status of ``flwr run`` (0 when the run was submitted and its log
    stream ended; the run's own outcome is in ``run.json``)."""
    write_app(app_dir, settings)
    command = [
        flower_executable("flwr"),
        "run",
        str(app_dir),
        CONNECTION,
        "--stream",
        "--run-config",
        run_config_arg(settings),
    ]
    proc = subprocess.Popen(
        command,
        env=flower_env(flwr_home, extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    # The log stream blocks while the run is quiet, so the time limit is a watchdog.
    expired = threading.Event()

    def _expire() -> None:
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its whole session: nothing holds the pipe

    watchdog = threading.Timer(timeout, _expire) if timeout is not None else None
    if watchdog is not None:
        watchdog.start()
    try:
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        status = proc.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if expired.is_set():
        raise DeployError(f"flwr run did not finish within {timeout:.0f} s")
    return status
