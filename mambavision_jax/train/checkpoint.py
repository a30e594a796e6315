"""Orbax checkpointing of the train state.

The checkpoint holds the whole ``TrainState`` (step, params, batch_stats, opt_state, EMA). The data position is
the step itself: the data API is deterministic in (seed, step), so restoring step s and rebuilding the train
iterator with ``start_step=s`` continues exactly. Orbax writes each step into a temporary directory and renames
it when complete, so a kill mid-save leaves only complete checkpoints visible to ``latest_step()``.
Callers must only save states whose losses were checked finite (see ``loop.py``).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


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
