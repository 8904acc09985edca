"""Benchmark: `medfed audit verify` on a 3-site, 10-round run (target: under 2 s).

Runs a real simulation (`medfed simulate --rounds 10`, three synthetic hospitals,
medfed secure aggregation) unless ``--dir`` names an existing audit folder, then times
the `medfed audit verify DIR` command end to end (a fresh process each time, as an
auditor runs it: interpreter start, imports, every signature, chain link, epsilon replay,
anchor and checkpoint) ``--repeat`` times. Prints the figures and writes JSON.

    python bench/bench_audit_verify.py [--dir DIR] [--repeat 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import default_out, environment, write_json

TARGET_SECONDS = 2.0


def simulate(root: Path, rounds: int) -> Path:
    out = root / "run"
    command = [
        sys.executable, "-m", "medfed.cli.main", "simulate", "--rounds", str(rounds),
        "--data-dir", str(root / "data"), "--out", str(out), "--no-reference",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    print(f"simulated {rounds} rounds in {time.perf_counter() - started:.0f} s")
    return out


def time_verify(directory: Path, repeat: int) -> tuple[list[float], dict]:
    command = [sys.executable, "-m", "medfed.cli.main", "audit", "verify", str(directory), "--json"]
    seconds, summary = [], {}
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if done.returncode not in (0, 1):
            raise SystemExit(f"verify failed to run: {done.stderr}")
        summary = json.loads(done.stdout)
    return seconds, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="an existing audit folder")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=default_out("audit_verify"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or simulate(Path(tmp), args.rounds)
        seconds, summary = time_verify(directory, args.repeat)
    median = statistics.median(seconds)
    print(f"medfed audit verify: {summary['checked']}, ok={summary['ok']}")
    print(f"  seconds per run: {', '.join(f'{s:.2f}' for s in seconds)}")
    print(f"  median {median:.2f} s (target < {TARGET_SECONDS:g} s): "
          f"{'met' if median < TARGET_SECONDS else 'NOT met'}")  # fmt: skip
    write_json(
        args.out,
        {
            "benchmark": "audit_verify",
            "checked": summary["checked"],
            "ok": summary["ok"],
            "seconds": seconds,
            "median_seconds": median,
            "target_seconds": TARGET_SECONDS,
            "met": median < TARGET_SECONDS,
            "environment": environment(),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
