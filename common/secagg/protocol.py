"""The SecAgg+ protocol (Bell et al., CCS 2020) as transport-independent state machines.

One :class:`SiteSession` per site and one :class:`ServerSession` per round exchange plain
frozen dataclasses (ints, bytes, numpy arrays). Nothing here knows about Flower: a transport
carries each message, applies the stage timeouts, and simply does not deliver the message of a
site that dropped. Every stage is safe under such a drop.

Stages and messages (``i`` a site, ``N(i)`` its neighbourhood *including itself*)::

    0 keys     site   setup()                    -> SignedKeys            -> server.receive_keys
               server key_broadcast()            -> {i: {j: SignedKeys}}  -> site.share_keys
    1 shares   site   share_keys(bundles)        -> SharesMessage         -> server.receive_shares
               server route_shares()             -> {i: RoutedShares}     -> site.masked_input
    2 masked   site   masked_input(u, w, routed) -> MaskedInput           -> server.receive_masked
               server unmask_requests()          -> {i: UnmaskRequest}    -> site.unmask
    3 unmask   site   unmask(request)            -> UnmaskShares          -> server.receive_unmask
               server finish()                   -> AggregateResult

What each stage reveals, to whom:

* **keys**: every site's two fresh X25519 public keys, signed (Ed25519) with its identity key
  over run id, round and node id, go to the server and to the site's neighbours. Public keys
  only; a server that substitutes one is caught by the neighbours before any share exists.
* **shares**: a site Shamir-splits (threshold t of its live neighbourhood) its fresh self-mask
  seed and its mask private key, and sends each neighbour one payload sealed with
  ChaCha20-Poly1305 under a pairwise share key. The server relays ciphertexts it cannot read;
  each neighbour learns one share of each secret (t - 1 shares reveal nothing).
* **masked**: the server sees ``encode(w * u, w) + self mask + sum of pairwise masks`` in
  Z_{2**k}: uniformly distributed on its own (the self mask is unknown to everyone else).
* **unmask**: each survivor reveals, for each node of its neighbourhood, *either* its share of
  that node's self-mask seed (the node sent its masked vector) *or* its share of that node's
  mask private key (the node dropped before masking), never both; the server reconstructs
  the seeds of survivors and the keys of the dropped, and learns only the weighted sum of the
  survivors' updates (and their total weight). A site refuses a request that names one node in
  both sets, that names itself as dropped, or that has fewer than t survivors, and answers only
  once per round.

Threat model: the server is honest but curious and the network is hostile; identities come
from the consortium :class:`~medfed.common.secagg.identity.Roster`. Not covered (as in
SecAgg+ without its consistency-check round): a *malicious* server that tells different sites
different survivor sets could collect a seed share from some and a key share from others for
the same node; choosing t above 2/3 of each neighbourhood plus a signed consistency round
closes that and is left to the wiring.

Persistence: a Flower ClientApp is rebuilt for every message, so a client mod keeps a site's
session between stages in ``context.state``. :meth:`SiteSession.state_dict` gives what the
session holds beyond its constructor arguments as flat ``ConfigRecord`` values, and
:meth:`SiteSession.load_state_dict` restores it into a freshly constructed session. That state
holds the site's secrets (its private keys and seed until it masks, the shares it holds until
it unmasks), so it must stay on the site, as the session object itself would.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.common.secagg.identity import (
    KeyAuthenticationError,
    Roster,
    SignedKeys,
    sign_keys,
    verify_keys,
    verify_peer_keys,
)
from medfed.common.secagg.masks import (
    MaskContext,
    apply_masks,
    derive_key,
    generate_keypair,
    load_private,
    new_seed,
    private_bytes,
    public_bytes,
    ring_mask,
    sum_mod,
    unmask_sum,
)
from medfed.common.secagg.quantize import (
    QuantParams,
    decode_sum,
    encode_weighted,
    weighted_average,
)
from medfed.common.secagg.shares import (
    Share,
    ShareError,
    ShareHeader,
    SharePayload,
    combine_shares,
    open_payload,
    seal_payload,
    split_secret,
)

_U64 = 2**64


class ProtocolError(Exception):
    """A message breaks the protocol (wrong stage, run or round, sender, shape, contents).

    ``node_id`` names the site concerned where there is one. On a site this aborts the site's
    round; on the server it rejects that one message (the transport treats the site as dropped).
    """

    def __init__(self, message: str, node_id: int | None = None) -> None:
        super().__init__(message)
        self.node_id = node_id


class RoundAborted(ProtocolError):
    """The server cannot complete the round (too few sites at some stage); nothing was revealed
    beyond fewer than t shares of any secret. The server carries on with the next round."""


class UnmaskRefused(ProtocolError):
    """A site refuses an unmask request that would reveal a site's update."""


class _Stage(enum.IntEnum):
    """Which stage method a site (or the server) accepts next; the values are persisted."""

    KEYS = 0
    SHARES = 1
    MASKED = 2
    UNMASK = 3
    DONE = 4
    ABORTED = 5


StateValue = int | bytes | list[int] | list[bytes]
"""A value of :meth:`SiteSession.state_dict`: what a Flower ``ConfigRecord`` stores."""

