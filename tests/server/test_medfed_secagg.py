"""The coordinator's medfed secure aggregation (server/medfed_secagg.py) over an in-process Grid.

:class:`SiteGrid` stands in for Flower's transport: each message the workflow sends goes
through a protobuf round trip to its site's :class:`MedfedSecAggMod` (a real site: its own
node ``Context``, roster identity and real crypto), and the reply comes back the same way.
Dropouts are simulated per stage, either as a site that never gets the message (offline) or
as a reply that never arrives (lost). The sites' "training" returns the global model it got
plus a known delta, so the new global model can be checked against the weighted average.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
    serde,
)
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from medfed.client.secagg_mod import (
    CONFIG_STATE,
    LAST_ROUND_KEY,
    ROUND_STATE,
    SESSION_STATE,
    MedfedSecAggMod,
)
from medfed.client.site_identity import SiteIdentity
from medfed.common.messages import ACCEPT_KEY, SECAGG_ID_KEY, SITE_ID_KEY
from medfed.common.secagg import wire
from medfed.common.secagg.identity import Roster, simulation_roster
from medfed.common.secagg.protocol import ProtocolConfig
from medfed.common.secagg.quantize import error_bound
from medfed.server.medfed_secagg import MedfedSecAggWorkflow, SecAggRound, threshold_for
from medfed.server.strategy import SiteSelectingFedAvg

RUN = 2**63 + 17  # Flower run ids are uint64
ROSTER_IDS = (1, 2, 3, 4)
NAMES = {1: "oslo", 2: "bergen", 3: "tromso", 4: "stavanger"}
# Flower node ids, unrelated to roster ids; increasing with the roster id (see the
# duplicate-claim test, where the smaller Flower id keeps the roster id).
FLOWER = {1: 1_000_001, 2: 2**40 + 2, 3: 2**62 + 3, 4: 2**64 - 4}
ROSTER_OF = {fid: rid for rid, fid in FLOWER.items()}
SMALL = ((4, 3), (3,))
TIMEOUT = 30.0
CLIP = 1.0

SETUP, BROADCAST = wire.STAGE_SETUP, wire.STAGE_KEY_BROADCAST
TRAIN, UNMASK = wire.STAGE_ROUTED_SHARES, wire.STAGE_UNMASK_REQUEST
STAGES = (SETUP, BROADCAST, TRAIN, UNMASK)


# --------------------------------------------------------------------------- transport


def carry(message: Message) -> Message:
    """What Flower does to a message in flight: protobuf round trip, then a message id."""
    proto = serde.message_to_proto(message)
    out = serde.message_from_proto(ProtoMessage.FromString(proto.SerializeToString()))
    out.metadata.__dict__["_message_id"] = out.object_id
    return out


@dataclass
class SiteNode:
    """One site behind the grid: its mod, its node context and its training."""

    roster_id: int
    context: Context
    mod: MedfedSecAggMod
    delta: list[np.ndarray]
    num_examples: int
    received: list[list[np.ndarray]] = field(default_factory=list)
    trained: list[np.ndarray] = field(default_factory=list)
    fail: str | None = None

    @property
    def name(self) -> str:
        return NAMES[self.roster_id]

    def train(self, msg: Message, ctxt: Context) -> Message:
        assert ctxt is self.context
        global_model = parameters_to_ndarrays(
            compat.recorddict_to_fitins(msg.content, keep_input=True).parameters
        )
        self.received.append(global_model)
        if self.fail is not None:
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=self.fail), reply_to=msg
            )
        self.trained = [
            (g.astype(np.float64) + d).astype(g.dtype)
            for g, d in zip(global_model, self.delta, strict=True)
        ]
        res = FitRes(
            Status(Code.OK, "ok"),
            ndarrays_to_parameters(self.trained),
            self.num_examples,
            {SITE_ID_KEY: self.name, "loss": 0.5},
        )
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    def update(self) -> np.ndarray:
        """The flat update of its last training: trained - the global model it got."""
        return np.concatenate(
            [
                (t.astype(np.float64) - g.astype(np.float64)).ravel()
                for t, g in zip(self.trained, self.received[-1], strict=True)
            ]
        )

    def session_wiped(self) -> bool:
        records = self.context.state.config_records
        return CONFIG_STATE not in records and SESSION_STATE not in records


class SiteGrid(Grid):
    """A test double of Flower's Grid: each message goes, in-process, to its site's mod.

    ``offline[stage]``: Flower node ids that never get that stage's message;
    ``lost[stage]``: Flower node ids whose reply to that stage never arrives;
    ``tamper[(stage, node)]``: changes that node's reply (a non-conforming site).
    """

    def __init__(self, sites: dict[int, SiteNode]) -> None:
        self.sites = sites  # by Flower node id
        self.offline: dict[str, set[int]] = {}
        self.lost: dict[str, set[int]] = {}
        self.tamper: dict[tuple[str, int], Callable[[Message], None]] = {}
        self.sent: list[tuple[str, int]] = []
        self.configs: list[ProtocolConfig] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        assert timeout == TIMEOUT
        replies = []
        for msg in messages:
            meta = msg.metadata
            assert meta.message_type == MessageType.TRAIN
            assert meta.src_node_id == SUPERLINK_NODE_ID and meta.run_id == RUN
            record = msg.content.config_records[wire.RECORD_KEY]
            stage = wire.stage_of(record)
            dst = meta.dst_node_id
            self.sent.append((stage, dst))
            if stage == SETUP:
                self.configs.append(wire.decode(record, expect=SETUP))
            if dst in self.offline.get(stage, ()):
                continue
            site = self.sites[dst]
            delivered = carry(msg)
            assert delivered.metadata.group_id == meta.group_id
            reply = site.mod(delivered, site.context, site.train)
            if dst in self.lost.get(stage, ()):
                continue
            if (stage, dst) in self.tamper:
                self.tamper[stage, dst](reply)
            replies.append(carry(reply))
        return replies

    def stages_sent(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for stage, dst in self.sent:
            out.setdefault(stage, []).append(dst)
        return out

    # The workflow must use nothing but send_and_receive.
    def set_run(self, run):
        raise AssertionError("the workflow must only call send_and_receive")

    @property
    def run(self):
        raise AssertionError("the workflow must only call send_and_receive")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise AssertionError("the workflow must only call send_and_receive")

    def get_node_ids(self):
        raise AssertionError("the workflow must only call send_and_receive")

    def push_messages(self, messages):
        raise AssertionError("the workflow must only call send_and_receive")

    def pull_messages(self, message_ids):
        raise AssertionError("the workflow must only call send_and_receive")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    """Flower sets these when it starts a ServerApp; Message() needs them."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@dataclass
