"""FedAvg restricted to the sites that accepted the round, keeping per-site reports.

Under Flower's SecAgg+ every fit result carries the *same* already-aggregated parameters
(the secure sum divided by the summed weights), so FedAvg's weighted average returns them
unchanged; medfed's secure aggregation updates the global model itself and only hands the
sites' reports to :meth:`SiteSelectingFedAvg.note_fit`; without secure aggregation this is
plain weighted FedAvg. What this class adds is site selection and bookkeeping of the
aggregates that sites release (their budget figures and cohort-level metrics).
"""

from __future__ import annotations

from typing import Any

from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from medfed.common.messages import ROUND_KEY, SITE_ID_KEY, SUPPRESSED_KEY


class SiteSelectingFedAvg(FedAvg):
    """Weighted FedAvg over the node ids set with :meth:`select` before each round.

    Parameters
    ----------
    min_sites : int
        Fewest accepted sites needed to train a round.
    initial_parameters : Parameters
        The global model before round 1 (built by the coordinator from the seed).
    """

    def __init__(self, min_sites: int, initial_parameters: Parameters) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=min_sites,
            min_evaluate_clients=1,
            min_available_clients=min_sites,
            initial_parameters=initial_parameters,
            accept_failures=True,
        )
        self.selected: set[int] = set()
        self.fit_reports: dict[str, dict[str, Any]] = {}
        self.eval_reports: dict[str, dict[str, Any]] = {}

    def select(self, node_ids: set[int]) -> None:
        self.selected = set(node_ids)
        self.fit_reports, self.eval_reports = {}, {}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        clients = [p for p in client_manager.all().values() if p.node_id in self.selected]
        ins = FitIns(parameters, {ROUND_KEY: server_round})
        return [(proxy, ins) for proxy in clients]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        ins = EvaluateIns(parameters, {ROUND_KEY: server_round})
        return [(proxy, ins) for proxy in client_manager.all().values()]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.note_fit([res for _, res in results])
        return super().aggregate_fit(server_round, results, failures)

    def note_fit(self, results: list[FitRes]) -> None:
        """Keep the budget figures and metrics that the sites in the sum reported."""
        for res in results:
            site = str(res.metrics.get(SITE_ID_KEY, "?"))
            self.fit_reports[site] = {"num_examples": res.num_examples, **res.metrics}

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[Any],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Keep every site's report; average only the sites that released metrics."""
        self.eval_reports = {}
        released = []
        for _, res in results:
            site = str(res.metrics.get(SITE_ID_KEY, "?"))
            self.eval_reports[site] = {
                "num_examples": res.num_examples,
                "loss": res.loss,
                **res.metrics,
            }
            if SUPPRESSED_KEY not in res.metrics and res.num_examples > 0:
                released.append(res)
        return weighted_means(released)


def weighted_means(results: list[EvaluateRes]) -> tuple[float | None, dict[str, Scalar]]:
    """Example-weighted mean loss and metrics over sites that released them.

    ``mean_site_*`` is the unweighted mean over sites (FLamby's headline figure).
    """
    if not results:
        return None, {}
    total = sum(r.num_examples for r in results)
    loss = sum(r.loss * r.num_examples for r in results) / total
    metrics: dict[str, Scalar] = {"sites": len(results), "patients": total}
    names = {k for r in results for k, v in r.metrics.items() if isinstance(v, float)}
    for name in sorted(names):
        having = [r for r in results if name in r.metrics]
        weight = sum(r.num_examples for r in having)
        metrics[name] = sum(float(r.metrics[name]) * r.num_examples for r in having) / weight
        metrics[f"mean_site_{name}"] = sum(float(r.metrics[name]) for r in having) / len(having)
    return loss, metrics
