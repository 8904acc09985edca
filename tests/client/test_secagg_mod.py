"""medfed secure aggregation at the site (client/secagg_mod.py) and the train gate (client/app.py).

Four sites, each a :class:`MedfedSecAggMod` with a Flower ``Context`` of its own whose state
persists across messages (as a SuperNode's node state does), are driven by a
:class:`ServerSession` acting as the coordinator. Every message is encoded with ``wire``,
carried as a real Flower ``Message`` through a protobuf round trip (as between SuperLink and
SuperNode), and answered with ``Message(..., reply_to=msg)``. The "training" behind the mod
is a plain function returning a FitRes with known new parameters.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
    serde,
)
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode, MessageTypeLegacy
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.proto.message_pb2 import Message as ProtoMessage

from medfed.client.app import SecureAggregationGate, SiteClient, site_identity
from medfed.client.policy import SitePolicy, write_policy
from medfed.client.secagg_mod import (
    CONFIG_STATE,
    LAST_ROUND_KEY,
    ROUND_STATE,
    SESSION_STATE,
    MedfedSecAggMod,
)
from medfed.client.site import Site
from medfed.client.site_identity import IdentityConfigError, SiteIdentity, load_site_identity
from medfed.common.config import SIM_IDENTITY_NAME, SIM_ROSTER_NAME, RunSettings
from medfed.common.messages import ACCEPT_KEY, REASON_KEY, ROUND_KEY, SECAGG_ID_KEY
from medfed.common.secagg import wire
from medfed.common.secagg.identity import (
    Roster,
    generate_identity,
    save_identity,
    sign_keys,
    simulation_roster,
)
from medfed.common.secagg.masks import generate_keypair, public_bytes
from medfed.common.secagg.protocol import (
    AggregateResult,
    ProtocolConfig,
    RoutedShares,
    ServerSession,
    UnmaskRequest,
)
from medfed.common.secagg.quantize import QuantParams, error_bound

RUN = 7
ROSTER_IDS = (1, 2, 3, 4)
NAMES = {1: "oslo", 2: "bergen", 3: "tromso", 4: "stavanger"}
# Flower node ids are unrelated to roster ids (and uint64): the mod must use the roster's.
FLOWER_IDS = {1: 2**63 + 11, 2: 9_000_000_022, 3: 33, 4: 2**64 - 44}
LAYERS = ((3, 4), (5,), (2, 1, 3))
DIM = sum(int(np.prod(s)) for s in LAYERS)
CLIP = 1.0
MAX_WEIGHT = 1000.0
THRESHOLD = 3
VICTIM = 2


# --------------------------------------------------------------------------- transport


def carry(message: Message) -> Message:
    """What Flower does to a message in flight: protobuf round trip, then a message id."""
    proto = serde.message_to_proto(message)
    out = serde.message_from_proto(ProtoMessage.FromString(proto.SerializeToString()))
    out.metadata.__dict__["_message_id"] = out.object_id
    return out


def to_node(
    content: RecordDict, node_id: int, server_round: int = 1, message_type: str = "train"
) -> Message:
    """A coordinator -> node message as the SuperNode hands it to the ClientApp."""
    metadata = Metadata(
        run_id=RUN,
        message_id="",
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )
    return carry(Message(content=content, metadata=metadata))


def fit_content(global_model: list[np.ndarray], server_round: int) -> RecordDict:
    ins = FitIns(ndarrays_to_parameters(global_model), {ROUND_KEY: server_round})
    return compat.fitins_to_recorddict(ins, keep_input=True)


def error_of(reply: Message) -> str:
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    return str(reply.error.reason)


# --------------------------------------------------------------------------- sites


@dataclass
class SiteNode:
    """One site: its mod, its node context and the training behind the mod."""

    roster_id: int
    context: Context
    mod: MedfedSecAggMod
    delta: list[np.ndarray]
    num_examples: int
    received: list[list[np.ndarray]] = field(default_factory=list)  # models handed to training
    trained: list[np.ndarray] = field(default_factory=list)
    fail: Callable[[Message], Message] | None = None

    @property
    def name(self) -> str:
        return NAMES[self.roster_id]

    @property
    def records(self) -> RecordDict:
        return self.context.state.config_records

    def train(self, msg: Message, ctxt: Context) -> Message:
        """The downstream ClientApp: global model in, trained model (global + delta) out."""
        assert ctxt is self.context
        assert msg.metadata.message_type == MessageType.TRAIN
        global_model = parameters_to_ndarrays(
            compat.recorddict_to_fitins(msg.content, keep_input=True).parameters
        )
        self.received.append(global_model)
        if self.fail is not None:
            return self.fail(msg)
        self.trained = [
            (g.astype(np.float64) + d).astype(np.float32)
            for g, d in zip(global_model, self.delta, strict=True)
        ]
        res = FitRes(
            Status(Code.OK, "ok"),
            ndarrays_to_parameters(self.trained),
            self.num_examples,
            {"site-id": self.name, "loss": 0.25, "epsilon-spent": 0.5},
        )
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    def handle(self, content: RecordDict, server_round: int = 1) -> Message:
        """Deliver ``content`` through the mod and carry the reply back."""
        msg = to_node(content, self.context.node_id, server_round)
        reply = self.mod(msg, self.context, self.train)
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert reply.metadata.src_node_id == self.context.node_id
        assert reply.metadata.dst_node_id == SUPERLINK_NODE_ID
        return carry(reply)

    def update(self, global_model: list[np.ndarray]) -> np.ndarray:
        """The flat update the site masked: trained - global, in float64."""
        return np.concatenate(
            [
                (t.astype(np.float64) - g.astype(np.float64)).ravel()
                for t, g in zip(self.trained, global_model, strict=True)
            ]
        )

    def session_wiped(self) -> bool:
        return CONFIG_STATE not in self.records and SESSION_STATE not in self.records


@dataclass
class Federation:
    roster: Roster
    roster_path: Path
    key_paths: dict[int, Path]
    sites: dict[int, SiteNode]
    global_model: list[np.ndarray]


def make_context(roster_id: int, partition: int, run_id: int = RUN) -> Context:
    return Context(
        run_id=run_id,
        node_id=FLOWER_IDS[roster_id],
        node_config={"partition-id": partition},
        state=RecordDict(),
        run_config={},
    )


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    """Four sites in the simulation layout: ``<root>/site-<i>/site-identity.pem`` and
    ``<root>/roster.json`` (a named roster), identities loaded from those files."""
    plain, keys = simulation_roster(ROSTER_IDS)
    roster = Roster(plain.keys, NAMES)
    roster_path = tmp_path / SIM_ROSTER_NAME
    roster.save(roster_path)
    rng = np.random.default_rng(2024)
    global_model = [rng.normal(0, 1, s).astype(np.float32) for s in LAYERS]
    sites, key_paths = {}, {}
    for partition, rid in enumerate(ROSTER_IDS):
        key_path = tmp_path / f"site-{partition}" / SIM_IDENTITY_NAME
        save_identity(key_path, keys[rid])
        key_paths[rid] = key_path

        def identity_of(ctxt: Context, key_path: Path = key_path) -> SiteIdentity:
            return load_site_identity(key_path, roster_path)

        sites[rid] = SiteNode(
            rid,
            make_context(rid, partition),
            MedfedSecAggMod(identity_of),
            [rng.uniform(-0.5, 0.5, s) for s in LAYERS],
            int(rng.integers(20, 900)),
        )
    return Federation(roster, roster_path, key_paths, sites, global_model)


# --------------------------------------------------------------------------- coordinator


class Coordinator:
    """The coordinator's side of one round: a ServerSession, every message through wire."""

    def __init__(
        self, fed: Federation, server_round: int = 1, run_id: int = RUN, nodes=ROSTER_IDS
    ) -> None:
        self.fed = fed
        self.server_round = server_round
        self.config = ProtocolConfig(
            run_id,
            server_round,
            THRESHOLD,
            DIM,
            QuantParams.auto(len(nodes), MAX_WEIGHT, CLIP),
            frozenset(nodes),
        )
        self.server = ServerSession(self.config, fed.roster)

    def send(self, rid: int, content: RecordDict) -> Message:
        return self.fed.sites[rid].handle(content, self.server_round)

    def setup(self, to=ROSTER_IDS) -> dict[int, Message]:
        replies = {rid: self.send(rid, wire.to_recorddict(self.config)) for rid in to}
        for reply in replies.values():
            if not reply.has_error():
                self.server.receive_keys(
                    wire.from_recorddict(reply.content, expect=wire.STAGE_KEYS)
                )
        return replies

    def broadcast_contents(self) -> dict[int, wire.KeyBroadcast]:
        cfg = self.config
        return {
            rid: wire.KeyBroadcast(rid, cfg.run_id, cfg.server_round, bundles)
            for rid, bundles in self.server.key_broadcast().items()
        }

    def broadcast(self, messages: dict[int, wire.KeyBroadcast] | None = None):
        messages = self.broadcast_contents() if messages is None else messages
        replies = {rid: self.send(rid, wire.to_recorddict(m)) for rid, m in messages.items()}
        for reply in replies.values():
            if not reply.has_error():
                shares = wire.from_recorddict(reply.content, expect=wire.STAGE_SHARES)
                self.server.receive_shares(shares)
        return replies

    def train_content(self, routed: RoutedShares) -> RecordDict:
        content = fit_content(self.fed.global_model, self.server_round)
        content.config_records[wire.RECORD_KEY] = wire.encode(routed)
        return content

    def train(self, skip=()) -> dict[int, Message]:
        routed = self.server.route_shares()
        replies = {
            rid: self.send(rid, self.train_content(r))
            for rid, r in routed.items()
            if rid not in skip
        }
        for reply in replies.values():
            if not reply.has_error():
                masked = wire.from_recorddict(
                    reply.content,
                    expect=wire.STAGE_MASKED,
                    modulus_bits=self.config.modulus_bits,
                    length=self.config.vector_length,
                )
                self.server.receive_masked(masked)
        return replies

    def unmask(self) -> dict[int, Message]:
        requests = self.server.unmask_requests()
        replies = {rid: self.send(rid, wire.to_recorddict(r)) for rid, r in requests.items()}
        for reply in replies.values():
            assert not reply.has_error(), reply.error.reason
            answer = wire.from_recorddict(reply.content, expect=wire.STAGE_UNMASK_SHARES)
            self.server.receive_unmask(answer)
        return replies

    def until_masked(self) -> dict[int, Message]:
        assert not any(r.has_error() for r in self.setup().values())
        assert not any(r.has_error() for r in self.broadcast().values())
        return self.train()

    def full_round(self) -> tuple[AggregateResult, dict[int, Message]]:
        masked = self.until_masked()
        self.unmask()
        return self.server.finish(), masked


