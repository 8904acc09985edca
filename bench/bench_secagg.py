"""What secure aggregation costs: round time and upload size, medfed vs Flower SecAgg+ vs off.

Targets (the secure-aggregation issue):

1. a medfed secure-aggregation round takes no longer than a Flower 1.42 SecAgg+ round at the
   same number of sites and model size (ratio medfed / flower <= 1.0 in every cell);
2. on the 2D imaging CNN (x-ray, ``cnn2d``) at 10 sites, a whole medfed round takes at most
   1.3x a round without secure aggregation;
3. a site's masked upload is at most 1.1x the plain float32 update reply at 10 sites.

Part A, round time grid. For N sites in {3, 10, 30} and models of about 10k and 1M float32
parameters (two layers), one real Flower simulation per cell (``flwr.simulation.
run_simulation``, the Ray backend as ``medfed simulate`` configures it, quiet logs) with N
SuperNodes, in a subprocess of its own (fresh Ray, a time limit), in which the modes
{medfed, flower, off} take turns: R cycles of one round per mode, the order rotated from
cycle to cycle, so that every mode runs under the same load, on the same warm Ray workers.
The ClientApp has the production mods: a bench router hands each ``train`` message to the
``medfed.client.app.SecureAggregationGate`` of the mode it arrived in, which checks the mode
and sends medfed messages to ``MedfedSecAggMod`` (with the site's Ed25519 identity and the
roster, written by this script where the simulation layout puts them), Flower's to
``secaggplus_mod`` and plain ones straight to the client. Only training is faked: the
client's ``fit`` returns the global model plus a perturbation that is a deterministic
function of (partition, round), with a sample count of 100-1000 depending on the
partition; no data is loaded and no DP-SGD runs. The bench ServerApp builds a
``LegacyContext`` with medfed's ``SiteSelectingFedAvg``, asks every node for its partition,
sample count and roster id each round (a ``get_properties`` round-trip, as the coordinator
asks its sites; not timed) and times on the server the aggregation call alone:

- medfed: ``MedfedSecAggWorkflow(roster, 0.66, clip 4, timeout)(grid, ctx, round, accepted)``;
- flower: ``SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.66,
  max_weight=<largest sample count>, timeout)`` (what ``MedfedWorkflow._flower_fit`` runs);
- off: FitIns train messages to every site and FedAvg of the replies (``_plain_fit``).

Both secure modes use the same threshold fraction with every selected site a neighbour. The
grid is wrapped to time each ``send_and_receive`` (sites + transport; the rest of the round
is the coordinator's own work) and to keep the messages, whose protobuf sizes
(``message_bytes``) are taken after the timed call: bytes uploaded per site in the reply
that carries the update (medfed: the masked reply, whose vector must be the
``4 * (d + 1)`` bytes that ``SecAggRound.masked_bytes`` records; flower: the
collect-masked-vectors reply; off: the FitRes).
Plain = the FitRes reply measured in off mode (the same message computed on the server
when off was not run). An outer client mod logs each message's handling time at the site.
Correctness: the server recomputes the sites' perturbations and reports max |new global -
weighted average of the sites' models| (~1e-8 for medfed and off; Flower quantises
parameters over [-8, 8] with 2^22 levels, ~5e-6).

The figure is the median of a mode's rounds in cycles 2..R (its first round includes first
use of its code paths, and the very first round of a simulation the Ray workers' start; it
is reported apart), and the median over cycles of medfed / flower in the same cycle is shown
too. Models of <= 100k parameters get more cycles (8; quick 5): their rounds are mostly the
simulation transport's polling (the in-memory grid and the Simulation Engine's message
pump each poll every 0.1 s, so a stage costs 0.1-0.3 s whatever its work), which makes a
single round a coarse figure.

Part B, the imaging pipeline. ``medfed.simulations.runner.run`` with x-ray ``cnn2d`` at 10
synthetic sites (the CLI's x-ray defaults: epsilon 8, batch 64, lr 0.5, 2 local epochs),
``secure_agg`` medfed and off, one after the other, on copies of one generated data set
(fresh policies and ledgers per mode). Round seconds come from run.json (ask + train +
aggregate + evaluate + checkpoint); the figure is the median of rounds 2..R, medfed / off.

Usage::

    python bench/bench_secagg.py [--quick] [--sites 3,10,30] [--sizes 10000,1000000]
                                 [--modes medfed,flower,off] [--rounds R] [--small-rounds R]
                                 [--patients P] [--skip-imaging] [--skip-grid]
                                 [--sim-timeout S] [--stage-timeout S] [--keep] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

NAME = "bench_secagg"
MODES = ("medfed", "flower", "off")
THRESHOLD = 0.66
CLIP = 4.0  # RunSettings.secagg_clip default
PERTURBATION = 0.01  # std of the fake training's change per coordinate
INIT_STD = 0.05
TARGET_VS_FLOWER = 1.0
TARGET_IMAGING = 1.3
TARGET_UPLOAD = 1.1
UPLOAD_SITES = 10
SMALL_MODEL = 100_000  # models up to this size get --small-rounds rounds (cheap, noisy)
IMAGING_SITES = 10
STAGES = {
    "medfed": ("setup", "keys", "train", "unmask"),
    "flower": ("setup", "share-keys", "collect-masked", "unmask"),
    "off": ("train",),
}
CLIENT_KINDS = {  # what the site receives at each stage (ClientTiming's "kind")
    "medfed": ("setup", "key-broadcast", "routed-shares", "unmask-request"),
    "flower": ("setup", "share_keys", "collect_masked_vectors", "unmask"),
    "off": ("train",),
}
UPDATE_STAGE = {"medfed": 2, "flower": 2, "off": 0}  # index of the update-carrying call


# -- the fake federation (runs inside the worker and its Ray actors) --------------------
def layer_shapes(params: int) -> list[tuple[int, ...]]:
    """Two layers summing to ``params``: a (rows, 100) weight matrix and the rest."""
    if params < 200:
        return [(params // 2,), (params - params // 2,)]
    rows = (params - 100) // 100
    return [(rows, 100), (params - 100 * rows,)]


def initial_model(params: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, INIT_STD, s).astype(np.float32) for s in layer_shapes(params)]


def train_records(partition: int) -> int:
    """The fake site's sample count: 100..1000, varying with the partition."""
    return 100 + (partition * 389) % 901


