"""Kill-and-resume reproduces the uninterrupted run; a non-finite loss stops the run and keeps the last good
checkpoint; metrics.jsonl rows carry step/split/metrics."""

import gc
import json
import os

import numpy as np
import pytest

from mambavision_jax.train import checkpoint as ckpt_lib
from mambavision_jax.train import loop
from mambavision_jax.train.metrics import read_jsonl

TOTAL = 8


def _rows(workdir, split):
    return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == split}


@pytest.fixture(scope="module")
def full_run(run_runner, tmp_path_factory):
    full = str(tmp_path_factory.mktemp("full"))
    run_runner({**SPEC, "workdir": full})
    return full


SPEC = {"task": "train", "devices": 1, "overrides": {"total_steps": TOTAL, "checkpoint_every_steps": 3}}


def _compare(full, cut):
    a, b = _rows(full, "train"), _rows(cut, "train")
    assert sorted(a) == sorted(b) == list(range(1, TOTAL + 1))  # rows the killed run wrote past its checkpoint
    for s in range(1, TOTAL + 1):  # were replaced by the resumed run's
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6, abs=1e-7), s
        assert b[s]["lr"] == pytest.approx(a[s]["lr"], rel=1e-7)
    ea, eb = _rows(full, "eval"), _rows(cut, "eval")
    assert list(ea) == list(eb) == [TOTAL]
    assert eb[TOTAL]["top1"] == pytest.approx(ea[TOTAL]["top1"])
    assert eb[TOTAL]["loss"] == pytest.approx(ea[TOTAL]["loss"], rel=1e-5)
    assert sorted(ckpt_lib.Checkpointer(os.path.join(cut, "checkpoints")).all_steps())[-1] == TOTAL
    return a, ea


def test_kill_mid_async_save_resumes_from_a_complete_checkpoint(run_runner, full_run, tmp_path):
    """Killed one step after an async save began: the in-flight save must never be visible as a checkpoint."""
    cut = str(tmp_path / "cut")
    run_runner({**SPEC, "workdir": cut, "exit_after_step": 4}, expect_rc=17)
    ck = ckpt_lib.Checkpointer(os.path.join(cut, "checkpoints"))
    restored = ck.latest_step()
    assert restored in (None, 3)
    resumed = run_runner({**SPEC, "workdir": cut})
    assert resumed["train_steps"][0] == (restored or 0) + 1
    _compare(full_run, cut)


def test_kill_and_resume_matches_uninterrupted(run_runner, full_run, tmp_path):
    full, cut = full_run, str(tmp_path / "cut")
    # Synchronous saves here, so the step-3 checkpoint is complete when the process is hard-killed
    # (os._exit, like SIGKILL) right after step 5 was logged.
    killed = {**SPEC, "overrides": {**SPEC["overrides"], "async_checkpointing": False}}
    run_runner({**killed, "workdir": cut, "exit_after_step": 5}, expect_rc=17)
    assert ckpt_lib.Checkpointer(os.path.join(cut, "checkpoints")).latest_step() == 3
    assert max(_rows(cut, "train")) == 5
    resumed = run_runner({**SPEC, "workdir": cut})  # the same command again: resumes from step 3
    assert resumed["train_steps"] == [4, 5, 6, 7, 8]  # not a fresh start, which would log the same losses
    a, ea = _compare(full, cut)

    # metrics.jsonl schema
    for r in a.values():
        for k in ("step", "split", "loss", "top1", "lr", "img_per_sec", "step_time"):
            assert k in r, (k, r)
    assert ea[TOTAL]["loss"] > 0 and 0 <= ea[TOTAL]["top1"] <= ea[TOTAL]["top5"] <= 1
    assert os.path.isdir(os.path.join(full, "tensorboard"))


def test_an_accumulating_run_killed_and_resumed_on_more_devices_continues(run_runner, tmp_path):
    """1 device with 2 micro-batches an update, killed after step 5 and resumed on 2 devices without accumulation
    (the same global batch and data; per-device statistics: the same numbers), continues the uninterrupted run."""
    accumulating = {**SPEC, "overrides": {**SPEC["overrides"], "grad_accum_steps": 2, "batch_size_per_device": 8}}
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run_runner({**accumulating, "workdir": full})
    killed = {**accumulating, "overrides": {**accumulating["overrides"], "async_checkpointing": False}}
    run_runner({**killed, "workdir": cut, "exit_after_step": 5}, expect_rc=17)
    moved = {**SPEC, "devices": 2, "overrides": {**SPEC["overrides"], "batch_size_per_device": 8}}
    assert run_runner({**moved, "workdir": cut})["train_steps"] == [4, 5, 6, 7, 8]
    a, b = _rows(full, "train"), _rows(cut, "train")
    assert sorted(a) == sorted(b) == list(range(1, TOTAL + 1))
    for s in a:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), s
    assert _rows(cut, "eval")[TOTAL]["loss"] == pytest.approx(_rows(full, "eval")[TOTAL]["loss"], rel=1e-5)