def check_average(coord: Coordinator, result: AggregateResult, summed) -> None:
    sites = [coord.fed.sites[rid] for rid in summed]
    weights = np.array([s.num_examples for s in sites], np.float64)
    updates = np.stack([s.update(coord.fed.global_model) for s in sites])
    expected = weights @ updates / weights.sum()
    assert result.survivors == frozenset(summed)
    assert result.total_weight == pytest.approx(weights.sum(), abs=len(sites) / 2**10)
    bound = error_bound(coord.config.quant, result.total_weight, num_summed=len(sites))
    assert bound < 1e-4  # the check below means something
    assert np.max(np.abs(result.average - expected)) <= bound


# --------------------------------------------------------------------------- 1. a full round


def test_full_round_server_recovers_weighted_average_of_updates(fed):
    coord = Coordinator(fed, server_round=1)
    setup_replies = coord.setup()
    for rid, site in fed.sites.items():
        keys = wire.from_recorddict(setup_replies[rid].content, expect=wire.STAGE_KEYS)
        assert keys.node_id == rid  # the roster id, not the Flower node id
        assert site.records[ROUND_STATE][LAST_ROUND_KEY] == 1
        assert CONFIG_STATE in site.records and SESSION_STATE in site.records
        # the session state holds secrets and stays in context.state, never in the reply
        assert set(setup_replies[rid].content.config_records) == {wire.RECORD_KEY}
    coord.broadcast()
    masked = coord.train()
    for site in fed.sites.values():
        assert len(site.received) == 1  # trained once, on the global model that was sent
        for got, sent in zip(site.received[0], fed.global_model, strict=True):
            np.testing.assert_array_equal(got, sent)
    coord.unmask()
    result = coord.server.finish()
    check_average(coord, result, ROSTER_IDS)
    assert result.dropped == frozenset()

    for rid, site in fed.sites.items():
        reply = masked[rid]
        # the update leaves the site only masked: no array data at all ...
        assert all(len(arrays) == 0 for arrays in reply.content.array_records.values())
        # ... but the FitRes metrics and sample count do
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        assert fitres.num_examples == site.num_examples
        assert fitres.metrics == {"site-id": site.name, "loss": 0.25, "epsilon-spent": 0.5}
        assert parameters_to_ndarrays(fitres.parameters) == []
        # after unmasking the session is gone but the round is remembered
        assert site.session_wiped()
        assert site.records[ROUND_STATE][LAST_ROUND_KEY] == 1


