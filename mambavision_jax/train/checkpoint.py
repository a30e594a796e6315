"""Orbax checkpointing of the train state.

The checkpoint holds the whole ``TrainState`` (step, params, batch_stats, opt_state, EMA). The data position is
the step itself: the data API is deterministic in (seed, step), so restoring step s and rebuilding the train
iterator with ``start_step=s`` continues exactly. Orbax writes each step into a temporary directory and renames
it when complete, so a kill mid-save leaves only complete checkpoints visible to ``latest_step()``.
Callers must only save states whose losses were checked finite (see ``loop.py``).

``BestWeights`` keeps the weights of a run's best eval apart from these, as a converted-weights directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from mambavision_jax.train import state as state_lib


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
        """``max_to_keep``: the newest checkpoints kept, >= 1, or None for all (orbax would keep none at 0, leaving
        nothing to resume from)."""
        if max_to_keep is not None and int(max_to_keep) < 1:
            raise ValueError(f"config.keep_checkpoints must be >= 1 (or None: keep all), got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, *, force: bool = True) -> bool:
        return self.manager.save(int(step), args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state, step: int | None = None):
        """Restores ``step`` (default: latest) into the shardings carried by ``abstract_state``'s leaves."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        try:
            return self.manager.restore(int(step), args=ocp.args.StandardRestore(abstract_state))
        except ValueError as e:
            if "mismatch" not in str(e).lower():
                raise
            raise ValueError(
                f"The checkpoint of step {step} in {self.directory} does not match the train state this config "
                "builds (a different model, optimizer or EMA setting, or a checkpoint written by another version of "
                "mambavision_jax; checkpoints from before 2026-12-06 need --config.pack_params=False). Use a fresh "
                f"--workdir, or the config it was written with. Orbax: {e}"
            ) from e

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def process_zeros(value: bool) -> bool:
    """Process 0's ``value`` on every process (a collective in a multi-process run; ``value`` itself in one)."""
    if jax.process_count() == 1:
        return bool(value)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(value))))


def host_copy(tree):
    """``tree``'s arrays as numpy arrays on this host, each whole: gathered from every process in a multi-process run
    (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


class BestWeights:
    """The weights of a run's best eval so far as a converted-weights directory, as timm's CheckpointSaver keeps
    ``model_best``; its ``best.json`` records the step, the metric tracked and its top-1, and a resumed run goes on
    comparing against it.

    An eval is judged by ``ema_top1`` when its metrics have it (the run keeps an EMA and evaluates it: the official
    train.py replaces its eval metrics with the EMA's), and then the EMA weights are kept; else by ``top1``, keeping
    the model's. A new best is written to ``<directory>.tmp``, the previous one renamed to ``<directory>.old``, the
    new one renamed into place and the old one removed: a kill at any point leaves the old or the new best complete,
    never a half-written one under ``directory`` (the next ``BestWeights`` puts back an old best set aside and
    removes a half-written one).

    In a multi-process run every process makes one and calls ``update`` after each eval: process 0 alone reads and
    writes the directory and decides, every process takes its decision and gathers the weights with it."""

    RECORD = "best.json"

    def __init__(self, directory: str, write, log=print):
        """``write(directory, variables, step, ema)`` writes a converted-weights directory (called on process 0 with
        host arrays); ``log`` gets a line for each new best. An existing ``directory`` that holds no converted
        weights is refused, not replaced."""
        self.directory = os.path.abspath(directory)
        self._tmp, self._old = self.directory + ".tmp", self.directory + ".old"
        self._write, self._log = write, log
        self._writer = jax.process_index() == 0
        self.record, refused = None, None
        if self._writer:
            try:
                self._recover()
                self.record = self._read_record()
            except FileExistsError as e:
                refused = e
        if not process_zeros(refused is None):
            raise refused or FileExistsError(f"process 0 refused {self.directory!r} as the best model's directory")

    def _recover(self):
        """Removes a half-written new best; puts back an old one set aside when no best is in place (a kill between
        the renames), else removes it; refuses a ``directory`` that is not converted weights."""
        from mambavision_jax.weights.converted import is_converted_dir

        shutil.rmtree(self._tmp, ignore_errors=True)
        if os.path.isdir(self._old):
            if os.path.exists(self.directory):
                shutil.rmtree(self._old)
            else:
                os.rename(self._old, self.directory)
        if os.path.exists(self.directory) and not is_converted_dir(self.directory):
            raise FileExistsError(
                f"{self.directory!r} holds no converted weights: move it, or turn best-model tracking off "
                "(--config.save_best=False)"
            )

    def _read_record(self) -> dict | None:
        path = os.path.join(self.directory, self.RECORD)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def update(self, step: int, metrics: dict, state) -> bool:
        """Keeps the weights of ``state`` (a ``TrainState``: ``variables(ema=...)``) when the tracked top-1 in
        ``metrics`` beats the best so far (strictly, as timm); returns whether it did."""
        metric = "ema_top1" if "ema_top1" in metrics else "top1"
        value = metrics.get(metric)
        best = -math.inf if self.record is None else self.record["top1"]
        if not process_zeros(value is not None and value > best):  # also skips NaN
            return False
        ema = metric == "ema_top1"
        variables = host_copy(state_lib.compiled_variables(state, ema=ema))
        record = {"step": int(step), "metric": metric, "top1": float(value)}
        if self._writer:
            self._replace(variables, step, ema, record)
            weights = "EMA weights" if ema else "weights"
            self._log(f"New best {metric}={value:.4f} at step {step}: {weights} in {self.directory}")
        self.record = record
        return True

    def _replace(self, variables, step: int, ema: bool, record: dict):
        """Writes the new best beside the old one and renames it into place (see the class docstring)."""
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._write(self._tmp, variables, step, ema)
        with open(os.path.join(self._tmp, self.RECORD), "w") as f:
            json.dump(record, f)
        if os.path.exists(self.directory):  # a directory cannot be renamed onto a non-empty one
            os.rename(self.directory, self._old)
        os.rename(self._tmp, self.directory)
        shutil.rmtree(self._old, ignore_errors=True)
