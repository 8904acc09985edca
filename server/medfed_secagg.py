"""The coordinator's side of medfed secure aggregation, carried over Flower messages.

One call runs one round of :class:`~medfed.common.secagg.protocol.ServerSession` over the
sites that accepted it, each stage one ``train`` message per live site and a wait of at
most ``timeout`` seconds (``train_timeout`` for the training stage) for the replies::

    setup           (round parameters)      -> keys          signed key-agreement keys
    key-broadcast   (neighbours' bundles)   -> shares        sealed Shamir shares
    routed-shares   (+ the global model)    -> masked        local DP-SGD, masked update
    unmask-request  (survivors, dropped)    -> unmask-shares seed or key shares

A site that does not answer in time, answers with an error (it aborted: a bad signature it
names, a refusal) or sends a message the protocol rejects, is dropped from the round; the
protocol recovers the masks of sites that dropped after sharing. When fewer than the
threshold remain at any stage the round is aborted without unmasking anything, and the
coordinator goes on with the next round. Sites are addressed by their Flower node id and
named in the protocol by their roster id, which each reports when it accepts the round; a
site's key bundle is checked against the roster entry it claimed.

The masked vector is the site's update (trained weights minus the global model, clipped to
``[-clip, clip]`` per coordinate), weighted by its sample count; the unmasked result is the
weighted average update, which is added to the global model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp.grid import Grid
from flwr.supercore import log

from medfed.common.messages import ROUND_KEY, SECAGG_ID_KEY
from medfed.common.secagg import wire
from medfed.common.secagg.identity import Roster
from medfed.common.secagg.protocol import (
    AggregateResult,
    ProtocolConfig,
    ProtocolError,
    RoundAborted,
    ServerSession,
)
from medfed.common.secagg.quantize import DEFAULT_MODULUS_BITS, QuantParams


def threshold_for(fraction: float, num_sites: int) -> int:
    """Shares needed to unmask: ``round(fraction * n)``, at least 2, at most n (as in
    Flower's SecAgg+ workflow with every selected site a neighbour)."""
    return min(num_sites, max(2, round(fraction * num_sites)))


@dataclass
class SecAggRound:
    """What one round of secure aggregation did, for run.json.

    ``survivors`` and ``dropped`` are Flower node ids (sites whose masked update is in the
    sum, and sites that shared keys but whose update is not); ``site_errors`` holds, per
    node id, why the site left the round (its own error reply or the message the
    coordinator rejected). ``fit_results`` are the survivors' metric-only fit results.
    """

    status: str
    threshold: int = 0
    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    site_errors: dict[int, str] = field(default_factory=dict)
    note: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    masked_bytes: dict[int, int] = field(default_factory=dict)  # the masked vector, per site
    plain_bytes: int = 0  # the same update as float32
    fit_results: list[tuple[int, FitRes]] = field(default_factory=list, repr=False)

    def summary(self, name_of: Callable[[int], str]) -> dict[str, Any]:
        """JSON-ready description with sites named."""
        return {
            "protocol": "medfed",
            "status": self.status,
            "threshold": self.threshold,
            "dropped": sorted(name_of(n) for n in self.dropped),
            "site_errors": {name_of(n): e for n, e in sorted(self.site_errors.items())},
            "stage_seconds": self.stage_seconds,
            "masked_vector_bytes": dict(
                sorted((name_of(n), b) for n, b in self.masked_bytes.items())
            ),
            "plain_float32_bytes": self.plain_bytes,
            "note": self.note,
        }


def _fit_result(content: RecordDict) -> tuple[FitRes, int]:
    """The metric-only fit result riding with a masked vector, and the vector's size."""
    try:
        fit_result = compat.recorddict_to_fitres(content, keep_input=True)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"masked reply without a well-formed fit result ({exc!r})") from None
    return fit_result, len(content.config_records[wire.RECORD_KEY]["vector"])


def _declared_weight(reply: Mapping[str, Any]) -> int:
    """The training-set size a site declared when it accepted the round."""
    value = reply.get("train-records", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"declared train-records {value!r} is not a non-negative integer")
    return value


