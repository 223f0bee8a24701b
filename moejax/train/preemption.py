"""Preemption: SIGTERM / SIGINT end a run cleanly at a step every process agrees on.

TPU maintenance events, Kubernetes and SLURM send SIGTERM and wait (typically 30 s or
more) before killing. While `Preemption` is entered (main thread only; elsewhere signals
keep their handlers), the first SIGTERM or SIGINT only sets a flag: the loop finishes the
step in flight, saves a checkpoint, waits for it, closes its writers and returns. A second
signal exits at once (status 128 + signal number), leaving the previous checkpoints as
they are (a save cut short is never finalised, see checkpoint.py).

The same agreement stops a run whose checkpoint save failed in the background (a full
disk): the loop passes `save_failed` (Orbax's writer thread reported an error) each step,
and when any process's save failed every process stops at the same step, after at most a
step or two, not at the next save (which would lose a second save interval of work).

Multi-process: one host may get the signal (or see its save fail) before the others, so
the loop asks `stop_after_this_step()` once per step, and every process must answer the
same at the same step. Each process contributes its two flags (signal, save failed) to a
tiny any-reduction over all devices, dispatched after the step; the answer read at step n
is the reduction dispatched at step n - 1, so reading it waits only for the previous step
(the device keeps one step queued) and every process stops after the same step. One
process answers from its flags directly.
"""
from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Context manager turning SIGTERM / SIGINT into an agreed stop (see the module doc)."""

    def __init__(self, synchronise: bool | None = None):
        self.signal: int | None = None  # the first signal received
        self.synchronise = jax.process_count() > 1 if synchronise is None else synchronise
        self._previous: dict[int, Any] = {}
        self._pending: jax.Array | None = None
        self._reduce: Any = None  # jitted any() over a [devices] array, with its sharding
        self._sharding: NamedSharding | None = None
        self.save_failed = False  # set when the agreed stop is for a failed save

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signal is not None:
            os.write(2, f"\n{name} again: exiting now, without saving.\n".encode())
            os._exit(128 + signum)
        self.signal = signum
        os.write(2, f"\n{name}: finishing the step in flight and saving a checkpoint "
                    "(send it again to exit at once).\n".encode())

    @property
    def name(self) -> str:
        """The signal that stops the run, as this process knows it."""
        if self.signal is None:
            return "a signal to another process"
        return signal.Signals(self.signal).name

    def stop_after_this_step(self, save_failed: bool = False) -> bool:
        """Whether to stop after the step just dispatched (call once per step): a signal
        (save, then stop) or, with `save_failed` on some process, a failed background
        save (`self.save_failed` is then set: stop without saving)."""
        flags = (self.signal is not None, save_failed)
        if self.synchronise:
            previous, self._pending = self._pending, self._any_process(flags)
            flags = (False, False) if previous is None else tuple(jax.device_get(previous))
        self.save_failed = bool(flags[1])
        return bool(flags[0] or flags[1])

    def _any_process(self, flags: tuple[bool, bool]) -> jax.Array:
        """Dispatches any(flags over processes) (asynchronous; a replicated bool [2])."""
        count = jax.device_count()
        if self._reduce is None:
            mesh = Mesh(np.asarray(jax.devices()), ("devices",))
            self._sharding = NamedSharding(mesh, PartitionSpec("devices", None))
            self._reduce = jax.jit(lambda f: jnp.any(f, axis=0),
                                   out_shardings=NamedSharding(mesh, PartitionSpec()))
        array = jax.make_array_from_callback(
            (count, 2), self._sharding,
            lambda index: np.tile(np.asarray(flags), (len(range(*index[0].indices(count))), 1)))
        return self._reduce(array)