class Federation:
    roster: Roster
    sites: dict[int, SiteNode]  # by Flower node id
    grid: SiteGrid
    context: LegacyContext

    def accepted(self, claims: dict[int, object] | None = None) -> dict[int, dict]:
        """Each site's reply to "will you train?": accept, with the roster id it claims."""
        claims = claims if claims is not None else {fid: ROSTER_OF[fid] for fid in self.sites}
        return {
            fid: {
                SITE_ID_KEY: self.sites[fid].name,
                ACCEPT_KEY: True,
                SECAGG_ID_KEY: claim,
                "train-records": self.sites[fid].num_examples,
            }
            for fid, claim in claims.items()
        }

    def global_model(self) -> list[np.ndarray]:
        return parameters_to_ndarrays(
            compat.arrayrecord_to_parameters(
                self.context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
            )
        )

    def run(self, server_round: int = 1, threshold: float = 0.66, **accepted) -> SecAggRound:
        workflow = MedfedSecAggWorkflow(self.roster, threshold, CLIP, TIMEOUT)
        return workflow(self.grid, self.context, server_round, self.accepted(**accepted))


def make_federation(layers=SMALL, seed=0) -> Federation:
    plain, keys = simulation_roster(ROSTER_IDS)
    roster = Roster(plain.keys, NAMES)
    rng = np.random.default_rng(seed)
    sites = {}
    for rid in ROSTER_IDS:
        identity = SiteIdentity(rid, keys[rid], roster)
        context = Context(
            run_id=RUN, node_id=FLOWER[rid], node_config={}, state=RecordDict(), run_config={}
        )
        sites[FLOWER[rid]] = SiteNode(
            rid,
            context,
            MedfedSecAggMod(lambda ctxt, identity=identity: identity),
            [rng.uniform(-0.5, 0.5, s) for s in layers],
            int(rng.integers(10, 5000)),
        )
    initial = [rng.normal(0, 1, s).astype(np.float32) for s in layers]
    strategy = SiteSelectingFedAvg(2, ndarrays_to_parameters(initial))
    context = LegacyContext(
        context=Context(
            run_id=RUN, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={}
        ),
        config=ServerConfig(num_rounds=3),
        strategy=strategy,
    )
    # as MedfedWorkflow does before round 1
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        strategy.initialize_parameters(context.client_manager), keep_input=True
    )
    return Federation(roster, sites, SiteGrid(sites), context)