def perturbation(seed: int, partition: int, server_round: int, shapes) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, partition, server_round])
    return [rng.normal(0.0, PERTURBATION, s).astype(np.float32) for s in shapes]


def fake_training(
    parameters: list[np.ndarray], seed: int, partition: int, server_round: int
) -> list[np.ndarray]:
    """What a site "trains": the global model plus its (partition, round) perturbation."""
    deltas = perturbation(seed, partition, server_round, [p.shape for p in parameters])
    return [
        (np.asarray(p, np.float32) + d).astype(np.float32)
        for p, d in zip(parameters, deltas, strict=True)
    ]


def build_bench_client_app(spec: Mapping[str, Any]):
    """The ClientApp: production mods (one SecureAggregationGate per mode), fake training."""
    from flwr.client import NumPyClient
    from flwr.clientapp import ClientApp

    from medfed.client.app import SecureAggregationGate, site_identity
    from medfed.common.config import RunSettings
    from medfed.common.messages import ROUND_KEY, SECAGG_ID_KEY, SITE_ID_KEY

    run_configs = {mode: dict(config) for mode, config in spec["run_configs"].items()}
    medfed_settings = (
        RunSettings.from_flower(run_configs["medfed"]) if "medfed" in run_configs else None
    )
    seed = int(spec["seed"])

    class BenchClient(NumPyClient):
        def __init__(self, context) -> None:
            self.context = context
            self.partition = int(context.node_config["partition-id"])

        def get_properties(self, config):
            reply = {
                "partition-id": self.partition,
                "train-records": train_records(self.partition),
                SITE_ID_KEY: f"site-{self.partition}",
            }
            if medfed_settings:  # as SiteClient: the roster id of its identity key
                reply[SECAGG_ID_KEY] = site_identity(self.context, medfed_settings).node_id
            return reply

        def fit(self, parameters, config):
            server_round = int(config[ROUND_KEY])
            trained = fake_training(parameters, seed, self.partition, server_round)
            metrics = {SITE_ID_KEY: f"site-{self.partition}", "epsilon": 1.0}
            return trained, train_records(self.partition), metrics

    def client_fn(context):
        return BenchClient(context).to_client()

    router = ModeRouter({mode: SecureAggregationGate(c) for mode, c in run_configs.items()})
    timing = ClientTiming(spec["client_times"]) if spec.get("client_times") else None
    return ClientApp(client_fn=client_fn, mods=[*([timing] if timing else []), router])


class ModeRouter:
    """Client mod: hands a ``train`` message to the production gate of the mode it arrived
    in (medfed record, Flower SecAgg+ record, or neither), so the modes of one simulation
    can alternate round by round; that gate checks the mode again and runs the real mods.
    Other messages (``get_properties``) go straight to the client."""

    def __init__(self, gates: Mapping[str, Any]) -> None:
        self.gates = dict(gates)

    def __call__(self, msg, ctxt, call_next):
        from flwr.app.message_type import MessageType

        from medfed.client.app import secure_agg_of

        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        arrived = secure_agg_of(msg)
        gate = self.gates.get(arrived) or next(iter(self.gates.values()))  # it will refuse
        return gate(msg, ctxt, call_next)