def test_consecutive_rounds_reuse_the_node_state(fed):
    for server_round in (1, 2, 5):
        coord = Coordinator(fed, server_round=server_round)
        result, _ = coord.full_round()
        check_average(coord, result, ROSTER_IDS)
        for site in fed.sites.values():
            assert site.session_wiped()
            assert site.records[ROUND_STATE][LAST_ROUND_KEY] == server_round


def test_unmask_is_answered_once(fed):
    coord = Coordinator(fed)
    coord.until_masked()
    requests = coord.server.unmask_requests()
    site = fed.sites[1]
    first = site.handle(wire.to_recorddict(requests[1]))
    assert not first.has_error()
    again = error_of(site.handle(wire.to_recorddict(requests[1])))
    assert "no secure-aggregation round in progress" in again


# --------------------------------------------------------------------------- 2. replays


@pytest.mark.parametrize("replayed_round", [2, 1])
def test_replayed_setup_after_completed_round_is_refused(fed, replayed_round):
    Coordinator(fed, server_round=2).full_round()
    replay = Coordinator(fed, server_round=replayed_round)
    for site in fed.sites.values():
        reason = error_of(site.handle(wire.to_recorddict(replay.config), replayed_round))
        assert "replayed" in reason and site.name in reason
        assert f"round {replayed_round}" in reason
        assert site.session_wiped()  # no keys were made, none were kept
        assert site.records[ROUND_STATE][LAST_ROUND_KEY] == 2