@pytest.fixture
def fed() -> Federation:
    return make_federation()


def check_new_model(fed: Federation, before: list[np.ndarray], summed: Iterable[int]) -> None:
    """New global model == before + weighted average of the summed sites' updates, within the
    quantisation bound of the round's parameters (plus the final cast to float32)."""
    sites = [fed.sites[fid] for fid in summed]
    for site in sites:  # each trained on the global model of this round
        for got, sent in zip(site.received[-1], before, strict=True):
            np.testing.assert_array_equal(got, sent)
    weights = np.array([s.num_examples for s in sites], np.float64)
    average = weights @ np.stack([s.update() for s in sites]) / weights.sum()
    expected = np.concatenate([b.astype(np.float64).ravel() for b in before]) + average
    after = fed.global_model()
    assert [a.shape for a in after] == [b.shape for b in before]
    assert all(a.dtype == b.dtype for a, b in zip(after, before, strict=True))
    got = np.concatenate([a.astype(np.float64).ravel() for a in after])
    quant = fed.grid.configs[-1].quant
    bound = error_bound(quant, weights.sum() * (1 - 1e-6), num_summed=len(sites))
    assert bound < 1e-5
    tolerance = bound + np.abs(expected) * 2.0**-23  # float32 rounding of the stored model
    assert np.all(np.abs(got - expected) <= tolerance)
    assert not np.allclose(got, expected - average)  # the model did move


def unchanged(fed: Federation, before: list[np.ndarray]) -> bool:
    after = fed.global_model()
    return all(np.array_equal(a, b) for a, b in zip(after, before, strict=True))


# --------------------------------------------------------------------------- all sites survive


def test_all_sites_survive(fed):
    before = fed.global_model()
    outcome = fed.run(server_round=1)
    everyone = sorted(fed.sites)
    assert outcome.status == "aggregated", outcome
    assert outcome.threshold == threshold_for(0.66, 4) == 3
    assert outcome.survivors == everyone and outcome.dropped == []
    assert outcome.site_errors == {} and outcome.note == ""
    assert set(outcome.stage_seconds) == {"setup", "keys", "train", "unmask"}
    check_new_model(fed, before, everyone)
    # every stage went to every site, once, in order
    assert [stage for stage, _ in fed.grid.sent] == [s for s in STAGES for _ in range(4)]
    assert all(sorted(dsts) == everyone for dsts in fed.grid.stages_sent().values())
    config = fed.grid.configs[0]
    assert fed.grid.configs == [config] * 4  # every site got the same round parameters
    assert config.nodes == frozenset(ROSTER_IDS) and config.run_id == RUN
    assert config.dimension == 15 and config.quant.clip == CLIP
    assert config.quant.max_weight == max(s.num_examples for s in fed.sites.values())
    # the survivors' reports, without parameters
    assert [nid for nid, _ in outcome.fit_results] == everyone
    for nid, res in outcome.fit_results:
        site = fed.sites[nid]
        assert res.num_examples == site.num_examples
        assert res.metrics == {SITE_ID_KEY: site.name, "loss": 0.5}
        assert parameters_to_ndarrays(res.parameters) == []
    for site in fed.sites.values():
        assert site.session_wiped()
        assert site.context.state.config_records[ROUND_STATE][LAST_ROUND_KEY] == 1
    summary = outcome.summary(lambda nid: fed.sites[nid].name)
    json.dumps(summary)
    assert summary["status"] == "aggregated" and summary["dropped"] == []
    assert set(summary["masked_vector_bytes"]) == set(NAMES.values())
    dimension = summary["plain_float32_bytes"] // 4
    assert set(summary["masked_vector_bytes"].values()) == {4 * (dimension + 1)}


def test_consecutive_rounds_train_on_the_new_model(fed):
    for server_round in (1, 2, 3):
        before = fed.global_model()
        outcome = fed.run(server_round=server_round)
        assert outcome.status == "aggregated"
        check_new_model(fed, before, sorted(fed.sites))


# --------------------------------------------------------------------------- dropouts


@pytest.mark.parametrize("how", ["offline", "lost"])
def test_drop_after_masking_is_a_survivor(fed, how):
    """No answer to the unmask request: the site's masked update is in the sum (recovered
    from the others' seed shares), so it is a survivor, not dropped."""
    late = FLOWER[3]
    getattr(fed.grid, how)[UNMASK] = {late}
    before = fed.global_model()
    outcome = fed.run()
    assert outcome.status == "aggregated", outcome.note
    assert late in outcome.survivors and outcome.dropped == []
    assert late not in outcome.site_errors
    check_new_model(fed, before, sorted(fed.sites))  # its update is in the average


