"""`flwr run .` runs the same ServerApp/ClientApp in Flower's simulation engine.

Flower starts a local SuperLink in the background for this; the test gives it a
private FLWR_HOME and stops it at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medfed.client.policy import SitePolicy, write_policy
from medfed.simulations.identities import write_simulation_identities
from medfed.simulations.synthetic import generate_risk_sites

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    # Flower 1.42 keeps federations in FLWR_HOME/config.toml, not in pyproject.toml.
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "sim3"\n\n'
        '[superlink.sim3]\naddress = ":local:"\noptions.num-supernodes = 3\n'
    )
    yield home
    subprocess.run(["pkill", "-f", f"flower-superlink.*{home}"], check=False)


def test_flwr_run_uses_the_declared_apps(tmp_path, flwr_home):
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    data, out = tmp_path / "sites", tmp_path / "out"
    site_dirs = generate_risk_sites(3, data, seed=5, size_scale=0.3)
    for i, d in enumerate(site_dirs):
        write_policy(d / "site.toml", SitePolicy(site_id=f"s{i}"))
    write_simulation_identities(site_dirs, data / "roster.json")  # medfed secure aggregation
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    config = f"num-rounds=1 data-root='{data}' out-dir='{out}'"
    proc = subprocess.run(
        [flwr, "run", ".", "--stream", "--run-config", config],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["secure_aggregation"]["protocol"] == "medfed"
    assert record["rounds"][0]["status"] == "aggregated"
    assert record["rounds"][0]["participants"] == ["s0", "s1", "s2"]
    assert (out / "checkpoints" / "round-0001.npz").is_file()
