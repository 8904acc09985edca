"""The medfed ClientApp: one hospital site behind Flower.

The site's data directory comes from the SuperNode's node config (``data-dir``). In the
simulation engine, where nodes only carry ``partition-id``, it is
``<data-root>/site-<partition-id>`` from the run config. The requested run settings come
from the run config; the site checks them against its own policy every round.

Message types handled (legacy Flower messages; ``train`` passes a gate that lets an update
leave the site only through the run's secure-aggregation mode, which the site's policy
must allow):

- ``get_properties``: "will you train this round?" -> accept/decline with the reason
  (and, under medfed secure aggregation, the site's roster id);
- ``train``: one DP-SGD round -> the update, masked by medfed's secure aggregation
  (:mod:`medfed.client.secagg_mod`) or Flower's SecAgg+, or in the clear when the run
  and the site's policy both say ``off``; sample count and metrics;
- ``evaluate``: test-split metrics, released only over at least the minimum cohort.

Every message starts a fresh ``flwr-clientapp`` process that imports this module, so it
imports nothing heavy: torch, Opacus, pandas, scikit-learn and pydicom load only in the
code that uses them (secure-aggregation stages need none of them).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Context
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from medfed.client.secagg_mod import MedfedSecAggMod, error_reply
from medfed.client.site import Site, SiteRefusal
from medfed.client.site_identity import (
    IdentityConfigError,
    SiteIdentity,
    identity_paths,
    load_site_identity,
)
from medfed.common.config import RunSettings
from medfed.common.ledger import LedgerError
from medfed.common.messages import ACCEPT_KEY, REASON_KEY, ROUND_KEY, SECAGG_ID_KEY
from medfed.common.secagg import wire

LOG = logging.getLogger("medfed.site")


class SiteClient(NumPyClient):
    """Adapter from Flower's NumPyClient calls to a :class:`Site`.

    ``run_id`` is the medfed run id the site keys its ledger by
    (:meth:`RunSettings.medfed_run_id`: the run's ``run-name``, else Flower's run id), so
    a restarted coordinator that resumes a named run reaches the same ledger entries.
    """

    def __init__(
        self,
        site: Site,
        settings: RunSettings,
        run_id: str,
        identity: Callable[[], SiteIdentity] | None = None,
    ) -> None:
        self.site = site
        self.settings = settings
        self.run_id = run_id
        self.identity = identity

    def get_properties(self, config: Mapping[str, Any]) -> dict[str, Any]:
        server_round = int(config[ROUND_KEY])
        decision = self.site.decide(self.settings, self.run_id, server_round)
        if not decision.accept:
            LOG.warning(
                "site %s declines round %s: %s",
                decision.site_id,
                server_round,
                decision.reason,
            )
            self.site.record_decline(decision, self.run_id, server_round)
        reply = decision.to_config()
        with contextlib.suppress(LedgerError):  # the decision already names the problem
            reply.update(self.site.ledger_head())
        if decision.accept and self.settings.secure_agg == "medfed" and self.identity:
            try:
                reply[SECAGG_ID_KEY] = self.identity().node_id
            except IdentityConfigError as exc:
                LOG.error("site %s declines round %s: %s", decision.site_id, server_round, exc)
                reply.update({ACCEPT_KEY: False, REASON_KEY: str(exc)})
        return reply

    def fit(
        self, parameters: list[np.ndarray], config: Mapping[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        server_round = int(config[ROUND_KEY])
        try:
            return self.site.train_round(self.settings, self.run_id, server_round, parameters)
        except SiteRefusal as refusal:
            # Fail closed: no update leaves; secure aggregation treats the site as dropped.
            raise RuntimeError(f"site declined round {server_round}: {refusal}") from None

    def evaluate(
        self, parameters: list[np.ndarray], config: Mapping[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        return self.site.evaluate(self.settings, parameters)


def resolve_data_dir(node_config: Mapping[str, Any], settings: RunSettings) -> Path:
    """The site's data directory from the node config, or the simulation layout."""
    if "data-dir" in node_config:
        return Path(str(node_config["data-dir"]))
    if "partition-id" in node_config:
        return Path(settings.data_root) / f"site-{int(node_config['partition-id'])}"
    raise ValueError("node config has neither 'data-dir' nor 'partition-id'")


