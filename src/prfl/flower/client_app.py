"""The prfl ClientApp: local training with prfl's trainer on the node's partition.

A node learns its partition from its node config (``partition-id``, ``num-partitions``; the
Simulation Engine sets both) or, when unset, from the client id of the task the server sends.
The partition is computed exactly as the simulator does (``prfl.data.partition_dataset`` with
the run config's scheme and seed), and the task's seed is the simulator's, so a node returns the
weights the simulator would compute for the same task.

Residual pieces are cached in ``Context.state`` (kept by the SuperNode between the messages of
a run) keyed by (model version, piece): a message carries only the pieces the node lacks. An
optional artificial delay (node config ``delay-seconds``, else the run config's
``client-delays``) is slept after training to emulate a slow device.

Message types: ``train`` (a task), ``query.describe`` (partition id, delay, cached pieces) and
``query.notice`` (the server rejected one of this node's results: logged as a warning and kept,
with a count, in the node's state under ``prfl.notices``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from prfl.config import ConfigError, ExperimentConfig
from prfl.data import Partition, partition_dataset
from prfl.flower import codec
from prfl.flower.pieces import NodeCache
from prfl.flower.settings import AppSettings, app_settings
from prfl.client.workspace import WorkerSpec, Workspace

log = logging.getLogger(__name__)

_WORKSPACES: dict[str, tuple[Workspace, Partition]] = {}  # reused while the process lives (simulation)


def _workspace(cfg: ExperimentConfig) -> tuple[Workspace, Partition]:
    """The trainer and the partition of this run's data, built once per process."""
    key = json.dumps(
        {"seed": cfg.seed, "data": cfg.data.model_dump(), "model": cfg.model.model_dump(), "train": cfg.train.model_dump()},
        sort_keys=True, default=str,
    )
    hit = _WORKSPACES.get(key)
    if hit is None:
        d = cfg.data
        spec = WorkerSpec(
            dataset=d.dataset, model=cfg.model.name, train=cfg.train,
            dataset_options=dict(d.options), model_options=dict(cfg.model.options), data_dir=d.data_dir, threads=1,
        )
        ws = Workspace(spec)
        try:
            part = partition_dataset(ws.dataset, d.partition, d.num_clients, seed=cfg.seed, **d.partition_options)
        except TypeError as exc:
            raise ConfigError(f"prfl.data.partition_options: {exc}") from exc
        hit = _WORKSPACES[key] = (ws, part)
    return hit


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config, -1 where unset."""
    cfg = context.node_config

    def get(key: str) -> int:
        value = cfg.get(key)
        if value is None or value == "":
            return -1
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"node config {key} must be an integer, got {value!r}") from None

    return get("partition-id"), get("num-partitions")


def node_delay(context: Context, settings: AppSettings, partition: int) -> float:
    """Artificial delay of this node: node config ``delay-seconds``, else ``client-delays``."""
    raw = context.node_config.get("delay-seconds")
    if raw is not None and raw != "":
        try:
            delay = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"node config delay-seconds must be a number, got {raw!r}") from None
        if delay < 0:
            raise ConfigError(f"node config delay-seconds must be >= 0, got {delay}")
        return delay
    return settings.driver.delay_for(partition) if partition >= 0 else 0.0


def start_model(task: codec.TaskMessage, context: Context) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The start model (flat weights) and mask (None: dense) a task carries: a dense or sparse
    payload decoded, or residual pieces added to the node's piece cache (kept in ``context.state``,
    saved before training so a failed task does not lose them) and the model rebuilt from it."""
    if task.kind == codec.KIND_DENSE:
        return torch.from_numpy(codec.from_raw(task.arrays["weights"]).astype(np.float32)), None
    if task.kind == codec.KIND_SPARSE:
        return codec.decode_sparse(task.arrays, task.total, task.num_prunable)
    cache = NodeCache.load(context.state)
    cache.receive(task)
    cache.save(context.state)
    weights, mask = cache.rebuild(task)
    return weights, (None if bool(mask.all()) else mask)  # every piece: the dense model


