"""Wire format: the secure-aggregation messages of :mod:`.protocol` as Flower ``ConfigRecord``s.

Each message becomes one flat :class:`flwr.app.ConfigRecord` whose values are ints, bytes and
lists of those (what Flower's protobuf serialisation carries, uint64 included), plus three
floats in ``setup``:

==================  ======================  =================================================
``stage``           message                 keys besides ``stage``, ``node-id``, ``run-id``,
                                            ``server-round``
==================  ======================  =================================================
``setup``           :class:`ProtocolConfig` *no* ``node-id`` (it is the round's, not a
                                            site's); ``threshold``, ``dimension``, ``nodes``,
                                            ``num-sites``, ``max-weight``, ``clip``,
                                            ``scale``, ``modulus-bits`` (the
                                            :class:`QuantParams`; the three in between are
                                            floats), ``edges-low`` + ``edges-high``
``keys``            :class:`SignedKeys`     ``mask-public``, ``share-public``, ``signature``
``key-broadcast``   :class:`KeyBroadcast`   ``peer-ids`` + ``mask-publics``,
                                            ``share-publics``, ``signatures`` (parallel)
``shares``          :class:`SharesMessage`  ``peer-ids`` + ``ciphertexts`` (receiver -> blob)
``routed-shares``   :class:`RoutedShares`   ``peer-ids`` + ``ciphertexts`` (sender -> blob)
``masked``          :class:`MaskedInput`    ``modulus-bits``, ``length``, ``vector``
``unmask-request``  :class:`UnmaskRequest`  ``survivors``, ``dropped``
``unmask-shares``   :class:`UnmaskShares`   ``seed-ids``/``seed-indices``/``seed-values``,
                                            ``key-ids``/``key-indices``/``key-values``
==================  ======================  =================================================

Node-keyed maps travel as parallel lists sorted by node id. The ``setup`` neighbour graph
travels as its undirected edges, ``edges-low[i] < edges-high[i]``, sorted; no edges means the
complete graph (``neighbours=None``), which is unambiguous because in a valid graph every node
has at least ``threshold - 1 >= 1`` neighbours. The masked vector travels as one
``bytes`` value: little-endian ``uint32`` per coordinate when ``modulus_bits <= 32`` (the same
size as the float32 update), ``uint64`` otherwise.

Decoding is strict: a missing key, an unexpected key, a value of the wrong type or size, an
id out of the uint64 range, a duplicate id, parallel lists of different lengths, an unknown
stage or a masked coordinate outside ``Z_{2**k}`` raise :class:`WireError`, which names the
stage and the key. Decoding checks form only; whether run, round, sender and contents fit the
round is for :mod:`.protocol` to judge. The exception is ``setup``: it decodes into a
:class:`ProtocolConfig`, whose own validation (threshold, graph, overflow capacity) then
applies; its failures are :class:`WireError` naming the stage too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from medfed.common.secagg.identity import SignedKeys
from medfed.common.secagg.masks import MAX_MODULUS_BITS as _RING_MAX_BITS
from medfed.common.secagg.protocol import (
    MaskedInput,
    ProtocolConfig,
    RoutedShares,
    SharesMessage,
    UnmaskRequest,
    UnmaskShares,
)
from medfed.common.secagg.quantize import QuantParams
from medfed.common.secagg.shares import MAX_SHARES, SECRET_BYTES, Share

#: Key of the ConfigRecord inside a message's RecordDict.
RECORD_KEY = "medfed-secagg"
STAGE_KEY = "stage"

STAGE_SETUP = "setup"
STAGE_KEYS = "keys"
STAGE_KEY_BROADCAST = "key-broadcast"
STAGE_SHARES = "shares"
STAGE_ROUTED_SHARES = "routed-shares"
STAGE_MASKED = "masked"
STAGE_UNMASK_REQUEST = "unmask-request"
STAGE_UNMASK_SHARES = "unmask-shares"

PUBLIC_KEY_BYTES = 32  # X25519
SIGNATURE_BYTES = 64  # Ed25519
MAX_MODULUS_BITS = 64
_MAX_LENGTH = 2**40  # largest masked-vector length (dimension + 1) accepted

_U64 = 2**64


class WireError(ValueError):
    """A record that is not a well-formed secure-aggregation message (or a message that cannot
    be encoded). ``stage`` and ``key`` name where (either may be ``None``)."""

    def __init__(self, stage: str | None, key: str | None, detail: str) -> None:
        where = f"stage {stage!r}" if stage is not None else "secagg record"
        if key is not None:
            where += f", key {key!r}"
        super().__init__(f"{where}: {detail}")
        self.stage = stage
        self.key = key


@dataclass(frozen=True)
class KeyBroadcast:
    """Stage 0, server -> site ``node_id``: the signed key bundles of its live neighbourhood
    (one entry of :meth:`ServerSession.key_broadcast`), keyed by node id. Every bundle must be
    for ``run_id`` and ``server_round``; each is verified by the site, not here."""

    node_id: int
    run_id: int
    server_round: int
    bundles: Mapping[int, SignedKeys]

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundles", MappingProxyType(dict(self.bundles)))


SecAggMessage = (
    ProtocolConfig
    | SignedKeys
    | KeyBroadcast
    | SharesMessage
    | RoutedShares
    | MaskedInput
    | UnmaskRequest
    | UnmaskShares
)


# --------------------------------------------------------------------------- vectors


def _vector_dtype(modulus_bits: int) -> np.dtype:
    return np.dtype("<u4") if modulus_bits <= 32 else np.dtype("<u8")


def _check_modulus_bits(modulus_bits: object, stage: str | None, key: str) -> int:
    if isinstance(modulus_bits, bool) or not isinstance(modulus_bits, int):
        raise WireError(stage, key, f"must be an int, got {type(modulus_bits).__name__}")
    if not 1 <= modulus_bits <= MAX_MODULUS_BITS:
        raise WireError(stage, key, f"must be in 1..{MAX_MODULUS_BITS}, got {modulus_bits}")
    return modulus_bits


def pack_vector(vector: np.ndarray, modulus_bits: int) -> bytes:
    """A 1-D vector of ring elements in ``Z_{2**modulus_bits}`` as little-endian bytes:
    4 bytes per coordinate for ``modulus_bits <= 32``, 8 otherwise."""
    k = _check_modulus_bits(modulus_bits, STAGE_MASKED, "modulus-bits")
    v = np.asarray(vector)
    if v.ndim != 1 or v.dtype.kind not in "ui":
        raise WireError(
            STAGE_MASKED, "vector", f"must be a 1-D integer array, got {v.dtype} {v.shape}"
        )
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 2**k):
        raise WireError(STAGE_MASKED, "vector", f"has values outside Z_2**{k}")
    return v.astype(_vector_dtype(k), copy=False).tobytes()


def unpack_vector(data: bytes, modulus_bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_vector`: a fresh, writable ``uint64`` array of ``length``.

    :class:`WireError` on a wrong byte count or a coordinate ``>= 2**modulus_bits``."""
    k = _check_modulus_bits(modulus_bits, STAGE_MASKED, "modulus-bits")
    dtype = _vector_dtype(k)
    if not isinstance(data, bytes):
        raise WireError(STAGE_MASKED, "vector", f"must be bytes, got {type(data).__name__}")
    if len(data) != length * dtype.itemsize:
        raise WireError(
            STAGE_MASKED,
            "vector",
            f"has {len(data)} bytes, expected {length} x {dtype.itemsize} = "
            f"{length * dtype.itemsize} for modulus_bits={k}",
        )
    out = np.frombuffer(data, dtype=dtype).astype(np.uint64)
    if k < 8 * dtype.itemsize and out.size and int(out.max()) >> k:
        raise WireError(STAGE_MASKED, "vector", f"has values outside Z_2**{k}")
    return out


