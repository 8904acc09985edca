"""SiteSession.state_dict / load_state_dict (common/secagg/protocol.py): a site's session
carried between stages in a Flower ConfigRecord, as a client mod keeps it in context.state."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.common import serde
from flwr.proto.recorddict_pb2 import ConfigRecord as ProtoConfigRecord

from medfed.common.secagg import protocol as P
from medfed.common.secagg.identity import simulation_roster
from medfed.common.secagg.masks import generate_keypair, private_bytes
from medfed.common.secagg.quantize import QuantParams, error_bound
from medfed.common.secagg.shares import Share, SharePayload

NODES = (11, 22, 33, 2**64 - 1)  # the largest Flower node id too
DIM = 48
RUN, ROUND = 9, 4
STAGE_KEYS = {  # what each stage persists (the stage ints are part of the format)
    0: {"stage"},
    1: {"stage", "mask-private", "share-private", "bundle"},
    2: {"stage", "mask-private", "share-private", "bundle", "seed", "peer-ids",
        "peer-bundles", "share-keys", "held-ids", "held-payloads"},
    3: {"stage", "bundle", "peer-ids", "peer-bundles", "held-ids", "held-payloads"},
    4: {"stage"},
    5: {"stage"},
}  # fmt: skip


class World:
    """Sites, server and the means to rebuild a site from nothing but its persisted state."""

    def __init__(self, threshold=3, neighbours=None):
        self.roster, self.identities = simulation_roster(NODES)
        quant = QuantParams.auto(len(NODES), max_weight=500.0, clip=1.0)
        self.config = P.ProtocolConfig(
            RUN, ROUND, threshold, DIM, quant, frozenset(NODES), neighbours
        )
        self.sites = {n: self.fresh(n) for n in NODES}
        self.server = P.ServerSession(self.config, self.roster)

    def fresh(self, node):
        return P.SiteSession(node, self.identities[node], self.roster, self.config)

    def reload(self, node):
        """Persist site ``node`` through a ConfigRecord (and its protobuf form, as a stored
        context.state would be) and replace it with a fresh session that loads it back."""
        state = self.sites[node].state_dict()
        assert set(state) == STAGE_KEYS[state["stage"]]
        for value in state.values():
            assert isinstance(value, int | bytes) or (
                isinstance(value, list) and all(isinstance(v, int | bytes) for v in value)
            )
        record = ConfigRecord(state)
        record = serde.config_record_from_proto(
            ProtoConfigRecord.FromString(serde.config_record_to_proto(record).SerializeToString())
        )
        site = self.fresh(node)
        site.load_state_dict(record)
        assert site.state_dict() == state  # restored exactly
        self.sites[node] = site
        return site

    def reload_all(self):
        for node in NODES:
            self.reload(node)


def data(seed=0):
    rng = np.random.default_rng(seed)
    updates = {n: rng.uniform(-1, 1, DIM) for n in NODES}
    weights = {n: float(rng.integers(1, 500)) for n in NODES}
    return updates, weights


def run_round(world, updates, weights, *, persist, skip_masked=()):
    """One full round; with ``persist`` every site is rebuilt from its state between stages."""
    sites, server = world.sites, world.server
    step = world.reload_all if persist else lambda: None
    step()
    for n in NODES:
        server.receive_keys(sites[n].setup())
    step()
    for n, bundles in server.key_broadcast().items():
        server.receive_shares(sites[n].share_keys(bundles))
    step()
    for n, routed in server.route_shares().items():
        if n not in skip_masked:
            server.receive_masked(sites[n].masked_input(updates[n], weights[n], routed))
    step()
    requests = server.unmask_requests()
    for n, request in requests.items():
        server.receive_unmask(sites[n].unmask(request))
    step()
    return server.finish(), requests


def check(result, config, updates, weights, summed):
    total = sum(weights[n] for n in summed)
    expected = sum(weights[n] * updates[n] for n in summed) / total
    assert result.survivors == frozenset(summed)
    bound = error_bound(config.quant, result.total_weight, num_summed=len(summed))
    assert np.max(np.abs(result.average - expected)) <= bound


@pytest.mark.parametrize("skip_masked", [(), (33,)], ids=["all-survive", "one-drops"])
def test_round_trip_at_every_stage_matches_the_plain_run(skip_masked):
    updates, weights = data(seed=len(skip_masked))
    summed = [n for n in NODES if n not in skip_masked]
    plain = World()
    result, _ = run_round(plain, updates, weights, persist=False, skip_masked=skip_masked)
    check(result, plain.config, updates, weights, summed)
    persisted = World()
    result, _ = run_round(persisted, updates, weights, persist=True, skip_masked=skip_masked)
    check(result, persisted.config, updates, weights, summed)
    assert result.dropped == frozenset(skip_masked)
    for n in summed:
        assert persisted.sites[n].state_dict() == {"stage": 4}  # DONE
    if skip_masked:  # the site that dropped still waits to mask, secrets and all
        assert persisted.sites[33].state_dict()["stage"] == 2


def test_sparse_graph_round_trip():
    ring = {n: (NODES[i - 1], NODES[(i + 1) % 4]) for i, n in enumerate(NODES)}
    world = World(threshold=2, neighbours=ring)
    updates, weights = data(seed=5)
    result, _ = run_round(world, updates, weights, persist=True)
    check(result, world.config, updates, weights, NODES)


def test_secrets_leave_the_state_once_masked():
    world = World()
    updates, weights = data()
    for n in NODES:
        world.server.receive_keys(world.sites[n].setup())
    for n, bundles in world.server.key_broadcast().items():
        world.server.receive_shares(world.sites[n].share_keys(bundles))
    masked_state = world.sites[11].state_dict()
    assert masked_state["held-ids"] == [11]
    for n, routed in world.server.route_shares().items():
        world.sites[n].masked_input(updates[n], weights[n], routed)
    state = world.sites[11].state_dict()
    assert not {"seed", "mask-private", "share-private", "share-keys"} & set(state)
    assert state["held-ids"] == sorted(NODES)
    assert masked_state["seed"] not in state.values()


def test_reloaded_site_still_answers_unmask_only_once():
    world = World()
    updates, weights = data()
    _, requests = run_round(world, updates, weights, persist=True)
    other = P.UnmaskRequest(11, RUN, ROUND, frozenset({11, 22, 33}), frozenset({2**64 - 1}))
    with pytest.raises(P.ProtocolError, match="DONE"):
        world.sites[11].unmask(other)
    with pytest.raises(P.ProtocolError, match="DONE"):
        world.reload(11).unmask(requests[11])


def test_reloaded_site_refuses_a_greedy_request_and_stays_aborted():
    world = World()
    updates, weights = data()
    for n in NODES:
        world.server.receive_keys(world.sites[n].setup())
    for n, bundles in world.server.key_broadcast().items():
        world.server.receive_shares(world.sites[n].share_keys(bundles))
    for n, routed in world.server.route_shares().items():
        world.server.receive_masked(world.sites[n].masked_input(updates[n], weights[n], routed))
    requests = world.server.unmask_requests()
    site = world.reload(22)
    greedy = P.UnmaskRequest(22, RUN, ROUND, requests[22].survivors, frozenset({33}))
    with pytest.raises(P.UnmaskRefused, match="both"):
        site.unmask(greedy)
    assert site.state_dict() == {"stage": 5}  # ABORTED, nothing held any more
    with pytest.raises(P.ProtocolError, match="ABORTED"):
        world.reload(22).unmask(requests[22])


def test_load_refuses_a_started_session():
    world = World()
    state = world.sites[11].state_dict()
    world.sites[11].setup()
    with pytest.raises(P.ProtocolError, match="fresh session"):
        world.sites[11].load_state_dict(state)


# --------------------------------------------------------------------------- malformed


@pytest.fixture(scope="module")
def states():
    """A world and each site-11 state of a round: {stage: state}."""
    world = World()
    updates, weights = data()
    out = {0: world.sites[11].state_dict()}
    for n in NODES:
        world.server.receive_keys(world.sites[n].setup())
    out[1] = world.sites[11].state_dict()
    for n, bundles in world.server.key_broadcast().items():
        world.server.receive_shares(world.sites[n].share_keys(bundles))
    out[2] = world.sites[11].state_dict()
    for n, routed in world.server.route_shares().items():
        world.server.receive_masked(world.sites[n].masked_input(updates[n], weights[n], routed))
    out[3] = world.sites[11].state_dict()
    out["bundle-22"] = world.sites[22].state_dict()["bundle"]
    return world, out


def drop(key):
    return lambda s, _: {k: v for k, v in s.items() if k != key}


def put(key, value):
    return lambda s, _: s | {key: value}


def edit(key, fn):
    return lambda s, _: s | {key: fn(s[key])}


def payload(sender, receiver):
    share = Share(1, bytes(32))
    return SharePayload(sender, receiver, share, share).encode()


MALFORMED = [
    # (stage of the base state, change, key named, message pattern)
    (1, drop("stage"), "stage", "missing"),
    (1, put("stage", "1"), "stage", "must be an int"),
    (1, put("stage", True), "stage", "must be an int"),
    (1, put("stage", 6), "stage", "must be in 0..5, got 6"),
    (1, put("stage", -1), "stage", "must be in 0..5"),
    (0, put("stage", 1), "bundle", "missing in stage SHARES"),
    (1, put("stage", 0), "bundle", "unexpected in stage KEYS"),
    (3, put("stage", 4), "bundle", "unexpected in stage DONE"),
    (1, put("extra", 1), "extra", "unexpected"),
    (1, drop("share-private"), "share-private", "missing"),
    (1, put("mask-private", "x" * 32), "mask-private", "must be bytes, got str"),
    (1, edit("mask-private", lambda v: v[:31]), "mask-private", "must be 32 bytes, got 31"),
    (1, put("mask-private", private_bytes(generate_keypair())), "mask-private",
     "does not match the mask public key"),
    (1, lambda s, _: s | {"mask-private": s["share-private"]}, "mask-private", "does not match"),
    (1, edit("bundle", lambda v: v[:-1]), "bundle", "malformed"),
    (1, lambda s, o: s | {"bundle": o["bundle-22"]}, "bundle", "node 22"),
    (1, edit("bundle", lambda v: v[:-1] + bytes([v[-1] ^ 1])), "bundle", "signature"),
    (2, edit("seed", lambda v: v + b"\0"), "seed", "must be 32 bytes, got 33"),
    (2, put("seed", [0] * 32), "seed", "must be bytes, got list"),
    (2, put("peer-ids", 22), "peer-ids", "must be a list"),
    (2, edit("peer-ids", lambda v: v[::-1]), "peer-ids", "sorted ascending"),
    (2, edit("peer-ids", lambda v: [v[0], *v]), "peer-ids", "without duplicates"),
    (2, edit("peer-ids", lambda v: [*v[:-1], -1]), "peer-ids", "item 2 must be an unsigned"),
    (2, edit("peer-ids", lambda v: [*v[:-1], 99]), "peer-ids", "non-neighbours \\[99\\]"),
    (2, edit("peer-bundles", lambda v: v[:-1]), "peer-bundles", "parallel"),
    (2, edit("peer-bundles", lambda v: [v[1], v[0], v[2]]), "peer-bundles",
     "relayed as those of node 22"),
    (2, edit("peer-bundles", lambda v: [*v[:2], b"x"]), "peer-bundles", "malformed"),
    (2, edit("share-keys", lambda v: [*v[:2], v[2][:16]]), "share-keys",
     "item 2 must be 32 bytes"),
    (2, edit("share-keys", lambda v: v[:2]), "share-keys", "parallel"),
    (2, put("held-ids", [11, 22]), "held-ids", "only its own shares"),
    (2, put("held-ids", []), "held-ids", "own shares"),
    (2, put("held-payloads", [payload(11, 22)]), "held-payloads", "to node 22, expected"),
    (2, put("held-payloads", [b"\0" * 85]), "held-payloads", "item 0: unknown share"),
    (2, put("held-payloads", [b"short"]), "held-payloads", "item 0: share payload must be 85"),
    (2, put("held-payloads", ["x"]), "held-payloads", "item 0 must be bytes"),
    (3, put("held-payloads", []), "held-payloads", "parallel"),
    (3, edit("held-payloads", lambda v: [v[1], v[0], *v[2:]]), "held-payloads",
     "item 0 holds shares from node 22"),
    (3, lambda s, _: s | {"peer-ids": [22, 33], "peer-bundles": s["peer-bundles"][:2]},
     "held-ids", "not in 'peer-ids': \\[18446744073709551615\\]"),
    (3, put("mask-private", bytes(32)), "mask-private", "unexpected in stage UNMASK"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "change", "key", "pattern"),
    MALFORMED,
    ids=[f"{s}-{k}-{i}" for i, (s, _, k, _) in enumerate(MALFORMED)],
)
def test_malformed_state_is_rejected_naming_the_key(states, stage, change, key, pattern):
    world, out = states
    bad = change(dict(out[stage]), out)
    site = world.fresh(11)
    with pytest.raises(P.ProtocolError, match=pattern) as info:
        site.load_state_dict(ConfigRecord(bad))
    assert f"session state key {key!r}" in str(info.value)
    assert info.value.node_id == 11
    # Nothing was half-loaded: the session is still fresh and takes the good state.
    assert site.state_dict() == {"stage": 0}
    site.load_state_dict(out[stage])
    assert site.state_dict() == out[stage]


def test_threshold_too_high_for_the_persisted_neighbourhood(states):
    world, out = states
    strict = P.ProtocolConfig(RUN, ROUND, 4, DIM, world.config.quant, frozenset(NODES))
    site = P.SiteSession(11, world.identities[11], world.roster, strict)
    state = out[2] | {"peer-ids": [22], "peer-bundles": out[2]["peer-bundles"][:1]}
    state["share-keys"] = out[2]["share-keys"][:1]
    with pytest.raises(P.ProtocolError, match="'peer-ids': only 2 live neighbours"):
        site.load_state_dict(state)


def test_state_of_another_round_is_rejected(states):
    world, out = states
    later = P.ProtocolConfig(RUN, ROUND + 1, 3, DIM, world.config.quant, frozenset(NODES))
    site = P.SiteSession(11, world.identities[11], world.roster, later)
    with pytest.raises(P.ProtocolError, match=r"'bundle'.*replayed"):
        site.load_state_dict(out[1])


def test_state_must_be_a_mapping(states):
    world, _ = states
    with pytest.raises(P.ProtocolError, match="must be a mapping"):
        world.fresh(11).load_state_dict([("stage", 0)])