def handle_train(msg: Message, context: Context, defaults: Mapping[str, Any] | None = None) -> Message:
    """Train one task and reply with the trained values (see :mod:`prfl.flower.codec`)."""
    arrived_at = time.time()  # wall clock, comparable with the server's stamps on one machine or NTP-synced ones
    settings = app_settings(context.run_config, defaults)
    cfg = settings.experiment
    task = codec.decode_task(msg.content)
    pid, nparts = node_partition(context)
    if task.num_clients != cfg.data.num_clients:
        raise ConfigError(f"the server runs {task.num_clients} clients but this node's run config says "
                          f"prfl.data.num_clients={cfg.data.num_clients}")
    if nparts >= 0 and nparts != task.num_clients:
        raise ConfigError(f"node config num-partitions={nparts} but the run has {task.num_clients} clients")
    if pid >= 0 and pid != task.client:
        raise ConfigError(f"node config partition-id={pid} but the server sent a task for client {task.client}")
    ws, part = _workspace(cfg)
    received_payload = codec.payload_bytes(msg.content[codec.PAYLOAD])
    received_record = codec.record_bytes(msg.content)

    weights, mask = start_model(task, context)
    trainer = ws.trainer_for(task.width)
    out = trainer.train(weights, part.client_indices[task.client], task.seed, mask=mask,
                        want_importance=task.want_importance)
    delay = node_delay(context, settings, task.client)
    if delay > 0:
        time.sleep(delay)
    trained_at = time.time()
    content = codec.encode_result(
        task=task, weights=out.weights, mask=mask, grad_sq=out.grad_sq, num_samples=out.num_samples,
        mean_loss=out.mean_loss, steps=out.steps, compute_seconds=out.compute_seconds, delay_seconds=delay,
        received_payload_bytes=received_payload, received_record_bytes=received_record,
        partition_id=pid if pid >= 0 else task.client, arrived_at=arrived_at, trained_at=trained_at,
    )
    log.debug("task %d (client %d): %d steps in %.3f s, loss %.4f", task.task_id, task.client, out.steps,
              out.compute_seconds, out.mean_loss)
    return Message(content, reply_to=msg)


def handle_describe(msg: Message, context: Context, defaults: Mapping[str, Any] | None = None) -> Message:
    """Answer the server's describe query: partition id, partitions, delay and cached pieces."""
    settings = app_settings(context.run_config, defaults)
    pid, nparts = node_partition(context)
    delay = node_delay(context, settings, pid)
    cached = len(NodeCache.load(context.state))
    return Message(codec.encode_node(pid, nparts, delay, cached), reply_to=msg)


NOTICES = "prfl.notices"


def handle_notice(msg: Message, context: Context) -> Message:
    """Log the server's rejection notice, count it in the node's state, and acknowledge it."""
    notice = codec.decode_notice(msg.content)
    log.warning("the server rejected the result of task %d (client %d): %s: %s", notice["task_id"],
                notice["client"], notice["check"], notice["reason"])
    seen = context.state.config_records.get(NOTICES)
    count = int(seen["count"]) + 1 if seen is not None else 1
    context.state[NOTICES] = ConfigRecord({"count": count, "last-task": notice["task_id"],
                                           "last-check": notice["check"], "last-reason": notice["reason"]})
    return Message(RecordDict({NOTICES: ConfigRecord({"count": count})}), reply_to=msg)


def make_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``defaults`` (flat run-config keys) fill keys the run config lacks."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, defaults)

    @client_app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        return handle_describe(msg, context, defaults)

    @client_app.query("notice")
    def notice(msg: Message, context: Context) -> Message:
        return handle_notice(msg, context)

    return client_app


app = make_client_app()
"""The ClientApp ``[tool.flwr.app.components] clientapp`` points at."""
