"""Wire format of the secure-aggregation messages (common/secagg/wire.py) over Flower records."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from flwr.common import serde
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import ConfigRecord as ProtoConfigRecord

from medfed.common.secagg import protocol as P
from medfed.common.secagg import wire as W
from medfed.common.secagg.identity import SignedKeys, simulation_roster
from medfed.common.secagg.quantize import QuantParams
from medfed.common.secagg.shares import Share

BIG = 2**64 - 1  # Flower node and run ids are uint64; this one needs protobuf's uint64 field
RUN, ROUND = 2**63 + 5, 3


def bundle(node, run=RUN, rnd=ROUND, salt=0):
    return SignedKeys(node, run, rnd, bytes([salt + 1]) * 32, bytes([salt + 2]) * 32, b"\x07" * 64)


def share(index, fill):
    return Share(index, bytes([fill]) * 32)


def messages():
    """One of each message type (a masked vector for each packing width)."""
    rng = np.random.default_rng(1)
    return [
        (bundle(BIG), None),
        (
            W.KeyBroadcast(11, RUN, ROUND, {n: bundle(n, salt=i) for i, n in enumerate((11, BIG))}),
            None,
        ),
        (W.KeyBroadcast(11, RUN, ROUND, {}), None),
        (P.SharesMessage(11, RUN, ROUND, {22: b"a" * 97, BIG: b"b" * 97}), None),
        (P.RoutedShares(22, RUN, ROUND, {11: b"c" * 97, 33: b""}), None),
        (P.RoutedShares(22, RUN, ROUND, {}), None),
        (P.MaskedInput(11, RUN, ROUND, rng.integers(0, 2**32, 101, dtype=np.uint64)), 32),
        (P.MaskedInput(11, RUN, ROUND, rng.integers(0, 2**20, 7, dtype=np.uint64)), 20),
        (P.MaskedInput(11, RUN, ROUND, rng.integers(0, 2**62, 9, dtype=np.uint64)), 62),
        (P.MaskedInput(11, RUN, ROUND, np.array([2**64 - 1], np.uint64)), 64),
        (P.UnmaskRequest(11, RUN, ROUND, {11, 22, BIG}, {33}), None),
        (P.UnmaskRequest(11, RUN, ROUND, {11, 22}, set()), None),
        (
            P.UnmaskShares(11, RUN, ROUND, {11: share(1, 1), BIG: share(2, 2)}, {33: share(3, 3)}),
            None,
        ),
        (P.UnmaskShares(11, RUN, ROUND, {11: share(65535, 9)}, {}), None),
    ]


def same(a, b):
    assert type(a) is type(b)
    if isinstance(a, P.MaskedInput):
        assert (a.node_id, a.run_id, a.server_round) == (b.node_id, b.run_id, b.server_round)
        assert b.vector.dtype == np.uint64 and b.vector.flags.writeable
        np.testing.assert_array_equal(a.vector, b.vector)
    else:
        assert a == b


def via_flower(record: ConfigRecord) -> ConfigRecord:
    """Carry a record through a full Flower Message protobuf round trip (as on the wire)."""
    content = RecordDict({W.RECORD_KEY: record})
    metadata = Metadata(
        run_id=BIG, message_id="", src_node_id=1, dst_node_id=BIG, reply_to_message_id="",
        group_id="3", created_at=0.0, ttl=60.0, message_type="train",
    )  # fmt: skip
    proto = serde.message_to_proto(Message(content=content, metadata=metadata))
    back = serde.message_from_proto(ProtoMessage.FromString(proto.SerializeToString()))
    return back.content.config_records[W.RECORD_KEY]


COPIES = {
    "none": lambda r: r,
    "deepcopy": copy.deepcopy,
    "config_record_proto": lambda r: serde.config_record_from_proto(
        ProtoConfigRecord.FromString(serde.config_record_to_proto(r).SerializeToString())
    ),
    "deflate_inflate": lambda r: ConfigRecord.inflate(r.deflate()),
    "message_proto": via_flower,
}


@pytest.mark.parametrize("copier", COPIES.values(), ids=COPIES.keys())
@pytest.mark.parametrize("case", range(len(messages())))
def test_round_trip_every_message_type(case, copier):
    message, bits = messages()[case]
    record = W.encode(message, modulus_bits=bits)
    assert isinstance(record, ConfigRecord)
    assert record[W.STAGE_KEY] in W.STAGES
    assert {"node-id", "run-id", "server-round"} <= set(record)
    same(message, W.decode(copier(record), modulus_bits=bits))


def test_recorddict_helpers_and_expected_stage():
    message = P.UnmaskRequest(5, RUN, ROUND, {5, 6}, {7})
    content = W.to_recorddict(message)
    assert W.from_recorddict(content, expect=W.STAGE_UNMASK_REQUEST) == message
    with pytest.raises(W.WireError, match=r"'unmask-request'.*expected stage 'masked'"):
        W.from_recorddict(content, expect=W.STAGE_MASKED)
    with pytest.raises(W.WireError, match=W.RECORD_KEY):
        W.from_recorddict(RecordDict())


def test_masked_vector_is_compact():
    n = 10_000
    rng = np.random.default_rng(0)
    update = rng.standard_normal(n).astype(np.float32)
    vector = rng.integers(0, 2**32, n + 1, dtype=np.uint64)  # update + weight
    record = W.encode(P.MaskedInput(BIG, RUN, ROUND, vector), modulus_bits=32)
    assert len(record["vector"]) == 4 * (n + 1)
    masked_bytes = serde.config_record_to_proto(record).ByteSize()
    assert masked_bytes <= 1.1 * 4 * n
    plain_bytes = serde.array_record_to_proto(ArrayRecord([update])).ByteSize()
    assert masked_bytes <= 1.1 * plain_bytes
    wide = W.encode(P.MaskedInput(BIG, RUN, ROUND, vector), modulus_bits=48)
    assert len(wide["vector"]) == 8 * (n + 1)


def test_pack_refuses_values_outside_the_ring():
    with pytest.raises(W.WireError, match=r"'vector'.*outside Z_2\*\*8"):
        W.encode(P.MaskedInput(1, RUN, ROUND, np.array([256], np.uint64)), modulus_bits=8)
    with pytest.raises(W.WireError, match="'modulus-bits'"):
        W.encode(P.MaskedInput(1, RUN, ROUND, np.array([1], np.uint64)))
    with pytest.raises(W.WireError, match=r"'vector'.*1-D integer"):
        W.encode(P.MaskedInput(1, RUN, ROUND, np.zeros(3)), modulus_bits=32)
    with pytest.raises(W.WireError, match="cannot encode"):
        W.encode(object())


def test_encode_refuses_broadcast_bundle_of_another_round_or_node():
    with pytest.raises(W.WireError, match=r"'peer-ids'.*round 2"):
        W.encode(W.KeyBroadcast(1, RUN, ROUND, {2: bundle(2, rnd=2)}))
    with pytest.raises(W.WireError, match=r"'peer-ids'.*for node 3"):
        W.encode(W.KeyBroadcast(1, RUN, ROUND, {2: bundle(3)}))


# --------------------------------------------------------------------------- malformed


def base(stage):
    for message, bits in messages():
        record = W.encode(message, modulus_bits=bits)
        if record[W.STAGE_KEY] == stage:
            return dict(record)
    raise AssertionError(stage)


def drop(key):
    return lambda r: {k: v for k, v in r.items() if k != key}


def put(key, value):
    return lambda r: r | {key: value}


def edit(key, fn):
    return lambda r: r | {key: fn(r[key])}


MALFORMED = [
    # (stage, change, key named, message pattern)
    ("keys", drop("stage"), "stage", "missing"),
    ("keys", put("stage", 0), "stage", "must be a str"),
    ("keys", put("stage", "keyz"), "stage", "unknown stage"),
    ("keys", drop("node-id"), "node-id", "missing"),
    ("keys", drop("run-id"), "run-id", "missing"),
    ("keys", drop("server-round"), "server-round", "missing"),
    ("keys", put("node-id", "11"), "node-id", "must be an int"),
    ("keys", put("run-id", True), "run-id", "must be an int"),
    ("keys", put("server-round", 1.0), "server-round", "must be an int"),
    ("keys", put("node-id", -1), "node-id", "unsigned 64-bit"),
    ("keys", put("node-id", 2**64), "node-id", "unsigned 64-bit"),
    ("keys", drop("signature"), "signature", "missing"),
    ("keys", put("mask-public", b"x" * 31), "mask-public", "32 bytes"),
    ("keys", put("share-public", "x" * 32), "share-public", "must be bytes"),
    ("keys", put("signature", b"x" * 65), "signature", "64 bytes"),
    ("keys", lambda r: r | {"share-public": r["mask-public"]}, "share-public", "differ"),
    ("keys", put("extra", 1), "extra", "unexpected key"),
    ("key-broadcast", drop("peer-ids"), "peer-ids", "missing"),
    ("key-broadcast", put("peer-ids", 11), "peer-ids", "must be a list"),
    ("key-broadcast", put("peer-ids", [11, 11]), "peer-ids", "duplicate node ids \\[11\\]"),
    ("key-broadcast", put("peer-ids", [11, -2]), "peer-ids", "item 1 .*unsigned 64-bit"),
    ("key-broadcast", put("peer-ids", [11]), "mask-publics", "parallel"),
    ("key-broadcast", edit("signatures", lambda v: v[:1]), "signatures", "parallel"),
    ("key-broadcast", edit("share-publics", lambda v: [v[0], b"s"]), "share-publics",
     "item 1 must be 32 bytes"),
    ("key-broadcast", put("signatures", [5, 6]), "signatures",
     "item 0 must be bytes"),
    ("shares", drop("ciphertexts"), "ciphertexts", "missing"),
    ("shares", edit("ciphertexts", lambda v: [*v, b"z"]), "ciphertexts", "parallel"),
    ("shares", put("peer-ids", [22, True]), "peer-ids", "item 1 must be an int"),
    ("routed-shares", put("ciphertexts", ["a", "b"]), "ciphertexts", "item 0 must be bytes"),
    ("masked", drop("vector"), "vector", "missing"),
    ("masked", put("vector", [1, 2]), "vector", "must be bytes"),
    ("masked", edit("vector", lambda v: v[:-1]), "vector", "bytes, expected 101 x 4"),
    ("masked", edit("length", lambda n: n + 1), "vector", "expected 102 x 4"),
    ("masked", put("length", 0), "length", "must be in 1.."),
    ("masked", drop("modulus-bits"), "modulus-bits", "missing"),
    ("masked", put("modulus-bits", 65), "modulus-bits", "must be in 1..64"),
    ("masked", put("modulus-bits", 40), "vector", "expected 101 x 8"),
    ("masked", put("modulus-bits", 31), "vector", "outside Z_2\\*\\*31"),
    ("unmask-request", drop("dropped"), "dropped", "missing"),
    ("unmask-request", put("survivors", [11, 22, 11]), "survivors", "duplicate"),
    ("unmask-request", put("dropped", [b"x"]), "dropped", "item 0 must be an int"),
    ("unmask-shares", drop("key-values"), "key-values", "missing"),
    ("unmask-shares", put("seed-indices", [1, 0]), "seed-indices", "item 1 must be in 1..65535"),
    ("unmask-shares", put("seed-indices", [1, 2**16]), "seed-indices", "must be in 1..65535"),
    ("unmask-shares", edit("seed-values", lambda v: [v[0], v[1][:31]]), "seed-values",
     "item 1 must be 32 bytes"),
    ("unmask-shares", put("key-ids", []), "key-indices", "parallel"),
    ("unmask-shares", put("seed-ids", [11, 11]), "seed-ids", "duplicate"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "change", "key", "pattern"),
    MALFORMED,
    ids=[f"{s}-{k}-{i}" for i, (s, _, k, _) in enumerate(MALFORMED)],
)
def test_malformed_record_names_the_key(stage, change, key, pattern):
    record = ConfigRecord(change(base(stage)))
    with pytest.raises(W.WireError, match=pattern) as info:
        W.decode(record)
    assert info.value.key == key
    assert f"key {key!r}" in str(info.value)
    stage_value = record.get(W.STAGE_KEY)
    if isinstance(stage_value, str):  # the stage is named whenever the record has one
        assert info.value.stage == stage_value
        assert f"stage {stage_value!r}" in str(info.value)
    else:
        assert info.value.stage is None


def test_masked_expectations_from_the_round_config():
    record = W.encode(P.MaskedInput(1, RUN, ROUND, np.arange(5, dtype=np.uint64)), modulus_bits=32)
    W.decode(record, modulus_bits=32, length=5)
    with pytest.raises(W.WireError, match=r"'modulus-bits'.*is 32, expected 40") as info:
        W.decode(record, modulus_bits=40)
    assert info.value.key == "modulus-bits" and info.value.stage == "masked"
    with pytest.raises(W.WireError, match=r"'length'.*is 5, expected 6"):
        W.decode(record, length=6)


def test_not_a_record():
    with pytest.raises(W.WireError, match="expected a ConfigRecord"):
        W.decode([1, 2])


# --------------------------------------------------------------------------- whole protocol


def test_full_round_through_flower_messages_with_a_dropout():
    """Drive the real state machines with every message carried as a Flower Message proto."""
    nodes = (11, 22, 33, 44, BIG)
    dim = 32
    roster, identities = simulation_roster(nodes)
    quant = QuantParams.auto(len(nodes), max_weight=100.0, clip=1.0)
    config = P.ProtocolConfig(RUN, ROUND, 3, dim, quant, frozenset(nodes))
    sites = {n: P.SiteSession(n, identities[n], roster, config) for n in nodes}
    server = P.ServerSession(config, roster)
    k, length = config.modulus_bits, config.vector_length

    def carry(message, expect):
        record = via_flower(W.encode(message, modulus_bits=k))
        out = W.decode(record, expect=expect, modulus_bits=k, length=length)
        same(message, out)
        return out

    for n in nodes:
        server.receive_keys(carry(sites[n].setup(), W.STAGE_KEYS))
    for n, bundles in server.key_broadcast().items():
        bc = carry(W.KeyBroadcast(n, RUN, ROUND, bundles), W.STAGE_KEY_BROADCAST)
        server.receive_shares(carry(sites[n].share_keys(bc.bundles), W.STAGE_SHARES))
    rng = np.random.default_rng(3)
    updates = {n: rng.uniform(-1, 1, dim) for n in nodes}
    weights = {n: float(rng.integers(1, 100)) for n in nodes}
    survivors = [n for n in nodes if n != 33]  # 33 drops after sharing
    for n, routed in server.route_shares().items():
        routed = carry(routed, W.STAGE_ROUTED_SHARES)
        if n in survivors:
            masked = sites[n].masked_input(updates[n], weights[n], routed)
            assert len(W.encode(masked, modulus_bits=k)["vector"]) == 4 * length
            server.receive_masked(carry(masked, W.STAGE_MASKED))
    for n, request in server.unmask_requests().items():
        request = carry(request, W.STAGE_UNMASK_REQUEST)
        server.receive_unmask(carry(sites[n].unmask(request), W.STAGE_UNMASK_SHARES))
    result = server.finish()
    total = sum(weights[n] for n in survivors)
    expected = sum(weights[n] * updates[n] for n in survivors) / total
    assert result.survivors == frozenset(survivors) and result.dropped == {33}
    np.testing.assert_allclose(result.average, expected, atol=1e-3)
    assert result.total_weight == pytest.approx(total)


# --------------------------------------------------------------------------- setup


SETUP_NODES = (11, 22, 33, BIG)


def setups():
    """Round configurations: complete graph, a ring, and a ring at a 48-bit modulus."""
    nodes = frozenset(SETUP_NODES)
    ring = {n: (SETUP_NODES[i - 1], SETUP_NODES[(i + 1) % 4]) for i, n in enumerate(SETUP_NODES)}
    return [
        P.ProtocolConfig(RUN, ROUND, 3, 101, QuantParams.auto(4, 1000.0, 1.0), nodes),
        P.ProtocolConfig(BIG, 0, 2, 7, QuantParams.auto(6, 12.5, 0.25), nodes, ring),
        P.ProtocolConfig(0, BIG, 3, 1, QuantParams(4, 3.0, 2.0, 1024.0, 48), nodes, ring),
    ]


@pytest.mark.parametrize("copier", COPIES.values(), ids=COPIES.keys())
@pytest.mark.parametrize("case", range(len(setups())), ids=["complete", "ring", "ring-48"])
def test_setup_round_trip(case, copier):
    config = setups()[case]
    record = W.encode(config)
    assert record[W.STAGE_KEY] == W.STAGE_SETUP and "node-id" not in record
    for key in ("max-weight", "clip", "scale"):
        assert type(record[key]) is float
    back = W.decode(copier(record), expect=W.STAGE_SETUP)
    assert isinstance(back, P.ProtocolConfig)
    assert back == config
    assert back.quant == config.quant and back.neighbours == config.neighbours
    for n in SETUP_NODES:
        assert back.peers(n) == config.peers(n)


def test_setup_graph_encoding():
    complete, ring, _ = setups()
    record = W.encode(complete)
    assert record["edges-low"] == [] and record["edges-high"] == []
    assert W.decode(record).neighbours is None
    record = W.encode(ring)
    assert record["nodes"] == sorted(SETUP_NODES)
    assert list(zip(record["edges-low"], record["edges-high"], strict=True)) == [
        (11, 22), (11, BIG), (22, 33), (33, BIG),
    ]  # fmt: skip
    content = W.to_recorddict(ring)
    assert W.from_recorddict(content, expect=W.STAGE_SETUP) == ring


def test_setup_works_for_sessions():
    """A site and the server built from the decoded setup run a round together."""
    config = W.decode(via_flower(W.encode(setups()[1])))
    roster, identities = simulation_roster(SETUP_NODES)
    sites = {n: P.SiteSession(n, identities[n], roster, config) for n in SETUP_NODES}
    server = P.ServerSession(config, roster)
    for n in SETUP_NODES:
        server.receive_keys(sites[n].setup())
    for n, bundles in server.key_broadcast().items():
        assert set(bundles) == config.neighbourhood(n)


def setup_base():
    return dict(W.encode(setups()[1]))


SETUP_MALFORMED = [
    # (change, key named (None: the config's own validation), message pattern)
    (drop("run-id"), "run-id", "missing"),
    (put("run-id", 2**64), "run-id", "unsigned 64-bit"),
    (drop("server-round"), "server-round", "missing"),
    (put("node-id", 11), "node-id", "unexpected key"),
    (drop("threshold"), "threshold", "missing"),
    (put("threshold", 1), "threshold", "must be in 2..65535"),
    (put("threshold", 2.0), "threshold", "must be an int"),
    (put("threshold", 4), None, "threshold must satisfy 2 <= t <= 3"),  # ring: 2 peers
    (put("dimension", 0), "dimension", "must be in 1.."),
    (put("nodes", [11, 22, 11]), "nodes", "duplicate"),
    (put("nodes", 11), "nodes", "must be a list"),
    (put("num-sites", 3), None, "num_sites=3 < 4 sites"),
    (put("num-sites", True), "num-sites", "must be an int"),
    (put("max-weight", 12), "max-weight", "must be a float, got int"),
    (put("clip", "0.25"), "clip", "must be a float, got str"),
    (drop("scale"), "scale", "missing"),
    (put("clip", -1.0), None, "clip must be a positive finite"),
    (put("max-weight", float("nan")), None, "max_weight must be a positive finite"),
    (edit("scale", lambda v: v * 4), None, "may wrap"),  # OverflowRisk
    (put("modulus-bits", 63), "modulus-bits", "must be in 2..62"),
    (put("modulus-bits", 16), None, "may wrap"),
    (edit("edges-low", lambda v: v[:-1]), "edges-high", "parallel"),
    (lambda r: r | {"edges-low": [11], "edges-high": [22]}, None, "2 <= t <= 1"),  # 33 alone
    (put("edges-high", [22, 11, 33, BIG]), "edges-high", "item 1: 11 is not above 11"),
    (put("edges-high", [22, 99, 33, BIG]), "edges-high", "item 1: node 99 is not in 'nodes'"),
    (put("edges-low", [7, 11, 22, 33]), "edges-low", "item 0: node 7 is not in 'nodes'"),
    (put("edges-high", [22, 22, 33, BIG]), "edges-high", "item 1: duplicate edge 11-22"),
    (put("edges-low", [11, 11, 22, -1]), "edges-low", "item 3 .*unsigned 64-bit"),
    (put("extra", 1.0), "extra", "unexpected key"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "key", "pattern"),
    SETUP_MALFORMED,
    ids=[f"setup-{k}-{i}" for i, (_, k, _) in enumerate(SETUP_MALFORMED)],
)
def test_malformed_setup_rejected(change, key, pattern):
    record = ConfigRecord(change(setup_base()))
    with pytest.raises(W.WireError, match=pattern) as info:
        W.decode(record)
    assert info.value.stage == W.STAGE_SETUP and "stage 'setup'" in str(info.value)
    assert info.value.key == key
    if key is not None:
        assert f"key {key!r}" in str(info.value)


def test_setup_of_a_config_with_an_unrepresentable_id():
    config = dataclasses.replace(setups()[0])
    object.__setattr__(config, "run_id", -1)  # bypasses the config's own check
    with pytest.raises(W.WireError, match=r"'setup', key 'run-id'.*unsigned 64-bit"):
        W.encode(config)