def test_replayed_setup_mid_round_ends_the_sites_round(fed):
    coord = Coordinator(fed, server_round=3)
    coord.setup()
    site = fed.sites[3]
    reason = error_of(site.handle(wire.to_recorddict(coord.config), 3))
    assert "replayed" in reason
    assert site.session_wiped()
    broadcast = coord.broadcast_contents()
    reason = error_of(site.handle(wire.to_recorddict(broadcast[3]), 3))
    assert "no secure-aggregation round in progress" in reason


# --------------------------------------------------------------------------- 3. wrong run


def test_setup_for_another_run_is_refused_and_does_not_use_up_the_round(fed):
    site = fed.sites[1]
    other = Coordinator(fed, run_id=RUN + 1)
    reason = error_of(site.handle(wire.to_recorddict(other.config)))
    assert f"run {RUN + 1}" in reason and f"this is run {RUN}" in reason
    assert "misrouted" in reason
    assert ROUND_STATE not in site.records and site.session_wiped()
    # the refused message did not consume round 1 of this run
    ok = site.handle(wire.to_recorddict(Coordinator(fed).config))
    assert not ok.has_error()


@pytest.mark.parametrize(
    "change", [{"run_id": RUN + 1}, {"server_round": 2}, {"node_id": 3}], ids=str
)
def test_key_broadcast_for_another_run_round_or_node_is_refused(fed, change):
    coord = Coordinator(fed)
    coord.setup()
    message = dataclasses.replace(coord.broadcast_contents()[1], **change)
    if "node_id" not in change:  # bundles must match the broadcast's run and round to encode
        message = dataclasses.replace(message, bundles={})
    site = fed.sites[1]
    reason = error_of(site.handle(wire.to_recorddict(message)))
    assert "replayed or misrouted" in reason or "addressed to node 3" in reason
    assert site.session_wiped()


# --------------------------------------------------------------------------- 4. out of order


def test_key_broadcast_without_setup_is_refused_and_leaves_no_state(fed):
    coord = Coordinator(fed)
    replies = coord.setup(to=(2, 3, 4))  # site 1 never saw the setup
    bundles = {
        rid: wire.from_recorddict(reply.content, expect=wire.STAGE_KEYS)
        for rid, reply in replies.items()
    }
    site = fed.sites[1]
    content = wire.to_recorddict(wire.KeyBroadcast(1, RUN, 1, bundles))
    reason = error_of(site.handle(content))
    assert "no secure-aggregation round in progress" in reason and "out-of-order" in reason
    assert len(site.records) == 0  # nothing at all kept, not even a round number