def ledger_key(context: Context) -> Path | None:
    """The key that signs the site's ledger: the enrolled identity key in a deployment
    (node config ``identity-key``), else the data directory's own (see :class:`Site`)."""
    if "data-dir" not in context.node_config:
        return None
    if "identity-key" not in context.node_config:
        raise IdentityConfigError(
            "the site signs its privacy ledger with its identity key: node config lacks "
            "'identity-key'"
        )
    return Path(str(context.node_config["identity-key"]))


def site_identity(context: Context, settings: RunSettings) -> SiteIdentity:
    """This node's secure-aggregation identity (see :mod:`medfed.client.site_identity`)."""
    key, roster = identity_paths(
        context.node_config,
        resolve_data_dir(context.node_config, settings),
        settings.roster_path(),
    )
    ca = context.node_config.get("ca-cert")
    return load_site_identity(key, roster, Path(str(ca)) if ca else None)


def secure_agg_of(msg: Message) -> str:
    """The secure-aggregation mode a ``train`` message was sent in, from its records."""
    records = msg.content.config_records
    if wire.RECORD_KEY in records:
        return "medfed"
    return "flower" if RECORD_KEY_CONFIGS in records else "off"


class SecureAggregationGate:
    """Client mod: a ``train`` message reaches training only through the run's mode.

    medfed messages (a ``medfed-secagg`` record) go to :class:`MedfedSecAggMod`, Flower
    SecAgg+ messages to Flower's ``secaggplus_mod``, plain ``train`` messages straight to
    training; each only when it is the run's ``secure-agg`` mode. Anything else (say a
    plain ``train`` in a medfed run, which would return the update unmasked) is refused.
    The site's policy has already checked, when the round was offered, that it allows
    the run's mode; training checks it again.
    """

    def __init__(self, defaults: Mapping[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.medfed = MedfedSecAggMod(lambda ctxt: site_identity(ctxt, self.settings(ctxt)))

    def settings(self, ctxt: Context) -> RunSettings:
        return RunSettings.from_flower({**self.defaults, **dict(ctxt.run_config)})

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        arrived = secure_agg_of(msg)
        mode = self.settings(ctxt).secure_agg
        if arrived != mode:
            reason = (
                f"refusing a train message for secure aggregation {arrived!r}: this run "
                f"uses {mode!r}"
            )
            LOG.error("%s", reason)
            return error_reply(msg, reason)
        if mode == "medfed":
            return self.medfed(msg, ctxt, call_next)
        if mode == "flower":
            return secaggplus_mod(msg, ctxt, call_next)
        return call_next(msg, ctxt)


def build_client_app(
    defaults: Mapping[str, Any] | None = None, outer_mods: Sequence[Mod] = ()
) -> ClientApp:
    """A ClientApp whose run settings default to ``defaults`` (Flower run-config keys).

    ``outer_mods`` run before the secure-aggregation gate (for logging, or to inject
    faults in tests).
    """
    base = dict(defaults or {})

    def client_fn(context: Context):
        import torch

        torch.set_num_threads(1)
        settings = RunSettings.from_flower({**base, **dict(context.run_config)})
        site = Site(resolve_data_dir(context.node_config, settings), ledger_key(context))
        return SiteClient(
            site,
            settings,
            settings.medfed_run_id(context.run_id),
            lambda: site_identity(context, settings),
        ).to_client()

    return ClientApp(client_fn=client_fn, mods=[*outer_mods, SecureAggregationGate(base)])


app = build_client_app()
