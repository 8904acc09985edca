"""The model card of a run: what the model is for, what it was trained on, how private.

:func:`build_model_card` turns a run record (run.json) into a card: model details,
intended and out-of-scope use, training data per site, the privacy guarantee per site
(and what it does not cover), metrics overall, by site and by group, and known
limitations. :func:`write_model_card` writes it as ``model_card.json`` (the machine-
readable card) and ``model_card.md`` (the same card for people), each atomically.

Every figure comes from the record; the fixed wording per task lives in
:mod:`medfed.server.model_card_text`. The card claims nothing the record does not show:
where the record cannot tell (a site's own policy delta, the noise generator a site
used), it says so and points to the signed ledgers (``medfed audit report``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from medfed import __version__ as medfed_version
from medfed.common.atomic import atomic_write_json, atomic_write_text
from medfed.common.tasks import ImagingSpec, get_task_spec
from medfed.server.model_card_markdown import render_model_card_markdown
from medfed.server.model_card_text import NOT_COVERED, SECAGG_WORDS, task_text
from medfed.server.run_record import RUN_RECORD_NAME, RunRecord, RunRecordError

__all__ = [
    "MODEL_CARD_JSON",
    "MODEL_CARD_MD",
    "build_model_card",
    "render_model_card_markdown",
    "write_model_card",
]

MODEL_CARD_JSON = "model_card.json"
MODEL_CARD_MD = "model_card.md"
SCHEMA = "medfed-model-card/1"
#: A released test split below this many patients is flagged as small.
SMALL_TEST = 50
SUPPRESSED = "suppressed"


def write_model_card(out_dir: Path, record: RunRecord | dict[str, Any]) -> tuple[Path, Path]:
    """Build the card of ``record`` and write model_card.md and model_card.json in ``out_dir``.

    Returns (markdown path, JSON path). Each file is written atomically, so a reader
    never sees half a card.
    """
    out_dir = Path(out_dir)
    card = build_model_card(record, out_dir)
    md_path, json_path = out_dir / MODEL_CARD_MD, out_dir / MODEL_CARD_JSON
    atomic_write_json(json_path, card)
    atomic_write_text(md_path, render_model_card_markdown(card))
    return md_path, json_path


def build_model_card(record: RunRecord | dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The card of a run as a JSON-ready dict (the Markdown renders exactly this).

    ``out_dir`` is the run's output folder: the final checkpoint's file hash is read
    from there when the file exists. Raises RunRecordError when a dict is not a run record.
    """
    data = _as_dict(record, str(Path(out_dir) / RUN_RECORD_NAME))
    settings = data["settings"]
    text = task_text(str(settings.get("task", "?")), str(settings.get("dataset", "?")))
    evaluated = _last_evaluated(data["rounds"])
    card: dict[str, Any] = {
        "schema": SCHEMA,
        "generated": _iso(time.time()),
        "model_details": _model_details(data, Path(out_dir)),
        "intended_use": {
            "purpose": text.purpose,
            "intended": list(text.intended),
            "out_of_scope": list(text.out_of_scope),
        },
        "training_data": _training_data(data, evaluated, text.provenance),
        "privacy": _privacy(data),
        "metrics": _metrics(data, evaluated),
    }
    card["limitations"] = list(text.limitations) + _computed_limitations(data, card)
    return card


# -- the record ---------------------------------------------------------------------


def _as_dict(record: RunRecord | dict[str, Any], where: str) -> dict[str, Any]:
    """The record as a plain dict, checked to be a run record; unknown keys are kept.

    RunRecordError names ``where`` (the run.json the dict came from) and the field.
    """
    if isinstance(record, RunRecord):
        return asdict(record)
    if not isinstance(record, dict):
        raise RunRecordError(f"{where}: expected a JSON object")
    missing = [k for k in ("run_id", "settings", "secure_aggregation") if k not in record]
    if missing:
        raise RunRecordError(f"{where}: missing field(s) {', '.join(missing)}")
    known = {f.name for f in fields(RunRecord)}
    checked = RunRecord.from_dict({k: v for k, v in record.items() if k in known}, where)
    return {**record, **asdict(checked)}