class _NaNAfter:
    """mambavision_jax.data with NaN images from the batch of global step `bad` (0-based) on."""

    def __init__(self, bad):
        import mambavision_jax.data as data

        self._data, self._bad = data, bad

    def __getattr__(self, name):
        return getattr(self._data, name)

    def build_train_iterator(self, config, *, start_step, process_index, process_count):
        it = self._data.build_train_iterator(
            config, start_step=start_step, process_index=process_index, process_count=process_count
        )

        def gen():
            for step, b in enumerate(it, start=start_step):
                if step >= self._bad:
                    b = dict(b, image=np.full(b["image"].shape, np.nan, np.float32))  # float: used as it is
                yield b

        return gen()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, jax_cache_env):
    c = tiny_config
    c.total_steps = TOTAL
    c.checkpoint_every_steps = 3
    c.log_every_steps = 4
    workdir = str(tmp_path / "nan")
    with pytest.raises(loop.NonFiniteLossError, match=r"Non-finite loss at step 5 .*last good checkpoint \(step 3\)"):
        loop.train_and_evaluate(c, workdir, data_module=_NaNAfter(4))  # the 5th batch produces step 5
    assert gc.get_freeze_count() == 0  # the loop's gc.freeze() is undone on the error path too
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ck.all_steps() == [3]
    rows = _rows(workdir, "train")
    assert max(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows.values())  # logged at 4, stopped at 5


def test_restore_into_a_different_state_structure_names_the_problem(tmp_path):
    """A checkpoint written with another optimizer chain (here one clip more) is refused with a message that says
    so, not half-restored."""
    import jax
    import jax.numpy as jnp
    import optax

    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    written = optax.chain(optax.clip_by_global_norm(5.0), optax.clip_by_global_norm(1.0), optax.scale_by_adam())
    wanted = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(3, {"params": params, "opt_state": written.init(params)})
    ckpt.wait()
    abstract = jax.eval_shape(lambda: {"params": params, "opt_state": wanted.init(params)})
    with pytest.raises(ValueError, match="step 3 .* does not match the train state"):
        ckpt.restore(abstract)
    restored = ckpt.restore(jax.eval_shape(lambda: {"params": params, "opt_state": written.init(params)}))
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), 1.0)
    ckpt.close()


def test_a_fresh_start_drops_the_rows_of_a_run_killed_before_its_first_checkpoint(tiny_config, jax_cache_env, tmp_path):
    """No checkpoint in the workdir: rows already in metrics.jsonl belong to no trajectory this run continues."""
    c = tiny_config
    c.total_steps = 1
    c.async_checkpointing = False
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 5, "split": "train", "loss": 9.0}) + "\n")
    loop.train_and_evaluate(c, str(workdir))
    rows = read_jsonl(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in rows if r["split"] == "train"] == [1]


def test_a_resumed_run_keeps_its_global_batch(tiny_config, jax_cache_env, tmp_path):
    """Resuming with another global batch would move the data position and the schedule: refused, naming both
    batches and grad_accum_steps; the same global batch from other micro-batches resumes."""
    c = tiny_config
    c.total_steps, c.checkpoint_every_steps, c.async_checkpointing = 1, 1, False
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(c, workdir)
    resumed = c.copy_and_resolve_references()
    resumed.total_steps = 2
    resumed.batch_size_per_device = c.batch_size_per_device // 2
    with pytest.raises(ValueError, match=r"global batch of 16 examples, and this config gives 8 .*grad_accum_steps"):
        loop.train_and_evaluate(resumed, workdir)
    assert max(_rows(workdir, "train")) == 1  # refused before anything was written
    resumed.grad_accum_steps = 2
    loop.train_and_evaluate(resumed, workdir)
    assert max(_rows(workdir, "train")) == 2


def test_keeps_the_newest_checkpoints_and_refuses_to_keep_none(tmp_path):
    """keep_checkpoints=k keeps the newest k; 0 (orbax: keep none, nothing to resume from) is refused by name."""
    import jax.numpy as jnp

    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), max_to_keep=2, async_save=False)
    for step in (1, 2, 3, 4):
        ckpt.save(step, {"w": jnp.full((2,), float(step))})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    ckpt.close()
    for keep in (0, -1):
        with pytest.raises(ValueError, match="config.keep_checkpoints must be >= 1"):
            ckpt_lib.Checkpointer(str(tmp_path / f"none{keep}"), max_to_keep=keep)
