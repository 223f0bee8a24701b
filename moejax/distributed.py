"""Multi-process start-up and where each process's batch rows live.

`initialize(multihost)` runs `jax.distributed.initialize` before anything touches a
device. On Cloud TPU VMs, SLURM and Open MPI, JAX detects the coordinator, the process
count and the process id itself; elsewhere (and in tests) set

  JAX_COORDINATOR_ADDRESS   host:port of process 0's coordination service (JAX reads it)
  JAX_NUM_PROCESSES         number of processes
  JAX_PROCESS_ID            this process's id, 0 .. JAX_NUM_PROCESSES - 1
  MOEJAX_HEARTBEAT_TIMEOUT_SECONDS  how long a silent peer is tolerated (JAX's default:
                            100 s); after it, every surviving process is stopped with an
                            error naming the lost task, so a dead host never hangs a job

`BatchLayout` maps a global [B, L] batch sharding to the rows this process must supply
(`rows`, handed to the data pipeline) and assembles the global `jax.Array` from them. It
handles any mesh: rows need not be contiguous, and processes that share rows (a batch
replicated over an axis that spans processes) each supply them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_HEARTBEAT = "MOEJAX_HEARTBEAT_TIMEOUT_SECONDS"


def requested(multihost: bool) -> bool:
    """Whether to start distributed JAX: asked for, or a coordinator address is set."""
    return multihost or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(multihost: bool) -> bool:
    """`jax.distributed.initialize()` when `requested`; returns whether it ran.

    Process count / id / heartbeat come from the environment variables of the module
    docstring where set, else from JAX's cluster detection (TPU VM, SLURM, Open MPI).
    XLA:CPU processes talk through gloo (`jax_cpu_collectives_implementation`, JAX's
    default since 0.5).
    """
    if not requested(multihost):
        return False
    kwargs: dict[str, int] = {}
    if os.environ.get(ENV_NUM_PROCESSES):
        kwargs["num_processes"] = int(os.environ[ENV_NUM_PROCESSES])
    if os.environ.get(ENV_PROCESS_ID):
        kwargs["process_id"] = int(os.environ[ENV_PROCESS_ID])
    if os.environ.get(ENV_HEARTBEAT):
        kwargs["heartbeat_timeout_seconds"] = int(os.environ[ENV_HEARTBEAT])
    jax.distributed.initialize(**kwargs)
    return True


def is_primary() -> bool:
    """Process 0: the one that writes config.json, metrics, eval.json and plots."""
    return jax.process_index() == 0


class BatchLayout:
    """This process's rows of a global [batch_size, seq_len] array laid out by `sharding`."""

    def __init__(self, sharding: jax.sharding.Sharding, batch_size: int, seq_len: int):
        self.sharding, self.shape = sharding, (batch_size, seq_len)
        indices = sharding.addressable_devices_indices_map(self.shape).values()
        rows = set()
        for index in indices:
            rows.update(range(*index[0].indices(batch_size)))
        self.rows = np.asarray(sorted(rows), dtype=np.int64)
        owner = np.full(batch_size, np.iinfo(np.int64).max)
        for device, index in sharding.devices_indices_map(self.shape).items():
            covered = np.arange(*index[0].indices(batch_size))
            owner[covered] = np.minimum(owner[covered], device.process_index)
        # rows this process counts in host-side sums (once per job, however replicated)
        self.owned = owner[self.rows] == jax.process_index()

    def to_global(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """[len(rows), L] host arrays (rows in increasing order) -> global jax.Arrays."""
        return {k: jax.make_array_from_callback(self.shape, self.sharding,
                                                self._reader(np.asarray(v)))
                for k, v in host_batch.items()}

    def _reader(self, local: np.ndarray):
        if local.shape[0] != len(self.rows):
            raise ValueError(f"host batch has {local.shape[0]} rows; this process supplies "
                             f"{len(self.rows)} rows of the global batch.")

        def read(index: tuple[slice, ...]) -> np.ndarray:
            wanted = np.arange(*index[0].indices(self.shape[0]))
            return local[np.searchsorted(self.rows, wanted)][:, index[1]]
        return read


def sync(name: str) -> None:
    """Waits until every process reaches `sync(name)` (no-op with one process).

    Used after a read-only look at the workdir and before any process creates in it, so
    no process sees what another has just made (Orbax's managers synchronise on create,
    and processes that disagree on whether checkpoints exist wait in different places).
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in process order (a collective; [value] alone)."""
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode("utf-8"), dtype=np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:raw.size] = raw
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(gathered[p][:int(sizes[p][0])]).decode("utf-8"))
            for p in range(gathered.shape[0])]


def sum_over_processes(value: int) -> int:
    """Sum of an integer over all processes (a collective)."""
    return int(sum(allgather_json(int(value))))


__all__ = ["BatchLayout", "allgather_json", "initialize", "is_primary", "requested",
           "sum_over_processes", "sync"]