@pytest.mark.parametrize("how", ["offline", "lost"])
def test_drop_before_masking_is_dropped_and_its_masks_recovered(fed, how):
    """No masked vector: the site shared keys, so it is dropped; its pairwise masks are
    removed with the others' shares of its mask key, and its update is not in the sum."""
    gone = FLOWER[2]
    getattr(fed.grid, how)[TRAIN] = {gone}
    before = fed.global_model()
    outcome = fed.run()
    assert outcome.status == "aggregated", outcome.note
    assert outcome.dropped == [gone] and gone not in outcome.survivors
    rest = [fid for fid in sorted(fed.sites) if fid != gone]
    assert outcome.survivors == rest
    assert [nid for nid, _ in outcome.fit_results] == rest
    assert gone not in fed.grid.stages_sent()[UNMASK]
    check_new_model(fed, before, rest)


def test_drop_before_sharing_keys_is_neither_survivor_nor_dropped(fed):
    gone = FLOWER[4]
    fed.grid.lost[SETUP] = {gone}
    before = fed.global_model()
    outcome = fed.run()
    assert outcome.status == "aggregated", outcome.note
    rest = [fid for fid in sorted(fed.sites) if fid != gone]
    assert outcome.survivors == rest and outcome.dropped == []
    assert gone not in fed.grid.stages_sent()[BROADCAST]
    check_new_model(fed, before, rest)


@pytest.mark.parametrize(
    ("stage", "gone", "note"),
    [
        (TRAIN, (1, 2), "only 2 sites sent masked vectors, threshold 3"),
        (SETUP, (1, 3), "only 2 sites sent keys, threshold 3"),
        (BROADCAST, (2, 4), "only 2 sites sent shares, threshold 3"),
        (UNMASK, (1, 2), "fewer than t=3 unmask shares"),
    ],
)
def test_fewer_than_threshold_aborts_and_keeps_the_model(fed, stage, gone, note):
    fed.grid.offline[stage] = {FLOWER[rid] for rid in gone}
    before = fed.global_model()
    outcome = fed.run(threshold=0.75)
    assert outcome.threshold == 3
    assert outcome.status == "aborted"
    assert note in outcome.note and f"run {RUN} round 1" in outcome.note
    assert outcome.survivors == [] and outcome.dropped == [] and outcome.fit_results == []
    assert unchanged(fed, before)
    later = STAGES[STAGES.index(stage) + 1 :]
    if stage != UNMASK:
        assert not set(later) & set(fed.grid.stages_sent())  # nothing more was asked
    # the coordinator goes on: the next round aggregates
    fed.grid.offline.clear()
    assert fed.run(server_round=2, threshold=0.75).status == "aggregated"
    check_new_model(fed, before, sorted(fed.sites))


# --------------------------------------------------------------------------- roster claims


def test_only_one_valid_roster_id_aborts_before_sending_anything(fed):
    claims = {FLOWER[1]: 1, FLOWER[2]: 99, FLOWER[3]: "3", FLOWER[4]: None}
    before = fed.global_model()
    outcome = fed.run(claims=claims)
    assert outcome.status == "aborted"
    assert "only 1 site(s) with a valid roster id" in outcome.note
    assert set(outcome.site_errors) == {FLOWER[2], FLOWER[3], FLOWER[4]}
    assert outcome.site_errors[FLOWER[2]] == "roster id 99 is not in the roster"
    assert outcome.site_errors[FLOWER[3]] == "roster id '3' is not in the roster"
    assert fed.grid.sent == [] and unchanged(fed, before)


def test_unknown_and_duplicate_roster_claims_are_site_errors(fed):
    claims = {FLOWER[1]: 1, FLOWER[2]: 2, FLOWER[3]: 1, FLOWER[4]: 404}
    before = fed.global_model()
    outcome = fed.run(claims=claims)
    assert outcome.site_errors == {
        FLOWER[3]: f"roster id 1 already claimed by node {FLOWER[1]}",
        FLOWER[4]: "roster id 404 is not in the roster",
    }
    assert outcome.status == "aggregated" and outcome.threshold == 2
    assert {dst for _, dst in fed.grid.sent} == {FLOWER[1], FLOWER[2]}  # the others: nothing
    assert outcome.survivors == [FLOWER[1], FLOWER[2]]
    check_new_model(fed, before, [FLOWER[1], FLOWER[2]])


