"""mode=export and mode=eval of a checkpoint: a run's latest checkpoint, evaluated and written as converted-weights
directories, reproduces the run's own final eval."""

import json
import os

import pytest

from mambavision_jax.train import loop
from mambavision_jax.train.metrics import read_jsonl


def test_export_reproduces_the_runs_final_eval(tiny_config, jax_cache_env, tmp_path):
    c = tiny_config
    c.total_steps = 2
    c.checkpoint_every_steps = 2
    c.ema_decay = 0.5
    c.async_checkpointing = False
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(c, workdir)
    final = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "eval"][-1]
    assert final["step"] == 2 and "ema_top1" in final

    # mode=eval without init_from: the latest checkpoint, EMA too; restoring reads no train split (an eval-only
    # machine may hold the validation set alone)
    eval_only = c.copy_and_resolve_references()
    eval_only.data.train_split = "not_on_this_machine"
    from_checkpoint = loop.evaluate(eval_only, workdir)
    for key in ("loss", "top1", "ema_loss", "ema_top1"):
        assert from_checkpoint[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), key

    written = loop.export(eval_only, workdir)
    assert written == [os.path.join(workdir, "converted"), os.path.join(workdir, "converted_ema")]
    manifests = [json.load(open(os.path.join(d, "mambavision.json"))) for d in written]
    assert [m["ema"] for m in manifests] == [False, True]
    assert all(m["overrides"]["num_classes"] == 10 and m["source"] == "run_step2" for m in manifests)

    for directory, prefix in zip(written, ("", "ema_")):
        e = tiny_config.copy_and_resolve_references()
        e.init_from = directory
        got = loop.evaluate(e, str(tmp_path / f"eval_{prefix or 'plain'}"))
        for key in ("loss", "top1", "top5"):
            assert got[key] == pytest.approx(final[prefix + key], rel=1e-5, abs=1e-6), (directory, key)


def test_export_and_eval_without_a_checkpoint_name_the_workdir(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="mode=export: no checkpoint under .*empty"):
        loop.export(tiny_config, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="mode=eval: no config.init_from and no checkpoint under .*empty"):
        loop.evaluate(tiny_config, str(tmp_path / "empty"))


def test_a_leaf_by_leaf_checkpoint_needs_pack_params_false(tiny_config, jax_cache_env, tmp_path):
    """A run with ``pack_params=False`` writes the leaf-by-leaf layout (that of checkpoints before packing): the
    default config refuses it with a message naming the option, and ``pack_params=False`` reads it back."""
    c = tiny_config
    c.total_steps = 2
    c.checkpoint_every_steps = 2
    c.async_checkpointing = False
    c.pack_params = False
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(c, workdir)
    final = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "eval"][-1]
    packed = c.copy_and_resolve_references()
    packed.pack_params = True
    with pytest.raises(ValueError, match="pack_params=False"):
        loop.evaluate(packed, workdir)
    assert loop.evaluate(c, workdir)["loss"] == pytest.approx(final["loss"], rel=1e-5)
