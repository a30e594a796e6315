"""The loops keep few programs unfinished: the train loop waits for the step ``_DispatchWindow.SIZE`` steps back
before going on, and so does the eval for its running sums (unbounded, a two-process CPU run hung in XLA:CPU; see
``loop._DispatchWindow`` and ``test_multiprocess.py``)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mambavision_jax.train import loop
from mambavision_jax.train import sharding
from mambavision_jax.train import step as step_lib
from tests.train.conftest import EvalBatches

WINDOW = 2


@pytest.fixture
def waited(monkeypatch):
    """What the loops blocked on, in order, with a window of ``WINDOW`` programs."""
    monkeypatch.setattr(loop._DispatchWindow, "SIZE", WINDOW)
    calls, block = [], jax.block_until_ready

    def recording_block(x):
        calls.append(x)
        return block(x)

    monkeypatch.setattr(jax, "block_until_ready", recording_block)
    return calls


def test_the_train_loop_waits_for_the_step_a_window_back(tiny_config, tmp_path, jax_cache_env, monkeypatch, waited):
    c = tiny_config
    c.total_steps = 6
    c.log_every_steps = 6  # no metrics pulled to the host before the end
    c.checkpoint_every_steps = 0
    make = step_lib.make_train_step
    losses = []

    def recording_make(*args, **kwargs):
        train_step = make(*args, **kwargs)

        def wrapped(state, batch, rng, step):
            state, metrics = train_step(state, batch, rng, step)
            losses.append(metrics["loss"])
            return state, metrics

        return wrapped

    monkeypatch.setattr(step_lib, "make_train_step", recording_make)
    loop.train_and_evaluate(c, str(tmp_path))
    assert len(losses) == 6
    # before dispatching step k + 1 the loop waited for step k - WINDOW + 1: steps 1-4 of 6
    assert [x for x in waited if any(x is loss for loss in losses)] == losses[: 6 - WINDOW]


def test_the_eval_waits_for_its_sums_a_window_back(waited):
    devices = jax.device_count()

    def eval_step(variables, batch):
        return {k: jnp.sum(batch["label"]).astype(jnp.float32) for k in ("loss_sum", "correct1", "correct5", "count")}

    five_batches = EvalBatches([{"label": np.full((devices,), i + 1, np.int32)} for i in range(5)])
    config = ml_collections.ConfigDict({"data": {"prefetch": 0}})
    metrics = loop.run_eval(eval_step, {}, five_batches, config, sharding.make_mesh())
    assert metrics["num_examples"] == devices * (1 + 2 + 3 + 4 + 5)
    # the running sums after batches 1-3 were waited for, once each, before batches 4-5 went on
    sums = [x for x in waited if isinstance(x, dict)]
    assert [float(s["count"]) for s in sums] == [devices * n for n in (1, 3, 6)]
