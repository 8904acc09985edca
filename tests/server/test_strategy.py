import numpy as np
import pytest
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from medfed.common.messages import ROUND_KEY
from medfed.server.strategy import SiteSelectingFedAvg, weighted_means

OK = Status(Code.OK, "")


class _Proxy(ClientProxy):
    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *a, **k):  # pragma: no cover - unused
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def _manager(n: int) -> SimpleClientManager:
    manager = SimpleClientManager()
    for i in range(1, n + 1):
        manager.register(_Proxy(i))
    return manager


def _strategy() -> SiteSelectingFedAvg:
    return SiteSelectingFedAvg(2, ndarrays_to_parameters([np.zeros(2, np.float32)]))


def test_fit_goes_only_to_selected_sites_with_the_round():
    strategy = _strategy()
    strategy.select({1, 3})
    params = Parameters(tensors=[], tensor_type="")
    chosen = strategy.configure_fit(4, params, _manager(3))
    assert sorted(p.node_id for p, _ in chosen) == [1, 3]
    assert all(ins.config[ROUND_KEY] == 4 for _, ins in chosen)


def test_evaluation_goes_to_every_site():
    chosen = _strategy().configure_evaluate(1, Parameters([], ""), _manager(3))
    assert sorted(p.node_id for p, _ in chosen) == [1, 2, 3]


def test_aggregate_fit_keeps_secure_sum_and_site_reports():
    strategy = _strategy()
    agg = ndarrays_to_parameters([np.array([1.5, -2.0], np.float32)])
    results = [
        (_Proxy(1), FitRes(OK, agg, 100, {"site-id": "a", "epsilon": 1.0})),
        (_Proxy(2), FitRes(OK, agg, 300, {"site-id": "b", "epsilon": 0.5})),
    ]
    params, _ = strategy.aggregate_fit(1, results, [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [1.5, -2.0])
    assert strategy.fit_reports["b"]["num_examples"] == 300
    assert strategy.fit_reports["a"]["epsilon"] == 1.0


def test_weighted_means_weight_by_patients_and_report_site_mean():
    res = [
        EvaluateRes(OK, 1.0, 100, {"auc": 0.9, "site-id": "a"}),
        EvaluateRes(OK, 3.0, 300, {"auc": 0.7, "site-id": "b"}),
    ]
    loss, metrics = weighted_means(res)
    assert loss == pytest.approx(2.5)
    assert metrics["auc"] == pytest.approx(0.75)
    assert metrics["mean_site_auc"] == pytest.approx(0.8)
    assert metrics["patients"] == 400 and metrics["sites"] == 2


def test_suppressed_sites_are_left_out_of_the_aggregate():
    strategy = _strategy()
    res = [
        (_Proxy(1), EvaluateRes(OK, 1.0, 100, {"auc": 0.9, "site-id": "a"})),
        (_Proxy(2), EvaluateRes(OK, 0.0, 0, {"site-id": "b", "suppressed": "small"})),
    ]
    _, metrics = strategy.aggregate_evaluate(1, res, [])
    assert metrics["sites"] == 1 and metrics["auc"] == pytest.approx(0.9)
    assert strategy.eval_reports["b"]["suppressed"] == "small"
    assert weighted_means([]) == (None, {})