def test_routed_shares_or_unmask_without_setup_are_refused(fed):
    site = fed.sites[1]
    routed = RoutedShares(1, RUN, 1, {2: b"x" * 97})
    reason = error_of(site.handle(Coordinator(fed).train_content(routed)))
    assert "no secure-aggregation round in progress" in reason
    request = UnmaskRequest(1, RUN, 1, frozenset(ROSTER_IDS), frozenset())
    reason = error_of(site.handle(wire.to_recorddict(request)))
    assert "no secure-aggregation round in progress" in reason
    assert site.received == []  # training never ran
    assert len(site.records) == 0


def test_routed_shares_before_key_broadcast_is_refused_and_wipes_the_session(fed):
    coord = Coordinator(fed)
    coord.setup()
    site = fed.sites[1]
    routed = RoutedShares(1, RUN, 1, {2: b"x" * 97, 3: b"y" * 97})
    reason = error_of(site.handle(coord.train_content(routed)))
    assert "stage SHARES" in reason
    assert site.session_wiped()


@pytest.mark.parametrize("when", ["before key broadcast", "replayed after masking"])
def test_out_of_order_routed_shares_never_reach_training(fed, when):
    coord = Coordinator(fed)
    site = fed.sites[1]
    coord.setup()
    if when == "before key broadcast":
        content = coord.train_content(RoutedShares(1, RUN, 1, {2: b"x" * 97, 3: b"y" * 97}))
    else:
        coord.broadcast()
        routed = coord.server.route_shares()
        content = coord.train_content(routed[1])
        assert not site.handle(content).has_error()
        content = coord.train_content(routed[1])
    trained_before = len(site.received)
    reply = site.handle(content)
    assert reply.has_error()
    assert len(site.received) == trained_before


# --------------------------------------------------------------------------- 5. substituted keys


def substitute_victim_keys(coord: Coordinator, how: str) -> dict[int, wire.KeyBroadcast]:
    """The coordinator's attack: the victim's mask public key replaced by its own."""
    server_mask = public_bytes(generate_keypair())
    out = {}
    for rid, message in coord.broadcast_contents().items():
        bundles = dict(message.bundles)
        real = bundles[VICTIM]
        if how == "signature unchanged":
            fake = dataclasses.replace(real, mask_public=server_mask)
        else:  # re-signed with a key that is not the victim's roster key
            fake = sign_keys(
                generate_identity(), VICTIM, RUN, coord.server_round, server_mask, real.share_public
            )
        bundles[VICTIM] = fake
        out[rid] = dataclasses.replace(message, bundles=bundles)
    return out


@pytest.mark.parametrize("how", ["signature unchanged", "re-signed with a non-roster key"])
def test_substituted_mask_key_is_caught_by_every_site_naming_the_victim(fed, how):
    coord = Coordinator(fed)
    coord.setup()
    replies = coord.broadcast(substitute_victim_keys(coord, how))
    victim = f"site 'bergen' (node {VICTIM})"
    for rid, reply in replies.items():
        reason = error_of(reply)  # no shares were sealed for anyone
        site = fed.sites[rid]
        assert reason.startswith(f"site {site.name!r} (node {rid})")
        assert "KeyAuthenticationError" in reason
        detail = reason.split("KeyAuthenticationError: ", 1)[1]
        assert detail.startswith(victim)
        if rid == VICTIM:
            assert "relayed different keys as our own" in detail
        else:
            assert "does not verify" in detail
        assert site.session_wiped()
        assert site.received == []


# --------------------------------------------------------------------------- 6. training fails


def fails_with_error(msg: Message) -> Message:
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="no data"), reply_to=msg
    )


def fails_with_exception(msg: Message) -> Message:
    raise RuntimeError("site declined round 1: epsilon budget exhausted")


@pytest.mark.parametrize(
    ("fail", "expected"),
    [
        (fails_with_error, "SecAggFailure: training failed: no data"),
        (fails_with_exception, "RuntimeError: site declined round 1: epsilon budget exhausted"),
    ],
)
def test_failed_training_ends_the_sites_round_and_the_others_still_aggregate(fed, fail, expected):
    failing = fed.sites[3]
    failing.fail = fail
    coord = Coordinator(fed)
    replies = coord.until_masked()
    reason = error_of(replies[3])
    assert expected in reason and failing.name in reason
    assert failing.session_wiped()
    coord.unmask()
    result = coord.server.finish()
    check_average(coord, result, (1, 2, 4))
    assert result.dropped == frozenset({3})


