"""The train rows' step_time and img_per_sec time the train steps only: not the first step's compile, nor a
checkpoint save between two windows; img_per_sec counts every micro-batch of an update."""

import os
import time

import jax
import pytest

from mambavision_jax.train import loop
from mambavision_jax.train import step as step_lib
from mambavision_jax.train.metrics import read_jsonl

SLOW = 8.0  # seconds added to the first step's call (a compile) and to each checkpoint save


def test_step_time_leaves_out_the_compile_and_the_checkpoint_saves(tiny_config, tmp_path, jax_cache_env, monkeypatch):
    c = tiny_config
    c.total_steps = 4
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
    c.grad_accum_steps = 2
    make, save = step_lib.make_train_step, loop.ckpt_lib.Checkpointer.save

    def slow_first_call(*args, **kwargs):
        train_step = make(*args, **kwargs)
        calls = []

        def wrapped(state, batch, rng, step):
            out = train_step(state, batch, rng, step)
            if not calls:
                time.sleep(SLOW)
            calls.append(step)
            return out

        return wrapped

    def slow_save(self, step, state, **kwargs):
        time.sleep(SLOW)
        return save(self, step, state, **kwargs)

    monkeypatch.setattr(loop.step_lib, "make_train_step", slow_first_call)
    monkeypatch.setattr(loop.ckpt_lib.Checkpointer, "save", slow_save)
    workdir = str(tmp_path / "wd")
    loop.train_and_evaluate(c, workdir)
    rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    batch = c.batch_size_per_device * jax.device_count() * 2
    for r in rows:  # step 1 ran after the "compile", step 3 after the save of step 2
        assert r["step_time"] < SLOW / 2, r
        assert r["img_per_sec"] == pytest.approx(batch / r["step_time"], rel=1e-6)
