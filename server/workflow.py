"""The coordinator's round loop: ask, securely aggregate, evaluate, checkpoint, record.

Each round:

1. **Ask** every connected site whether it will train this round with the run's
   settings (a ``get_properties`` message). Each site answers from its own policy and
   ledger, and a refusal carries its reason.
2. **Train** over the sites that accepted, when at least ``min_sites`` did, through the
   run's secure aggregation: medfed's (:mod:`medfed.server.medfed_secagg`, the default)
   or Flower's SecAgg+ workflow, where the coordinator only ever sees masked updates and
   their sum; or, with ``secure-agg = "off"``, plain FedAvg of the sites' DP updates.
   An aborted secure-aggregation round leaves the model as it was; the run goes on.
3. **Evaluate** the new global model at every site (cohort-level metrics only).
4. **Checkpoint** the global model, append a signed round record to ``rounds.jsonl``
   (:mod:`medfed.server.round_log`) and rewrite ``run.json``.

With ``resume = true`` the run continues from ``run.json`` and the last verified
checkpoint instead of round 1 (:mod:`medfed.server.resume`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.app.message_type import MessageType
from flwr.common import (
    Code,
    GetPropertiesIns,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import MessageTypeLegacy
from flwr.server import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp.grid import Grid
from flwr.supercore import log

from medfed.common.config import RunSettings
from medfed.common.messages import (
    ACCEPT_KEY,
    FAIRNESS_KEY,
    LEDGER_ENTRY_KEY,
    LEDGER_HEAD_KEY,
    LEDGER_LENGTH_KEY,
    REASON_KEY,
    ROUND_KEY,
    SITE_ID_KEY,
)
from medfed.common.params import weights_digest
from medfed.common.secagg.identity import Roster
from medfed.common.secagg.quantize import DEFAULT_MODULUS_BITS
from medfed.server.checkpoint import save_checkpoint
from medfed.server.fairness import combine as combine_fairness
from medfed.server.medfed_secagg import MedfedSecAggWorkflow
from medfed.server.model_card import write_model_card
from medfed.server.resume import ResumeError, resume_point
from medfed.server.round_log import (
    ROUND_LOG_NAME,
    RoundAttestation,
    append_round,
    coordinator_key_path,
    load_coordinator_key,
    publish_audit_keys,
)
from medfed.server.run_record import RUN_RECORD_NAME, RoundRecord, RunRecord, emit_event
from medfed.server.strategy import SiteSelectingFedAvg

SITE_WAIT_SECONDS = 120.0


class MedfedWorkflow:
    """Runs ``settings.num_rounds`` rounds over the sites connected to ``grid``.

    Parameters
    ----------
    settings : RunSettings
        The run's validated settings.
    out_dir : Path
        Where run.json, events.jsonl and checkpoints/ are written.
    expected_sites : int
        Sites to wait for before round 1 (at least ``settings.min_sites``).
    model_meta : dict
        Stored with every checkpoint (task, dataset, model, feature names).
    """

    def __init__(
        self,
        settings: RunSettings,
        out_dir: Path,
        expected_sites: int,
        model_meta: dict[str, Any],
    ) -> None:
        if expected_sites < settings.min_sites:
            raise ValueError(
                f"expected_sites ({expected_sites}) is below min_sites ({settings.min_sites})"
            )
        self.settings = settings
        self.out_dir = out_dir
        self.expected_sites = expected_sites
        self.model_meta = model_meta
        self._node_names: dict[int, str] = {}
        self._roster: Roster | None = None
        self._key = load_coordinator_key(settings)
        self._flower_run_id = ""

    def __call__(self, grid: Grid, context: LegacyContext) -> RunRecord:
        run_id = self.settings.medfed_run_id(context.run_id)
        self._flower_run_id = str(context.run_id)
        initial = context.strategy.initialize_parameters(context.client_manager)
        if initial is None:
            raise ValueError("the strategy has no initial parameters")
        first_round = 1
        if self.settings.resume:
            # Before anything is written: a refused resume leaves run.json as it was.
            point = resume_point(self.out_dir, self.settings, run_id, context.run_id)
            record = point.record
            first_round = point.after_round + 1
            if point.weights is not None:
                initial = self._resumed_parameters(initial, point.weights)
            log(
                INFO,
                "resuming run %s after round %s (dropped rounds: %s)",
                run_id,
                point.after_round,
                point.dropped or "none",
            )
            emit_event(
                self.out_dir,
                "run-resume",
                run_id=run_id,
                after_round=point.after_round,
                dropped_rounds=point.dropped,
                flower_run_id=str(context.run_id),
            )
        else:
            if (self.out_dir / RUN_RECORD_NAME).exists():
                log(
                    WARNING,
                    "%s is replaced by the record of run %s (set resume = true and the "
                    "run's run-name to continue the run it records)",
                    self.out_dir / RUN_RECORD_NAME,
                    run_id,
                )
            record = RunRecord(
                run_id=run_id,
                settings=self.settings.model_dump(),
                secure_aggregation=self._secagg_description(),
                flower_run_id=str(context.run_id),
            )
        publish_audit_keys(
            self.out_dir,
            self._key,
            self.settings.roster_path(),
            coordinator_key_path(self.settings),
        )
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        c_done.wait()
        try:
            self._wait_for_sites(context)
            cfg = ConfigRecord({Key.START_TIME: time.time()})
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                initial, keep_input=True
            )
            emit_event(
                self.out_dir,
                "run-start",
                rounds=self.settings.num_rounds,
                first_round=first_round,
                sites=context.client_manager.num_available(),
            )
            for server_round in range(first_round, self.settings.num_rounds + 1):
                cfg[Key.CURRENT_ROUND] = server_round
                record.rounds.append(self._round(grid, context, server_round, record))
                record.write(self.out_dir)
            record.status = "completed"
        except Exception as exc:
            record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            record.finished = time.time()
            record.write(self.out_dir)
            try:  # the card must never mask the run's own outcome or error
                write_model_card(self.out_dir, record)
            except Exception as card_error:
                log(WARNING, "no model card written in %s: %s", self.out_dir, card_error)
            emit_event(self.out_dir, "run-end", status=record.status, error=record.error)
            f_stop.set()
            thread.join(timeout=10)
        return record

    @staticmethod
    def _resumed_parameters(initial: Parameters, weights: list[np.ndarray]) -> Parameters:
        """The checkpoint's weights as parameters, if they fit the run's model."""
        expected = [(a.shape, a.dtype) for a in parameters_to_ndarrays(initial)]
        found = [(a.shape, a.dtype) for a in weights]
        if expected != found:
            raise ResumeError(
                "cannot resume: the checkpoint's arrays do not fit the run's model "
                f"({len(found)} arrays, expected {len(expected)} of the model's shapes)"
            )
        return ndarrays_to_parameters(weights)

    # -- one round -------------------------------------------------------------------
    def _round(
        self, grid: Grid, context: LegacyContext, server_round: int, record: RunRecord
    ) -> RoundRecord:
        started = time.time()
        emit_event(self.out_dir, "round-start", round=server_round)
        strategy: SiteSelectingFedAvg = context.strategy  # type: ignore[assignment]
        model_in = weights_digest(parameters_to_ndarrays(self._global_parameters(context)))
        replies = self._ask_sites(grid, context, server_round)
        rnd = RoundRecord(round=server_round, status="skipped")
        accepted = {nid: r for nid, r in replies.items() if r.get(ACCEPT_KEY)}
        for nid, reply in replies.items():
            self._node_names[nid] = str(reply[SITE_ID_KEY])
            self._note_decision(record, reply)
            if not reply.get(ACCEPT_KEY):
                rnd.declined[str(reply[SITE_ID_KEY])] = str(reply.get(REASON_KEY, ""))
        rnd.no_reply = sorted(
            self._node_names.get(p.node_id, f"node {p.node_id}")
            for p in context.client_manager.all().values()
            if p.node_id not in replies
        )
        if len(accepted) < self.settings.min_sites:
            rnd.note = (
                f"only {len(accepted)} site(s) accepted; at least {self.settings.min_sites} "
                "are needed for secure aggregation"
            )
            if rnd.no_reply:
                rnd.note += f"; no answer within {self.settings.ask_timeout:g}s from " + ", ".join(
                    rnd.no_reply
                )
        else:
            strategy.select(set(accepted))
            if self.settings.secure_agg == "medfed":
                self._medfed_fit(grid, context, server_round, accepted, rnd)
            elif self.settings.secure_agg == "flower":
                self._flower_fit(grid, context, accepted)
            else:
                self._plain_fit(grid, context, server_round)
            rnd.participants = sorted(strategy.fit_reports)
            rnd.dropped = sorted(
                str(r[SITE_ID_KEY])
                for r in accepted.values()
                if str(r[SITE_ID_KEY]) not in strategy.fit_reports
            )
            if strategy.fit_reports:
                rnd.status = "aggregated"
                self._note_training(record, strategy.fit_reports)
            else:
                rnd.status = "aborted"
                rnd.note = (
                    rnd.note or "secure aggregation did not complete (too few sites survived)"
                )
        loss, metrics, per_site = self._evaluate(grid, context, server_round)
        rnd.aggregate_metrics = {"loss": loss, **metrics} if loss is not None else {}
        fairness = combine_fairness(per_site, self.settings.fairness_attributes())
        if fairness:
            record.fairness = fairness
        # The per-group figures live in record.fairness; the raw strings are left out.
        rnd.site_metrics = {
            site: {k: v for k, v in report.items() if k != FAIRNESS_KEY}
            for site, report in per_site.items()
        }
        rnd.checkpoint, rnd.model_sha256 = self._checkpoint(context, server_round)
        self._attest(record, rnd, replies, strategy.fit_reports, model_in)
        rnd.seconds = round(time.time() - started, 3)
        record.final_metrics = rnd.aggregate_metrics or record.final_metrics
        emit_event(self.out_dir, "round-end", **asdict(rnd))
        return rnd

    def _ask_sites(
        self, grid: Grid, context: LegacyContext, server_round: int
    ) -> dict[int, dict[str, Any]]:
        """Send "will you train?" to every site; return node id -> reply."""
        ins = GetPropertiesIns({ROUND_KEY: server_round})
        node_ids = [p.node_id for p in context.client_manager.all().values()]
        messages = [
            Message(
                content=compat.getpropertiesins_to_recorddict(ins),
                dst_node_id=nid,
                message_type=MessageTypeLegacy.GET_PROPERTIES,
                group_id=str(server_round),
            )
            for nid in node_ids
        ]
        replies: dict[int, dict[str, Any]] = {}
        for msg in grid.send_and_receive(messages, timeout=self.settings.ask_timeout):
            if not msg.has_content():
                continue
            res = compat.recorddict_to_getpropertiesres(msg.content)
            if res.status.code == Code.OK and SITE_ID_KEY in res.properties:
                replies[msg.metadata.src_node_id] = dict(res.properties)
        log(
            INFO,
            "round %s: %s of %s sites accepted",
            server_round,
            sum(bool(r.get(ACCEPT_KEY)) for r in replies.values()),
            len(node_ids),
        )
        emit_event(
            self.out_dir,
            "asked",
            round=server_round,
            accepted=[r[SITE_ID_KEY] for r in replies.values() if r.get(ACCEPT_KEY)],
            declined={
                r[SITE_ID_KEY]: r.get(REASON_KEY) for r in replies.values() if not r.get(ACCEPT_KEY)
            },
        )
        return replies

    def _medfed_fit(
        self,
        grid: Grid,
        context: LegacyContext,
        server_round: int,
        accepted: dict[int, dict[str, Any]],
        rnd: RoundRecord,
    ) -> None:
        if self._roster is None:
            self._roster = load_roster(self.settings)
        outcome = MedfedSecAggWorkflow(
            self._roster,
            threshold=self.settings.secagg_threshold,
            clip=self.settings.secagg_clip,
            timeout=self.settings.secagg_timeout,
            train_timeout=self.settings.train_timeout,
        )(grid, context, server_round, accepted)
        context.strategy.note_fit([res for _, res in outcome.fit_results])  # type: ignore[attr-defined]
        rnd.secure_aggregation = outcome.summary(self._name)
        if outcome.status != "aggregated":
            rnd.note = f"secure aggregation aborted: {outcome.note}"

    def _plain_fit(self, grid: Grid, context: LegacyContext, server_round: int) -> None:
        """FedAvg of the sites' DP updates in the clear (``secure-agg = "off"``)."""
        strategy: SiteSelectingFedAvg = context.strategy  # type: ignore[assignment]
        instructions = strategy.configure_fit(
            server_round, self._global_parameters(context), context.client_manager
        )
        results = self._exchange(
            grid,
            server_round,
            instructions,
            MessageType.TRAIN,
            lambda ins: compat.fitins_to_recorddict(ins, True),
            lambda content: compat.recorddict_to_fitres(content, True),
            self.settings.train_timeout,
        )
        if not results:
            return
        aggregated, _ = strategy.aggregate_fit(server_round, results, [])
        if aggregated is not None:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                aggregated, keep_input=True
            )

    def _exchange(
        self,
        grid: Grid,
        server_round: int,
        instructions: list[tuple[Any, Any]],
        message_type: str,
        encode: Callable[[Any], Any],
        decode: Callable[[Any], Any],
        timeout: float,
    ) -> list[tuple[Any, Any]]:
        """Send legacy instructions, return (proxy, result) for the sites that answered OK."""
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        messages = [
            Message(
                content=encode(ins),
                dst_node_id=proxy.node_id,
                message_type=message_type,
                group_id=str(server_round),
            )
            for proxy, ins in instructions
        ]
        results = []
        for msg in grid.send_and_receive(messages, timeout=timeout):
            if msg.has_content():
                res = decode(msg.content)
                if res.status.code == Code.OK:
                    results.append((proxies[msg.metadata.src_node_id], res))
        return results

    @staticmethod
    def _global_parameters(context: LegacyContext) -> Parameters:
        return compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )

    def _name(self, node_id: int) -> str:
        return self._node_names.get(node_id, f"node {node_id}")

    def _flower_fit(
        self, grid: Grid, context: LegacyContext, accepted: dict[int, dict[str, Any]]
    ) -> None:
        largest = max(int(r.get("train-records", 1)) for r in accepted.values())
        SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=self.settings.secagg_threshold,
            max_weight=float(max(largest, 1)),
            timeout=self.settings.secagg_timeout,
        )(grid, context)

    def _evaluate(
        self, grid: Grid, context: LegacyContext, server_round: int
    ) -> tuple[float | None, dict[str, Any], dict[str, dict[str, Any]]]:
        strategy: SiteSelectingFedAvg = context.strategy  # type: ignore[assignment]
        instructions = strategy.configure_evaluate(
            server_round, self._global_parameters(context), context.client_manager
        )
        results = self._exchange(
            grid,
            server_round,
            instructions,
            MessageType.EVALUATE,
            lambda ins: compat.evaluateins_to_recorddict(ins, True),
            compat.recorddict_to_evaluateres,
            self.settings.secagg_timeout,
        )
        loss, metrics = strategy.aggregate_evaluate(server_round, results, [])
        return loss, metrics, strategy.eval_reports

    def _checkpoint(self, context: LegacyContext, server_round: int) -> tuple[str, str]:
        parameters = self._global_parameters(context)
        path, digest = save_checkpoint(
            self.out_dir,
            server_round,
            parameters_to_ndarrays(parameters),
            self.model_meta,
        )
        return str(path.relative_to(self.out_dir)), digest

    # -- bookkeeping -----------------------------------------------------------------
    def _attest(
        self,
        record: RunRecord,
        rnd: RoundRecord,
        replies: dict[int, dict[str, Any]],
        fit_reports: dict[str, dict[str, Any]],
        model_in: str,
    ) -> None:
        """Append the round's signed record, anchoring each site's reported ledger head."""
        sites: dict[str, dict[str, Any]] = {}
        for reply in replies.values():
            site = str(reply[SITE_ID_KEY])
            sites[site] = {
                "decision": "accept" if reply.get(ACCEPT_KEY) else "decline",
                "ledger_length": int(reply.get(LEDGER_LENGTH_KEY, 0)),
                "ledger_head": str(reply.get(LEDGER_HEAD_KEY, "")),
            }
        for site, report in fit_reports.items():
            anchor = sites.setdefault(site, {"decision": "accept"})
            anchor["train_entry"] = str(report.get(LEDGER_ENTRY_KEY, ""))
            anchor["ledger_length"] = int(report.get(LEDGER_LENGTH_KEY, 0))
            anchor["ledger_head"] = anchor["train_entry"]
        append_round(
            self.out_dir / ROUND_LOG_NAME,
            RoundAttestation(
                run_id=record.run_id,
                flower_run_id=self._flower_run_id,
                round=rnd.round,
                status=rnd.status,
                participants=list(rnd.participants),
                declined=dict(rnd.declined),
                dropped=list(rnd.dropped),
                sites=sites,
                secure_aggregation=self.settings.secure_agg,
                model_sha256_in=model_in,
                model_sha256=rnd.model_sha256,
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            ),
            self._key,
        )

    def _wait_for_sites(self, context: LegacyContext) -> None:
        deadline = time.time() + SITE_WAIT_SECONDS
        while context.client_manager.num_available() < self.expected_sites:
            if time.time() > deadline:
                raise TimeoutError(
                    f"only {context.client_manager.num_available()} of "
                    f"{self.expected_sites} sites connected within {SITE_WAIT_SECONDS:.0f}s"
                )
            time.sleep(0.5)

    @staticmethod
    def _note_decision(record: RunRecord, reply: dict[str, Any]) -> None:
        site = record.site(str(reply[SITE_ID_KEY]))
        site.epsilon_spent = max(site.epsilon_spent, float(reply.get("epsilon-spent", 0)))
        site.epsilon_budget = float(reply.get("epsilon-budget", site.epsilon_budget))
        site.records_used = int(reply.get("records-used", site.records_used))
        site.records_skipped = int(reply.get("records-skipped", site.records_skipped))
        if not reply.get(ACCEPT_KEY):
            site.rounds_declined += 1

    @staticmethod
    def _note_training(record: RunRecord, reports: dict[str, dict[str, Any]]) -> None:
        for site_id, report in reports.items():
            site = record.site(site_id)
            site.rounds_trained += 1
            site.epsilon_spent = max(site.epsilon_spent, float(report.get("epsilon", 0)))
            site.noise_multiplier = float(report.get("noise-multiplier", 0))

    def _secagg_description(self) -> dict[str, Any]:
        common = {
            "reconstruction_threshold": self.settings.secagg_threshold,
            "timeout_seconds": self.settings.secagg_timeout,
        }
        if self.settings.secure_agg == "medfed":
            return {
                "protocol": "medfed",
                **common,
                "train_timeout_seconds": self.settings.train_timeout,
                "clip": self.settings.secagg_clip,
                "modulus_bits": DEFAULT_MODULUS_BITS,
                "note": "SecAgg+ stages over every selected site; X25519 key agreement "
                "signed with each site's Ed25519 identity and checked against the roster; "
                "HKDF-SHA256 bound to run, round and pair; ChaCha20 masks in Z_2^32; Shamir "
                "shares under ChaCha20-Poly1305. Honest-but-curious coordinator; no "
                "survivor-set consistency round.",
            }
        if self.settings.secure_agg == "flower":
            return {
                "protocol": "flower-secagg+",
                **common,
                "num_shares": "all selected sites",
                "note": "Flower 1.42 SecAgg+: masks from a 32-bit-folded seed and numpy "
                "RandomState; key-agreement keys not authenticated.",
            }
        return {
            "protocol": "off",
            "note": "No secure aggregation: the coordinator sees each site's DP update.",
        }


def load_roster(settings: RunSettings) -> Roster:
    """The roster the coordinator checks key bundles against (see ``secagg-roster``)."""
    return Roster.load(settings.roster_path())