def test_a_malformed_declared_weight_is_a_site_error_not_a_crash(fed):
    accepted = fed.accepted()
    accepted[FLOWER[4]]["train-records"] = "many"
    workflow = MedfedSecAggWorkflow(fed.roster, 0.66, CLIP, TIMEOUT)
    outcome = workflow(fed.grid, fed.context, 1, accepted)
    assert "train-records 'many'" in outcome.site_errors[FLOWER[4]]
    assert outcome.status == "aggregated"
    assert FLOWER[4] not in outcome.survivors


def test_sites_answering_as_another_roster_id_are_rejected(fed):
    """Sites 1 and 4 claim each other's roster id: their signed keys name their own, so the
    coordinator rejects both replies and the round goes on without them."""
    claims = {FLOWER[1]: 4, FLOWER[2]: 2, FLOWER[3]: 3, FLOWER[4]: 1}
    before = fed.global_model()
    outcome = fed.run(claims=claims, threshold=0.5)
    assert outcome.threshold == 2
    assert outcome.site_errors == {
        FLOWER[1]: f"rejected: node {FLOWER[1]} answered as roster id 1, it claimed 4",
        FLOWER[4]: f"rejected: node {FLOWER[4]} answered as roster id 4, it claimed 1",
    }
    assert outcome.status == "aggregated" and outcome.dropped == []
    assert outcome.survivors == [FLOWER[2], FLOWER[3]]
    check_new_model(fed, before, [FLOWER[2], FLOWER[3]])


# --------------------------------------------------------------------------- site errors


def test_a_sites_error_reply_is_recorded_with_its_reason(fed):
    failing = fed.sites[FLOWER[2]]
    failing.fail = "site declined round 1: epsilon budget exhausted"
    before = fed.global_model()
    outcome = fed.run()
    reason = outcome.site_errors[FLOWER[2]]
    assert reason.startswith("site 'bergen' (node 2): secure aggregation aborted:")
    assert "training failed: site declined round 1: epsilon budget exhausted" in reason
    assert list(outcome.site_errors) == [FLOWER[2]]
    assert outcome.status == "aggregated" and outcome.dropped == [FLOWER[2]]
    rest = [fid for fid in sorted(fed.sites) if fid != FLOWER[2]]
    check_new_model(fed, before, rest)
    assert failing.session_wiped()
    summary = outcome.summary(lambda nid: fed.sites[nid].name)
    assert summary["dropped"] == ["bergen"] and list(summary["site_errors"]) == ["bergen"]


def strip_fitres(reply: Message) -> None:
    for key in [k for k in reply.content if k.startswith("fitres.")]:
        del reply.content[key]


def test_a_masked_reply_without_fit_results_is_rejected_not_fatal(fed):
    odd = FLOWER[3]
    fed.grid.tamper[TRAIN, odd] = strip_fitres
    before = fed.global_model()
    outcome = fed.run()
    assert outcome.site_errors[odd].startswith("rejected:")
    assert outcome.status == "aggregated" and outcome.dropped == [odd]
    check_new_model(fed, before, outcome.survivors)


def test_a_replayed_round_is_refused_by_every_site(fed):
    assert fed.run(server_round=2).status == "aggregated"
    before = fed.global_model()
    outcome = fed.run(server_round=2)
    assert outcome.status == "aborted" and "only 0 sites sent keys" in outcome.note
    assert set(outcome.site_errors) == set(fed.sites)
    assert all("replayed" in e for e in outcome.site_errors.values())
    assert unchanged(fed, before)


# --------------------------------------------------------------------------- upload size


def test_masked_upload_is_about_the_size_of_a_float32_update():
    fed = make_federation(layers=((100, 100), (100,)), seed=3)
    outcome = fed.run()
    assert outcome.status == "aggregated"
    assert outcome.plain_bytes == 4 * 10_100
    assert set(outcome.masked_bytes) == set(fed.sites)
    for size in outcome.masked_bytes.values():
        assert outcome.plain_bytes < size <= 1.1 * outcome.plain_bytes


def test_workflow_rejects_bad_parameters(fed):
    with pytest.raises(ValueError, match="threshold"):
        MedfedSecAggWorkflow(fed.roster, 0.0, CLIP, TIMEOUT)
    with pytest.raises(ValueError, match="clip and the timeouts"):
        MedfedSecAggWorkflow(fed.roster, 0.5, 0.0, TIMEOUT)


@pytest.mark.parametrize(
    ("fraction", "n", "t"), [(0.66, 2, 2), (0.66, 3, 2), (0.66, 4, 3), (0.5, 10, 5), (1.0, 5, 5)]
)
def test_threshold_for(fraction, n, t):
    assert threshold_for(fraction, n) == t
