"""Deployment with real processes on 127.0.0.1: TLS, SuperNode authentication, faults.

`medfed server` (Flower SuperLink), three `medfed site` (Flower SuperNodes) and
`medfed run` (Flower's `flwr run`) run as separate processes, as at three hospitals
and a coordinator; every process is stopped when a test ends (see conftest.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from medfed.deploy.pki import generate_supernode_key, supernode_private_openssh
from medfed.deploy.processes import flower_env, flower_executable
from medfed.deploy.provision import revoke_site

from .conftest import MEDFED, SITES, Consortium, events, free_port, ledger, wait_for

pytestmark = pytest.mark.slow


def train_rounds(entries: list[dict], run_id: str) -> list[int]:
    return sorted(e["round"] for e in entries if e["kind"] == "train" and e["run_id"] == run_id)


def secrets_of(c: Consortium) -> list[str]:
    """Fragments of every private key in the consortium, as they would appear in a log."""
    fragments = []
    for path in [*c.pki.rglob("*.key"), *c.pki.rglob("coordinator-identity.pem")]:
        body = b"".join(
            line for line in path.read_bytes().splitlines() if not line.startswith(b"-----")
        )
        fragments.append(body[10:50].decode())
        raw = base64.b64decode(body)
        fragments.append(raw[-32:].hex())
    return fragments


def test_three_hospitals_complete_a_run_over_tls(consortium: Consortium) -> None:
    c = consortium
    c.start_server()
    c.start_sites()
    out = c.root / "out"
    done = c.run("--out", str(out), "--rounds", "3", "--min-sites", "3", "--run-name", "r1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(done.stdout)["run"]
    assert record["status"] == "completed"
    assert record["secure_aggregation"]["protocol"] == "medfed"
    assert [r["status"] for r in record["rounds"]] == ["aggregated"] * 3
    for r in record["rounds"]:
        assert sorted(r["participants"]) == list(SITES)
    assert (out / "checkpoints" / "round-0003.npz").is_file()
    for site in SITES:
        assert train_rounds(ledger(c.data(site)), "r1") == [1, 2, 3]

    # The run's folder plus the hospitals' ledgers verifies against the consortium CA:
    # every entry signed with the enrolled identity keys, every round record with the
    # coordinator's CA-certified key.
    for site in SITES:
        (out / "ledgers").mkdir(exist_ok=True)
        shutil.copyfile(c.data(site) / "ledger.jsonl", out / "ledgers" / f"{site}.jsonl")
    audit = subprocess.run(
        [MEDFED, "audit", "verify", str(out), "--ca", str(c.pki / "ca" / "ca.pem"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    verified = json.loads(audit.stdout)
    assert verified["checked"]["round_records"] == 3
    assert verified["checked"]["signatures"] == 3 + 3 * 3
    assert "coordinator key certified by the CA" in verified["trust"]

    # A run the sites' policies forbid (no secure aggregation) is declined at every site,
    # with the reason in the coordinator's summary and in each site's ledger.
    off_run = ["--out", str(c.root / "off"), "--rounds", "1", "--secure-agg", "off"]
    refused = subprocess.run(
        [MEDFED, "run", "--bundle", str(c.server_bundle), *off_run],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert refused.returncode == 0, refused.stdout[-3000:] + refused.stderr[-3000:]
    # The human summary: the sites' privacy table and every decline with its reason.
    assert "Sites: privacy spent" in refused.stdout
    assert "0 of 1 rounds aggregated; run completed." in refused.stdout
    (only,) = json.loads((c.root / "off" / "run.json").read_text())["rounds"]
    assert only["status"] == "skipped" and not only["participants"]
    for site in SITES:
        assert "secure aggregation 'off' not allowed" in only["declined"][site]
        line = f"round 1: {site} declined: secure aggregation 'off' not allowed"
        assert line in refused.stdout
        (decline,) = [e for e in ledger(c.data(site)) if e["kind"] == "decline"]
        assert "secure aggregation 'off' not allowed" in decline["reason"]

    # Every listener is on 127.0.0.1; logs carry no key material and no patient id.
    listeners = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    ours = [line for line in listeners.splitlines() if "flower-" in line or "medfed" in line]
    assert ours, listeners
    for line in ours:
        assert re.search(r"\s127\.0\.0\.1:\d+\s", line), line
    logs = "".join(p.read_text(errors="replace") for p in (c.root / "logs").glob("*.log"))
    logs += done.stdout + done.stderr
    for fragment in secrets_of(c):
        assert fragment not in logs
    patient_ids = re.findall(r"MRN-[A-Z]\d{6}", (c.data("hospital-a") / "clinical.csv").read_text())
    assert patient_ids and not any(pid in logs for pid in patient_ids[:200])


def test_a_site_killed_mid_round_does_not_stop_the_run(consortium: Consortium) -> None:
    c = consortium
    c.start_server()
    c.start_sites()
    out = c.root / "out"
    run = subprocess.Popen(
        [
            MEDFED,
            "run",
            "--bundle",
            str(c.server_bundle),
            "--json",
            "--out",
            str(out),
            "--rounds",
            "3",
            "--min-sites",
            "2",
            "--run-name",
            "r2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Kill hospital-c while round 1 trains (after every site accepted it).
        wait_for(lambda: any(e["event"] == "asked" for e in events(out)), 300)
        c.kill("hospital-c")
        wait_for(lambda: any(e["event"] == "round-end" for e in events(out)), 300)
        c.start_site("hospital-c")  # it rejoins for a later round
        stdout, stderr = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]
    record = json.loads(stdout)["run"]
    assert record["status"] == "completed"
    assert len(record["rounds"]) == 3
    first = record["rounds"][0]
    assert first["status"] == "aggregated"
    assert "hospital-c" not in first["participants"]
    assert sorted(first["participants"]) == ["hospital-a", "hospital-b"]
    rejoined = [r for r in record["rounds"][1:] if "hospital-c" in r["participants"]]
    assert rejoined, [r["participants"] for r in record["rounds"]]
    assert all(r["status"] == "aggregated" for r in record["rounds"])


def _supernode(c: Consortium, key: Path, *extra: str) -> tuple[int, str]:
    """Run a bare Flower SuperNode that gives up after two tries: (exit status, output).

    Its output goes to a file: the SuperExec it spawns would hold a pipe open."""
    log = c.root / "logs" / f"probe-{free_port()}.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                flower_executable("flower-supernode"),
                "--superlink",
                f"127.0.0.1:{c.port}",
                "--auth-supernode-private-key",
                str(key),
                "--max-retries",
                "2",
                "--max-wait-time",
                "20",
                "--port",
                str(free_port()),
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=flower_env(c.root / "probe-home"),
        )
    try:
        status = proc.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return status, log.read_text(errors="replace")


def test_unregistered_revoked_and_plaintext_nodes_are_refused(consortium: Consortium) -> None:
    c = consortium
    c.start_server()
    ca = str(c.bundle("hospital-a") / "ca.pem")

    intruder = c.root / "intruder.key"
    intruder.write_bytes(supernode_private_openssh(generate_supernode_key()))
    intruder.chmod(0o600)
    status, output = _supernode(c, intruder, "--root-certificates", ca)
    assert status != 0
    assert "SuperNode ID" not in output

    # Without TLS the SuperLink does not answer (it speaks only HTTPS).
    status, output = _supernode(c, c.bundle("hospital-a") / "supernode.key", "--insecure")
    assert status != 0
    assert "SuperNode ID" not in output

    # An enrolled site connects; once revoked it is removed and cannot reconnect.
    enrolled = c.start_site("hospital-b")
    wait_for(lambda: "SuperNode ID" in c.log("hospital-b").read_text(), 120, enrolled)
    c.kill("hospital-b")
    revoke_site(c.pki, "hospital-b", "test: hospital left the consortium")
    wait_for(lambda: "removed site hospital-b" in c.log("server").read_text(), 60)
    status, output = _supernode(
        c, c.bundle("hospital-b") / "supernode.key", "--root-certificates", ca
    )
    assert status != 0
    assert "SuperNode ID" not in output
    # And `medfed site` refuses the revoked bundle before connecting.
    local = subprocess.run(
        [
            MEDFED,
            "site",
            "--bundle",
            str(c.bundle("hospital-b")),
            "--data",
            str(c.data("hospital-b")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert local.returncode == 2
    assert "revoked" in local.stderr


def test_coordinator_restart_resumes_without_double_counting(consortium: Consortium) -> None:
    c = consortium
    c.start_server()
    c.start_sites()
    out = c.root / "out"
    args = ["--out", str(out), "--rounds", "3", "--min-sites", "2", "--run-name", "r4"]
    run = subprocess.Popen(
        [MEDFED, "run", "--bundle", str(c.server_bundle), "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Kill the coordinator (SuperLink, its ServerApp) while round 2 trains: as soon
        # as one site has recorded its round-2 spend.
        wait_for(
            lambda: any(2 in train_rounds(ledger(c.data(s)), "r4") for s in SITES),
            900,
        )
        c.kill("server")
        run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    before = json.loads((out / "run.json").read_text())
    assert [r["round"] for r in before["rounds"]] == [1]
    trained_before = {site: train_rounds(ledger(c.data(site)), "r4") for site in SITES}

    c.start_server()
    resumed = c.run("--out", str(out), "--resume", timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    record = json.loads(resumed.stdout)["run"]
    assert record["status"] == "completed"
    assert [r["round"] for r in record["rounds"]] == [1, 2, 3]
    assert record["resumes"] and record["resumes"][0]["after_round"] == 1
    for site in SITES:
        rounds = train_rounds(ledger(c.data(site)), "r4")
        assert len(rounds) == len(set(rounds)), rounds  # no round counted twice
        assert 1 in rounds and 3 in rounds
        noise = {e["noise_multiplier"] for e in ledger(c.data(site)) if e["kind"] == "train"}
        assert len(noise) == 1
    second = record["rounds"][1]
    interrupted = [site for site, rounds in trained_before.items() if 2 in rounds]
    assert interrupted
    for site in interrupted:  # trained in the interrupted attempt: declines, never retrains
        assert "already in the ledger" in second["declined"].get(site, ""), second
        assert site not in second["participants"]
    assert record["rounds"][2]["status"] == "aggregated"