# --------------------------------------------------------------------------- decoding helper


class _Reader:
    """Typed, strict access to one record; :meth:`done` rejects keys nobody read."""

    def __init__(self, record: ConfigRecord, stage: str) -> None:
        self.record = record
        self.stage = stage
        self.seen = {STAGE_KEY}

    def _get(self, key: str) -> object:
        self.seen.add(key)
        if key not in self.record:
            raise WireError(self.stage, key, "missing")
        return self.record[key]

    def _error(self, key: str, detail: str) -> WireError:
        return WireError(self.stage, key, detail)

    def u64(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._error(key, f"must be an int, got {type(value).__name__}")
        if not 0 <= value < _U64:
            raise self._error(key, f"must be an unsigned 64-bit integer, got {value}")
        return value

    def int_in(self, key: str, low: int, high: int) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._error(key, f"must be an int, got {type(value).__name__}")
        if not low <= value <= high:
            raise self._error(key, f"must be in {low}..{high}, got {value}")
        return value

    def real(self, key: str) -> float:
        value = self._get(key)
        if not isinstance(value, float):
            raise self._error(key, f"must be a float, got {type(value).__name__}")
        return value

    def raw_bytes(self, key: str, size: int | None = None) -> bytes:
        value = self._get(key)
        if not isinstance(value, bytes):
            raise self._error(key, f"must be bytes, got {type(value).__name__}")
        if size is not None and len(value) != size:
            raise self._error(key, f"must be {size} bytes, got {len(value)}")
        return value

    def _list(self, key: str) -> list:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._error(key, f"must be a list, got {type(value).__name__}")
        return value

    def u64_list(self, key: str, *, unique: bool = True) -> list[int]:
        values = self._list(key)
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int):
                raise self._error(key, f"item {i} must be an int, got {type(v).__name__}")
            if not 0 <= v < _U64:
                raise self._error(key, f"item {i} must be an unsigned 64-bit integer, got {v}")
        if unique and len(set(values)) != len(values):
            dupes = sorted({v for v in values if values.count(v) > 1})
            raise self._error(key, f"has duplicate node ids {dupes}")
        return values

    def int_list_in(self, key: str, low: int, high: int) -> list[int]:
        values = self._list(key)
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int):
                raise self._error(key, f"item {i} must be an int, got {type(v).__name__}")
            if not low <= v <= high:
                raise self._error(key, f"item {i} must be in {low}..{high}, got {v}")
        return values

    def bytes_list(self, key: str, size: int | None = None) -> list[bytes]:
        values = self._list(key)
        for i, v in enumerate(values):
            if not isinstance(v, bytes):
                raise self._error(key, f"item {i} must be bytes, got {type(v).__name__}")
            if size is not None and len(v) != size:
                raise self._error(key, f"item {i} must be {size} bytes, got {len(v)}")
        return values

    def same_length(self, ids_key: str, ids: list, **others: list) -> None:
        for key, values in others.items():
            if len(values) != len(ids):
                raise self._error(
                    key, f"has {len(values)} items but {ids_key!r} has {len(ids)} (parallel lists)"
                )

    def header(self) -> tuple[int, int, int]:
        return self.u64("node-id"), self.u64("run-id"), self.u64("server-round")

    def done(self) -> None:
        extra = sorted(set(self.record) - self.seen)
        if extra:
            raise self._error(extra[0], f"unexpected key (all unexpected: {extra})")


