"""Clinician and ethics features: prediction, explanation, fairness evaluation, consent.

No targets (the issue sets none): the figures an operator asks about, side by side from
one run, with the ratios that compare a feature on and off. Every figure is a real call
of medfed's code on synthetic data made here (nothing is hard-coded or mocked):

- **predict (library)**: ``medfed.inference.tabular.predict_tabular`` (load + validate
  the CSV, forward, contributions) on CSVs of 1, 100, 1000 and 10 000 synthetic
  patients, for a ``logreg`` and an ``mlp`` risk checkpoint trained briefly (non-private, as
  tests/inference/tabular_fixtures.py does) and written by the coordinator's
  ``save_checkpoint``; plain and with ``explain`` (logreg: coef x input; mlp: integrated
  gradients, rows batched along their paths: ``--ig-max`` caps the CSV it runs on).
- **predict (CLI)**: one fresh ``medfed predict`` process end to end (interpreter,
  imports, checkpoint, CSV or DICOM, JSON out), beside ``medfed --help`` (the start-up
  floor) and the library figure for the same input.
- **imaging**: ``predict_imaging`` per radiograph (``SYNTHETIC_XRAY``, 64 px) and per CT
  volume (``SYNTHETIC_CT``, 16 x 64 x 64) with a Grad-CAM PNG, split into its stages
  (DICOM read + preprocessing, model build, forward, Grad-CAM, PNG drawing + writing),
  and over a folder (per image).
- **importance**: ``site_importance`` (permutation importance, 10 repeats) at a site
  whose held-out split is 1000 patients, mlp and logreg.
- **fairness**: ``Site.evaluate`` with the run's fairness groups ``sex,age`` vs ``""``
  (off) on one synthetic site, interleaved, as a ratio; the site-side
  ``fairness_metrics`` alone; ``server.fairness.combine`` over 10 sites' real reports.
- **consent**: ``load_site_data`` on a 100 000-row CSV without consent rules vs with a
  consent column (1% "no") and a 10 000-id withdrawn list (half of them in the data).

Timings are medians over ``--repeats`` runs after warm-up calls (min beside it: the
machine is noisy; 10 000-patient CSVs 3 runs, mlp explanations of 1000+ patients one);
in-process torch work runs on ``--threads`` threads (default 1: on a shared 2-core
machine, torch's default of one thread per core makes the figures swing with the other
work); the CLI processes run with torch's default, as ``medfed predict`` does on a laptop.
``sections_s`` in the JSON says where the run's time went.

Usage::

    python bench/bench_clinician.py [--quick] [--repeats 5] [--ig-max 10000] [--threads 1]
        [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import default_out, environment, print_table, write_json

NAME = "bench_clinician"
SEED = 7
TEST_FRACTION = 0.25
PREDICT_SIZES = (1, 100, 1000, 10_000)
CONSENT_ROWS, WITHDRAWN_IDS = 100_000, 10_000
IMPORTANCE_HELD_OUT, IMPORTANCE_REPEATS = 1000, 10
COMBINE_SITES = 10
XRAY_IMAGES, CT_VOLUMES = 12, 3


# -- timing --------------------------------------------------------------------------------
def measure(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> tuple[dict, Any]:
    """Median and min seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` calls
    (torch's second call of a new input shape is still slow on CPU)."""
    result = None
    for _ in range(warmup):
        result = fn()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return timing(seconds), result


def timing(seconds: list[float]) -> dict[str, Any]:
    return {"seconds": seconds, "median_s": statistics.median(seconds), "min_s": min(seconds)}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """``a`` over ``b``: ratio of medians, of minima, and the median of the ratios of
    runs made back to back (steadiest while the machine's load drifts)."""
    pairs = [x / y for x, y in zip(a["seconds"], b["seconds"], strict=True) if y]
    return {
        "median": ratio(a["median_s"], b["median_s"]),
        "min": ratio(a["min_s"], b["min_s"]),
        "paired": statistics.median(pairs) if pairs else None,
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "medfed.cli.main", *map(str, args)]


def run_cli(command: list[str], repeats: int) -> dict[str, Any]:
    """Wall seconds of a fresh CLI process, ``repeats`` times; fails loudly on an error."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")
    return timing(seconds)


# -- synthetic inputs ----------------------------------------------------------------------
def base_site(root: Path) -> Path:
    """One synthetic hospital (``generate_risk_sites``) with a default policy."""
    from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
    from medfed.simulations.synthetic import generate_risk_sites

    [site] = generate_risk_sites(1, root / "base", seed=SEED)
    write_policy(site / POLICY_NAME, SitePolicy(site_id="hospital-a"))
    return site


def resample_csv(src: Path, dst: Path, rows: int, columns: list[str] | None = None) -> Path:
    """``rows`` rows drawn (with replacement) from ``src``, each with a fresh patient id."""
    import pandas as pd

    frame = pd.read_csv(src, dtype=str, keep_default_na=False)
    rng = np.random.default_rng(rows)
    out = frame.iloc[rng.integers(0, len(frame), rows)].reset_index(drop=True)
    out["patient_id"] = [f"MRN-Z{i:06d}" for i in range(rows)]
    if columns is not None:
        out = out[["patient_id", *columns]]
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(dst, index=False)
    return dst


def train_checkpoint(site: Path, model: str, out: Path, quick: bool) -> Path:
    """A risk checkpoint of ``model`` trained briefly on ``site`` (non-private)."""
    from medfed.client.data import load_site_data, split_train_test
    from medfed.client.training import fit_full_batch, train_plain
    from medfed.common.config import RunSettings
    from medfed.common.models import build_model
    from medfed.common.params import get_weights
    from medfed.common.tasks import SYNTHETIC_RISK
    from medfed.server.app import model_meta
    from medfed.server.checkpoint import save_checkpoint

    train, _ = split_train_test(
        load_site_data(site / "clinical.csv", SYNTHETIC_RISK), TEST_FRACTION, SEED
    )
    net = build_model(model, SYNTHETIC_RISK.model_input, SEED)
    if model == "logreg":
        fit_full_batch(net, train.X, train.y, True, max_iter=100)
    else:
        train_plain(net, train.X, train.y, True, 10 if quick else 60, 32, 0.1, seed=SEED)
    settings = RunSettings(task="risk", model=model, seed=SEED, test_fraction=TEST_FRACTION)
    path, _ = save_checkpoint(out / model, 1, get_weights(net), model_meta(settings))
    return path


def imaging_checkpoint(task: str, out: Path) -> Path:
    """An imaging checkpoint (cnn2d / cnn3d at the synthetic task's size), perturbed init."""
    from medfed.common.config import RunSettings
    from medfed.common.models import build_model
    from medfed.common.params import get_weights
    from medfed.server.app import model_meta
    from medfed.server.checkpoint import save_checkpoint

    model = "cnn2d" if task == "xray" else "cnn3d"
    meta = model_meta(RunSettings(task=task, model=model, seed=SEED))
    net = build_model(model, tuple(meta["input_shape"]), SEED + 1)
    rng = np.random.default_rng(SEED)
    weights = [w + rng.normal(0, 0.3, w.shape).astype(w.dtype) for w in get_weights(net)]
    path, _ = save_checkpoint(out / model, 1, weights, meta)
    return path


# -- predict: library ----------------------------------------------------------------------
def bench_predict(site: Path, checkpoints: dict, root: Path, args) -> list[dict]:
    from medfed.common.tasks import SYNTHETIC_RISK
    from medfed.inference.model_file import load_model
    from medfed.inference.tabular import predict_tabular

    columns = [c.name for c in SYNTHETIC_RISK.columns]
    rows = []
    for n in args.sizes:
        csv = resample_csv(site / "clinical.csv", root / f"patients-{n}.csv", n, columns)
        for model, path in checkpoints.items():
            loaded = load_model(path)
            for explain in (False, True):
                if explain and model == "mlp" and n > args.ig_max:
                    continue
                repeats, warmup = predict_repeats(args.repeats, n, explain and model == "mlp")
                stats, report = measure(
                    lambda m=loaded, c=csv, e=explain: predict_tabular(m, c, explain=e),
                    repeats,
                    warmup,
                )
                if len(report.predictions) != n:
                    raise SystemExit(f"{csv}: {len(report.predictions)} predictions for {n} rows")
                row = {"model": model, "patients": n, "explain": explain, **stats}
                row["per_patient_ms"] = 1000 * stats["median_s"] / n
                if explain:
                    steps = [p.explanation.steps for p in report.predictions]
                    row["ig_steps_mean"] = float(np.mean(steps))
                rows.append(row)
                print(f"  predict {model:<6} n={n:<6} explain={explain!s:<5} "
                      f"{stats['median_s']:.4f} s", flush=True)  # fmt: skip
    for n in (size for size in args.sizes if size > args.ig_max):
        print(f"  (mlp --explain at n={n} not run: above --ig-max {args.ig_max})")
    return rows


def predict_repeats(repeats: int, patients: int, integrated_gradients: bool) -> tuple[int, int]:
    """(repeats, warm-ups) for one predict timing: fewer for the long ones."""
    if integrated_gradients and patients >= 1000:
        return 1, 0
    if patients >= 10_000:
        return min(repeats, 3), 1
    return repeats, 2


def bench_cli(
    checkpoints: dict, imaging: dict, root: Path, args, library: dict[str, float]
) -> list[dict]:
    """Fresh-process ``medfed predict`` (and ``medfed --help``), JSON out.

    ``library`` maps a command's label to the in-process seconds of the same work.
    """
    big = max(args.sizes)
    csv = {n: root / f"patients-{n}.csv" for n in (1, 100, big)}
    logreg, mlp, js = checkpoints["logreg"], checkpoints["mlp"], ("--format", "json")
    runs = [
        ("medfed --help (start-up floor)", cli("--help")),
        ("predict logreg, 1 patient", cli("predict", logreg, csv[1], *js)),
        ("predict mlp, 1 patient", cli("predict", mlp, csv[1], *js)),
        (f"predict mlp, {big} patients", cli("predict", mlp, csv[big], *js)),
        ("predict mlp --explain, 100 patients", cli("predict", mlp, csv[100], "--explain", *js)),
        ("predict xray --explain, 1 radiograph",
         cli("predict", imaging["xray"]["checkpoint"], imaging["xray"]["one"], "--explain",
             "--saliency-dir", root / "cli-saliency", "--format", "json")),
        ("predict ct --explain, 1 volume",
         cli("predict", imaging["ct"]["checkpoint"], imaging["ct"]["one"], "--explain",
             "--saliency-dir", root / "cli-saliency", "--format", "json")),
    ]  # fmt: skip
    if args.quick:
        runs = runs[:2]
    rows = []
    for what, command in runs:
        stats = run_cli(command, args.cli_repeats)
        rows.append({"what": what, **stats, "library_s": library.get(what)})
        print(f"  cli {what:<40} {stats['median_s']:.2f} s", flush=True)
    return rows


# -- imaging -------------------------------------------------------------------------------
def imaging_inputs(root: Path, quick: bool) -> dict[str, dict]:
    """Synthetic DICOM hospitals at the task sizes, and a checkpoint per task."""
    from medfed.common.tasks import SYNTHETIC_CT, SYNTHETIC_XRAY
    from medfed.simulations.synthetic_imaging import generate_imaging_sites

    (xray,) = generate_imaging_sites(
        "xray",
        1,
        root / "xray",
        seed=SEED,
        image_size=SYNTHETIC_XRAY.size,
        patients_per_site=4 if quick else XRAY_IMAGES,
    )
    (ct,) = generate_imaging_sites(
        "ct", 1, root / "ct", seed=SEED, image_size=SYNTHETIC_CT.size,
        slices=SYNTHETIC_CT.depth, patients_per_site=2 if quick else CT_VOLUMES,
    )  # fmt: skip
    files = sorted((xray / "dicom").rglob("*.dcm"))
    series = sorted({p.parent for p in (ct / "dicom").rglob("*.dcm")})
    return {
        "xray": {"checkpoint": imaging_checkpoint("xray", root), "folder": xray / "dicom",
                 "units": files, "one": files[0]},
        "ct": {"checkpoint": imaging_checkpoint("ct", root), "folder": ct / "dicom",
               "units": series, "one": series[0]},
    }  # fmt: skip


def bench_imaging(inputs: dict[str, dict], root: Path, args) -> list[dict]:
    """Per radiograph / per volume: each stage of predict_imaging, then the whole call."""
    from medfed.inference.model_file import load_model

    rows = []
    for task, info in inputs.items():
        loaded = load_model(info["checkpoint"])
        stages = imaging_stages(loaded, info["units"], root / f"saliency-{task}")
        for stage, seconds in stages.items():
            rows.append({"task": task, "stage": stage, **timing(seconds)})
        rows += imaging_whole(task, loaded, info, root, args.repeats)
        print(f"  imaging {task}: {len(info['units'])} inputs", flush=True)
    return rows


def imaging_stages(loaded, units: list[Path], out: Path) -> dict[str, list[float]]:
    """The stages predict_imaging runs for one input, timed for each input in turn."""
    from medfed.inference import imaging
    from medfed.inference.gradcam import explain
    from medfed.inference.saliency_png import write_saliency_png

    spec = imaging.imaging_spec(loaded.meta, units[0])
    names = ("read+preprocess", "build model", "forward", "Grad-CAM", "PNG draw+write")
    stages: dict[str, list[float]] = {name: [] for name in names}
    for k, unit in enumerate([units[0], units[0], *units], start=-1):  # two warm-ups
        marks = [time.perf_counter()]
        [item] = imaging.read_input(unit, spec, loaded.model_name)
        marks.append(time.perf_counter())
        model = imaging.load_model(loaded.weights, loaded.meta, spec)
        marks.append(time.perf_counter())
        [probability] = imaging._probabilities(model, [item.array])  # predict_imaging's own
        marks.append(time.perf_counter())
        saliency = explain(model, item.array)
        marks.append(time.perf_counter())
        write_saliency_png(out / f"{k}.png", item.array, saliency, probability)
        marks.append(time.perf_counter())
        if k > 0:
            for name, a, b in zip(stages, marks[:-1], marks[1:], strict=True):
                stages[name].append(b - a)
    return stages


def imaging_whole(task: str, loaded, info: dict, root: Path, repeats: int) -> list[dict]:
    from medfed.inference.imaging import predict_imaging

    unit = "radiograph" if task == "xray" else "volume"
    count = len(info["units"])
    rows = []
    for label, path, saliency in (
        (f"predict_imaging, 1 {unit}, no PNG", info["one"], None),
        (f"predict_imaging, 1 {unit}, Grad-CAM PNG", info["one"], root / "whole-one"),
        (f"predict_imaging, folder of {count}, PNGs (per {unit})", info["folder"], root / "whole"),
    ):
        stats, found = measure(
            lambda p=path, s=saliency: predict_imaging(loaded.weights, loaded.meta, p, s),
            min(repeats, 3) if path == info["folder"] else repeats,
            warmup=1,
        )
        per = len(found)
        row = {"task": task, "stage": label, **stats}
        row.update(median_s=stats["median_s"] / per, min_s=stats["min_s"] / per, inputs=per)
        rows.append(row)
    return rows


# -- importance ----------------------------------------------------------------------------
def bench_importance(site: Path, checkpoints: dict, root: Path, args) -> list[dict]:
    """Permutation importance at a site whose held-out split is 1000 patients.

    ``site_importance`` reads and validates the site's whole CSV first (as `medfed explain
    --site` does); ``csv_read_s`` is that read alone (``load_site_data``).
    """
    from medfed.client.data import load_site_data
    from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
    from medfed.common.tasks import SYNTHETIC_RISK
    from medfed.inference.importance import site_importance
    from medfed.inference.model_file import load_model

    held_out = 200 if args.quick else IMPORTANCE_HELD_OUT
    big = root / "importance-site"
    resample_csv(site / "clinical.csv", big / "clinical.csv", round(held_out / TEST_FRACTION))
    write_policy(big / POLICY_NAME, SitePolicy(site_id="hospital-a"))
    read, _ = measure(lambda: load_site_data(big / "clinical.csv", SYNTHETIC_RISK), args.repeats)
    rows = []
    for model in ("mlp", "logreg"):
        loaded = load_model(checkpoints[model])
        stats, report = measure(
            lambda m=loaded: site_importance(m, big, TEST_FRACTION, IMPORTANCE_REPEATS, seed=0),
            args.repeats,
        )
        top = report.permutation[0]
        rows.append({
            "model": model, "held_out": report.held_out_patients, "repeats": report.repeats,
            "columns": len(report.permutation), "baseline_auc": report.baseline_score,
            "top_column": top.column, "top_drop": top.mean, **stats,
            "csv_read_s": read["median_s"],
        })  # fmt: skip
        print(f"  importance {model}: {stats['median_s']:.3f} s", flush=True)
    return rows


# -- fairness ------------------------------------------------------------------------------
def bench_fairness(site: Path, checkpoints: dict, root: Path, args) -> dict[str, Any]:
    from medfed.client.fairness import fairness_metrics
    from medfed.client.site import Site
    from medfed.common.config import RunSettings
    from medfed.inference.model_file import load_model

    weights = load_model(checkpoints["mlp"]).weights
    common = dict(task="risk", model="mlp", seed=SEED, test_fraction=TEST_FRACTION)
    on, off = RunSettings(**common), RunSettings(**common, fairness_groups="")
    target = Site(site)
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    for settings in (on, off):
        target.evaluate(settings, weights)  # warm-up (key, caches)
    for _ in range(args.fairness_repeats):
        for name, settings in (("on", on), ("off", off)):
            started = time.perf_counter()
            _, n, _ = target.evaluate(settings, weights)
            seconds[name].append(time.perf_counter() - started)
    _, _, with_groups = target.evaluate(on, weights)
    _, _, without = target.evaluate(off, weights)
    if "fairness" not in with_groups or "fairness" in without:
        raise SystemExit(f"fairness groups on/off not honoured: {sorted(with_groups)}")
    alone = site_fairness_alone(target, on, weights, fairness_metrics, args.repeats)
    combined = bench_combine(root, weights, on, args)
    result = {
        "test_patients": n,
        "attributes": list(on.fairness_attributes()),
        "evaluate_on": timing(seconds["on"]),
        "evaluate_off": timing(seconds["off"]),
        "fairness_metrics_alone": alone,
        "groups_released": sorted(json.loads(with_groups["fairness"])["groups"]),
        "combine": combined,
    }
    result["evaluate_ratio"] = compare(result["evaluate_on"], result["evaluate_off"])
    print(f"  fairness evaluate on/off: {result['evaluate_ratio']['median']:.3f}x", flush=True)
    return result


def site_fairness_alone(site, settings, weights, fairness_metrics, repeats: int) -> dict:
    """The work fairness adds to evaluate: fairness_metrics on the site's test split."""
    from medfed.client.training import predict
    from medfed.common.models import build_model
    from medfed.common.params import set_weights

    prep = site._prepare(settings)  # the very split Site.evaluate uses
    model = build_model(settings.model, prep.test.spec.model_input, settings.seed)
    set_weights(model, weights)
    attributes, edges = settings.fairness_attributes(), settings.age_band_edges()
    stats, _ = measure(
        lambda: fairness_metrics(
            predict(model, prep.test.X), prep.test, attributes, edges, prep.policy.min_cohort
        ),
        repeats * 4,
    )
    return stats


def bench_combine(root: Path, weights, settings, args) -> dict[str, Any]:
    """``server.fairness.combine`` over real reports of 10 synthetic sites' evaluate."""
    from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
    from medfed.client.site import Site
    from medfed.server.fairness import combine
    from medfed.simulations.synthetic import generate_risk_sites

    sites = generate_risk_sites(COMBINE_SITES, root / "ten", seed=SEED + 1, size_scale=0.3)
    reports = {}
    for i, path in enumerate(sites):
        write_policy(path / POLICY_NAME, SitePolicy(site_id=f"hospital-{chr(97 + i)}"))
        _, _, metrics = Site(path).evaluate(settings, weights)
        reports[str(metrics["site-id"])] = metrics
    silent = [site for site, report in reports.items() if "fairness" not in report]
    if silent:
        raise SystemExit(f"no fairness report from {', '.join(silent)}: combine would skip them")
    attributes = settings.fairness_attributes()
    calls = 20 if args.quick else 200
    stats, view = measure(lambda: [combine(reports, attributes) for _ in range(calls)], 5)
    per_call = timing([s / calls for s in stats["seconds"]])
    return {"sites": len(reports), "groups": len(view[0].get("groups", {})), **per_call}


# -- consent -------------------------------------------------------------------------------
def consent_inputs(site: Path, root: Path, rows: int, withdrawn: int) -> tuple[Path, Path, Path]:
    """The same ``rows`` patients without and with a consent column (1% "no"), and a
    withdrawn list of ``withdrawn`` ids, half of them in the data."""
    import pandas as pd

    plain = resample_csv(site / "clinical.csv", root / "consent" / "plain.csv", rows)
    frame = pd.read_csv(plain, dtype=str, keep_default_na=False)
    rng = np.random.default_rng(SEED)
    frame["consent"] = np.where(rng.random(rows) < 0.01, "no", "yes")
    with_column = root / "consent" / "with-consent.csv"
    frame.to_csv(with_column, index=False)
    present = rng.choice(frame["patient_id"].to_numpy(), withdrawn // 2, replace=False)
    absent = [f"MRN-W{i:06d}" for i in range(withdrawn - len(present))]
    listed = root / "consent" / "withdrawn.txt"
    listed.write_text("# withdrawn patients\n" + "\n".join([*present, *absent]) + "\n")
    return plain, with_column, listed


def bench_consent(site: Path, root: Path, args) -> dict[str, Any]:
    from medfed.client.consent import load_consent_rules
    from medfed.client.data import load_site_data
    from medfed.common.tasks import SYNTHETIC_RISK

    rows, withdrawn = (10_000, 1000) if args.quick else (CONSENT_ROWS, WITHDRAWN_IDS)
    plain, with_column, listed = consent_inputs(site, root, rows, withdrawn)
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    kept = {}
    for _ in range(args.consent_repeats):  # interleaved: the load drifts
        started = time.perf_counter()
        data = load_site_data(plain, SYNTHETIC_RISK)
        seconds["without"].append(time.perf_counter() - started)
        kept["without"] = len(data)
        started = time.perf_counter()
        rules = load_consent_rules(listed.parent, "consent", listed.name)
        data = load_site_data(with_column, SYNTHETIC_RISK, consent=rules)
        seconds["with"].append(time.perf_counter() - started)
        kept["with"], report = len(data), data.consent.to_report()
    without, with_ = timing(seconds["without"]), timing(seconds["with"])
    print(f"  consent: {with_['median_s']:.2f} s with vs {without['median_s']:.2f} s without")
    return {
        "rows": rows, "withdrawn_list_ids": withdrawn, "kept": kept, "consent_report": report,
        "without": without, "with": with_,
        "ratio": compare(with_, without),
    }  # fmt: skip


# -- report --------------------------------------------------------------------------------
def print_predict(rows: list[dict]) -> None:
    plain = {(r["model"], r["patients"]): r for r in rows if not r["explain"]}
    table = []
    for r in rows:
        base = plain[(r["model"], r["patients"])]
        table.append([
            r["model"], r["patients"], "yes" if r["explain"] else "no", r["median_s"], r["min_s"],
            r["per_patient_ms"], ratio(r["median_s"], base["median_s"]) if r["explain"] else None,
            r.get("ig_steps_mean"),
        ])  # fmt: skip
    print_table(
        "predict_tabular (library: read + validate CSV, forward, contributions)",
        ["model", "patients", "explain", "median s", "min s", "ms/patient", "x plain",
         "IG steps"],
        table,
    )  # fmt: skip


def library_seconds(predict: list[dict], imaging: list[dict]) -> dict[str, float]:
    """The in-process median of the work each CLI command does, by the command's label."""
    tabular = {(r["model"], r["patients"], r["explain"]): r["median_s"] for r in predict}
    big = max(r["patients"] for r in predict)
    whole = {(r["task"], r["stage"]): r["median_s"] for r in imaging}
    labels = {
        "predict logreg, 1 patient": tabular.get(("logreg", 1, False)),
        "predict mlp, 1 patient": tabular.get(("mlp", 1, False)),
        f"predict mlp, {big} patients": tabular.get(("mlp", big, False)),
        "predict mlp --explain, 100 patients": tabular.get(("mlp", 100, True)),
        "predict xray --explain, 1 radiograph": whole.get(
            ("xray", "predict_imaging, 1 radiograph, Grad-CAM PNG")
        ),
        "predict ct --explain, 1 volume": whole.get(
            ("ct", "predict_imaging, 1 volume, Grad-CAM PNG")
        ),
    }
    return {k: v for k, v in labels.items() if v is not None}


def print_cli(rows: list[dict]) -> None:
    floor = rows[0]["median_s"]
    table = [
        [r["what"], r["median_s"], r["min_s"], r["library_s"], r["median_s"] - floor if i else None]
        for i, r in enumerate(rows)
    ]
    print_table(
        "medfed predict, one fresh process (JSON out)",
        ["command", "median s", "min s", "library s", "above --help s"],
        table,
        digits=3,
    )


def print_imaging(rows: list[dict]) -> None:
    print_table(
        "imaging: per radiograph (xray 64 px) / per volume (ct 16x64x64)",
        ["task", "stage", "median ms", "min ms"],
        [[r["task"], r["stage"], 1000 * r["median_s"], 1000 * r["min_s"]] for r in rows],
        digits=2,
    )


RATIO_HEADERS = ("ratio (median)", "ratio (min)", "ratio (paired)")


def print_rest(importance: list[dict], fairness: dict, consent: dict) -> None:
    print_table(
        "permutation importance at a site (site_importance)",
        ["model", "held-out", "repeats", "columns", "median s", "min s", "CSV read s",
         "top column"],
        [[r["model"], r["held_out"], r["repeats"], r["columns"], r["median_s"], r["min_s"],
          r["csv_read_s"], r["top_column"]] for r in importance],
    )  # fmt: skip
    on, off, combine = fairness["evaluate_on"], fairness["evaluate_off"], fairness["combine"]
    print_table(
        f"fairness ({', '.join(fairness['attributes'])}; {fairness['test_patients']} test "
        f"patients; released: {', '.join(fairness['groups_released'])})",
        ["measure", "median s", "min s", *RATIO_HEADERS],
        [
            ["Site.evaluate, fairness off", off["median_s"], off["min_s"], None, None, None],
            ["Site.evaluate, fairness on", on["median_s"], on["min_s"],
             *fairness["evaluate_ratio"].values()],
            ["fairness_metrics alone", fairness["fairness_metrics_alone"]["median_s"],
             fairness["fairness_metrics_alone"]["min_s"], None, None, None],
            [f"server combine, {combine['sites']} sites", combine["median_s"], combine["min_s"],
             None, None, None],
        ],
    )  # fmt: skip
    print_table(
        f"consent: load_site_data on {consent['rows']} rows",
        ["rules", "rows kept", "median s", "min s", *RATIO_HEADERS],
        [
            ["none", consent["kept"]["without"], consent["without"]["median_s"],
             consent["without"]["min_s"], None, None, None],
            [f"column + {consent['withdrawn_list_ids']}-id list", consent["kept"]["with"],
             consent["with"]["median_s"], consent["with"]["min_s"], *consent["ratio"].values()],
        ],
    )  # fmt: skip


# -- main ----------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 repeat")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of in-process timings")
    parser.add_argument("--ig-max", type=int, default=10_000,
                        help="largest CSV explained with integrated gradients (mlp)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads in process")
    parser.add_argument("--out", type=Path, default=default_out(NAME))
    args = parser.parse_args()
    args.sizes = PREDICT_SIZES[:3] if args.quick else PREDICT_SIZES
    if args.quick:
        args.repeats, args.ig_max = 1, 100
    args.cli_repeats = 1 if args.quick else 3
    args.fairness_repeats = 2 if args.quick else 15
    args.consent_repeats = 1 if args.quick else 5
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict[str, Any] = {"benchmark": NAME, "quick": args.quick,
                               "torch_threads": torch.get_num_threads()}  # fmt: skip
    sections: dict[str, float] = {}

    def section(name: str, fn: Callable[[], Any]) -> Any:
        print(name, flush=True)
        begun = time.perf_counter()
        value = fn()
        sections[name] = time.perf_counter() - begun
        return value

    with tempfile.TemporaryDirectory(prefix="medfed-bench-clinician-") as tmp:
        root = Path(tmp)
        site = base_site(root)
        checkpoints = section("setup: train checkpoints", lambda: {
            m: train_checkpoint(site, m, root / "ckpt", args.quick) for m in ("logreg", "mlp")
        })  # fmt: skip
        results["predict"] = section(
            "predict (library)", lambda: bench_predict(site, checkpoints, root, args)
        )
        imaging = section("setup: DICOM", lambda: imaging_inputs(root / "imaging", args.quick))
        results["imaging"] = section("imaging", lambda: bench_imaging(imaging, root, args))
        library = library_seconds(results["predict"], results["imaging"])
        results["predict_cli"] = section(
            "predict (CLI, fresh processes)",
            lambda: bench_cli(checkpoints, imaging, root, args, library),
        )
        results["importance"] = section(
            "importance", lambda: bench_importance(site, checkpoints, root, args)
        )
        results["fairness"] = section(
            "fairness", lambda: bench_fairness(site, checkpoints, root, args)
        )
        results["consent"] = section("consent", lambda: bench_consent(site, root, args))
    results["sections_s"] = sections
    results["total_seconds"] = time.perf_counter() - started
    print_predict(results["predict"])
    print_cli(results["predict_cli"])
    print_imaging(results["imaging"])
    print_rest(results["importance"], results["fairness"], results["consent"])
    spent = ", ".join(f"{k} {v:.0f} s" for k, v in results["sections_s"].items())
    print(f"\ntotal {results['total_seconds']:.0f} s ({spent})")
    results["environment"] = environment()
    write_json(args.out, results)


if __name__ == "__main__":
    main()
