"""The medfed ClientApp: one hospital site behind Flower.

The site's data directory comes from the SuperNode's node config (``data-dir``). In the
simulation engine, where nodes only carry ``partition-id``, it is
``<data-root>/site-<partition-id>`` from the run config. The requested run settings come
from the run config; the site checks them against its own policy every round.

Message types handled (legacy Flower messages, wrapped by ``secaggplus_mod`` so that the
update leaves the site only masked):

- ``get_properties``: "will you train this round?" -> accept/decline with the reason;
- ``train``: one DP-SGD round -> the update (masked by SecAgg+), sample count, metrics;
- ``evaluate``: test-split metrics, released only over at least the minimum cohort.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Context

from medfed.client.site import Site, SiteRefusal
from medfed.common.config import RunSettings
from medfed.common.messages import ROUND_KEY

LOG = logging.getLogger("medfed.site")


class SiteClient(NumPyClient):
    """Adapter from Flower's NumPyClient calls to a :class:`Site`."""

    def __init__(self, site: Site, settings: RunSettings, run_id: str) -> None:
        self.site = site
        self.settings = settings
        self.run_id = run_id

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
        return decision.to_config()

    def fit(
        self, parameters: list[np.ndarray], config: Mapping[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        server_round = int(config[ROUND_KEY])
        try:
            return self.site.train_round(self.settings, self.run_id, server_round, parameters)
        except SiteRefusal as refusal:
            # Fail closed: no update leaves; SecAgg+ treats the site as dropped.
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


def build_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run settings default to ``defaults`` (Flower run-config keys)."""
    base = dict(defaults or {})

    def client_fn(context: Context):
        torch.set_num_threads(1)
        settings = RunSettings.from_flower({**base, **dict(context.run_config)})
        site = Site(resolve_data_dir(context.node_config, settings))
        return SiteClient(site, settings, str(context.run_id)).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


app = build_client_app()