def test_trained_model_of_the_wrong_shape_is_refused(fed):
    site = fed.sites[1]

    def wrong(msg: Message) -> Message:
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.zeros(3)]), 5, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    site.fail = wrong
    replies = Coordinator(fed).until_masked()
    assert "layers do not match the global model" in error_of(replies[1])
    assert site.session_wiped()


# --------------------------------------------------------------------------- 7. unmask refusals


@pytest.mark.parametrize("what", ["survivor and dropped", "itself dropped"])
def test_unmask_request_that_would_reveal_an_update_is_refused(fed, what):
    coord = Coordinator(fed)
    coord.until_masked()
    site = fed.sites[1]
    if what == "survivor and dropped":
        request = UnmaskRequest(1, RUN, 1, frozenset(ROSTER_IDS), frozenset({2}))
        expected = "refusing to reveal both the self-seed share and the mask-key share"
    else:
        request = UnmaskRequest(1, RUN, 1, frozenset({2, 3, 4}), frozenset({1}))
        expected = "does not list this site as survivor"
    reason = error_of(site.handle(wire.to_recorddict(request)))
    assert "UnmaskRefused" in reason and expected in reason
    assert site.session_wiped()
    # the shares it held are gone: a well-formed request afterwards gets nothing either
    honest = UnmaskRequest(1, RUN, 1, frozenset(ROSTER_IDS), frozenset())
    assert "no secure-aggregation round" in error_of(site.handle(wire.to_recorddict(honest)))


# --------------------------------------------------------------------------- 8. the train gate


class Recorder:
    """A call_next that records what reached it."""

    def __init__(self) -> None:
        self.calls: list[Message] = []

    def __call__(self, msg: Message, ctxt: Context) -> Message:
        self.calls.append(msg)
        return Message(RecordDict({"out": ConfigRecord({"ok": 1})}), reply_to=msg)


def gate_for(fed: Federation, mode: str) -> SecureAggregationGate:
    return SecureAggregationGate({"secure-agg": mode, "data-root": str(fed.roster_path.parent)})


def flower_secagg_content() -> RecordDict:
    content = fit_content([np.zeros(3, np.float32)], 1)
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({"stage": "setup"})
    return content


def test_gate_medfed_message_reaches_the_mod_with_the_simulation_identity(fed):
    site = fed.sites[2]
    gate = gate_for(fed, "medfed")
    msg = to_node(wire.to_recorddict(Coordinator(fed).config), site.context.node_id)
    reply = gate(msg, site.context, site.train)
    keys = wire.from_recorddict(reply.content, expect=wire.STAGE_KEYS)
    assert keys.node_id == 2 and SESSION_STATE in site.records


@pytest.mark.parametrize(
    ("content", "arrived"),
    [
        (lambda fed: fit_content(fed.global_model, 1), "off"),
        (lambda fed: flower_secagg_content(), "flower"),
    ],
    ids=["plain", "flower-secagg"],
)
def test_gate_refuses_train_messages_outside_the_runs_mode(fed, content, arrived):
    site = fed.sites[1]
    recorder = Recorder()
    msg = to_node(content(fed), site.context.node_id)
    reason = error_of(gate_for(fed, "medfed")(msg, site.context, recorder))
    assert f"secure aggregation {arrived!r}" in reason and "this run uses 'medfed'" in reason
    assert recorder.calls == []
    assert len(site.records) == 0


@pytest.mark.parametrize(
    "message_type",
    [MessageType.EVALUATE, MessageType.QUERY, MessageTypeLegacy.GET_PROPERTIES],
)
def test_gate_passes_non_train_messages_through(fed, message_type):
    site = fed.sites[1]
    recorder = Recorder()
    msg = to_node(fit_content(fed.global_model, 1), site.context.node_id, 1, message_type)
    reply = gate_for(fed, "medfed")(msg, site.context, recorder)
    assert recorder.calls == [msg]
    assert reply.content.config_records["out"]["ok"] == 1


def test_gate_with_secure_aggregation_off(fed):
    site = fed.sites[1]
    gate = gate_for(fed, "off")
    recorder = Recorder()
    plain = to_node(fit_content(fed.global_model, 1), site.context.node_id)
    assert not gate(plain, site.context, recorder).has_error()
    assert recorder.calls == [plain]
    medfed = to_node(wire.to_recorddict(Coordinator(fed).config), site.context.node_id)
    reason = error_of(gate(medfed, site.context, recorder))
    assert "secure aggregation 'medfed'" in reason and "this run uses 'off'" in reason
    assert len(recorder.calls) == 1 and len(site.records) == 0