class MedfedSecAggWorkflow:
    """Runs one round of medfed secure aggregation and updates the global model.

    Parameters
    ----------
    roster : Roster
        The consortium's identity keys; key bundles are checked against it.
    threshold : float
        Fraction of the round's sites whose shares are needed to unmask
        (:func:`threshold_for`).
    clip : float
        Per-coordinate bound on a site's update before fixed-point encoding.
    timeout : float
        Seconds to wait for the replies of each stage.
    train_timeout : float, optional
        Seconds to wait for the training stage (local DP-SGD, then masking); default
        ``timeout``.
    modulus_bits : int
        Masked vectors live in Z_{2**k}; 32 keeps the upload the size of a float32 update.
    """

    def __init__(
        self,
        roster: Roster,
        threshold: float,
        clip: float,
        timeout: float,
        train_timeout: float | None = None,
        modulus_bits: int = DEFAULT_MODULUS_BITS,
    ) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a fraction in (0, 1], got {threshold}")
        train_timeout = timeout if train_timeout is None else train_timeout
        if not (clip > 0 and timeout > 0 and train_timeout > 0):
            raise ValueError("clip and the timeouts must be positive")
        self.roster = roster
        self.threshold = threshold
        self.clip = clip
        self.timeout = timeout
        self.train_timeout = train_timeout
        self.modulus_bits = modulus_bits

    def __call__(
        self,
        grid: Grid,
        context: LegacyContext,
        server_round: int,
        accepted: Mapping[int, Mapping[str, Any]],
    ) -> SecAggRound:
        """Aggregate the updates of the ``accepted`` sites (Flower node id -> ask reply)."""
        run = _RoundRun(self, grid, context, server_round)
        try:
            run.start(accepted)
            run.stage("setup", run.setup_messages, wire.STAGE_KEYS, run.server.receive_keys)
            run.stage("keys", run.broadcast_messages, wire.STAGE_SHARES, run.server.receive_shares)
            run.stage("train", run.train_messages, wire.STAGE_MASKED, run.receive_masked)
            run.stage(
                "unmask", run.unmask_messages, wire.STAGE_UNMASK_SHARES, run.server.receive_unmask
            )
            run.apply(run.server.finish())
        except RoundAborted as exc:
            run.outcome.status, run.outcome.note = "aborted", str(exc)
            log(WARNING, "secure aggregation aborted: %s", exc)
        return run.outcome


