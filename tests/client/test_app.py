"""The ClientApp adapter: where the site's data lives and what each message returns."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.client.app import SiteClient, build_client_app, resolve_data_dir
from medfed.client.policy import SitePolicy, write_policy
from medfed.client.site import Site
from medfed.common.config import RunSettings
from medfed.common.messages import ROUND_KEY
from medfed.common.models import build_model
from medfed.common.params import get_weights
from medfed.simulations.synthetic import generate_risk_sites


def test_data_dir_from_node_config_or_partition():
    settings = RunSettings(data_root="/data/sites")
    assert resolve_data_dir({"data-dir": "/h/a"}, settings) == Path("/h/a")
    assert resolve_data_dir({"partition-id": 2}, settings) == Path("/data/sites/site-2")
    with pytest.raises(ValueError, match="data-dir"):
        resolve_data_dir({}, settings)


def test_build_client_app_returns_a_flower_client_app():
    from flwr.clientapp import ClientApp

    assert isinstance(build_client_app({"epsilon": 1.0}), ClientApp)


@pytest.fixture
def client(tmp_path) -> SiteClient:
    (site_dir,) = generate_risk_sites(1, tmp_path, seed=4, size_scale=0.15)
    write_policy(site_dir / "site.toml", SitePolicy(site_id="h9", min_cohort=10))
    return SiteClient(Site(site_dir), RunSettings(num_rounds=2, batch_size=32), "run-7")


def test_query_fit_evaluate_carry_only_aggregates(client):
    reply = client.get_properties({ROUND_KEY: 1})
    assert reply["accept"] is True and reply["site-id"] == "h9"
    assert set(reply) == {
        "site-id",
        "accept",
        "reason",
        "epsilon-spent",
        "epsilon-after",
        "epsilon-budget",
        "noise-multiplier",
        "records-used",
        "records-skipped",
        "train-records",
        "ledger-length",  # the ledger's head, for the coordinator's signed round record
        "ledger-head",
    }
    assert reply["ledger-length"] == 0 and reply["ledger-head"] == "0" * 64
    weights = get_weights(build_model("logreg", 6, 42))
    new, n, metrics = client.fit(weights, {ROUND_KEY: 1})
    assert n == reply["train-records"] and len(new) == len(weights)
    written = client.site.ledger_path.read_text().splitlines()
    assert metrics["ledger-length"] == len(written) == 1
    assert metrics["ledger-entry"] in written[0]
    assert all(not isinstance(v, list | tuple) for v in metrics.values())
    loss, n_test, ev = client.evaluate(new, {ROUND_KEY: 1})
    assert n_test > 0 and 0 <= ev["auc"] <= 1 and loss > 0


def test_refused_fit_raises_and_releases_nothing(client):
    weights = get_weights(build_model("logreg", 6, 42))
    client.fit(weights, {ROUND_KEY: 1})
    with pytest.raises(RuntimeError, match="already in the ledger"):
        client.fit(weights, {ROUND_KEY: 1})


def test_declined_query_is_recorded_at_the_site(client):
    reply = client.get_properties({ROUND_KEY: 5})
    assert reply["accept"] is False and "outside the planned" in reply["reason"]
    text = client.site.ledger_path.read_text()
    assert '"kind": "decline"' in text