class ClientTiming:
    """Outer client mod (bench instrumentation): appends each message's handling time at
    the site (the production gate + mods + fake training) to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, msg, ctxt, call_next):
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

        from medfed.common.secagg import wire

        records = msg.content.config_records
        kind = msg.metadata.message_type
        if wire.RECORD_KEY in records:
            kind = wire.stage_of(records[wire.RECORD_KEY])
        elif RECORD_KEY_CONFIGS in records:
            kind = str(records[RECORD_KEY_CONFIGS].get("stage", "?"))
        started = time.perf_counter()
        reply = call_next(msg, ctxt)
        seconds = time.perf_counter() - started
        line = {
            "partition": int(ctxt.node_config["partition-id"]),
            "round": msg.metadata.group_id,
            "kind": kind,
            "seconds": round(seconds, 5),
            "error": reply.has_error(),
        }
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        return reply


class CountingGrid:
    """A Grid that keeps every exchange (messages, replies, seconds) of one round."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.calls: list[tuple[list[Any], list[Any], float]] = []

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None):
        messages = list(messages)
        started = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.calls.append((messages, replies, time.perf_counter() - started))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def build_bench_server_app(spec: Mapping[str, Any], result_path: Path):
    """The ServerApp: R cycles of one round per mode, timed; writes its figures as JSON
    (after every round, so a simulation stopped on time still leaves what it measured)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        out: dict[str, Any] = {"rounds": [], "error": None, "started": time.time()}

        def save() -> None:
            tmp = Path(f"{result_path}.tmp")
            tmp.write_text(json.dumps(out, indent=1, default=str))
            os.replace(tmp, result_path)

        try:
            _serve(grid, context, spec, out, save)
        except Exception as exc:  # reported, not raised: the simulation then ends cleanly
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = traceback.format_exc()
        finally:
            out["finished"] = time.time()
            save()

    return app


def _serve(grid, context, spec: Mapping[str, Any], out: dict[str, Any], save) -> None:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    from medfed.common.messages import SITE_ID_KEY
    from medfed.common.secagg.identity import Roster
    from medfed.server.strategy import SiteSelectingFedAvg

    modes, sites, params = list(spec["modes"]), int(spec["sites"]), int(spec["params"])
    seed, cycles = int(spec["seed"]), int(spec["rounds"])
    rounds = cycles * len(modes)
    model = initial_model(params, seed)
    strategy = SiteSelectingFedAvg(sites, ndarrays_to_parameters(model))
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
    )
    # The plain update reply, computed here (what an off-mode site sends back).
    plain = FitRes(
        Status(Code.OK, "Success"),
        ndarrays_to_parameters(model),
        1000,
        {SITE_ID_KEY: "site-0", "epsilon": 1.0},
    )
    out["plain_reply_bytes_computed"] = message_bytes(compat.fitres_to_recorddict(plain, True))
    out["plain_float32_bytes"] = 4 * params
    roster = Roster.load(Path(spec["data_root"]) / "roster.json") if "medfed" in modes else None

    thread, f_stop, c_done = start_update_client_manager_thread(grid, legacy.client_manager)
    c_done.wait()
    try:
        deadline = time.time() + 300
        while legacy.client_manager.num_available() < sites:
            if time.time() > deadline:
                raise TimeoutError(f"only {legacy.client_manager.num_available()} nodes")
            time.sleep(0.2)
        out["nodes_connected"] = time.time()
        cfg = ConfigRecord({Key.START_TIME: time.time()})
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            strategy.initialize_parameters(legacy.client_manager), keep_input=True
        )
        server_round = 0
        for cycle in range(1, cycles + 1):
            shift = (cycle - 1) % len(modes)  # rotate the order from cycle to cycle
            for mode in modes[shift:] + modes[:shift]:
                server_round += 1
                cfg[Key.CURRENT_ROUND] = server_round
                row = _bench_round(grid, legacy, spec, mode, server_round, roster)
                out["rounds"].append({"mode": mode, "cycle": cycle, **row})
                save()
    finally:
        f_stop.set()
        thread.join(timeout=10)


def _global_model(legacy) -> list[np.ndarray]:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    return parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(
            legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
    )


def _ask(grid, legacy, server_round: int, timeout: float) -> dict[int, dict[str, Any]]:
    """node id -> the node's properties (partition, sample count, roster id)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Message
    from flwr.common import Code, GetPropertiesIns
    from flwr.common.constant import MessageTypeLegacy

    from medfed.common.messages import ROUND_KEY

    ins = GetPropertiesIns({ROUND_KEY: server_round})
    messages = [
        Message(
            content=compat.getpropertiesins_to_recorddict(ins),
            dst_node_id=proxy.node_id,
            message_type=MessageTypeLegacy.GET_PROPERTIES,
            group_id=str(server_round),
        )
        for proxy in legacy.client_manager.all().values()
    ]
    replies = {}
    for msg in grid.send_and_receive(messages, timeout=timeout):
        if msg.has_content():
            res = compat.recorddict_to_getpropertiesres(msg.content)
            if res.status.code == Code.OK:
                replies[msg.metadata.src_node_id] = dict(res.properties)
    return replies