# --------------------------------------------------------------------------- encoders


def _header(stage: str, node_id: int, run_id: int, server_round: int) -> dict:
    for key, value in (("node-id", node_id), ("run-id", run_id), ("server-round", server_round)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _U64:
            raise WireError(stage, key, f"must be an unsigned 64-bit integer, got {value!r}")
    return {
        STAGE_KEY: stage,
        "node-id": int(node_id),
        "run-id": int(run_id),
        "server-round": int(server_round),
    }


def _ids(stage: str, key: str, mapping: Mapping[int, object]) -> list[int]:
    ids = sorted(mapping)
    for n in ids:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < _U64:
            raise WireError(stage, key, f"node id {n!r} is not an unsigned 64-bit integer")
    return [int(n) for n in ids]


def _encode_setup(c: ProtocolConfig) -> dict:
    for key, value in (("run-id", c.run_id), ("server-round", c.server_round)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _U64:
            raise WireError(STAGE_SETUP, key, f"must be an unsigned 64-bit integer, got {value!r}")
    nodes = _ids(STAGE_SETUP, "nodes", dict.fromkeys(c.nodes))
    edges = []
    if c.neighbours is not None:
        edges = sorted((a, b) for a in nodes for b in c.peers(a) if a < b)
    q = c.quant
    return {
        STAGE_KEY: STAGE_SETUP,
        "run-id": int(c.run_id),
        "server-round": int(c.server_round),
        "threshold": int(c.threshold),
        "dimension": int(c.dimension),
        "nodes": nodes,
        "num-sites": int(q.num_sites),
        "max-weight": float(q.max_weight),
        "clip": float(q.clip),
        "scale": float(q.scale),
        "modulus-bits": int(q.modulus_bits),
        "edges-low": [a for a, _ in edges],
        "edges-high": [b for _, b in edges],
    }


def _encode_keys(m: SignedKeys) -> dict:
    return _header(STAGE_KEYS, m.node_id, m.run_id, m.server_round) | {
        "mask-public": bytes(m.mask_public),
        "share-public": bytes(m.share_public),
        "signature": bytes(m.signature),
    }


def _encode_key_broadcast(m: KeyBroadcast) -> dict:
    out = _header(STAGE_KEY_BROADCAST, m.node_id, m.run_id, m.server_round)
    ids = _ids(STAGE_KEY_BROADCAST, "peer-ids", m.bundles)
    for n in ids:
        b = m.bundles[n]
        if (b.node_id, b.run_id, b.server_round) != (n, m.run_id, m.server_round):
            raise WireError(
                STAGE_KEY_BROADCAST,
                "peer-ids",
                f"bundle under node {n} is for node {b.node_id} run {b.run_id} round "
                f"{b.server_round}, not node {n} run {m.run_id} round {m.server_round}",
            )
    return out | {
        "peer-ids": ids,
        "mask-publics": [bytes(m.bundles[n].mask_public) for n in ids],
        "share-publics": [bytes(m.bundles[n].share_public) for n in ids],
        "signatures": [bytes(m.bundles[n].signature) for n in ids],
    }


def _encode_ciphertexts(stage: str, m: SharesMessage | RoutedShares) -> dict:
    ids = _ids(stage, "peer-ids", m.ciphertexts)
    return _header(stage, m.node_id, m.run_id, m.server_round) | {
        "peer-ids": ids,
        "ciphertexts": [bytes(m.ciphertexts[n]) for n in ids],
    }


def _encode_masked(m: MaskedInput, modulus_bits: int | None) -> dict:
    if modulus_bits is None:
        raise WireError(STAGE_MASKED, "modulus-bits", "encoding a masked vector needs it")
    out = _header(STAGE_MASKED, m.node_id, m.run_id, m.server_round)
    vector = np.asarray(m.vector)
    return out | {
        "modulus-bits": _check_modulus_bits(modulus_bits, STAGE_MASKED, "modulus-bits"),
        "length": int(vector.size),
        "vector": pack_vector(vector, modulus_bits),
    }


def _encode_unmask_request(m: UnmaskRequest) -> dict:
    return _header(STAGE_UNMASK_REQUEST, m.node_id, m.run_id, m.server_round) | {
        "survivors": _ids(STAGE_UNMASK_REQUEST, "survivors", dict.fromkeys(m.survivors)),
        "dropped": _ids(STAGE_UNMASK_REQUEST, "dropped", dict.fromkeys(m.dropped)),
    }


def _encode_unmask_shares(m: UnmaskShares) -> dict:
    out = _header(STAGE_UNMASK_SHARES, m.node_id, m.run_id, m.server_round)
    for prefix, shares in (("seed", m.seed_shares), ("key", m.key_shares)):
        ids = _ids(STAGE_UNMASK_SHARES, f"{prefix}-ids", shares)
        out[f"{prefix}-ids"] = ids
        out[f"{prefix}-indices"] = [int(shares[n].index) for n in ids]
        out[f"{prefix}-values"] = [bytes(shares[n].value) for n in ids]
    return out


def encode(message: SecAggMessage, *, modulus_bits: int | None = None) -> ConfigRecord:
    """One protocol message as a ConfigRecord (``modulus_bits`` is required, and only used,
    for a :class:`MaskedInput`). :class:`WireError` if the message cannot be represented."""
    if isinstance(message, ProtocolConfig):
        values = _encode_setup(message)
    elif isinstance(message, SignedKeys):
        values = _encode_keys(message)
    elif isinstance(message, KeyBroadcast):
        values = _encode_key_broadcast(message)
    elif isinstance(message, SharesMessage):
        values = _encode_ciphertexts(STAGE_SHARES, message)
    elif isinstance(message, RoutedShares):
        values = _encode_ciphertexts(STAGE_ROUTED_SHARES, message)
    elif isinstance(message, MaskedInput):
        values = _encode_masked(message, modulus_bits)
    elif isinstance(message, UnmaskRequest):
        values = _encode_unmask_request(message)
    elif isinstance(message, UnmaskShares):
        values = _encode_unmask_shares(message)
    else:
        raise WireError(None, None, f"cannot encode {type(message).__name__}")
    return ConfigRecord(values, keep_input=False)


# --------------------------------------------------------------------------- decoders


def _decode_setup(r: _Reader) -> ProtocolConfig:
    run_id, server_round = r.u64("run-id"), r.u64("server-round")
    threshold = r.int_in("threshold", 2, MAX_SHARES)
    dimension = r.int_in("dimension", 1, _MAX_LENGTH - 1)
    nodes = r.u64_list("nodes")
    num_sites = r.int_in("num-sites", 1, _U64 - 1)
    max_weight, clip, scale = r.real("max-weight"), r.real("clip"), r.real("scale")
    modulus_bits = r.int_in("modulus-bits", 2, _RING_MAX_BITS)
    low = r.u64_list("edges-low", unique=False)
    high = r.u64_list("edges-high", unique=False)
    r.same_length("edges-low", low, **{"edges-high": high})
    r.done()
    neighbours: dict[int, list[int]] | None = None
    if low:
        members = set(nodes)
        neighbours = {n: [] for n in nodes}
        seen = set()
        for i, (a, b) in enumerate(zip(low, high, strict=True)):
            if not a < b:
                raise WireError(r.stage, "edges-high", f"item {i}: {b} is not above {a}")
            for key, n in (("edges-low", a), ("edges-high", b)):
                if n not in members:
                    raise WireError(r.stage, key, f"item {i}: node {n} is not in 'nodes'")
            if (a, b) in seen:
                raise WireError(r.stage, "edges-high", f"item {i}: duplicate edge {a}-{b}")
            seen.add((a, b))
            neighbours[a].append(b)
            neighbours[b].append(a)
    try:
        quant = QuantParams(num_sites, max_weight, clip, scale, modulus_bits)
        return ProtocolConfig(
            run_id,
            server_round,
            threshold,
            dimension,
            quant,
            frozenset(nodes),
            None if neighbours is None else {n: tuple(p) for n, p in neighbours.items()},
        )
    except ValueError as exc:  # OverflowRisk included
        raise WireError(r.stage, None, f"not a valid round configuration: {exc}") from None


def _decode_keys(r: _Reader) -> SignedKeys:
    node_id, run_id, server_round = r.header()
    mask = r.raw_bytes("mask-public", PUBLIC_KEY_BYTES)
    share = r.raw_bytes("share-public", PUBLIC_KEY_BYTES)
    signature = r.raw_bytes("signature", SIGNATURE_BYTES)
    r.done()
    try:
        return SignedKeys(node_id, run_id, server_round, mask, share, signature)
    except ValueError as exc:
        raise WireError(r.stage, "share-public", str(exc)) from None


def _decode_key_broadcast(r: _Reader) -> KeyBroadcast:
    node_id, run_id, server_round = r.header()
    ids = r.u64_list("peer-ids")
    masks = r.bytes_list("mask-publics", PUBLIC_KEY_BYTES)
    shares = r.bytes_list("share-publics", PUBLIC_KEY_BYTES)
    signatures = r.bytes_list("signatures", SIGNATURE_BYTES)
    r.same_length(
        "peer-ids",
        ids,
        **{"mask-publics": masks, "share-publics": shares, "signatures": signatures},
    )
    r.done()
    bundles = {}
    for n, mask, share, sig in zip(ids, masks, shares, signatures, strict=True):
        try:
            bundles[n] = SignedKeys(n, run_id, server_round, mask, share, sig)
        except ValueError as exc:
            raise WireError(r.stage, "share-publics", f"node {n}: {exc}") from None
    return KeyBroadcast(node_id, run_id, server_round, bundles)


def _decode_ciphertexts(r: _Reader, cls: type[SharesMessage] | type[RoutedShares]):
    node_id, run_id, server_round = r.header()
    ids = r.u64_list("peer-ids")
    blobs = r.bytes_list("ciphertexts")
    r.same_length("peer-ids", ids, ciphertexts=blobs)
    r.done()
    return cls(node_id, run_id, server_round, dict(zip(ids, blobs, strict=True)))


def _decode_masked(r: _Reader, modulus_bits: int | None, length: int | None) -> MaskedInput:
    node_id, run_id, server_round = r.header()
    k = r.int_in("modulus-bits", 1, MAX_MODULUS_BITS)
    if modulus_bits is not None and k != modulus_bits:
        raise WireError(r.stage, "modulus-bits", f"is {k}, expected {modulus_bits}")
    n = r.int_in("length", 1, _MAX_LENGTH)
    if length is not None and n != length:
        raise WireError(r.stage, "length", f"is {n}, expected {length}")
    data = r.raw_bytes("vector")
    r.done()
    return MaskedInput(node_id, run_id, server_round, unpack_vector(data, k, n))


def _decode_unmask_request(r: _Reader) -> UnmaskRequest:
    node_id, run_id, server_round = r.header()
    survivors = r.u64_list("survivors")
    dropped = r.u64_list("dropped")
    r.done()
    return UnmaskRequest(node_id, run_id, server_round, frozenset(survivors), frozenset(dropped))


def _decode_unmask_shares(r: _Reader) -> UnmaskShares:
    node_id, run_id, server_round = r.header()
    maps = []
    for prefix in ("seed", "key"):
        ids = r.u64_list(f"{prefix}-ids")
        indices = r.int_list_in(f"{prefix}-indices", 1, MAX_SHARES)
        values = r.bytes_list(f"{prefix}-values", SECRET_BYTES)
        r.same_length(
            f"{prefix}-ids", ids, **{f"{prefix}-indices": indices, f"{prefix}-values": values}
        )
        maps.append({n: Share(i, v) for n, i, v in zip(ids, indices, values, strict=True)})
    r.done()
    return UnmaskShares(node_id, run_id, server_round, maps[0], maps[1])


STAGES = (
    STAGE_SETUP,
    STAGE_KEYS,
    STAGE_KEY_BROADCAST,
    STAGE_SHARES,
    STAGE_ROUTED_SHARES,
    STAGE_MASKED,
    STAGE_UNMASK_REQUEST,
    STAGE_UNMASK_SHARES,
)


def stage_of(record: ConfigRecord) -> str:
    """The record's stage; :class:`WireError` if missing, not a str or unknown."""
    if not isinstance(record, Mapping):
        raise WireError(None, None, f"expected a ConfigRecord, got {type(record).__name__}")
    if STAGE_KEY not in record:
        raise WireError(None, STAGE_KEY, "missing")
    stage = record[STAGE_KEY]
    if not isinstance(stage, str):
        raise WireError(None, STAGE_KEY, f"must be a str, got {type(stage).__name__}")
    if stage not in STAGES:
        raise WireError(stage, STAGE_KEY, f"unknown stage (known: {', '.join(STAGES)})")
    return stage


def decode(
    record: ConfigRecord,
    *,
    expect: str | None = None,
    modulus_bits: int | None = None,
    length: int | None = None,
) -> SecAggMessage:
    """Parse a record made by :func:`encode`.

    ``expect`` (a ``STAGE_*`` constant) rejects a record of any other stage. For a masked
    vector, ``modulus_bits`` and ``length`` (the round's ``ProtocolConfig.modulus_bits`` and
    ``vector_length``), when given, must match the record. The returned vector is uint64.
    """
    stage = stage_of(record)
    if expect is not None and stage != expect:
        raise WireError(stage, STAGE_KEY, f"expected stage {expect!r}")
    r = _Reader(record, stage)
    if stage == STAGE_SETUP:
        return _decode_setup(r)
    if stage == STAGE_KEYS:
        return _decode_keys(r)
    if stage == STAGE_KEY_BROADCAST:
        return _decode_key_broadcast(r)
    if stage == STAGE_SHARES:
        return _decode_ciphertexts(r, SharesMessage)
    if stage == STAGE_ROUTED_SHARES:
        return _decode_ciphertexts(r, RoutedShares)
    if stage == STAGE_MASKED:
        return _decode_masked(r, modulus_bits, length)
    if stage == STAGE_UNMASK_REQUEST:
        return _decode_unmask_request(r)
    return _decode_unmask_shares(r)


# --------------------------------------------------------------------------- RecordDict


def to_recorddict(message: SecAggMessage, *, modulus_bits: int | None = None) -> RecordDict:
    """A Flower message content holding the encoded message under :data:`RECORD_KEY`."""
    content = RecordDict()
    content[RECORD_KEY] = encode(message, modulus_bits=modulus_bits)
    return content


def from_recorddict(
    content: RecordDict,
    *,
    expect: str | None = None,
    modulus_bits: int | None = None,
    length: int | None = None,
) -> SecAggMessage:
    """Inverse of :func:`to_recorddict`; :class:`WireError` if the record is absent or not a
    ConfigRecord, otherwise as :func:`decode`."""
    if RECORD_KEY not in content.config_records:
        raise WireError(None, RECORD_KEY, "no secure-aggregation ConfigRecord in the message")
    return decode(
        content.config_records[RECORD_KEY],
        expect=expect,
        modulus_bits=modulus_bits,
        length=length,
    )