def _last_evaluated(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last round that holds site evaluation reports (normally the final model's)."""
    for rnd in reversed(rounds):
        if rnd.get("site_metrics"):
            return rnd
    return None


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(seconds)))


# -- model details ------------------------------------------------------------------


def _model_details(data: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    s = data["settings"]
    rounds = data["rounds"]
    inputs = _inputs(s)
    return {
        "run_id": data["run_id"],
        "flower_run_id": data.get("flower_run_id", ""),
        "status": data.get("status"),
        "error": data.get("error") or "",
        "task": s.get("task"),
        "dataset": s.get("dataset"),
        "model": s.get("model"),
        "architecture": _architecture(s, inputs),
        "inputs": inputs,
        "rounds_planned": s.get("num_rounds"),
        "rounds_recorded": len(rounds),
        "rounds_aggregated": sum(r.get("status") == "aggregated" for r in rounds),
        "resumes": len(data.get("resumes") or []),
        "final_checkpoint": _final_checkpoint(rounds, out_dir),
        "started": _iso(data.get("started")),
        "finished": _iso(data.get("finished")),
        "medfed_version": medfed_version,
        "training": {
            k: s.get(k)
            for k in (
                "local_epochs",
                "batch_size",
                "learning_rate",
                "max_grad_norm",
                "seed",
                "test_fraction",
            )
        },
    }


def _inputs(settings: dict[str, Any]) -> dict[str, Any]:
    """The model's inputs: feature names (tabular) or one sample's shape (imaging)."""
    try:
        spec = get_task_spec(str(settings.get("task")), str(settings.get("dataset")))
    except ValueError:
        return {}
    if isinstance(spec, ImagingSpec):
        return {"sample_shape": list(spec.model_input)}
    return {"features": spec.feature_names()}


def _architecture(settings: dict[str, Any], inputs: dict[str, Any]) -> str:
    name, task = settings.get("model"), settings.get("task")
    n = len(inputs.get("features", [])) or "the task's"
    head = "a logit (sigmoid for the probability)" if task != "rehab" else "a value"
    descriptions = {
        "logreg": f"{'linear' if task == 'rehab' else 'logistic'} regression: one linear "
        f"layer over {n} features to {head}",
        "mlp": f"MLP: {n} features, two hidden layers of 32 with ReLU, one output ({head})",
        "cnn2d": "2D CNN: Conv2d 5x5 stride 2, then 3x3 stride-2 convs (8, 16, 32 "
        "channels), each with GroupNorm (no affine) and ReLU; global mean and max pooling; "
        "one linear layer to a logit",
        "cnn3d": "3D CNN: Conv3d (3, 5, 5) stride (1, 2, 2), then 3x3x3 stride-2 convs "
        "(8, 16, 32 channels), each with GroupNorm (no affine) and ReLU; global mean and "
        "max pooling; one linear layer to a logit",
    }
    return descriptions.get(str(name), f"model {name!r}")


def _final_checkpoint(rounds: list[dict[str, Any]], out_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint written: its path, the weights digest and the file's SHA-256."""
    for rnd in reversed(rounds):
        if rnd.get("checkpoint"):
            path = out_dir / rnd["checkpoint"]
            return {
                "round": rnd["round"],
                "path": rnd["checkpoint"],
                "model_sha256": rnd.get("model_sha256") or None,
                "file_sha256": _file_sha256(path),
            }
    return None


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


# -- training data ------------------------------------------------------------------


def _site_ids(data: dict[str, Any], evaluated: dict[str, Any] | None) -> list[str]:
    ids = set(data["sites"]) | set((evaluated or {}).get("site_metrics") or {})
    return sorted(ids)


def _test_size(report: dict[str, Any] | None) -> int | None:
    """The test split's size where the site released it (None if suppressed or absent)."""
    if not report or SUPPRESSED in report:
        return None
    n = report.get("num_examples")
    return int(n) if isinstance(n, int | float) and n > 0 else None


def _training_data(
    data: dict[str, Any], evaluated: dict[str, Any] | None, provenance: str
) -> dict[str, Any]:
    reports = (evaluated or {}).get("site_metrics") or {}
    sites = []
    for site_id in _site_ids(data, evaluated):
        summary = data["sites"].get(site_id, {})
        used = summary.get("records_used")
        test = _test_size(reports.get(site_id))
        sites.append(
            {
                "site_id": site_id,
                "records_used": used,
                "records_skipped": summary.get("records_skipped"),
                "test_records": test,
                "train_records": used - test if used and test is not None else None,
                "test_released": test is not None,
            }
        )
    s = data["settings"]
    return {
        "dataset": s.get("dataset"),
        "provenance": provenance,
        "split": f"per site, patient-level, test fraction {s.get('test_fraction')} "
        f"(stratified where possible), seed {s.get('seed')}; the same split in every run",
        "records_used_total": sum(x["records_used"] or 0 for x in sites),
        "sites": sites,
        "note": "records_used counts a site's valid records (training plus test split); "
        "records_skipped the rows it left out (each counted with line and column in the "
        "site's own data_report.json). Test sizes are those the sites released with the "
        "last evaluation; a suppressed site's test size is not known here.",
    }


# -- privacy ------------------------------------------------------------------------


def _unit_of_privacy(k: int) -> str:
    if k <= 1:
        return "one patient (one training sample per patient)"
    return (
        f"one patient, who may contribute up to {k} samples: the epsilon below is for one "
        f"sample; one patient has the weaker protection of a group of {k} samples"
    )


def _privacy(data: dict[str, Any]) -> dict[str, Any]:
    s = data["settings"]
    protocol = str((data.get("secure_aggregation") or {}).get("protocol", "?"))
    covered_words, not_covered_words = SECAGG_WORDS.get(
        protocol, (f"Secure aggregation protocol {protocol!r}.", "")
    )
    k = int(s.get("samples_per_patient") or 1)
    run_epsilon = float(s.get("epsilon") or 0)
    return {
        "unit_of_privacy": _unit_of_privacy(k),
        "mechanism": "DP-SGD at every site (Opacus): Poisson sampling, per-sample clipping "
        f"to norm {s.get('max_grad_norm')}, Gaussian noise of the noise multiplier times "
        "that norm; add/remove-one-patient adjacency within each site's data.",
        "accountant": "RDP (Opacus RDPAccountant), composed over every DP-SGD step the site "
        "took on the same dataset, across rounds, runs and restarts (the site's ledger).",
        "epsilon_target_per_run": run_epsilon,
        "delta": s.get("delta"),
        "delta_note": "The delta is the run's setting; each site reports its epsilon at its own "
        "policy's delta, which run.json does not record and may differ (in simulation new "
        "site policies use the larger of the run's delta and 1e-5). The signed ledgers "
        "name the delta of every spend: medfed audit report.",
        "sites": [_site_privacy(x, run_epsilon) for x in sorted(data["sites"].values(), key=_sid)],
        "secure_aggregation": {
            "protocol": protocol,
            "summary": covered_words,
            "description": (data.get("secure_aggregation") or {}).get("note", ""),
        },
        "covered": [
            "Every update a site released, and so every global checkpoint (a function of "
            "those updates only), is covered by that site's epsilon: post-processing "
            "cannot weaken it.",
            covered_words,
        ],
        "not_covered": [*NOT_COVERED, *([not_covered_words] if not_covered_words else [])],
        "verify": "These figures are the coordinator's record of what the sites reported; "
        "the sites' signed ledgers are the evidence: medfed audit verify OUT, then "
        "medfed audit report OUT.",
    }


def _sid(summary: dict[str, Any]) -> str:
    return str(summary.get("site_id", ""))


def _site_privacy(summary: dict[str, Any], run_epsilon: float) -> dict[str, Any]:
    spent = float(summary.get("epsilon_spent") or 0)
    trained = int(summary.get("rounds_trained") or 0)
    notes = []
    if trained == 0:
        notes.append("did not train in this run: it released no update")
    if spent > run_epsilon * (1 + 1e-6) and run_epsilon > 0:
        notes.append("spent more than this run's epsilon: the figure includes earlier runs")
    return {
        "site_id": summary.get("site_id"),
        "epsilon_spent": spent,
        "epsilon_budget": summary.get("epsilon_budget"),
        "noise_multiplier": summary.get("noise_multiplier"),
        "rounds_trained": trained,
        "rounds_declined": int(summary.get("rounds_declined") or 0),
        "note": "; ".join(notes),
    }


# -- metrics ------------------------------------------------------------------------


def _scalars(report: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a site report (not its count, id or nested fields)."""
    return {
        k: v
        for k, v in report.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "num_examples"
    }


def _site_metrics(site_id: str, report: dict[str, Any] | None) -> dict[str, Any]:
    if report is None:
        return {"site_id": site_id, "status": "no report", "n": None, "metrics": {}}
    if SUPPRESSED in report:
        return {
            "site_id": site_id,
            "status": SUPPRESSED,
            "n": None,
            "metrics": {},
            "reason": str(report[SUPPRESSED]),
        }
    return {
        "site_id": site_id,
        "status": "released",
        "n": _test_size(report),
        "metrics": _scalars(report),
    }


def _metrics(data: dict[str, Any], evaluated: dict[str, Any] | None) -> dict[str, Any]:
    reports = (evaluated or {}).get("site_metrics") or {}
    return {
        "evaluated_round": (evaluated or {}).get("round"),
        "overall": dict(data.get("final_metrics") or {}),
        "overall_note": "Example-weighted means over the sites that released metrics on "
        "their own test split; mean_site_* are unweighted means over those sites. Not "
        "DP-protected.",
        "by_site": [_site_metrics(s, reports.get(s)) for s in _site_ids(data, evaluated)],
        "by_group": _groups(data.get("fairness") or {}),
    }


def _groups(fairness: dict[str, Any]) -> dict[str, Any]:
    """Subgroup metrics as the run recorded them (absent: say so)."""
    if not fairness:
        return {
            "available": False,
            "note": "This run record holds no per-group metrics.",
        }
    return {
        "available": True,
        "attributes": list(fairness.get("attributes") or []),
        "threshold": fairness.get("threshold"),
        "groups": dict(fairness.get("groups") or {}),
        "by_site": dict(fairness.get("by_site") or {}),
        "gaps": dict(fairness.get("gaps") or {}),
        "suppressed": dict(fairness.get("suppressed") or {}),
        "not_reported": {
            **dict(fairness.get("not_reported") or {}),
            **{s: f"report ignored: {why}" for s, why in (fairness.get("ignored") or {}).items()},
        },
        "unavailable": dict(fairness.get("unavailable") or {}),
        "note": fairness.get("note", ""),
    }


# -- limitations computed from the record -------------------------------------------


def _computed_limitations(data: dict[str, Any], card: dict[str, Any]) -> list[str]:
    out = _run_limitations(data, card)
    out += _site_limitations(data, card)
    out += _group_limitations(card["metrics"]["by_group"])
    out.append(
        "The metrics are plain aggregates, not DP-protected: they are exact figures over "
        "each site's test split (released only above its minimum cohort)."
    )
    return out


def _run_limitations(data: dict[str, Any], card: dict[str, Any]) -> list[str]:
    out = []
    details = card["model_details"]
    if data.get("status") != "completed":
        ckpt = details["final_checkpoint"]
        where = f"round {ckpt['round']}" if ckpt else "no round"
        out.append(
            f"The run did not complete (status {data.get('status')}"
            f"{': ' + data['error'] if data.get('error') else ''}); the model is the "
            f"checkpoint of {where}, the last one written."
        )
    evaluated, ckpt = card["metrics"]["evaluated_round"], details["final_checkpoint"]
    if ckpt and evaluated != ckpt["round"]:
        out.append(
            f"The metrics are those of the model after round {evaluated or 'none'}; the final "
            f"checkpoint (round {ckpt['round']}) was not evaluated by the sites."
        )
    for rnd in data["rounds"]:
        if rnd.get("status") != "aggregated":
            out.append(
                f"Round {rnd['round']} was {rnd.get('status')}"
                f"{': ' + rnd['note'] if rnd.get('note') else ''}; the model did not change."
            )
    if int(data["settings"].get("samples_per_patient") or 1) > 1:
        out.append(f"Unit of privacy: {card['privacy']['unit_of_privacy']}.")
    if card["privacy"]["secure_aggregation"]["protocol"] == "off":
        out.append("Secure aggregation was off: the coordinator saw each site's DP update.")
    return out


def _decline_reasons(rounds: list[dict[str, Any]]) -> dict[str, str]:
    """Each site's last recorded reason for declining a round."""
    reasons: dict[str, str] = {}
    for rnd in rounds:
        for site, reason in (rnd.get("declined") or {}).items():
            reasons[site] = str(reason)
    return reasons


def _site_limitations(data: dict[str, Any], card: dict[str, Any]) -> list[str]:
    out = []
    reasons = _decline_reasons(data["rounds"])
    for site in card["privacy"]["sites"]:
        if site["rounds_declined"]:
            why = reasons.get(site["site_id"], "")
            out.append(
                f"Site {site['site_id']} declined {site['rounds_declined']} round(s)"
                f"{' (last reason: ' + why + ')' if why else ''}"
                + (" and contributed nothing to the model." if site["rounds_trained"] == 0 else ".")
            )
    by_site = card["metrics"]["by_site"]
    hidden = [s["site_id"] for s in by_site if s["status"] != "released"]
    if hidden:
        out.append(
            f"No test metrics from {', '.join(hidden)} (suppressed or not reported): the "
            "overall figures leave these sites out."
        )
    small = [f"{s['site_id']} ({s['n']})" for s in by_site if s["n"] and s["n"] < SMALL_TEST]
    if small:
        out.append(
            f"Small test splits (under {SMALL_TEST} patients): {', '.join(small)}; their "
            "metrics are uncertain and no confidence intervals are given."
        )
    return out


def _group_limitations(groups: dict[str, Any]) -> list[str]:
    if not groups["available"]:
        return [
            "No per-group (e.g. per-sex or per-age) metrics were recorded: differences in "
            "performance between patient groups are unknown for this run."
        ]
    out = []
    methods = sorted(
        {str(g.get("auc_method")) for g in groups["groups"].values() if g.get("auc_method")}
    )
    if methods:
        out.append(
            "AUC by group combines the sites' within-group figures (method: "
            f"{', '.join(methods)}): a weighted mean of site AUCs is not the AUC of the "
            "pooled group, and differences in calibration between sites do not show in it."
        )
    suppressed = [
        f"{site}: {', '.join(map(str, names))}"
        for site, names in sorted(groups["suppressed"].items())
        if names
    ]
    if suppressed:
        out.append(
            "Groups below a site's minimum cohort were suppressed and are left out of the "
            f"group figures ({'; '.join(suppressed)})."
        )
    missing = [f"{site} ({why})" for site, why in sorted(groups["not_reported"].items())]
    if missing:
        out.append(f"No group metrics from {'; '.join(missing)}: the group figures leave them out.")
    lacking = [f"{site} ({why})" for site, why in sorted(groups.get("unavailable", {}).items())]
    if lacking:
        out.append(
            f"Subgroup attributes unavailable at {'; '.join(lacking)}: those groups leave "
            "out that site's patients."
        )
    return out