def _bench_round(grid, legacy, spec, mode: str, server_round: int, roster) -> dict[str, Any]:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Message
    from flwr.app.message_type import MessageType
    from flwr.common import Code
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    from medfed.common.messages import SECAGG_ID_KEY
    from medfed.server.medfed_secagg import MedfedSecAggWorkflow, threshold_for

    timeout, seed = float(spec["stage_timeout"]), int(spec["seed"])
    strategy = legacy.strategy
    asked_at = time.perf_counter()
    sites = _ask(grid, legacy, server_round, timeout)
    ask_seconds = time.perf_counter() - asked_at
    partition_of = {nid: int(p["partition-id"]) for nid, p in sites.items()}
    strategy.select(set(sites))
    before = _global_model(legacy)
    counting = CountingGrid(grid)
    row: dict[str, Any] = {"round": server_round, "ask_seconds": round(ask_seconds, 4)}

    # -- the timed aggregation ------------------------------------------------------------
    started = time.perf_counter()
    if mode == "medfed":
        accepted = {
            nid: {SECAGG_ID_KEY: p[SECAGG_ID_KEY], "train-records": p["train-records"]}
            for nid, p in sites.items()
        }
        outcome = MedfedSecAggWorkflow(roster, THRESHOLD, CLIP, timeout)(
            counting, legacy, server_round, accepted
        )
        strategy.note_fit([res for _, res in outcome.fit_results])
    elif mode == "flower":
        largest = max(int(p["train-records"]) for p in sites.values())
        SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=THRESHOLD,
            max_weight=float(max(largest, 1)),
            timeout=timeout,
        )(counting, legacy)
    else:
        instructions = strategy.configure_fit(
            server_round,
            compat.arrayrecord_to_parameters(
                legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
            ),
            legacy.client_manager,
        )
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        messages = [
            Message(
                content=compat.fitins_to_recorddict(ins, True),
                dst_node_id=proxy.node_id,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            for proxy, ins in instructions
        ]
        results = []
        for msg in counting.send_and_receive(messages, timeout=timeout):
            if msg.has_content():
                res = compat.recorddict_to_fitres(msg.content, True)
                if res.status.code == Code.OK:
                    results.append((proxies[msg.metadata.src_node_id], res))
        if results:
            aggregated, _ = strategy.aggregate_fit(server_round, results, [])
            if aggregated is not None:
                legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                    aggregated, keep_input=True
                )
    seconds = time.perf_counter() - started
    # -------------------------------------------------------------------------------------

    row["seconds"] = round(seconds, 4)
    exchange = sum(s for _, _, s in counting.calls)
    row["sites_and_transport_seconds"] = round(exchange, 4)
    row["coordinator_seconds"] = round(seconds - exchange, 4)
    names = STAGES[mode]
    stages = []
    for k, (messages, replies, call_seconds) in enumerate(counting.calls):
        up, errors = {}, {}
        for reply in replies:
            pid = partition_of.get(reply.metadata.src_node_id, -1)
            if reply.has_error():
                errors[pid] = str(reply.error.reason)[:300]
            else:
                up[pid] = message_bytes(reply.content)
        down = {
            partition_of.get(m.metadata.dst_node_id, -1): message_bytes(m.content) for m in messages
        }
        stages.append(
            {
                "stage": names[k] if k < len(names) else f"call-{k}",
                "send_and_receive_seconds": round(call_seconds, 4),
                "sent": len(messages),
                "replies": len(replies),
                "errors": errors,
                "up_bytes": dict(sorted(up.items())),
                "down_bytes": dict(sorted(down.items())),
            }
        )
    counting.calls.clear()
    row["exchanges"] = stages
    update_stage = UPDATE_STAGE[mode]
    if update_stage < len(stages):
        row["update_upload_bytes"] = stages[update_stage]["up_bytes"]

    if mode == "medfed":
        row["status"] = outcome.status
        row["note"] = outcome.note
        row["threshold"] = outcome.threshold
        row["stage_seconds"] = outcome.stage_seconds
        row["site_errors"] = {partition_of.get(n, n): e for n, e in outcome.site_errors.items()}
        row["masked_bytes"] = {partition_of[n]: b for n, b in sorted(outcome.masked_bytes.items())}
        row["plain_bytes"] = outcome.plain_bytes
        in_sum = [partition_of[n] for n in outcome.survivors]
    else:
        in_sum = sorted(int(str(s).split("-")[1]) for s in strategy.fit_reports)
        row["status"] = "aggregated" if in_sum else "aborted"
        if mode == "flower":
            row["threshold"] = max(2, round(THRESHOLD * len(sites)))
        else:
            row["threshold"] = None
    row["sites_asked"] = len(sites)
    row["sites_in_sum"] = len(in_sum)
    if mode == "medfed":
        row["medfed_threshold_check"] = threshold_for(THRESHOLD, len(sites))

    # Correctness: new global vs the weighted average the sites' models must give.
    after = _global_model(legacy)
    if in_sum:
        weights = {p: float(train_records(p)) for p in in_sum}
        total = sum(weights.values())
        worst = 0.0
        moved = 0.0
        for i, layer in enumerate(before):
            expected = np.zeros(layer.shape, np.float64)
            for p in in_sum:
                delta = perturbation(seed, p, server_round, [x.shape for x in before])[i]
                expected += weights[p] * (layer + delta).astype(np.float64)
            expected /= total
            worst = max(worst, float(np.max(np.abs(after[i].astype(np.float64) - expected))))
            moved = max(moved, float(np.max(np.abs(after[i] - layer))))
        row["max_abs_error"] = worst
        row["max_abs_change"] = moved
    return row


# -- worker processes -------------------------------------------------------------------
def _quiet() -> None:
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def worker_grid(spec: dict[str, Any]) -> None:
    """One Part A simulation (one cell: N sites, one model size, all modes); the ServerApp
    writes ``spec["result"]``."""
    from flwr.simulation import run_simulation

    from medfed.common.config import SIM_IDENTITY_NAME, RunSettings
    from medfed.common.secagg.identity import (
        Roster,
        generate_identity,
        public_key_bytes,
        save_identity,
    )

    root = Path(spec["data_root"])
    sites = int(spec["sites"])
    if "medfed" in spec["modes"]:  # identities where the simulation layout looks for them
        keys = {}
        for partition in range(sites):
            identity = generate_identity()
            save_identity(root / f"site-{partition}" / SIM_IDENTITY_NAME, identity)
            keys[partition] = public_key_bytes(identity)
        Roster(keys, {p: f"site-{p}" for p in keys}).save(root / "roster.json")
    spec["run_configs"] = {
        mode: RunSettings(
            secure_agg=mode,
            data_root=str(root),
            secagg_timeout=float(spec["stage_timeout"]),
            num_rounds=int(spec["rounds"]) * len(spec["modes"]),
        ).to_flower()
        for mode in spec["modes"]
    }
    _quiet()
    run_simulation(
        server_app=build_bench_server_app(spec, Path(spec["result"])),
        client_app=build_bench_client_app(spec),
        num_supernodes=sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": max(1, min(sites, os.cpu_count() or 1)),
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": "ERROR",
            },
        },
    )


