"""The loop's evals: ``<workdir>/best`` keeps the weights of the best top-1 (the EMA's when the run evaluates an
EMA), across a resume and through a kill while it is replaced; a resumed run writes the eval row a kill lost, and a
rerun of a finished run writes no second one."""

import functools
import json
import os

import jax
import numpy as np
import pytest

import mambavision_jax as mvj
from mambavision_jax.train import checkpoint as ckpt_lib
from mambavision_jax.train import loop
from mambavision_jax.train import state as state_lib
from mambavision_jax.train.metrics import read_jsonl
from mambavision_jax.weights.converted import load_converted


class _Killed(Exception):
    """Stands for the process being killed at the point where it is raised."""


def _config(c):
    """6 steps, an eval and a (synchronous) checkpoint every 2, with an EMA."""
    c.total_steps = 6
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 2
    c.async_checkpointing = False
    c.ema_decay = 0.5
    return c


def _step(state) -> int:
    """The step a train state is at."""
    return int(jax.device_get(state.step))


def _eval_steps(workdir) -> list[int]:
    """The steps of the eval rows in the workdir's metrics.jsonl, in order."""
    return [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "eval"]


def _record(directory) -> dict:
    """The best-model record in a best directory."""
    with open(os.path.join(directory, ckpt_lib.BestWeights.RECORD)) as f:
        return json.load(f)


def _leaves(tree) -> list[np.ndarray]:
    """A tree's leaves as numpy arrays."""
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _script_evals(monkeypatch, script: dict, ema_variables: dict):
    """Replaces the loop's evals by ``script[step]`` (metrics, or ``_Killed`` to raise) and keeps the EMA variables
    of each state evaluated in ``ema_variables[step]``."""

    def scripted(eval_step, state, data, config, mesh):
        step = _step(state)
        if script[step] is _Killed:
            raise _Killed(step)
        ema_variables[step] = jax.device_get(state.variables(ema=True))
        return dict(script[step])

    monkeypatch.setattr(loop, "_eval_all", scripted)


def test_best_keeps_the_ema_weights_of_the_best_ema_top1_across_a_resume(
    tiny_config, jax_cache_env, tmp_path, monkeypatch, capsys
):
    c = _config(tiny_config)
    workdir = str(tmp_path / "run")
    best = os.path.join(workdir, "best")
    ema_variables = {}
    # the model's top-1 is best at step 2, the EMA's at step 4; the run is killed in the eval of step 6
    script = {2: {"top1": 0.9, "ema_top1": 0.3}, 4: {"top1": 0.1, "ema_top1": 0.5}, 6: _Killed}
    _script_evals(monkeypatch, script, ema_variables)
    with pytest.raises(_Killed):
        loop.train_and_evaluate(c, workdir)
    assert _record(best) == {"step": 4, "metric": "ema_top1", "top1": 0.5}
    out = capsys.readouterr().out
    assert "New best ema_top1=0.3000 at step 2" in out and "New best ema_top1=0.5000 at step 4" in out
    manifest, _ = load_converted(best)
    assert manifest["ema"] and manifest["source"] == "run_step4"
    _, variables = mvj.from_pretrained(c.model_name, best)
    for got, want in zip(_leaves(variables), _leaves(ema_variables[4]), strict=True):
        np.testing.assert_array_equal(got, want)

    # resumed at step 6 (its eval lost to the kill): a worse EMA top-1 than the recorded best replaces nothing
    _script_evals(monkeypatch, {6: {"top1": 0.95, "ema_top1": 0.45}}, ema_variables)
    loop.train_and_evaluate(c, workdir)
    assert 6 in ema_variables  # evaluated
    assert _record(best)["step"] == 4
    assert "New best" not in capsys.readouterr().out


def _state(value: float) -> state_lib.TrainState:
    """A train state whose one weight ``w`` is filled with ``value`` (no packing, no optimizer state)."""
    return state_lib.TrainState(
        step=np.int32(0), params={"w": np.full((3,), value, np.float32)}, batch_stats={}, opt_state=()
    )


def _weight(directory) -> float:
    """The value the ``_state`` weights in a converted directory were filled with."""
    return float(load_converted(directory)[1]["params"]["w"][0])


