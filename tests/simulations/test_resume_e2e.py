"""End to end: the coordinator is killed during round 3 and a restarted one resumes the run.

Four DP-SGD sites under medfed secure aggregation, one named run ``R`` of three rounds,
the same site folders and output folder for both Flower runs:

- run 1: rounds 1 and 2 complete. In round 3 sites 2 and 3 fail before training (a
  fault-injecting mod), sites 0 and 1 train it and record the spend, and then the
  coordinator dies (a workflow that raises in round 3's evaluation), before round 3 is
  recorded or checkpointed;
- run 2 (a new Flower run, ``resume = true``): the coordinator continues from round 2's
  checkpoint with round 3. Sites 0 and 1 decline it, since it is already in their
  ledgers; sites 2 and 3 train it with the noise their ledgers recorded for run ``R``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

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
from medfed.server.workflow import MedfedWorkflow
from medfed.simulations.identities import write_simulation_identities
from medfed.simulations.synthetic import generate_risk_sites

pytestmark = pytest.mark.slow

RUN = "R"
KILLED_IN = 3
SKIPS_ROUND_3 = {2, 3}  # partitions that fail round 3 of the first run before training


class SkipRound3:
    """Client mod: in the first Flower run, sites 2 and 3 drop out of round 3 untrained."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        record = msg.content.config_records.get(wire.RECORD_KEY)
        if (
            self.active
            and record is not None
            and int(msg.metadata.group_id) == KILLED_IN
            and wire.stage_of(record) == wire.STAGE_ROUTED_SHARES
            and int(ctxt.node_config["partition-id"]) in SKIPS_ROUND_3
        ):
            return error_reply(msg, "injected dropout before training")
        return call_next(msg, ctxt)


class KilledCoordinator(MedfedWorkflow):
    """Dies in round 3, after the sites trained and before the round is recorded."""

    def _evaluate(self, grid, context, server_round):  # type: ignore[no-untyped-def]
        if server_round == KILLED_IN:
            raise RuntimeError(f"coordinator killed in round {server_round}")
        return super()._evaluate(grid, context, server_round)


def _simulate(settings: RunSettings, server_app) -> None:  # type: ignore[no-untyped-def]
    run_simulation(
        server_app=server_app,
        client_app=build_client_app(settings.to_flower(), [SkipRound3(not settings.resume)]),
        num_supernodes=4,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False},
        },
    )


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data, out = root / "sites", root / "run"
    site_dirs = generate_risk_sites(4, data, seed=11, size_scale=0.3)
    for i, d in enumerate(site_dirs):
        write_policy(d / "site.toml", SitePolicy(site_id=f"h{i}", epsilon_budget=20.0))
    settings = RunSettings(
        num_rounds=3,
        epsilon=4.0,
        data_root=str(data),
        out_dir=str(out),
        seed=5,
        secagg_timeout=30.0,
        run_name=RUN,
    )
    write_simulation_identities(site_dirs, settings.roster_path())
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)

    with pytest.raises(RuntimeError, match="coordinator killed in round 3"):
        _simulate(settings, build_server_app(settings.to_flower(), 4, KilledCoordinator))
    first = json.loads((out / "run.json").read_text())
    ledgers_after_crash = {
        f"h{i}": [(e.kind, e.run_id, e.round) for e in read_ledger(d / "ledger.jsonl")]
        for i, d in enumerate(site_dirs)
    }

    again = settings.model_copy(update={"resume": True})
    _simulate(again, build_server_app(again.to_flower(), 4))
    record = json.loads((out / "run.json").read_text())
    ledgers = {f"h{i}": read_ledger(d / "ledger.jsonl") for i, d in enumerate(site_dirs)}
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    return first, ledgers_after_crash, record, ledgers, events


def test_first_run_stops_after_two_recorded_rounds(resumed):
    first, ledgers_after_crash, _, _, _ = resumed
    assert first["status"] == "failed" and "killed in round 3" in first["error"]
    assert first["run_id"] == RUN
    assert [r["round"] for r in first["rounds"]] == [1, 2]
    # Sites 0 and 1 trained round 3 before the coordinator died; 2 and 3 did not.
    trained_3 = {s for s, entries in ledgers_after_crash.items() if ("train", RUN, 3) in entries}
    assert trained_3 == {"h0", "h1"}


def test_resumed_run_completes_round_3_once(resumed):
    first, _, record, _, events = resumed
    assert record["status"] == "completed" and record["error"] == ""
    assert record["run_id"] == RUN
    assert [r["round"] for r in record["rounds"]] == [1, 2, 3]
    assert record["rounds"][:2] == first["rounds"]  # the completed rounds are kept as they were
    (resume,) = record["resumes"]
    assert resume["after_round"] == 2 and resume["previous_status"] == "failed"
    assert resume["flower_run_id"] != record["flower_run_id"]  # a new Flower run
    assert [e["event"] for e in events].count("run-resume") == 1
    third = record["rounds"][2]
    assert third["status"] == "aggregated"
    assert third["participants"] == ["h2", "h3"]
    assert third["declined"] == {
        "h0": f"round 3 of run {RUN} is already in the ledger",
        "h1": f"round 3 of run {RUN} is already in the ledger",
    }


def test_no_ledger_counts_a_round_twice_or_loses_one(resumed):
    _, _, _, ledgers, _ = resumed
    for site, entries in ledgers.items():
        trained = [e for e in entries if e.kind == "train" and e.run_id == RUN]
        counts = Counter(e.round for e in trained)
        assert counts == {1: 1, 2: 1, 3: 1}, site
        # A round already trained is not recorded again, not even as a decline.
        assert [e for e in entries if e.kind == "decline"] == [], site
        # The resumed run is the same run: its noise comes from the ledger, unchanged.
        assert len({e.noise_multiplier for e in trained}) == 1, site
        assert trained[-1].epsilon == max(e.epsilon for e in trained)