def worker_imaging(spec: dict[str, Any]) -> None:
    """One Part B run of the real pipeline; writes run.json's round figures."""
    from medfed.common.config import RunSettings
    from medfed.simulations.runner import SimulationPlan, run

    settings = RunSettings(
        task="xray",
        model="cnn2d",
        secure_agg=spec["mode"],
        num_rounds=int(spec["rounds"]),
        epsilon=8.0,
        batch_size=64,
        learning_rate=0.5,
        local_epochs=2,
        test_fraction=0.25,
        seed=int(spec["seed"]),
        data_root=str(spec["data_root"]),
        out_dir=str(spec["out_dir"]),
        secagg_timeout=float(spec["stage_timeout"]),
    )
    plan = SimulationPlan(
        settings=settings,
        num_sites=int(spec["sites"]),
        site_budget=100.0,
        reference=False,
        patients_per_site=int(spec["patients"]),
    )
    result = run(plan)
    rounds = [
        {
            "round": r["round"],
            "seconds": r["seconds"],
            "status": r["status"],
            "participants": len(r.get("participants", [])),
            "dropped": r.get("dropped", []),
            "note": r.get("note", ""),
            "secure_aggregation": r.get("secure_aggregation"),
        }
        for r in result.run["rounds"]
    ]
    Path(spec["result"]).write_text(
        json.dumps(
            {
                "seconds": result.seconds,
                "rounds": rounds,
                "final_metrics": result.run.get("final_metrics"),
                "error": None,
            },
            indent=1,
            default=str,
        )
    )


def generate_imaging_data(root: Path, sites: int, patients: int, seed: int) -> None:
    """The synthetic x-ray sites exactly as the runner's ``prepare_sites`` makes them."""
    from medfed.common.tasks import get_task_spec
    from medfed.simulations.synthetic_imaging import generate_imaging_sites

    spec = get_task_spec("xray", "synthetic")
    generate_imaging_sites(
        spec.task,
        sites,
        root,
        seed=seed,
        image_size=spec.size,
        slices=max(spec.depth, 4),
        patients_per_site=patients,
    )