def test_gate_run_config_overrides_defaults(fed):
    site = fed.sites[1]
    site.context.run_config = {"secure-agg": "off"}
    recorder = Recorder()
    plain = to_node(fit_content(fed.global_model, 1), site.context.node_id)
    assert not gate_for(fed, "medfed")(plain, site.context, recorder).has_error()
    assert recorder.calls == [plain]


# --------------------------------------------------------------------------- 9. identity errors


def test_missing_identity_key_file_names_the_path(fed, tmp_path):
    missing = tmp_path / "nowhere" / SIM_IDENTITY_NAME
    with pytest.raises(IdentityConfigError, match="does not exist") as info:
        load_site_identity(missing, fed.roster_path)
    assert str(missing) in str(info.value)


def test_missing_roster_names_the_path(fed, tmp_path):
    missing = tmp_path / "no-roster.json"
    with pytest.raises(IdentityConfigError) as info:
        load_site_identity(fed.key_paths[1], missing)
    assert str(missing) in str(info.value)


def other_roster(tmp_path: Path) -> Path:
    roster, _ = simulation_roster([1, 2])
    path = tmp_path / "other-roster.json"
    roster.save(path)
    return path


def test_key_not_in_the_roster_is_an_identity_error(fed, tmp_path):
    with pytest.raises(IdentityConfigError, match="not enrolled in the roster"):
        load_site_identity(fed.key_paths[1], other_roster(tmp_path))


def test_key_not_in_the_roster_error_names_the_files(fed, tmp_path):
    roster_path = other_roster(tmp_path)
    with pytest.raises(IdentityConfigError) as info:
        load_site_identity(fed.key_paths[1], roster_path)
    assert str(roster_path) in str(info.value)
    assert str(fed.key_paths[1]) in str(info.value)


def deployment_context(tmp_path: Path, roster_path: Path) -> Context:
    return Context(
        run_id=RUN,
        node_id=FLOWER_IDS[1],
        node_config={"data-dir": str(tmp_path / "hospital"), "roster": str(roster_path)},
        state=RecordDict(),
        run_config={},
    )


def test_deployment_node_config_without_identity_key_names_it(fed, tmp_path):
    ctxt = deployment_context(tmp_path, fed.roster_path)
    with pytest.raises(IdentityConfigError, match="lacks 'identity-key'"):
        site_identity(ctxt, RunSettings())
    # through the gate: the site refuses the round with that reason and keeps nothing
    msg = to_node(wire.to_recorddict(Coordinator(fed).config), ctxt.node_id)
    recorder = Recorder()
    reason = error_of(gate_for(fed, "medfed")(msg, ctxt, recorder))
    assert "this site: secure aggregation aborted: IdentityConfigError" in reason
    assert "'identity-key'" in reason and "'roster'" not in reason
    assert recorder.calls == [] and len(ctxt.state.config_records) == 0


def test_deployment_identity_from_node_config(fed, tmp_path):
    ctxt = deployment_context(tmp_path, fed.roster_path)
    ctxt.node_config["identity-key"] = str(fed.key_paths[3])
    identity = site_identity(ctxt, RunSettings())
    assert identity.node_id == 3 and identity.name == "site 'tromso' (node 3)"


def test_get_properties_reports_the_roster_id_or_declines(fed, tmp_path, site_dir):
    write_policy(site_dir / "site.toml", SitePolicy(site_id="h9", min_cohort=10))
    settings = RunSettings(num_rounds=2, batch_size=32)
    good = SiteClient(
        Site(site_dir),
        settings,
        str(RUN),
        lambda: load_site_identity(fed.key_paths[4], fed.roster_path),
    )
    reply = good.get_properties({ROUND_KEY: 1})
    assert reply[ACCEPT_KEY] is True and reply[SECAGG_ID_KEY] == 4
    ctxt = deployment_context(tmp_path, fed.roster_path)
    broken = SiteClient(Site(site_dir), settings, str(RUN), lambda: site_identity(ctxt, settings))
    reply = broken.get_properties({ROUND_KEY: 1})
    assert reply[ACCEPT_KEY] is False and SECAGG_ID_KEY not in reply
    assert "'identity-key'" in reply[REASON_KEY]