@pytest.mark.parametrize("kill_at", ["write", "rename"])
def test_a_kill_while_a_new_best_replaces_the_old_leaves_the_old_one(kill_at, tiny_config, tmp_path, monkeypatch):
    """Killed while writing the new best's weights, or between renaming the old best aside and the new one into
    place: the next run finds the old best complete (weights and record) and goes on from it."""
    directory = str(tmp_path / "best")
    write = functools.partial(loop._write_converted, tiny_config, str(tmp_path))
    assert ckpt_lib.BestWeights(directory, write, log=print).update(2, {"top1": 0.5}, _state(1.0))
    assert not load_converted(directory)[0]["ema"]  # no ema_top1 in the metrics: the model's weights

    def write_then_kill(*args):
        write(*args)
        raise _Killed

    rename = os.rename

    def kill_at_second_rename(src, dst):
        if src == directory + ".tmp":
            raise _Killed
        rename(src, dst)

    if kill_at == "rename":
        monkeypatch.setattr(os, "rename", kill_at_second_rename)
    killed = ckpt_lib.BestWeights(directory, write_then_kill if kill_at == "write" else write, log=print)
    with pytest.raises(_Killed):
        killed.update(4, {"top1": 0.7}, _state(2.0))
    monkeypatch.undo()

    resumed = ckpt_lib.BestWeights(directory, write, log=print)
    assert resumed.record == _record(directory) == {"step": 2, "metric": "top1", "top1": 0.5}
    assert _weight(directory) == 1.0
    assert sorted(os.listdir(tmp_path)) == ["best"]
    assert resumed.update(4, {"top1": 0.7}, _state(2.0))
    assert _weight(directory) == 2.0 and _record(directory)["step"] == 4
    assert sorted(os.listdir(tmp_path)) == ["best"]


def test_a_best_directory_of_other_files_is_refused_not_replaced(tiny_config, tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no converted weights.*save_best=False"):
        ckpt_lib.BestWeights(str(tmp_path / "best"), write=None)
    assert (tmp_path / "best" / "notes.txt").read_text() == "mine"


def test_every_process_takes_process_zeros_decision(tmp_path, monkeypatch):
    """Process 1 of a two-process run (faked: the broadcasts answer with process 0's values) sees an eval that beats
    its record, but process 0 decided otherwise: it keeps nothing and gathers nothing, as process 0 does."""
    from jax.experimental import multihost_utils

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    process_zero_says = iter([1, 0])  # the directory is fine; not a new best
    asked = []

    def broadcast_one_to_all(value):
        asked.append(int(value))
        return np.int32(next(process_zero_says))

    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast_one_to_all)

    def write(*args):
        raise AssertionError("only process 0 writes the best model")

    best = ckpt_lib.BestWeights(str(tmp_path / "best"), write, log=print)
    assert not best.update(2, {"top1": 0.9}, _state(1.0))
    assert asked == [1, 1]  # process 1's own view: directory fine, a new best
    assert best.record is None and not os.path.exists(tmp_path / "best")


def test_resume_writes_the_eval_row_a_kill_lost_and_a_finished_rerun_writes_none(
    tiny_config, jax_cache_env, tmp_path, monkeypatch
):
    c = _config(tiny_config)
    c.save_best = False
    workdir = str(tmp_path / "run")
    evaluate = loop._eval_all

    def killed_at_step_4(eval_step, state, *args):
        if _step(state) == 4:  # after the checkpoint of step 4, before its eval row
            raise _Killed
        return evaluate(eval_step, state, *args)

    monkeypatch.setattr(loop, "_eval_all", killed_at_step_4)
    with pytest.raises(_Killed):
        loop.train_and_evaluate(c, workdir)
    monkeypatch.undo()
    assert _eval_steps(workdir) == [2]

    final = loop.train_and_evaluate(c, workdir)  # resumes at step 4: its eval first
    assert _eval_steps(workdir) == [2, 4, 6]
    again = loop.train_and_evaluate(c, workdir)  # finished: the recorded final eval, no second row
    assert _eval_steps(workdir) == [2, 4, 6]
    assert again == pytest.approx(final)
    assert not os.path.exists(os.path.join(workdir, "best"))  # config.save_best=False
