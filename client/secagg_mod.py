"""The site's side of medfed secure aggregation, as a Flower client mod.

The coordinator drives one round in four ``train`` messages, each carrying a
``medfed-secagg`` ConfigRecord (:mod:`medfed.common.secagg.wire`)::

    setup           -> keys            fresh key-agreement keys, signed with the site's identity
    key-broadcast   -> shares          peers' keys checked against the roster, then shares sealed
    routed-shares   -> masked          (+ the global model) train with DP-SGD, mask the update
    unmask-request  -> unmask-shares   reveal seed or key shares, never both for one site

What is masked is the update, the trained weights minus the global model the coordinator
sent, flattened in layer order, with the sample count as its weight; the coordinator adds
the unmasked weighted average back to the global model.

Flower rebuilds the ClientApp for every message, so the protocol state between messages
(:meth:`SiteSession.state_dict`: the round's key-agreement private keys, seed and the
shares held for peers) lives in the node's ``context.state``, which stays on the site.
Any failure (a bad signature naming the site, a replayed or out-of-order message, a
refused unmask request, a training refusal) ends the site's round: the state is wiped and
the reply is an error naming the reason, so the coordinator treats the site as dropped.
A round number is accepted once per run: a replayed ``setup`` is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import parameters_to_ndarrays
from flwr.common.constant import ErrorCode

from medfed.client.site_identity import SiteIdentity
from medfed.common.secagg import wire
from medfed.common.secagg.protocol import ProtocolConfig, ProtocolError, SiteSession

LOG = logging.getLogger("medfed.site")

ROUND_STATE = "medfed-secagg-round"
CONFIG_STATE = "medfed-secagg-config"
SESSION_STATE = "medfed-secagg-session"
LAST_ROUND_KEY = "last-round"


class SecAggFailure(Exception):
    """The site ends its part in the round; the reply carries this message."""


def error_reply(msg: Message, reason: str) -> Message:
    """An error reply to ``msg``: the coordinator counts the site as dropped."""
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def flat_update(trained: list[np.ndarray], global_model: list[np.ndarray]) -> np.ndarray:
    """``trained - global_model`` layer by layer, flattened to one float64 vector."""
    if len(trained) != len(global_model) or any(
        a.shape != b.shape for a, b in zip(trained, global_model, strict=True)
    ):
        raise SecAggFailure("the trained model's layers do not match the global model's")
    return np.concatenate(
        [
            (np.asarray(a, np.float64) - np.asarray(b, np.float64)).ravel()
            for a, b in zip(trained, global_model, strict=True)
        ]
    )


class MedfedSecAggMod:
    """Client mod for medfed secure aggregation (see the module docstring).

    Parameters
    ----------
    identity_of : callable
        Returns the site's :class:`SiteIdentity` for a message's context (identity key
        and roster from the site's own configuration, never from the coordinator).
    """

    def __init__(self, identity_of: Callable[[Context], SiteIdentity]) -> None:
        self.identity_of = identity_of

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        site = "this site"
        try:
            identity = self.identity_of(ctxt)
            site = identity.name
            if wire.RECORD_KEY not in msg.content.config_records:
                raise SecAggFailure("a train message without a secure-aggregation record")
            stage = wire.stage_of(msg.content.config_records[wire.RECORD_KEY])
            if stage == wire.STAGE_SETUP:
                return self._setup(msg, ctxt, identity)
            session, config = self._resume(ctxt, identity)
            if stage == wire.STAGE_KEY_BROADCAST:
                return self._share_keys(msg, ctxt, session, config)
            if stage == wire.STAGE_ROUTED_SHARES:
                return self._masked(msg, ctxt, call_next, session, config)
            if stage == wire.STAGE_UNMASK_REQUEST:
                return self._unmask(msg, ctxt, session)
            raise SecAggFailure(f"the coordinator sent a site-bound message of stage {stage!r}")
        except Exception as exc:  # the site's round ends on any failure, fail closed
            self._forget(ctxt)
            reason = f"{site}: secure aggregation aborted: {type(exc).__name__}: {exc}"
            LOG.error("%s", reason)
            return error_reply(msg, reason)

    # -- stages ----------------------------------------------------------------------
    def _setup(self, msg: Message, ctxt: Context, identity: SiteIdentity) -> Message:
        config = wire.from_recorddict(msg.content, expect=wire.STAGE_SETUP)
        assert isinstance(config, ProtocolConfig)
        if config.run_id != ctxt.run_id:
            raise ProtocolError(
                f"setup is for run {config.run_id}, this is run {ctxt.run_id} (replayed or "
                "misrouted message)"
            )
        last = self._last_round(ctxt)
        if config.server_round <= last:
            raise ProtocolError(
                f"setup for round {config.server_round}, but this site already began round "
                f"{last} of this run (replayed message)"
            )
        ctxt.state.config_records[ROUND_STATE] = ConfigRecord({LAST_ROUND_KEY: config.server_round})
        session = SiteSession(identity.node_id, identity.private_key, identity.roster, config)
        bundle = session.setup()
        ctxt.state.config_records[CONFIG_STATE] = msg.content.config_records[wire.RECORD_KEY]
        self._save(ctxt, session)
        return Message(wire.to_recorddict(bundle), reply_to=msg)

    def _share_keys(
        self, msg: Message, ctxt: Context, session: SiteSession, config: ProtocolConfig
    ) -> Message:
        broadcast = wire.from_recorddict(msg.content, expect=wire.STAGE_KEY_BROADCAST)
        _check_addressed(broadcast, session, config, "key broadcast")
        shares = session.share_keys(broadcast.bundles)
        self._save(ctxt, session)
        return Message(wire.to_recorddict(shares), reply_to=msg)

    def _masked(
        self,
        msg: Message,
        ctxt: Context,
        call_next: ClientAppCallable,
        session: SiteSession,
        config: ProtocolConfig,
    ) -> Message:
        routed = wire.from_recorddict(msg.content, expect=wire.STAGE_ROUTED_SHARES)
        _check_addressed(routed, session, config, "routed shares")  # before spending budget
        session.expect("masked_input")
        global_model = parameters_to_ndarrays(
            compat.recorddict_to_fitins(msg.content, keep_input=True).parameters
        )
        out = call_next(msg, ctxt)
        if out.has_error():
            raise SecAggFailure(f"training failed: {out.error.reason}")
        fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
        update = flat_update(parameters_to_ndarrays(fitres.parameters), global_model)
        clipped = int(np.count_nonzero(np.abs(update) > config.quant.clip))
        if clipped:  # logged at the site only: the count says something about the update
            LOG.warning(
                "%s: %d of %d update values exceed the run's secagg-clip %g and are clipped",
                session.node_id,
                clipped,
                update.size,
                config.quant.clip,
            )
        masked = session.masked_input(update, float(fitres.num_examples), routed)
        self._save(ctxt, session)
        content: RecordDict = out.content
        for arrays in content.array_records.values():
            arrays.clear()  # the update leaves the site only masked
        content.config_records[wire.RECORD_KEY] = wire.encode(
            masked, modulus_bits=config.modulus_bits
        )
        return Message(content, reply_to=msg)

    def _unmask(self, msg: Message, ctxt: Context, session: SiteSession) -> Message:
        request = wire.from_recorddict(msg.content, expect=wire.STAGE_UNMASK_REQUEST)
        shares = session.unmask(request)
        self._forget(ctxt)
        return Message(wire.to_recorddict(shares), reply_to=msg)

    # -- state in context.state -------------------------------------------------------
    @staticmethod
    def _last_round(ctxt: Context) -> int:
        record = ctxt.state.config_records.get(ROUND_STATE)
        return int(record[LAST_ROUND_KEY]) if record is not None else 0

    @staticmethod
    def _resume(ctxt: Context, identity: SiteIdentity) -> tuple[SiteSession, ProtocolConfig]:
        records = ctxt.state.config_records
        if CONFIG_STATE not in records or SESSION_STATE not in records:
            raise ProtocolError(
                "no secure-aggregation round in progress at this site (out-of-order or "
                "replayed message)"
            )
        config = wire.decode(records[CONFIG_STATE], expect=wire.STAGE_SETUP)
        assert isinstance(config, ProtocolConfig)
        session = SiteSession(identity.node_id, identity.private_key, identity.roster, config)
        session.load_state_dict(dict(records[SESSION_STATE]))
        return session, config

    @staticmethod
    def _save(ctxt: Context, session: SiteSession) -> None:
        ctxt.state.config_records[SESSION_STATE] = ConfigRecord(session.state_dict())

    @staticmethod
    def _forget(ctxt: Context) -> None:
        for key in (CONFIG_STATE, SESSION_STATE):
            ctxt.state.config_records.pop(key, None)


def _check_addressed(
    message: wire.KeyBroadcast | wire.RoutedShares,
    session: SiteSession,
    config: ProtocolConfig,
    what: str,
) -> None:
    if (message.run_id, message.server_round) != (config.run_id, config.server_round):
        raise ProtocolError(
            f"{what} is for run {message.run_id} round {message.server_round}, this site is in "
            f"run {config.run_id} round {config.server_round} (replayed or misrouted message)"
        )
    if message.node_id != session.node_id:
        raise ProtocolError(f"{what} addressed to node {message.node_id}, not to this site")