class _RoundRun:
    """State of one round on the coordinator (one instance per call)."""

    def __init__(
        self, workflow: MedfedSecAggWorkflow, grid: Grid, context: LegacyContext, server_round: int
    ) -> None:
        self.workflow, self.grid, self.context = workflow, grid, context
        self.server_round = server_round
        self.outcome = SecAggRound(status="aborted")
        self.flower_of: dict[int, int] = {}  # roster id -> Flower node id
        self.roster_of: dict[int, int] = {}  # Flower node id -> roster id
        self.server: ServerSession
        self.config: ProtocolConfig
        self.global_model = parameters_to_ndarrays(
            compat.arrayrecord_to_parameters(
                context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
            )
        )
        self.fit_results: dict[int, FitRes] = {}
        self._pending: dict[int, tuple[FitRes, int]] = {}

    # -- setup ------------------------------------------------------------------------
    def start(self, accepted: Mapping[int, Mapping[str, Any]]) -> None:
        roster = self.workflow.roster
        weights = []
        for nid, reply in sorted(accepted.items()):
            claimed = reply.get(SECAGG_ID_KEY)
            try:
                weight = _declared_weight(reply)
            except ValueError as exc:
                self.outcome.site_errors[nid] = str(exc)
                continue
            if not isinstance(claimed, int) or claimed not in roster.keys:
                self.outcome.site_errors[nid] = f"roster id {claimed!r} is not in the roster"
            elif claimed in self.flower_of:
                self.outcome.site_errors[nid] = (
                    f"roster id {claimed} already claimed by node {self.flower_of[claimed]}"
                )
            else:
                self.flower_of[claimed], self.roster_of[nid] = nid, claimed
                weights.append(weight)
        n = len(self.flower_of)
        if n < 2:
            raise RoundAborted(f"only {n} site(s) with a valid roster id; at least 2 needed")
        quant = QuantParams.auto(
            n, float(max(1, *weights)), self.workflow.clip, self.workflow.modulus_bits
        )
        self.config = ProtocolConfig(
            run_id=int(self.context.run_id),
            server_round=self.server_round,
            threshold=threshold_for(self.workflow.threshold, n),
            dimension=int(sum(a.size for a in self.global_model)),
            quant=quant,
            nodes=frozenset(self.flower_of),
        )
        self.outcome.threshold = self.config.threshold
        self.outcome.plain_bytes = 4 * self.config.dimension
        self.server = ServerSession(self.config, roster)

    # -- one stage --------------------------------------------------------------------
    def stage(
        self,
        name: str,
        make: Callable[[], dict[int, RecordDict]],
        expect: str,
        receive: Callable[[Any], None],
    ) -> None:
        started = time.time()
        contents = make()
        messages = [
            Message(
                content=content,
                dst_node_id=self.flower_of[rid],
                message_type=MessageType.TRAIN,
                group_id=str(self.server_round),
            )
            for rid, content in contents.items()
        ]
        timeout = self.workflow.train_timeout if name == "train" else self.workflow.timeout
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self._receive(reply, expect, receive)
        self.outcome.stage_seconds[name] = round(time.time() - started, 3)
        log(
            INFO,
            "secure aggregation %s: %s of %s sites answered",
            name,
            len(replies),
            len(messages),
        )

    def _receive(self, reply: Message, expect: str, receive: Callable[[Any], None]) -> None:
        nid = reply.metadata.src_node_id
        if nid not in self.roster_of:
            return
        if reply.has_error():
            self.outcome.site_errors[nid] = str(reply.error.reason)
            return
        try:
            message = wire.from_recorddict(
                reply.content,
                expect=expect,
                modulus_bits=self.config.modulus_bits,
                length=self.config.vector_length,
            )
            if message.node_id != self.roster_of[nid]:
                raise ProtocolError(
                    f"node {nid} answered as roster id {message.node_id}, it claimed "
                    f"{self.roster_of[nid]}"
                )
            if expect == wire.STAGE_MASKED:
                self._pending[nid] = _fit_result(reply.content)
            receive(message)
        except (ProtocolError, ValueError) as exc:
            self.outcome.site_errors[nid] = f"rejected: {exc}"

    # -- messages of each stage ----------------------------------------------------------
    def setup_messages(self) -> dict[int, RecordDict]:
        return {rid: wire.to_recorddict(self.config) for rid in sorted(self.config.nodes)}

    def broadcast_messages(self) -> dict[int, RecordDict]:
        cfg = self.config
        return {
            rid: wire.to_recorddict(wire.KeyBroadcast(rid, cfg.run_id, cfg.server_round, bundles))
            for rid, bundles in self.server.key_broadcast().items()
        }

    def train_messages(self) -> dict[int, RecordDict]:
        parameters = ndarrays_to_parameters(self.global_model)
        out = {}
        for rid, routed in self.server.route_shares().items():
            ins = FitIns(parameters, {ROUND_KEY: self.server_round})
            content = compat.fitins_to_recorddict(ins, keep_input=True)
            content.config_records[wire.RECORD_KEY] = wire.encode(routed)
            out[rid] = content
        return out

    def receive_masked(self, message: Any) -> None:
        nid = self.flower_of[message.node_id]
        fit_result, size = self._pending.pop(nid)
        self.server.receive_masked(message)
        self.fit_results[nid] = fit_result
        self.outcome.masked_bytes[nid] = size

    def unmask_messages(self) -> dict[int, RecordDict]:
        return {rid: wire.to_recorddict(r) for rid, r in self.server.unmask_requests().items()}

    # -- result -----------------------------------------------------------------------
    def apply(self, result: AggregateResult) -> None:
        """Add the average update to the global model and record the survivors."""
        offset, new_model = 0, []
        for layer in self.global_model:
            delta = result.average[offset : offset + layer.size].reshape(layer.shape)
            new_model.append((layer.astype(np.float64) + delta).astype(layer.dtype))
            offset += layer.size
        self.context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(new_model), keep_input=True
        )
        self.outcome.status = "aggregated"
        self.outcome.survivors = sorted(self.flower_of[r] for r in result.survivors)
        self.outcome.dropped = sorted(self.flower_of[r] for r in result.dropped)
        self.outcome.fit_results = [(nid, self.fit_results[nid]) for nid in self.outcome.survivors]