_STATE_KEYS: Mapping[_Stage, frozenset[str]] = MappingProxyType(
    {
        _Stage.KEYS: frozenset({"stage"}),
        _Stage.SHARES: frozenset({"stage", "mask-private", "share-private", "bundle"}),
        _Stage.MASKED: frozenset(
            {
                "stage",
                "mask-private",
                "share-private",
                "bundle",
                "seed",
                "peer-ids",
                "peer-bundles",
                "share-keys",
                "held-ids",
                "held-payloads",
            }
        ),
        _Stage.UNMASK: frozenset(
            {"stage", "bundle", "peer-ids", "peer-bundles", "held-ids", "held-payloads"}
        ),
        _Stage.DONE: frozenset({"stage"}),
        _Stage.ABORTED: frozenset({"stage"}),
    }
)
_SECRET_BYTES = 32  # X25519 private keys, the self-mask seed, share keys


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ProtocolConfig:
    """Public, agreed parameters of one round; validated on construction.

    ``nodes`` are the sites selected for the round. ``neighbours`` maps each node to the other
    nodes it shares with (SecAgg+ graph, symmetric, no self loops); ``None`` means the complete
    graph. ``threshold`` t counts shares, and a site's neighbourhood includes the site itself
    (as in SecAgg+), so 2 <= t <= min_i |neighbours(i)| + 1. ``dimension`` is the length of the
    flat float update; masked vectors have ``dimension + 1`` entries (the weight is appended).
    The ring size is ``quant.modulus_bits``.
    """

    run_id: int
    server_round: int
    threshold: int
    dimension: int
    quant: QuantParams
    nodes: frozenset[int]
    neighbours: Mapping[int, tuple[int, ...]] | None = None
    _graph: Mapping[int, frozenset[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("run_id", "server_round"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _U64:
                raise ValueError(f"{name} must be an unsigned 64-bit integer, got {value!r}")
        nodes = frozenset(int(n) for n in self.nodes)
        object.__setattr__(self, "nodes", nodes)
        if len(nodes) < 2:
            raise ValueError(f"secure aggregation needs at least 2 sites, got {len(nodes)}")
        if any(not 0 <= n < _U64 for n in nodes):
            raise ValueError("node ids must be unsigned 64-bit integers")
        if self.dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {self.dimension}")
        if self.quant.num_sites < len(nodes):
            raise ValueError(
                f"quant.num_sites={self.quant.num_sites} < {len(nodes)} sites: the capacity "
                "check would not cover this round"
            )
        if self.neighbours is None:
            graph = {n: nodes - {n} for n in nodes}
        else:
            graph = {
                int(n): frozenset(int(m) for m in peers) for n, peers in self.neighbours.items()
            }
            if set(graph) != nodes:
                raise ValueError("neighbours must have exactly one entry per node")
            for n, peers in graph.items():
                if n in peers:
                    raise ValueError(f"node {n} lists itself as a neighbour")
                if not peers <= nodes:
                    raise ValueError(f"node {n} has neighbours outside the round: {peers - nodes}")
                for m in peers:
                    if n not in graph[m]:
                        raise ValueError(f"neighbour graph is not symmetric: {n} -> {m} only")
            object.__setattr__(
                self,
                "neighbours",
                MappingProxyType({n: tuple(sorted(p)) for n, p in graph.items()}),
            )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise ValueError(f"threshold must be an integer, got {self.threshold!r}")
        smallest = min(len(p) for p in graph.values()) + 1
        if not 2 <= self.threshold <= smallest:
            raise ValueError(
                f"threshold must satisfy 2 <= t <= {smallest} (smallest neighbourhood, "
                f"self included), got {self.threshold}"
            )
        object.__setattr__(self, "_graph", MappingProxyType(graph))

    @property
    def modulus_bits(self) -> int:
        """k: masked vectors live in Z_{2**k}."""
        return self.quant.modulus_bits

    @property
    def vector_length(self) -> int:
        """Length of a masked vector: the update plus the weight."""
        return self.dimension + 1

    def peers(self, node_id: int) -> frozenset[int]:
        """The neighbours of ``node_id``, itself excluded."""
        return self._graph[node_id]

    def neighbourhood(self, node_id: int) -> frozenset[int]:
        """The neighbours of ``node_id``, itself included."""
        return self._graph[node_id] | {node_id}

    def mask_context(self, purpose: str, a: int, b: int) -> MaskContext:
        """HKDF context for the pair {a, b} in this run and round."""
        return MaskContext.for_pair(str(self.run_id), self.server_round, purpose, a, b)


# --------------------------------------------------------------------------- messages


def _frozen_map(value: Mapping) -> Mapping:
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class _Ciphertexts:
    """Sealed share payloads of one round, keyed by the other node of each pair."""

    node_id: int
    run_id: int
    server_round: int
    ciphertexts: Mapping[int, bytes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ciphertexts", _frozen_map(self.ciphertexts))


@dataclass(frozen=True)
class SharesMessage(_Ciphertexts):
    """Stage 1, site -> server: one sealed :class:`SharePayload` per live neighbour."""


@dataclass(frozen=True)
class RoutedShares(_Ciphertexts):
    """Stage 1, server -> site ``node_id``: the ciphertexts addressed to it, keyed by sender."""


@dataclass(frozen=True)
class MaskedInput:
    """Stage 2, site -> server: the masked, quantised ``[w * u, w]`` in Z_{2**k} (uint64)."""

    node_id: int
    run_id: int
    server_round: int
    vector: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3, server -> site ``node_id``: whose seed shares and whose key shares to reveal
    (both restricted to the site's neighbourhood)."""

    node_id: int
    run_id: int
    server_round: int
    survivors: frozenset[int]
    dropped: frozenset[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "survivors", frozenset(self.survivors))
        object.__setattr__(self, "dropped", frozenset(self.dropped))


@dataclass(frozen=True)
class UnmaskShares:
    """Stage 3, site -> server: self-seed shares of survivors, mask-key shares of the dropped."""

    node_id: int
    run_id: int
    server_round: int
    seed_shares: Mapping[int, Share]
    key_shares: Mapping[int, Share]

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed_shares", _frozen_map(self.seed_shares))
        object.__setattr__(self, "key_shares", _frozen_map(self.key_shares))


@dataclass(frozen=True)
class AggregateResult:
    """The round's outcome: weighted average of the survivors' (clipped) updates."""

    average: np.ndarray
    total_weight: float
    survivors: frozenset[int]
    dropped: frozenset[int]


def _check_header(
    config: ProtocolConfig, run_id: int, server_round: int, what: str, node: int | None
) -> None:
    if (run_id, server_round) != (config.run_id, config.server_round):
        raise ProtocolError(
            f"{what} is for run {run_id} round {server_round}, expected run {config.run_id} "
            f"round {config.server_round} (replayed or misrouted message)",
            node,
        )


# --------------------------------------------------------------------------- site


class _StateReader:
    """Typed, strict access to a persisted site state; errors name the key."""

    def __init__(self, state: Mapping, node_id: int) -> None:
        self.state = state
        self.node_id = node_id

    def error(self, key: str, detail: str) -> ProtocolError:
        return ProtocolError(
            f"node {self.node_id}: session state key {key!r}: {detail}", self.node_id
        )

    def get(self, key: str) -> object:
        if key not in self.state:
            raise self.error(key, "missing")
        return self.state[key]

    def stage(self) -> _Stage:
        value = self.get("stage")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error("stage", f"must be an int, got {type(value).__name__}")
        try:
            return _Stage(value)
        except ValueError:
            low, high = min(_Stage).value, max(_Stage).value
            raise self.error("stage", f"must be in {low}..{high}, got {value}") from None

    def raw(self, key: str, size: int | None = None) -> bytes:
        value = self.get(key)
        if not isinstance(value, bytes):
            raise self.error(key, f"must be bytes, got {type(value).__name__}")
        if size is not None and len(value) != size:
            raise self.error(key, f"must be {size} bytes, got {len(value)}")
        return value

    def ids(self, key: str) -> list[int]:
        """Node ids, strictly increasing (sorted, no duplicates), each an unsigned 64-bit int."""
        values = self.get(key)
        if not isinstance(values, list):
            raise self.error(key, f"must be a list, got {type(values).__name__}")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _U64:
                raise self.error(key, f"item {i} must be an unsigned 64-bit integer, got {v!r}")
            if i and v <= values[i - 1]:
                raise self.error(key, "must be sorted ascending without duplicates")
        return values

    def blobs(self, key: str, ids_key: str, ids: list[int], size: int | None = None) -> list:
        """A list of bytes parallel to ``ids`` (read from ``ids_key``)."""
        values = self.get(key)
        if not isinstance(values, list):
            raise self.error(key, f"must be a list, got {type(values).__name__}")
        if len(values) != len(ids):
            raise self.error(
                key, f"has {len(values)} items but {ids_key!r} has {len(ids)} (parallel lists)"
            )
        for i, v in enumerate(values):
            if not isinstance(v, bytes):
                raise self.error(key, f"item {i} must be bytes, got {type(v).__name__}")
            if size is not None and len(v) != size:
                raise self.error(key, f"item {i} must be {size} bytes, got {len(v)}")
        return values

    def x25519(self, key: str, expected_public: bytes, bundle_field: str):
        """A raw X25519 private key whose public half is the one signed in 'bundle'."""
        private = load_private(self.raw(key, _SECRET_BYTES))
        if public_bytes(private) != expected_public:
            raise self.error(key, f"does not match the {bundle_field} signed in 'bundle'")
        return private


class SiteSession:
    """One site's side of one round. Call the stages in order; any error aborts the session.

    Secrets it holds: two fresh X25519 private keys (mask, share), a fresh self-mask seed, and
    the shares neighbours sent it. The mask private key and the seed are dropped from memory as
    soon as the masked vector is produced; shares are released at most once, by :meth:`unmask`.
    """

    def __init__(
        self,
        node_id: int,
        identity_private_key: Ed25519PrivateKey,
        roster: Roster,
        config: ProtocolConfig,
    ) -> None:
        if node_id not in config.nodes:
            raise ValueError(f"node {node_id} is not selected for this round")
        if node_id not in roster.keys:
            raise ValueError(f"node {node_id} is not in the roster")
        if identity_private_key.public_key().public_bytes_raw() != roster.keys[node_id]:
            raise ValueError(f"identity key of node {node_id} does not match the roster")
        self.node_id = node_id
        self.config = config
        self._identity = identity_private_key
        self._roster = roster
        self._stage = _Stage.KEYS
        self._mask_private = None
        self._share_private = None
        self._seed: bytes | None = None
        self._bundle: SignedKeys | None = None
        self._peer_bundles: dict[int, SignedKeys] = {}
        self._share_keys: dict[int, bytes] = {}
        self._held: dict[int, SharePayload] = {}  # node -> shares of its secrets that we hold

    # -- helpers
    def expect(self, name: str) -> None:
        """Raise :class:`ProtocolError` unless ``name`` (``"share_keys"``, ...) is the stage
        method to call next; lets a transport refuse a message before costly work."""
        stage = {
            "setup": _Stage.KEYS,
            "share_keys": _Stage.SHARES,
            "masked_input": _Stage.MASKED,
            "unmask": _Stage.UNMASK,
        }[name]
        self._enter(stage, name)

    def _enter(self, stage: _Stage, name: str) -> None:
        if self._stage is not stage:
            raise ProtocolError(
                f"node {self.node_id}: {name}() called in stage {self._stage.name}", self.node_id
            )

    def _fail(self, exc: Exception) -> Exception:
        self._stage = _Stage.ABORTED
        self._mask_private = self._share_private = self._seed = None
        self._held.clear()
        return exc

    # -- persistence
    def state_dict(self) -> dict[str, StateValue]:
        """Everything the session holds besides its constructor arguments, as flat values a
        Flower ``ConfigRecord`` stores (ints, bytes, lists of those), for :meth:`load_state_dict`.

        Keys, by stage (``stage`` is the int value: 0 keys, 1 shares, 2 masked, 3 unmask,
        4 done, 5 aborted): ``mask-private``, ``share-private`` (raw X25519, 32 B) and
        ``bundle`` (:meth:`SignedKeys.to_bytes`) from stage 1; ``seed`` (32 B) in stage 2;
        ``peer-ids`` with the parallel ``peer-bundles`` (the verified neighbours' bundles) and,
        in stage 2, ``share-keys`` (32 B each); ``held-ids`` with the parallel
        ``held-payloads`` (:meth:`SharePayload.encode`, the shares this site holds) in stages
        2 and 3. Node-keyed lists are sorted by node id. A session not yet set up, done or
        aborted holds nothing to restore and gives only ``stage``.

        The result contains the site's secrets (see the module docstring): keep it on the site.
        """
        stage = self._stage
        state: dict[str, StateValue] = {"stage": int(stage)}
        if stage in (_Stage.KEYS, _Stage.DONE, _Stage.ABORTED):
            return state
        state["bundle"] = self._bundle.to_bytes()
        if stage in (_Stage.SHARES, _Stage.MASKED):
            state["mask-private"] = private_bytes(self._mask_private)
            state["share-private"] = private_bytes(self._share_private)
        if stage is _Stage.SHARES:
            return state
        peers = sorted(self._peer_bundles)
        held = sorted(self._held)
        state["peer-ids"] = peers
        state["peer-bundles"] = [self._peer_bundles[n].to_bytes() for n in peers]
        state["held-ids"] = held
        state["held-payloads"] = [self._held[n].encode() for n in held]
        if stage is _Stage.MASKED:
            state["seed"] = self._seed
            state["share-keys"] = [self._share_keys[n] for n in peers]
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` into this freshly constructed session (same node,
        identity key, roster and config), so the next stage method runs as if the session had
        never been serialised.

        Strict: :class:`ProtocolError` naming the key on a missing, unexpected or wrongly typed
        key, a wrong size, a stage out of range, unsorted or duplicate node ids, or contents that
        do not fit this session (a bundle not signed by this site for this run and round, private
        keys that do not match it, peer bundles that do not verify against the roster or are not
        neighbours, held shares not addressed to this site). Everything is checked before
        anything is assigned: on error the session is left untouched (still fresh). Loading
        into a session that has already started is refused.
        """
        me = self.node_id
        if self._stage is not _Stage.KEYS or self._bundle is not None:
            raise ProtocolError(
                f"node {me}: load_state_dict() needs a fresh session, this one is in stage "
                f"{self._stage.name}",
                me,
            )
        if not isinstance(state, Mapping):
            raise ProtocolError(
                f"node {me}: session state must be a mapping, got {type(state).__name__}", me
            )
        r = _StateReader(state, me)
        stage = r.stage()
        expected = _STATE_KEYS[stage]
        if missing := sorted(expected - set(state)):
            raise r.error(missing[0], f"missing in stage {stage.name} (all missing: {missing})")
        if extra := sorted(map(str, set(state) - expected)):
            raise r.error(extra[0], f"unexpected in stage {stage.name} (all unexpected: {extra})")
        if stage in (_Stage.KEYS, _Stage.DONE, _Stage.ABORTED):
            self._stage = stage
            return
        cfg = self.config
        try:
            bundle = SignedKeys.from_bytes(r.raw("bundle"))
            verify_keys(bundle, self._roster, cfg.run_id, cfg.server_round, expected_node_id=me)
        except KeyAuthenticationError as exc:
            raise r.error("bundle", f"not this site's keys for this round: {exc}") from None
        mask_private = share_private = seed = None
        if stage in (_Stage.SHARES, _Stage.MASKED):
            mask_private = r.x25519("mask-private", bundle.mask_public, "mask public key")
            share_private = r.x25519("share-private", bundle.share_public, "share public key")
        peer_bundles: dict[int, SignedKeys] = {}
        share_keys: dict[int, bytes] = {}
        held: dict[int, SharePayload] = {}
        if stage in (_Stage.MASKED, _Stage.UNMASK):
            peers = r.ids("peer-ids")
            if outside := set(peers) - cfg.peers(me):
                raise r.error("peer-ids", f"names non-neighbours {sorted(outside)}")
            if len(peers) + 1 < cfg.threshold:
                raise r.error(
                    "peer-ids",
                    f"only {len(peers) + 1} live neighbours (self included), threshold is "
                    f"{cfg.threshold}",
                )
            try:
                for n, blob in zip(peers, r.blobs("peer-bundles", "peer-ids", peers), strict=True):
                    peer_bundles[n] = SignedKeys.from_bytes(blob)
                verify_peer_keys(peer_bundles, self._roster, cfg.run_id, cfg.server_round)
            except KeyAuthenticationError as exc:
                raise r.error("peer-bundles", str(exc)) from None
            held_ids = r.ids("held-ids")
            if me not in held_ids:
                raise r.error("held-ids", "does not include this site's own shares")
            if stage is _Stage.MASKED and held_ids != [me]:
                raise r.error("held-ids", "before masking this site holds only its own shares")
            if unknown := set(held_ids) - set(peers) - {me}:
                raise r.error("held-ids", f"names nodes not in 'peer-ids': {sorted(unknown)}")
            payloads = r.blobs("held-payloads", "held-ids", held_ids)
            for i, (n, blob) in enumerate(zip(held_ids, payloads, strict=True)):
                try:
                    payload = SharePayload.decode(blob)
                except ValueError as exc:
                    raise r.error("held-payloads", f"item {i}: {exc}") from None
                if (payload.sender, payload.receiver) != (n, me):
                    raise r.error(
                        "held-payloads",
                        f"item {i} holds shares from node {payload.sender} to node "
                        f"{payload.receiver}, expected from node {n} to node {me}",
                    )
                held[n] = payload
        if stage is _Stage.MASKED:
            seed = r.raw("seed", _SECRET_BYTES)
            keys = r.blobs("share-keys", "peer-ids", peers, _SECRET_BYTES)
            share_keys = dict(zip(peers, keys, strict=True))
        self._stage = stage
        self._bundle = bundle
        self._mask_private = mask_private
        self._share_private = share_private
        self._seed = seed
        self._peer_bundles = peer_bundles
        self._share_keys = share_keys
        self._held = held

    # -- stage 0
    def setup(self) -> SignedKeys:
        """Stage 0: fresh mask and share key pairs, signed for this run, round and node.

        Reveals: the two public keys (to the server and, relayed, to the neighbours).
        """
        self._enter(_Stage.KEYS, "setup")
        self._mask_private = generate_keypair()
        self._share_private = generate_keypair()
        self._bundle = sign_keys(
            self._identity,
            self.node_id,
            self.config.run_id,
            self.config.server_round,
            public_bytes(self._mask_private),
            public_bytes(self._share_private),
        )
        self._stage = _Stage.SHARES
        return self._bundle

    # -- stage 1
    def share_keys(self, peer_bundles: Mapping[int, SignedKeys]) -> SharesMessage:
        """Stage 1: verify every relayed bundle, then share the seed and mask key.

        ``peer_bundles`` are the bundles the server relays, keyed by the node it says sent each
        (the site's own may be included). All are verified against the roster *before* anything
        is encrypted: an unknown node, a relabelled, replayed or substituted bundle raises
        :class:`KeyAuthenticationError` naming the site, and aborts. Fewer than t live
        neighbours (self included) raises :class:`ProtocolError`.

        Reveals: to each live neighbour j, sealed for j only, share j of the self-mask seed and
        share j of the mask private key (Shamir, t of the live neighbourhood).
        """
        self._enter(_Stage.SHARES, "share_keys")
        try:
            return self._share_keys_inner(peer_bundles)
        except Exception as exc:
            raise self._fail(exc) from None

    def _share_keys_inner(self, peer_bundles: Mapping[int, SignedKeys]) -> SharesMessage:
        cfg, me = self.config, self.node_id
        bundles = dict(peer_bundles)
        own = bundles.pop(me, None)
        if own is not None and own != self._bundle:
            raise KeyAuthenticationError(
                f"{self._roster.describe(me)}: the server relayed different keys as our own", me
            )
        verify_peer_keys(bundles, self._roster, cfg.run_id, cfg.server_round)
        if outside := set(bundles) - cfg.peers(me):
            raise ProtocolError(f"node {me}: relayed keys of non-neighbours {sorted(outside)}", me)
        publics = [b.mask_public for b in bundles.values()] + [
            b.share_public for b in bundles.values()
        ]
        publics += [self._bundle.mask_public, self._bundle.share_public]
        if len(set(publics)) != len(publics):
            raise ProtocolError(f"node {me}: relayed key bundles repeat a public key", me)
        live = sorted(set(bundles) | {me})
        if len(live) < cfg.threshold:
            raise ProtocolError(
                f"node {me}: only {len(live)} live neighbours (self included), threshold is "
                f"{cfg.threshold}",
                me,
            )
        self._peer_bundles = bundles
        self._seed = new_seed()
        seed_shares = split_secret(self._seed, cfg.threshold, len(live))
        key_shares = split_secret(private_bytes(self._mask_private), cfg.threshold, len(live))
        ciphertexts: dict[int, bytes] = {}
        for position, peer in enumerate(live):
            payload = SharePayload(me, peer, seed_shares[position], key_shares[position])
            if peer == me:
                self._held[me] = payload
                continue
            key = derive_key(
                self._share_private,
                bundles[peer].share_public,
                cfg.mask_context("share-key", me, peer),
            )
            self._share_keys[peer] = key
            header = ShareHeader(cfg.run_id, cfg.server_round, me, peer)
            ciphertexts[peer] = seal_payload(key, payload, header)
        self._stage = _Stage.MASKED
        return SharesMessage(me, cfg.run_id, cfg.server_round, ciphertexts)

    # -- stage 2
    def masked_input(self, update: np.ndarray, weight: float, routed: RoutedShares) -> MaskedInput:
        """Stage 2: open the shares received, quantise ``[w * u, w]`` and mask it.

        The ciphertexts are opened (and authenticated) now, so tampering is caught before the
        masked vector leaves the site; the shares are kept for :meth:`unmask`. Pairwise masks
        are added for exactly the neighbours whose shares arrived (SecAgg+: the sites alive
        at the share stage). Fewer than t of them (self included) aborts.

        Reveals: the masked vector to the server (uniform in Z_{2**k} without the self mask).
        """
        self._enter(_Stage.MASKED, "masked_input")
        try:
            return self._masked_inner(update, weight, routed)
        except Exception as exc:
            raise self._fail(exc) from None

    def _masked_inner(self, update: np.ndarray, weight: float, routed: RoutedShares) -> MaskedInput:
        cfg, me = self.config, self.node_id
        _check_header(cfg, routed.run_id, routed.server_round, "routed shares", me)
        if routed.node_id != me:
            raise ProtocolError(f"node {me}: received shares routed to node {routed.node_id}", me)
        if unknown := set(routed.ciphertexts) - set(self._share_keys):
            raise ProtocolError(
                f"node {me}: shares from nodes whose keys were not verified: {sorted(unknown)}", me
            )
        live = len(routed.ciphertexts) + 1
        if live < cfg.threshold:
            raise ProtocolError(
                f"node {me}: shares from only {live - 1} neighbours, threshold is {cfg.threshold}",
                me,
            )
        u = np.asarray(update, np.float64).ravel()
        if u.shape[0] != cfg.dimension:
            raise ValueError(f"update has {u.shape[0]} values, expected {cfg.dimension}")
        for sender, blob in sorted(routed.ciphertexts.items()):
            header = ShareHeader(cfg.run_id, cfg.server_round, sender, me)
            try:
                self._held[sender] = open_payload(self._share_keys[sender], blob, header)
            except ShareError as exc:
                raise ProtocolError(
                    f"node {me}: share from {self._roster.describe(sender)} rejected: {exc}",
                    sender,
                ) from None
        pair_keys = {
            peer: derive_key(
                self._mask_private,
                self._peer_bundles[peer].mask_public,
                cfg.mask_context("pairwise-mask", me, peer),
            )
            for peer in routed.ciphertexts
        }
        q = encode_weighted(u, weight, cfg.quant)
        vector = apply_masks(
            q,
            self._seed,
            pair_keys,
            me,
            cfg.modulus_bits,
            run_id=str(cfg.run_id),
            round=cfg.server_round,
        )
        # The seed and mask key now live only as shares; the share keys are no longer needed.
        self._seed = self._mask_private = self._share_private = None
        self._share_keys.clear()
        self._stage = _Stage.UNMASK
        return MaskedInput(me, cfg.run_id, cfg.server_round, vector)

    # -- stage 3
    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Stage 3: reveal seed shares of survivors and mask-key shares of dropped nodes.

        Refuses (:class:`UnmaskRefused`, the site's round aborts) a request that names a node
        both as survivor and as dropped (that would let the server unmask its update), that
        names this site as dropped or omits it from the survivors, that names a node this site
        holds no share of, or that lists fewer than t survivors. Answers once per round.

        Reveals: to the server, one share per named node (seed or key, never both).
        """
        self._enter(_Stage.UNMASK, "unmask")
        try:
            return self._unmask_inner(request)
        except Exception as exc:
            raise self._fail(exc) from None

    def _unmask_inner(self, request: UnmaskRequest) -> UnmaskShares:
        cfg, me = self.config, self.node_id
        _check_header(cfg, request.run_id, request.server_round, "unmask request", me)
        if request.node_id != me:
            raise ProtocolError(f"node {me}: received the request for node {request.node_id}", me)
        survivors, dropped = request.survivors, request.dropped
        if both := survivors & dropped:
            raise UnmaskRefused(
                f"node {me}: refusing to reveal both the self-seed share and the mask-key share "
                f"of nodes {sorted(both)} (that would reveal their updates)",
                me,
            )
        if me in dropped or me not in survivors:
            raise UnmaskRefused(f"node {me}: the request does not list this site as survivor", me)
        if unknown := (survivors | dropped) - set(self._held):
            raise UnmaskRefused(f"node {me}: holds no shares of nodes {sorted(unknown)}", me)
        if len(survivors) < cfg.threshold:
            raise UnmaskRefused(
                f"node {me}: only {len(survivors)} survivors, threshold is {cfg.threshold}", me
            )
        seeds = {n: self._held[n].seed_share for n in sorted(survivors)}
        keys = {n: self._held[n].key_share for n in sorted(dropped)}
        self._held.clear()
        self._stage = _Stage.DONE
        return UnmaskShares(me, cfg.run_id, cfg.server_round, seeds, keys)


# --------------------------------------------------------------------------- server


class ServerSession:
    """The server's side of one round: collect, route, sum and unmask.

    ``receive_*`` methods raise :class:`ProtocolError` for a message that must be ignored
    (unknown site, wrong run or round, wrong stage, duplicate, bad shape); the transport logs it
    and treats the site as dropped. The stage-closing methods (``key_broadcast``,
    ``route_shares``, ``unmask_requests``, ``finish``) raise :class:`RoundAborted` when too few
    sites remain; the server then moves on to the next round.
    """

    def __init__(self, config: ProtocolConfig, roster: Roster) -> None:
        if missing := config.nodes - set(roster.keys):
            raise ValueError(f"nodes not in the roster: {sorted(missing)}")
        self.config = config
        self._roster = roster
        self._stage = _Stage.KEYS
        self._bundles: dict[int, SignedKeys] = {}
        self._broadcast: dict[int, frozenset[int]] = {}
        self._shares: dict[int, Mapping[int, bytes]] = {}
        self._routed: dict[int, frozenset[int]] = {}  # receiver -> senders routed to it
        self._masked: dict[int, np.ndarray] = {}
        self._requests: dict[int, UnmaskRequest] = {}
        self._unmask: dict[int, UnmaskShares] = {}

    def _enter(self, stage: _Stage, name: str, node: int | None = None) -> None:
        if self._stage is not stage:
            raise ProtocolError(f"server: {name} in stage {self._stage.name}", node)

    def _sender(self, node: int, run_id: int, server_round: int, what: str) -> None:
        if node not in self._roster.keys or node not in self.config.nodes:
            raise ProtocolError(
                f"{what} from node {node}, which is not in this round's roster", node
            )
        _check_header(self.config, run_id, server_round, f"{what} from node {node}", node)

    def _abort(self, reason: str) -> RoundAborted:
        self._stage = _Stage.ABORTED
        self._masked.clear()
        self._unmask.clear()
        return RoundAborted(f"run {self.config.run_id} round {self.config.server_round}: {reason}")

    # -- stage 0
    def receive_keys(self, bundle: SignedKeys) -> None:
        """Accept one site's signed keys (verified here too, so a bad one is dropped early)."""
        self._enter(_Stage.KEYS, "receive_keys", bundle.node_id)
        self._sender(bundle.node_id, bundle.run_id, bundle.server_round, "key bundle")
        if bundle.node_id in self._bundles:
            raise ProtocolError(f"duplicate key bundle from node {bundle.node_id}", bundle.node_id)
        try:
            verify_keys(bundle, self._roster, self.config.run_id, self.config.server_round)
        except KeyAuthenticationError as exc:
            raise ProtocolError(str(exc), bundle.node_id) from None
        self._bundles[bundle.node_id] = bundle

    def key_broadcast(self) -> dict[int, dict[int, SignedKeys]]:
        """Close stage 0: for each site that sent keys, the bundles of its live neighbourhood."""
        self._enter(_Stage.KEYS, "key_broadcast")
        live = set(self._bundles)
        if len(live) < self.config.threshold:
            raise self._abort(
                f"only {len(live)} sites sent keys, threshold {self.config.threshold}"
            )
        out = {}
        for node in sorted(live):
            members = self.config.neighbourhood(node) & live
            self._broadcast[node] = frozenset(members)
            out[node] = {m: self._bundles[m] for m in sorted(members)}
        self._stage = _Stage.SHARES
        return out

    # -- stage 1
    def receive_shares(self, message: SharesMessage) -> None:
        """Accept one site's sealed shares: exactly one per neighbour it was sent keys of."""
        node = message.node_id
        self._enter(_Stage.SHARES, "receive_shares", node)
        self._sender(node, message.run_id, message.server_round, "shares")
        if node not in self._broadcast:
            raise ProtocolError(f"shares from node {node}, which sent no keys", node)
        if node in self._shares:
            raise ProtocolError(f"duplicate shares from node {node}", node)
        expected = self._broadcast[node] - {node}
        if set(message.ciphertexts) != expected:
            raise ProtocolError(
                f"node {node} addressed shares to {sorted(message.ciphertexts)}, expected "
                f"{sorted(expected)}",
                node,
            )
        self._shares[node] = message.ciphertexts

    def route_shares(self) -> dict[int, RoutedShares]:
        """Close stage 1: for each site that sent shares, those addressed to it by others that
        did. Sites that never sent shares get nothing and are out of the round."""
        self._enter(_Stage.SHARES, "route_shares")
        live = set(self._shares)
        if len(live) < self.config.threshold:
            raise self._abort(
                f"only {len(live)} sites sent shares, threshold {self.config.threshold}"
            )
        cfg, out = self.config, {}
        for dest in sorted(live):
            senders = {s: self._shares[s][dest] for s in sorted(live) if dest in self._shares[s]}
            self._routed[dest] = frozenset(senders)
            out[dest] = RoutedShares(dest, cfg.run_id, cfg.server_round, senders)
        self._stage = _Stage.MASKED
        return out

    # -- stage 2
    def receive_masked(self, message: MaskedInput) -> None:
        """Accept one masked vector (uint64, ``dimension + 1`` entries, all in Z_{2**k})."""
        node = message.node_id
        self._enter(_Stage.MASKED, "receive_masked", node)
        self._sender(node, message.run_id, message.server_round, "masked vector")
        if node not in self._routed:
            raise ProtocolError(f"masked vector from node {node}, which sent no shares", node)
        if node in self._masked:
            raise ProtocolError(f"duplicate masked vector from node {node}", node)
        vector = np.asarray(message.vector)
        if vector.dtype != np.uint64 or vector.shape != (self.config.vector_length,):
            raise ProtocolError(
                f"masked vector from node {node} has dtype {vector.dtype} and shape "
                f"{vector.shape}, expected uint64 ({self.config.vector_length},)",
                node,
            )
        if np.any(vector > ring_mask(self.config.modulus_bits)):
            raise ProtocolError(f"masked vector from node {node} leaves Z_2**k", node)
        self._masked[node] = vector.copy()

    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        """Close stage 2: survivors sent a masked vector; dropped sent shares but no vector.

        Each survivor is asked, within its neighbourhood, for seed shares of survivors and key
        shares of dropped nodes whose shares it received."""
        self._enter(_Stage.MASKED, "unmask_requests")
        survivors = frozenset(self._masked)
        if len(survivors) < self.config.threshold:
            raise self._abort(
                f"only {len(survivors)} sites sent masked vectors, threshold "
                f"{self.config.threshold}"
            )
        dropped = frozenset(self._routed) - survivors
        cfg, out = self.config, {}
        for node in sorted(survivors):
            held = self._routed[node] | {node}
            request = UnmaskRequest(
                node, cfg.run_id, cfg.server_round, survivors & held, dropped & held
            )
            self._requests[node] = request
            out[node] = request
        self._stage = _Stage.UNMASK
        return out

    # -- stage 3
    def receive_unmask(self, message: UnmaskShares) -> None:
        """Accept one survivor's shares: exactly the ones it was asked for."""
        node = message.node_id
        self._enter(_Stage.UNMASK, "receive_unmask", node)
        self._sender(node, message.run_id, message.server_round, "unmask shares")
        if node not in self._requests:
            raise ProtocolError(f"unmask shares from node {node}, which was not asked", node)
        if node in self._unmask:
            raise ProtocolError(f"duplicate unmask shares from node {node}", node)
        request = self._requests[node]
        if set(message.seed_shares) != request.survivors or set(message.key_shares) != (
            request.dropped
        ):
            raise ProtocolError(f"node {node} answered a different unmask request", node)
        self._unmask[node] = message

    def finish(self) -> AggregateResult:
        """Close stage 3: reconstruct, unmask, decode. :class:`RoundAborted` if any survivor's
        seed or dropped node's key has fewer than t shares, or a key does not match its
        signed public key (corrupted shares)."""
        self._enter(_Stage.UNMASK, "finish")
        cfg, t = self.config, self.config.threshold
        survivors = frozenset(self._masked)
        dropped = frozenset(self._routed) - survivors
        seed_shares: dict[int, list[Share]] = {n: [] for n in survivors}
        key_shares: dict[int, list[Share]] = {n: [] for n in dropped}
        for answer in self._unmask.values():
            for n, share in answer.seed_shares.items():
                seed_shares[n].append(share)
            for n, share in answer.key_shares.items():
                key_shares[n].append(share)
        short = sorted(n for n, s in (seed_shares | key_shares).items() if len(s) < t)
        if short:
            raise self._abort(
                f"fewer than t={t} unmask shares for nodes {short} "
                f"({len(self._unmask)} of {len(survivors)} survivors answered)"
            )
        try:
            seeds = {n: combine_shares(s, t) for n, s in seed_shares.items()}
            dangling: dict[tuple[int, int], bytes] = {}
            for d, shares in key_shares.items():
                private = load_private(combine_shares(shares, t))
                if public_bytes(private) != self._bundles[d].mask_public:
                    raise ValueError(f"reconstructed mask key of node {d} does not match its keys")
                for s in survivors:
                    if d in self._routed[s]:
                        key = derive_key(
                            private,
                            self._bundles[s].mask_public,
                            cfg.mask_context("pairwise-mask", s, d),
                        )
                        dangling[(s, d)] = key
        except ValueError as exc:
            raise self._abort(f"reconstruction failed: {exc}") from None
        total = sum_mod([self._masked[n] for n in sorted(survivors)], cfg.modulus_bits)
        plain = unmask_sum(
            total,
            self_seeds=seeds,
            dangling=dangling,
            run_id=str(cfg.run_id),
            round=cfg.server_round,
            modulus_bits=cfg.modulus_bits,
        )
        _, total_weight = decode_sum(plain, cfg.quant)
        try:
            average = weighted_average(plain, cfg.quant)
        except ValueError as exc:
            raise self._abort(str(exc)) from None
        self._stage = _Stage.DONE
        self._masked.clear()
        return AggregateResult(average, total_weight, survivors, dropped)