def run_worker(spec: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    """Run one simulation in a subprocess (own session, so it can be stopped on time)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(workdir / "result.json")}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / "worker.log"
    env = dict(os.environ)
    bench_dir = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [bench_dir, env.get("PYTHONPATH")]))
    started = time.time()
    status = "ok"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        try:
            rc = proc.wait(timeout=timeout)
            if rc != 0:
                status = f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
            _stop(proc)
    wall = time.time() - started
    result: dict[str, Any] = {}
    result_path = Path(spec["result"])
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    if status == "ok" and (not result or result.get("error")):
        status = f"failed: {result.get('error') or 'no result written'}"
    if status != "ok":
        tail = log_path.read_text(errors="replace")[-3000:]
        result["log_tail"] = tail
        print(f"    {status}; worker log tail:\n{_indent(tail[-1500:])}", flush=True)
    result["status"] = status
    result["wall_seconds"] = round(wall, 2)
    if spec.get("client_times") and Path(spec["client_times"]).is_file():
        lines = Path(spec["client_times"]).read_text().splitlines()
        result["client_times"] = [json.loads(line) for line in lines if line.strip()]
    return result


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the worker's process group, SIGKILL it if still there after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


# -- summaries --------------------------------------------------------------------------
def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(run: dict[str, Any], a: str, b: str) -> float | None:
    """Median over cycles 2..R of (mode a's round) / (mode b's round in the same cycle)."""
    by_cycle: dict[int, dict[str, float]] = {}
    for r in run.get("rounds") or []:
        by_cycle.setdefault(r["cycle"], {})[r["mode"]] = r["seconds"]
    ratios = [c[a] / c[b] for k, c in by_cycle.items() if k > 1 and a in c and b in c and c[b]]
    return _median(ratios)


def summarise_grid_cell(run: dict[str, Any], mode: str, cycles: int) -> dict[str, Any]:
    """One mode of one cell: its first round, the median of its rounds in cycles 2..R,
    upload bytes, correctness, per-stage and site-side medians."""
    rounds = [r for r in run.get("rounds") or [] if r["mode"] == mode]
    later = [r for r in rounds if r["cycle"] > 1] or rounds
    status = run.get("status")
    if status == "ok" and len(rounds) < cycles:
        status = f"only {len(rounds)} of {cycles} rounds"
    elif status != "ok":
        status = f"{status}; {len(rounds)} of {cycles} rounds done"
    out: dict[str, Any] = {
        "status": status,
        "rounds_done": len(rounds),
        "rounds_planned": cycles,
        "round1_seconds": rounds[0]["seconds"] if rounds else None,
        "median_seconds": _median([r["seconds"] for r in later]),
        "median_coordinator_seconds": _median([r["coordinator_seconds"] for r in later]),
        "all_aggregated": bool(rounds) and all(r["status"] == "aggregated" for r in rounds),
        "min_sites_in_sum": min((r["sites_in_sum"] for r in rounds), default=None),
        "max_abs_error": max((r.get("max_abs_error", float("nan")) for r in rounds), default=None),
        "wall_seconds": run.get("wall_seconds"),
    }
    uploads = [b for r in rounds for b in (r.get("update_upload_bytes") or {}).values()]
    out["median_update_upload_bytes"] = _median(uploads)
    out["max_update_upload_bytes"] = max(uploads) if uploads else None
    out["plain_reply_bytes_computed"] = run.get("plain_reply_bytes_computed")
    later_ids = {str(r["round"]) for r in later}
    times = [t for t in run.get("client_times") or [] if t["round"] in later_ids]
    kinds = sorted({t["kind"] for t in times})
    out["client_median_seconds"] = {
        k: _median([t["seconds"] for t in times if t["kind"] == k]) for k in kinds
    }
    per_round: dict[str, float] = {}
    for t in times:
        if t["kind"] not in ("get_properties", "evaluate"):
            per_round[t["round"]] = per_round.get(t["round"], 0.0) + t["seconds"]
    out["client_seconds_per_round_all_sites"] = _median(list(per_round.values()))
    names = STAGES[mode]
    out["stage_send_and_receive_seconds"] = {
        name: _median(
            [
                r["exchanges"][k]["send_and_receive_seconds"]
                for r in later
                if k < len(r["exchanges"])
            ]
        )
        for k, name in enumerate(names)
    }
    if mode == "medfed":
        out["medfed_stage_seconds"] = {
            name: _median([r["stage_seconds"].get(name) for r in later]) for name in names
        }
        out["medfed_finish_seconds"] = _median(
            [r["seconds"] - sum(r["stage_seconds"].values()) for r in later if r["stage_seconds"]]
        )
        # run.json's figure is the masked vector alone: 4 bytes per coordinate + the weight.
        out["masked_vector_bytes_ok"] = all(
            set(r.get("masked_bytes", {}).values()) == {r["plain_bytes"] + 4}
            for r in rounds
            if r["status"] == "aggregated"
        )
    return out


def message_bytes(content) -> int:
    """Size of a message's content as Flower serialises it (protobuf bytes)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="sites 3,10; 2 rounds; Part B small")
    parser.add_argument("--sites", default=None, help="comma list (default 3,10,30; quick 3,10)")
    parser.add_argument("--sizes", default=None, help="parameters, comma list (10000,1000000)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of modes")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds per mode (Part A cycles; Part B rounds) (3; quick 2)",
    )
    parser.add_argument(
        "--small-rounds",
        type=int,
        default=None,
        help=f"rounds for models of <= {SMALL_MODEL} parameters (8; quick 5): their rounds "
        "last a few 0.1 s polling ticks of the simulation transport, so more are needed",
    )
    parser.add_argument("--skip-imaging", action="store_true", help="skip Part B")
    parser.add_argument("--skip-grid", action="store_true", help="skip Part A")
    parser.add_argument("--patients", type=int, default=None, help="Part B (60; quick 40)")
    parser.add_argument("--stage-timeout", type=float, default=600.0, help="per stage, s")
    parser.add_argument(
        "--sim-timeout", type=float, default=None, help="per simulation, s (900; quick 420)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--out", default=None, help=f"JSON path (default results/{NAME}.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        (worker_grid if spec["part"] == "A" else worker_imaging)(spec)
        return

    from _common import default_out, environment, load_average, print_table, write_json

    sites_list = [int(s) for s in (args.sites or ("3,10" if args.quick else "3,10,30")).split(",")]
    sizes = [int(s) for s in (args.sizes or "10000,1000000").split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        raise SystemExit(f"error: unknown mode(s) {sorted(unknown)}")
    rounds = args.rounds or (2 if args.quick else 3)
    small_rounds = max(rounds, args.small_rounds or (5 if args.quick else 8))
    patients = args.patients or (40 if args.quick else 60)
    sim_timeout = args.sim_timeout or (420.0 if args.quick else 900.0)
    env = environment()
    print(
        f"sites {sites_list}, sizes {sizes}, modes {modes}, {rounds} rounds ({small_rounds} "
        f"for <= {SMALL_MODEL} params); per-simulation "
        f"limit {sim_timeout:.0f} s; load average {env['load_average']}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    grid: list[dict[str, Any]] = []
    imaging: dict[str, Any] = {}
    began = time.time()
    try:
        if not args.skip_grid:
            for n in sites_list:
                for size in sizes:
                    cycles = small_rounds if size <= SMALL_MODEL else rounds
                    name = f"a-{n}-{size}"
                    print(f"  {n} sites, {size} params: {cycles} x {modes} ...", flush=True)
                    spec = {
                        "part": "A",
                        "modes": modes,
                        "sites": n,
                        "params": size,
                        "rounds": cycles,
                        "seed": args.seed,
                        "stage_timeout": args.stage_timeout,
                        "data_root": str(work / name / "data"),
                        "client_times": str(work / name / "client_times.jsonl"),
                    }
                    run = run_worker(spec, work / name, sim_timeout)
                    summaries = {m: summarise_grid_cell(run, m, cycles) for m in modes}
                    grid.append(
                        {"sites": n, "params": size, "cycles": cycles, "summaries": summaries}
                        | {"raw": run}
                    )
                    print(
                        f"    {run['status']}, wall {run['wall_seconds']} s; median round: "
                        + ", ".join(f"{m} {s['median_seconds']} s" for m, s in summaries.items()),
                        flush=True,
                    )
        if not args.skip_imaging:
            imaging = run_imaging(args, work, rounds, patients, sim_timeout)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")

    result = report(grid, imaging, sites_list, sizes, modes, print_table)
    result.update(
        {
            "benchmark": NAME,
            "settings": {
                "sites": sites_list,
                "sizes": sizes,
                "modes": modes,
                "rounds": rounds,
                "rounds_small_models": small_rounds,
                "small_model_max_params": SMALL_MODEL,
                "threshold": THRESHOLD,
                "clip": CLIP,
                "stage_timeout": args.stage_timeout,
                "sim_timeout": sim_timeout,
                "imaging_patients_per_site": patients,
                "imaging_sites": IMAGING_SITES,
                "seed": args.seed,
                "quick": args.quick,
            },
            "total_seconds": round(time.time() - began, 1),
            "grid": grid,
            "imaging": imaging,
            "environment": {**env, "load_average_end": load_average()},
        }
    )
    write_json(Path(args.out) if args.out else default_out(NAME), result)


def run_imaging(args, work: Path, rounds: int, patients: int, timeout: float) -> dict[str, Any]:
    """Part B: the x-ray CNN pipeline at 10 sites, medfed vs off, same generated data."""
    pristine = work / "imaging-data"
    print(
        f"  Part B: generating {IMAGING_SITES} x-ray sites of {patients} patients ...", flush=True
    )
    generate_imaging_data(pristine, IMAGING_SITES, patients, seed=42)
    out: dict[str, Any] = {"patients_per_site": patients, "sites": IMAGING_SITES, "runs": {}}
    for mode in ("medfed", "off"):
        data = work / f"imaging-{mode}" / "sites"
        shutil.copytree(pristine, data)
        print(f"  Part B: x-ray cnn2d, {IMAGING_SITES} sites, {mode} ...", flush=True)
        spec = {
            "part": "B",
            "mode": mode,
            "sites": IMAGING_SITES,
            "rounds": rounds,
            "patients": patients,
            "seed": 42,
            "stage_timeout": max(args.stage_timeout, 300.0),
            "data_root": str(data),
            "out_dir": str(work / f"imaging-{mode}" / "run"),
        }
        run = run_worker(spec, work / f"imaging-{mode}", timeout)
        rs = run.get("rounds") or []
        later = rs[1:] if len(rs) > 1 else rs
        run["round1_seconds"] = rs[0]["seconds"] if rs else None
        run["median_seconds"] = _median([r["seconds"] for r in later])
        out["runs"][mode] = run
        print(
            f"    {run['status']}: rounds {[r['seconds'] for r in rs]} s, wall "
            f"{run['wall_seconds']} s",
            flush=True,
        )
    med, off = (out["runs"][m].get("median_seconds") for m in ("medfed", "off"))
    out["ratio"] = med / off if med and off else None
    return out


def report(grid, imaging, sites_list, sizes, modes, print_table) -> dict[str, Any]:
    """Print the tables and the verdict; return the JSON summary."""
    cells = {(entry["sites"], entry["params"]): entry["summaries"] for entry in grid}

    def plain_bytes(cell: dict[str, dict[str, Any]]) -> float | None:
        off = cell.get("off", {})
        if off.get("median_update_upload_bytes"):
            return off["median_update_upload_bytes"]
        return next(
            (
                s["plain_reply_bytes_computed"]
                for s in cell.values()
                if s.get("plain_reply_bytes_computed")
            ),
            None,
        )

    rows, table = [], []
    for (n, size), cell in sorted(cells.items()):
        plain = plain_bytes(cell)
        flower = cell.get("flower", {}).get("median_seconds")
        for mode in modes:
            s = cell.get(mode)
            if s is None:
                continue
            upload = s.get("median_update_upload_bytes")
            row = {
                "sites": n,
                "params": size,
                "mode": mode,
                "status": s["status"],
                "round1_seconds": s["round1_seconds"],
                "median_seconds": s["median_seconds"],
                "vs_flower": s["median_seconds"] / flower
                if s["median_seconds"] and flower
                else None,
                "coordinator_seconds": s["median_coordinator_seconds"],
                "upload_bytes": upload,
                "plain_reply_bytes": plain,
                "upload_vs_plain": upload / plain if upload and plain else None,
                "max_abs_error": s["max_abs_error"],
                "all_aggregated": s["all_aggregated"],
            }
            rows.append(row)
            table.append(
                [
                    n,
                    size,
                    mode,
                    row["round1_seconds"],
                    row["median_seconds"],
                    row["vs_flower"],
                    row["coordinator_seconds"],
                    int(upload) if upload else None,
                    row["upload_vs_plain"],
                    f"{s['max_abs_error']:.1e}" if s["max_abs_error"] is not None else None,
                    s["min_sites_in_sum"],
                    s["status"]
                    if s["status"] != "ok"
                    else ("ok" if s["all_aggregated"] else "not all aggregated"),
                ]
            )
    if table:
        print_table(
            "Part A: aggregation time per round (server wall clock; first round of each mode, "
            "median of its rounds in cycles 2..R), upload per site in the update-carrying reply",
            [
                "sites",
                "params",
                "mode",
                "1st round s",
                "median later s",
                "x flower",
                "coord. s",
                "upload B",
                "x plain",
                "max|err|",
                "in sum",
                "status",
            ],
            table,
            digits=3,
        )
        stage_rows = []
        for (n, size), cell in sorted(cells.items()):
            for mode in modes:
                s = cell.get(mode)
                if not s or not s.get("rounds_done"):
                    continue
                sr = s["stage_send_and_receive_seconds"]
                line = [n, size, mode]
                line += [sr.get(name) for name in STAGES[mode]] + [None] * (4 - len(STAGES[mode]))
                if mode == "medfed":
                    ms = s["medfed_stage_seconds"]
                    line += [ms.get(name) for name in STAGES[mode]] + [s["medfed_finish_seconds"]]
                else:
                    line += [None] * 5
                stage_rows.append(line)
        print_table(
            "Part A: per stage, median of rounds 2..R: send_and_receive seconds (sites + "
            "transport) s1..s4; medfed SecAggRound.stage_seconds (incl. coordinator work) and "
            "finish (unmask + apply)",
            [
                "sites",
                "params",
                "mode",
                "s1",
                "s2",
                "s3",
                "s4",
                "setup",
                "keys",
                "train",
                "unmask",
                "finish",
            ],
            stage_rows,
            digits=3,
        )

        client_rows = []
        for (n, size), cell in sorted(cells.items()):
            for mode in modes:
                s = cell.get(mode)
                if not s or not s.get("client_median_seconds"):
                    continue
                cm = s["client_median_seconds"]
                kinds = CLIENT_KINDS[mode]
                line = [n, size, mode, cm.get("get_properties")]
                line += [cm.get(k) for k in kinds] + [None] * (4 - len(kinds))
                line.append(s["client_seconds_per_round_all_sites"])
                client_rows.append(line)
        if client_rows:
            print_table(
                "Part A: site side, seconds per message (production mods + fake training), "
                "median over sites and rounds 2..R; last column: all sites' aggregation "
                "messages of one round summed (2 Ray workers share it)",
                ["sites", "params", "mode", "ask", "m1", "m2", "m3", "m4", "sum/round"],
                client_rows,
                digits=4,
            )

    verdict: list[dict[str, Any]] = []
    # (1) medfed <= flower per cell
    for entry in grid:
        n, size, cell = entry["sites"], entry["params"], entry["summaries"]
        med, flo = cell.get("medfed"), cell.get("flower")
        if not med or not flo:
            continue
        m, f = med["median_seconds"], flo["median_seconds"]
        paired = paired_ratio(entry["raw"], "medfed", "flower")
        complete = med["status"] == "ok" and flo["status"] == "ok"
        detail = f"{m} s vs {f} s" if m is None or f is None else f"{m:.3f} s vs {f:.3f} s"
        detail += f"; same-cycle ratio {paired:.3f}" if paired is not None else ""
        if not complete:
            detail += f" (medfed: {med['status']}; flower: {flo['status']})"
        if not med["all_aggregated"]:
            detail += " (a medfed round did not aggregate)"
        ratio = m / f if m and f else None
        verdict.append(
            {
                "target": f"medfed round <= {TARGET_VS_FLOWER:g}x flower",
                "sites": n,
                "params": size,
                "measured": ratio,
                "paired_ratio": paired,
                "detail": detail,
                "passed": None
                if ratio is None
                else bool(ratio <= TARGET_VS_FLOWER and med["all_aggregated"]),
            }
        )
    # (3) upload <= 1.1x plain at 10 sites (medfed; flower shown for information)
    for row in rows:
        if row["sites"] == UPLOAD_SITES and row["mode"] in ("medfed", "flower"):
            ratio = row["upload_vs_plain"]
            verdict.append(
                {
                    "target": f"{row['mode']} masked upload <= {TARGET_UPLOAD:g}x plain at "
                    f"{UPLOAD_SITES} sites" + (" (information)" if row["mode"] == "flower" else ""),
                    "sites": row["sites"],
                    "params": row["params"],
                    "measured": ratio,
                    "detail": f"{row['upload_bytes']:.0f} B vs {row['plain_reply_bytes']:.0f} B"
                    if ratio is not None
                    else "not measured",
                    "passed": (ratio <= TARGET_UPLOAD if ratio is not None else None)
                    if row["mode"] == "medfed"
                    else None,
                }
            )
    # (2) imaging
    if imaging:
        runs = imaging["runs"]
        print_table(
            f"Part B: x-ray cnn2d, {imaging['sites']} sites, {imaging['patients_per_site']} "
            "patients each; run.json round seconds (ask + train + aggregate + evaluate + "
            "checkpoint)",
            ["mode", "status", "rounds s", "round 1 s", "median r2.. s", "min in sum"],
            [
                [
                    mode,
                    r["status"],
                    " ".join(f"{x['seconds']:.2f}" for x in r.get("rounds") or []),
                    r.get("round1_seconds"),
                    r.get("median_seconds"),
                    min((x["participants"] for x in r.get("rounds") or []), default=None),
                ]
                for mode, r in runs.items()
            ],
            digits=3,
        )
        med_run = runs.get("medfed", {})
        stage = [
            (x.get("secure_aggregation") or {}).get("stage_seconds") or {}
            for x in (med_run.get("rounds") or [])[1:]
        ]
        if stage:
            print(
                "  medfed stage seconds, rounds 2..R: "
                + "; ".join(", ".join(f"{k} {v:.2f}" for k, v in s.items()) for s in stage)
            )
        ratio = imaging.get("ratio")
        verdict.append(
            {
                "target": f"imaging cnn2d round, medfed <= {TARGET_IMAGING:g}x off",
                "sites": imaging["sites"],
                "params": None,
                "measured": ratio,
                "detail": f"{runs['medfed'].get('median_seconds')} s vs "
                f"{runs['off'].get('median_seconds')} s",
                "passed": ratio <= TARGET_IMAGING if ratio is not None else None,
            }
        )

    print_table(
        "verdict",
        ["target", "sites", "params", "measured", "detail", "pass"],
        [
            [
                v["target"],
                v["sites"],
                v["params"],
                v["measured"],
                v["detail"],
                "n/a" if v["passed"] is None else v["passed"],
            ]
            for v in verdict
        ],
        digits=3,
    )
    judged = [v["passed"] for v in verdict if v["passed"] is not None]
    return {
        "passed": bool(judged) and all(judged),
        "targets": {
            "medfed_vs_flower": TARGET_VS_FLOWER,
            "imaging_medfed_vs_off": TARGET_IMAGING,
            "upload_vs_plain_at_10_sites": TARGET_UPLOAD,
        },
        "verdict": verdict,
        "table": rows,
    }


if __name__ == "__main__":
    main()
