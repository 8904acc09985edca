"""End to end: medfed secure aggregation in Flower's simulation engine, with dropouts.

Four DP-SGD sites (t = 3 of 4) and a fault-injecting mod in front of the ClientApp that
makes chosen sites go silent at a chosen stage of a chosen round:

- round 1: site 3 drops after sending its masked update (no answer to the unmask request);
  its update stays in the sum, its self mask is removed from the others' shares;
- round 2: site 2 drops before masking (no answer at the training stage); its pairwise
  masks are recovered from the survivors' key shares;
- round 3: sites 1 and 2 drop before masking, leaving 2 < t: the round aborts, the model
  stays as it was, and the run goes on;
- round 4: everyone answers.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.simulation import run_simulation

from medfed.client.app import build_client_app
from medfed.client.policy import SitePolicy, write_policy
from medfed.client.secagg_mod import error_reply
from medfed.common.config import RunSettings
from medfed.common.ledger import read_ledger
from medfed.common.secagg import wire
from medfed.server.app import build_server_app
from medfed.server.checkpoint import load_checkpoint
from medfed.simulations.identities import write_simulation_identities
from medfed.simulations.synthetic import generate_risk_sites

pytestmark = pytest.mark.slow

ROUNDS = 4
# (round, stage the coordinator sends) -> partitions that do not answer it
SILENT = {
    (1, wire.STAGE_UNMASK_REQUEST): {3},
    (2, wire.STAGE_ROUTED_SHARES): {2},
    (3, wire.STAGE_ROUTED_SHARES): {1, 2},
}


def drop_out(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Fault injection: the chosen sites fail the chosen stage without doing its work."""
    record = msg.content.config_records.get(wire.RECORD_KEY)
    if record is not None:
        stage = wire.stage_of(record)
        partition = int(ctxt.node_config["partition-id"])
        if partition in SILENT.get((int(msg.metadata.group_id), stage), ()):
            return error_reply(msg, f"injected dropout at {stage}")
    return call_next(msg, ctxt)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg")
    data, out = root / "sites", root / "run"
    site_dirs = generate_risk_sites(4, data, seed=11, size_scale=0.3)
    for i, d in enumerate(site_dirs):
        write_policy(d / "site.toml", SitePolicy(site_id=f"h{i}", epsilon_budget=20.0))
    settings = RunSettings(
        num_rounds=ROUNDS,
        epsilon=4.0,
        data_root=str(data),
        out_dir=str(out),
        seed=5,
        secagg_timeout=30.0,
    )
    write_simulation_identities(site_dirs, settings.roster_path())
    config = settings.to_flower()
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    run_simulation(
        server_app=build_server_app(config, expected_sites=4),
        client_app=build_client_app(config, outer_mods=[drop_out]),
        num_supernodes=4,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False},
        },
    )
    record = json.loads((out / "run.json").read_text())
    return site_dirs, out, record


def test_run_completes_through_dropouts_and_an_aborted_round(federation):
    _, _, record = federation
    assert record["status"] == "completed"
    assert record["secure_aggregation"]["protocol"] == "medfed"
    statuses = [r["status"] for r in record["rounds"]]
    assert statuses == ["aggregated", "aggregated", "aborted", "aggregated"]
    assert record["final_metrics"]["auc"] > 0.6


def test_drop_after_masking_keeps_the_update_in_the_sum(federation):
    _, _, record = federation
    first = record["rounds"][0]
    assert first["participants"] == ["h0", "h1", "h2", "h3"]
    assert first["dropped"] == []
    assert "injected dropout" in first["secure_aggregation"]["site_errors"]["h3"]


def test_drop_before_masking_is_recovered_without_the_update(federation):
    _, _, record = federation
    second = record["rounds"][1]
    assert second["participants"] == ["h0", "h1", "h3"]
    assert second["dropped"] == ["h2"]
    assert second["secure_aggregation"]["threshold"] == 3


def test_too_few_survivors_abort_and_leave_the_model_unchanged(federation):
    _, out, record = federation
    third = record["rounds"][2]
    assert "only 2 sites sent masked vectors" in third["note"]
    assert third["participants"] == []
    before, _ = load_checkpoint(out / record["rounds"][1]["checkpoint"])
    after, _ = load_checkpoint(out / third["checkpoint"])
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sites_that_trained_record_their_spend(federation):
    site_dirs, _, _ = federation
    trained = {
        i: sorted(e.round for e in read_ledger(d / "ledger.jsonl") if e.kind == "train")
        for i, d in enumerate(site_dirs)
    }
    # Silenced before training: no DP-SGD ran, so nothing was spent in those rounds.
    assert trained == {0: [1, 2, 3, 4], 1: [1, 2, 4], 2: [1, 4], 3: [1, 2, 3, 4]}
