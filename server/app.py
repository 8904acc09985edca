"""The medfed ServerApp: the coordinator of a federated run.

The same app runs under the Simulation Engine (``medfed simulate``, ``flwr run .``) and
the Deployment Engine; its settings come from the run config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid, ServerApp

from medfed.common.config import RunSettings
from medfed.common.models import build_model
from medfed.common.params import get_weights
from medfed.common.tasks import ImagingSpec, get_task_spec
from medfed.server.strategy import SiteSelectingFedAvg
from medfed.server.workflow import MedfedWorkflow


def model_meta(settings: RunSettings) -> dict[str, Any]:
    """What a checkpoint needs to be used without the run's configuration."""
    spec = get_task_spec(settings.task, settings.dataset)
    meta: dict[str, Any] = {
        "task": settings.task,
        "dataset": settings.dataset,
        "model": settings.model,
        "seed": settings.seed,
    }
    if isinstance(spec, ImagingSpec):
        meta["input_shape"] = list(spec.model_input)
        meta["preprocessing"] = {
            "size": spec.size,
            "depth": spec.depth,
            "window_center": spec.window_center,
            "window_width": spec.window_width,
        }
    else:
        meta["features"] = spec.feature_names()
    return meta


def build_server_app(
    defaults: Mapping[str, Any] | None = None,
    expected_sites: int | None = None,
    workflow_cls: type[MedfedWorkflow] = MedfedWorkflow,
) -> ServerApp:
    """A ServerApp whose run settings default to ``defaults`` (Flower run-config keys).

    ``expected_sites`` is how many sites to wait for before round 1 (default:
    ``min-sites``); ``workflow_cls`` runs the rounds (a subclass can inject faults in
    tests).
    """
    base = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = RunSettings.from_flower({**base, **dict(context.run_config)})
        spec = get_task_spec(settings.task, settings.dataset)
        model = build_model(settings.model, spec.model_input, settings.seed)
        strategy = SiteSelectingFedAvg(
            settings.min_sites, ndarrays_to_parameters(get_weights(model))
        )
        legacy = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=settings.num_rounds),
            strategy=strategy,
        )
        workflow = workflow_cls(
            settings,
            Path(settings.out_dir),
            expected_sites or settings.min_sites,
            model_meta(settings),
        )
        workflow(grid, legacy)

    return app


app = build_server_app()
