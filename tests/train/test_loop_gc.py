"""The train loop freezes the cyclic garbage collector's objects once the first step is compiled (so full
collections, which pause every Python thread, no longer walk the model / jit caches) and undoes it on return."""

import gc

import pytest

from mambavision_jax.train import loop
from mambavision_jax.train import step as step_lib


@pytest.mark.parametrize("gc_freeze", [True, False])
def test_gc_frozen_after_first_step_and_unfrozen_on_return(
    tiny_config, tmp_path, jax_cache_env, monkeypatch, gc_freeze
):
    c = tiny_config
    c.total_steps = 4
    c.checkpoint_every_steps = 0
    c.log_every_steps = 2
    c.gc_freeze = gc_freeze
    seen = []  # (step, gc.get_freeze_count()) at each train_step call, in the loop's thread
    make = step_lib.make_train_step

    def recording_make_train_step(*args, **kwargs):
        train_step = make(*args, **kwargs)

        def wrapped(state, batch, rng, step):
            seen.append((int(step), gc.get_freeze_count()))
            return train_step(state, batch, rng, step)

        return wrapped

    monkeypatch.setattr(loop.step_lib, "make_train_step", recording_make_train_step)
    assert gc.get_freeze_count() == 0
    try:
        loop.train_and_evaluate(c, str(tmp_path / "wd"))
    finally:
        left_frozen = gc.get_freeze_count()
        gc.unfreeze()
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert seen[0][1] == 0  # the first call compiles the step: nothing frozen yet
    if gc_freeze:
        assert all(n > 10_000 for _, n in seen[1:]), seen  # model, optimizer, jit caches: hundreds of thousands
    else:
        assert all(n == 0 for _, n in seen), seen
    assert left_frozen == 0  # unfrozen on return
