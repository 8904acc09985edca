"""Wall time of the default ``medfed simulate`` (target: under 90 s on a 2-core machine).

Runs the real console script, ``medfed simulate --out <tmpdir>``, as a subprocess
(``--repeats`` times, default 1) and reports its wall time against the target. The
phases of each run come for free, without touching the command: the arrival time of
each line it prints (the header comes just before ``run()``; the progress bar's last
frame or the summary table just after it), the coordinator's ``events.jsonl`` (wall-clock
stamps of run start, every round and run end) and ``summary.json`` (seconds spent inside
Flower). So a run splits into: interpreter start + imports; Ray + ServerApp start;
round 1 (Ray workers and ClientApps start, then training); rounds 2..N; Flower teardown
(estimated: header time + Flower seconds); the pooled non-private reference; the
summary tables and interpreter exit.

Unless ``--no-breakdown``, a few cheap in-process measurements follow on the sites that
the first run wrote: a fresh interpreter importing what ``medfed simulate`` imports,
generating the synthetic sites, the pooled reference alone, and one site's DP-SGD round.

Usage::

    python bench/bench_simulate.py [--repeats N] [--quick] [--out PATH] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from _common import default_out, environment, load_average, print_table, write_json

NAME = "bench_simulate"
TARGET_SECONDS = 90.0


def medfed_command() -> list[str]:
    """The ``medfed`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "medfed"
    if script.exists():
        return [str(script)]
    found = shutil.which("medfed")
    if found:
        return [found]
    raise SystemExit("error: the 'medfed' console script is not installed (pip install -e .)")


def run_once(index: int, keep: bool, timeout: float) -> dict[str, Any]:
    out_dir = Path(tempfile.mkdtemp(prefix="medfed-bench-sim-"))
    cmd = [*medfed_command(), "simulate", "--out", str(out_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # line timestamps; no effect on the work
    load_before = load_average()
    lines: list[tuple[float, str]] = []
    started_wall = time.time()
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1
    )
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        returncode = proc.wait()
    reader.join(timeout=5)
    seconds = time.perf_counter() - started
    ended_wall = time.time()
    result: dict[str, Any] = {
        "repeat": index,
        "command": " ".join(cmd),
        "returncode": returncode,
        "seconds": round(seconds, 2),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "out_dir": str(out_dir),
        "stdout": [[round(t - started_wall, 2), text] for t, text in lines],
    }
    if returncode != 0:
        result["stderr_tail"] = "".join(stderr)[-2000:]
    flower_seconds = None
    summary = out_dir / "summary.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        flower_seconds = data.get("seconds")
        result["flower_seconds"] = flower_seconds
        result["final_metrics"] = (data.get("run") or {}).get("final_metrics")
        result["pooled_reference"] = data.get("pooled_reference")
    result["phases"] = phases(out_dir, started_wall, ended_wall, lines, flower_seconds)
    result["_out_dir"] = out_dir
    if not keep and index > 0:
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


def _first(lines: list[tuple[float, str]], after: float, needles: tuple[str, ...]) -> float | None:
    for t, text in lines:
        if t >= after and any(n in text for n in needles):
            return t
    return None


def phases(
    out_dir: Path,
    started: float,
    ended: float,
    lines: list[tuple[float, str]],
    flower_seconds: float | None,
) -> list[dict[str, Any]]:
    """Phase durations from the CLI's stdout (line arrival times) and events.jsonl.

    Marks: the CLI's header line (printed just before ``run()``), the coordinator's
    events (wall-clock stamps), the end of Flower (header + ``summary.json``'s Flower
    seconds; site preparation, ~0.1 s, falls before it), the first line printed after
    ``run()`` returned (progress bar's last frame or the summary table).
    """
    path = out_dir / "events.jsonl"
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    marks: list[tuple[str, float]] = []
    header = _first(lines, 0, ("medfed simulate:",))
    if header is not None:
        marks.append(("interpreter start + imports (to the CLI header)", header))
    for event in events:
        kind = event.get("event")
        if kind == "run-start":
            marks.append(("Ray start + ServerApp start (to run-start)", event["time"]))
        elif kind == "asked" and event.get("round") == 1:
            marks.append(("round 1: Ray workers + ClientApps start, sites decide", event["time"]))
        elif kind == "round-end":
            label = (
                "round 1: DP-SGD + secure aggregation + evaluate"
                if event.get("round") == 1
                else f"round {event.get('round')} (ask, train, secure aggregation, evaluate)"
            )
            marks.append((label, event["time"]))
        elif kind == "run-end":
            marks.append(("run end bookkeeping", event["time"]))
    last = marks[-1][1] if marks else started
    if header is not None and flower_seconds is not None:
        flower_end = header + float(flower_seconds)
        marks.append(("Flower teardown (Ray shutdown) [estimated]", max(flower_end, last)))
        last = max(flower_end, last)
    after_run = _first(lines, last, ("━", "┏", "Sites:", "Finished in"))
    if after_run is not None:
        marks.append(("pooled non-private reference", after_run))
    marks.append(("summary tables + interpreter exit", ended))
    out: list[dict[str, Any]] = []
    previous = started
    for label, t in marks:
        out.append({"phase": label, "seconds": round(t - previous, 2)})
        previous = t
    return out


def in_process_breakdown(sites_root: Path) -> list[dict[str, Any]]:
    """Cheap measurements of the pieces, in this process (sites from the first run)."""
    rows: list[dict[str, Any]] = []

    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import medfed.cli.main, medfed.simulations.runner"],
        check=True,
    )
    rows.append(
        {
            "piece": "fresh interpreter: import medfed.cli.main + simulations.runner",
            "seconds": time.perf_counter() - started,
        }
    )

    import torch

    from medfed.cli.main import DATASET_DEFAULTS
    from medfed.client.data import load_site_data, split_train_test
    from medfed.client.training import DPSettings, train_dp
    from medfed.common.config import RunSettings
    from medfed.common.models import build_model
    from medfed.common.privacy import calibrate_noise, steps_per_round
    from medfed.common.tasks import get_task_spec
    from medfed.simulations.reference import pooled_reference
    from medfed.simulations.synthetic import generate_risk_sites

    d = DATASET_DEFAULTS["synthetic"]
    settings = RunSettings.from_mapping(
        {
            "num_rounds": d["rounds"],
            "epsilon": d["epsilon"],
            "batch_size": d["batch_size"],
            "learning_rate": d["learning_rate"],
            "local_epochs": d["local_epochs"],
            "test_fraction": d["test_fraction"],
            "data_root": str(sites_root),
        }
    )
    with tempfile.TemporaryDirectory(prefix="medfed-bench-gen-") as tmp:
        started = time.perf_counter()
        generate_risk_sites(3, Path(tmp), seed=settings.seed)
        rows.append(
            {"piece": "generate 3 synthetic sites", "seconds": time.perf_counter() - started}
        )

    site_dirs = sorted(sites_root.glob("site-*"))
    threads = torch.get_num_threads()
    started = time.perf_counter()
    pooled_reference(site_dirs, settings)
    rows.append(
        {
            "piece": f"pooled reference alone (torch threads={threads})",
            "seconds": time.perf_counter() - started,
        }
    )

    spec = get_task_spec(settings.task, settings.dataset)
    largest = max(site_dirs, key=lambda p: (p / spec.csv_name).stat().st_size)
    started = time.perf_counter()
    data = load_site_data(largest / spec.csv_name, spec)
    train, _ = split_train_test(data, settings.test_fraction, settings.seed)
    rows.append(
        {
            "piece": f"load + split {largest.name} ({len(data)} rows)",
            "seconds": time.perf_counter() - started,
        }
    )
    rate, steps = steps_per_round(len(train), settings.batch_size, settings.local_epochs)
    noise = calibrate_noise(settings.epsilon, settings.delta, rate, steps * settings.num_rounds)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    model = build_model(settings.model, spec.num_features, settings.seed)
    dp = DPSettings(
        noise,
        settings.max_grad_norm,
        settings.batch_size,
        settings.local_epochs,
        settings.learning_rate,
    )
    started = time.perf_counter()
    train_dp(model, train.X, train.y, spec.is_binary, dp)
    rows.append(
        {
            "piece": f"one DP-SGD round at {largest.name} ({steps} steps, 1 thread)",
            "seconds": time.perf_counter() - started,
        }
    )
    torch.set_num_threads(threads)
    for row in rows:
        row["seconds"] = round(row["seconds"], 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of medfed simulate (default 1)"
    )
    parser.add_argument("--quick", action="store_true", help="one run (same as the default)")
    parser.add_argument("--out", type=Path, default=default_out(NAME))
    parser.add_argument("--target", type=float, default=TARGET_SECONDS)
    parser.add_argument("--timeout", type=float, default=900.0, help="per-run limit in seconds")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the in-process pieces")
    parser.add_argument("--keep", action="store_true", help="keep the runs' output folders")
    args = parser.parse_args()
    repeats = 1 if args.quick else max(1, args.repeats)

    env = environment()
    runs = []
    for i in range(repeats):
        print(f"run {i + 1}/{repeats}: medfed simulate ...", flush=True)
        runs.append(run_once(i, args.keep, args.timeout))
        print(f"  {runs[-1]['seconds']:.1f} s (exit {runs[-1]['returncode']})", flush=True)

    ok = [r for r in runs if r["returncode"] == 0]
    times = [r["seconds"] for r in ok]
    median = statistics.median(times) if times else None
    passed = bool(times) and len(ok) == len(runs) and median is not None and median < args.target

    breakdown = None
    first_out = runs[0]["_out_dir"]
    if not args.no_breakdown and ok:
        print("in-process breakdown ...", flush=True)
        breakdown = in_process_breakdown(first_out / "sites")
    if not args.keep:
        shutil.rmtree(first_out, ignore_errors=True)
    for r in runs:
        r.pop("_out_dir", None)

    print_table(
        "medfed simulate (defaults: 3 synthetic sites, 3 rounds, epsilon 3, logreg, reference on)",
        ["run", "exit", "wall s", "in Flower s", "load avg before", "load avg after"],
        [
            [
                r["repeat"] + 1,
                r["returncode"],
                r["seconds"],
                r.get("flower_seconds"),
                " ".join(map(str, r["load_average_before"] or [])),
                " ".join(map(str, r["load_average_after"] or [])),
            ]
            for r in runs
        ],
        digits=1,
    )
    labels: list[str] = []
    for r in runs:
        labels += [p["phase"] for p in r["phases"] if p["phase"] not in labels]
    table = []
    for label in labels:
        values = [
            next((p["seconds"] for p in r["phases"] if p["phase"] == label), None) for r in runs
        ]
        present = [v for v in values if v is not None]
        table.append([label, *values, statistics.median(present) if present else None])
    print_table(
        "phases, seconds (CLI output line times + events.jsonl)",
        ["phase", *[f"run {r['repeat'] + 1}" for r in runs], "median"],
        table,
        digits=1,
    )
    if breakdown:
        print_table(
            "in-process pieces",
            ["piece", "seconds"],
            [[b["piece"], b["seconds"]] for b in breakdown],
            digits=1,
        )
    print_table(
        "verdict",
        ["metric", "seconds", "target", "pass"],
        [["median wall time of medfed simulate", median, f"< {args.target:g}", passed]],
        digits=1,
    )
    if len(ok) != len(runs):
        for r in runs:
            if r["returncode"] != 0:
                print(f"\nrun {r['repeat'] + 1} failed:\n{r.get('stderr_tail', '')}")

    write_json(
        args.out,
        {
            "benchmark": NAME,
            "target_seconds": args.target,
            "median_seconds": median,
            "min_seconds": min(times) if times else None,
            "max_seconds": max(times) if times else None,
            "passed": passed,
            "runs": runs,
            "in_process_breakdown": breakdown,
            "environment": env,
            "cpu_count": os.cpu_count(),
        },
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
