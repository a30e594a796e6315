"""main.py end to end: the demo config for a few steps, and eval of converted weights."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambavision_jax.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_config_smoke(run_main, tmp_path):
    wd = str(tmp_path / "demo")
    p = run_main(
        "--config=" + os.path.join(ROOT, "configs", "demo.py"),
        "--workdir=" + wd,
        "--config.total_steps=3",
        "--config.log_every_steps=1",
        "--config.progress_bar=False",
    )
    rows = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    ev = [r for r in rows if r["split"] == "eval"]
    assert len(ev) == 1 and ev[0]["step"] == 3 and ev[0]["num_examples"] == 360
    assert os.path.isdir(os.path.join(wd, "checkpoints", "3"))
    assert json.load(open(os.path.join(wd, "config.json")))["data"]["name"] == "digits"
    assert "steps 0->3" in p.stdout


def test_without_workdir_the_run_goes_to_workdirs_and_the_config_name(jax_cache_env, tmp_path):
    """``python main.py --config=configs/demo.py`` alone: the run lives in ./workdirs/demo, where running the same
    command again resumes it."""
    import subprocess
    import sys

    command = [sys.executable, os.path.join(ROOT, "main.py"), "--config=" + os.path.join(ROOT, "configs", "demo.py")]
    command += ["--config.total_steps=1", "--config.progress_bar=False"]
    p = subprocess.run(command, env=jax_cache_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    workdir = tmp_path / "workdirs" / "demo"
    assert f"workdir: {workdir}" in p.stdout
    assert (workdir / "checkpoints" / "1").is_dir() and (workdir / "config.json").is_file()


def test_an_unknown_mode_is_named_before_anything_is_written(run_main, tmp_path):
    wd = tmp_path / "never"
    config = "--config=" + os.path.join(ROOT, "configs", "demo.py")
    p = run_main(config, f"--workdir={wd}", "--config.mode=evaluate", expect_rc=1)
    assert "config.mode must be 'train', 'eval' or 'export', got 'evaluate'" in p.stderr
    assert not wd.exists()


def test_eval_of_converted_weights_matches_from_pretrained(run_main, tmp_path, tiny_config, jax_cache_env):
    weights = pytest.importorskip("mambavision_jax.weights")
    if not hasattr(weights, "save_converted"):
        pytest.skip("mambavision_jax.weights.save_converted not available yet")
    import mambavision_jax as mvj
    import mambavision_jax.data as data
    from tests.train.tiny_config import TINY_MODEL

    c = tiny_config
    model = mvj.create_model(c.model_name, num_classes=10, **TINY_MODEL)
    variables = jax.jit(model.init)({"params": jax.random.PRNGKey(3)}, jnp.zeros((1, 32, 32, 3)))
    # non-trivial BN statistics so that eval-mode normalisation matters
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(
            lambda x: x + 0.1 * jnp.abs(jnp.sin(jnp.arange(x.size) + 1.0)).reshape(x.shape), variables["batch_stats"]
        ),
    }
    conv = str(tmp_path / "converted")
    weights.save_converted(conv, c.model_name, variables, dict(TINY_MODEL, num_classes=10))

    wd = str(tmp_path / "eval")
    run_main(
        "--config=" + os.path.join(ROOT, "tests", "train", "tiny_config.py"),
        "--workdir=" + wd,
        "--config.mode=eval",
        "--config.init_from=" + conv,
    )
    (row,) = [r for r in read_jsonl(os.path.join(wd, "metrics.jsonl")) if r["split"] == "eval"]
    # an eval writes its config beside, not over, a training run's config.json
    assert json.load(open(os.path.join(wd, "config_eval.json")))["mode"] == "eval"
    assert not os.path.exists(os.path.join(wd, "config.json"))

    module, v = mvj.from_pretrained(c.model_name, conv, num_classes=10)
    apply = jax.jit(module.apply)
    correct, nll, n = 0.0, 0.0, 0.0
    pre = data.preprocess_settings(c)
    for b in data.build_eval_iterator(c, process_index=0, process_count=1):
        logits = np.asarray(apply(v, data.batch_images(b, pre.mean, pre.std)), np.float64)
        m = b["mask"]
        correct += float(np.sum((logits.argmax(-1) == b["label"]) * m))
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float(np.sum((lse - logits[np.arange(len(m)), b["label"]]) * m))
        n += float(m.sum())
    assert row["num_examples"] == n == 360
    assert row["top1"] == pytest.approx(correct / n, abs=1e-9)
    assert row["loss"] == pytest.approx(nll / n, rel=1e-4)


def test_compilation_cache_dir_precedence(monkeypatch, tmp_path, tiny_config):
    from mambavision_jax.train.loop import compilation_cache_dir

    workdir = str(tmp_path / "run")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert compilation_cache_dir(tiny_config, workdir) == os.path.join(workdir, "compilation_cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env_cache"))
    assert compilation_cache_dir(tiny_config, workdir) == str(tmp_path / "env_cache")
    tiny_config.compilation_cache_dir = "relative_cache"
    assert compilation_cache_dir(tiny_config, workdir) == os.path.abspath("relative_cache")
    tiny_config.compilation_cache_dir = ""
    assert compilation_cache_dir(tiny_config, workdir) == ""


def test_resumed_run_loads_its_compiled_train_step(run_main, tmp_path):
    """main.py keeps its compiled programs in config.compilation_cache_dir; a run resumed from a checkpoint finds its
    train step there (JAX writes an entry only on a miss, so a second entry would mean it compiled again)."""
    wd, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    args = ["--config=" + os.path.join(ROOT, "tests", "train", "tiny_config.py"), "--workdir=" + wd]
    args.append("--config.compilation_cache_dir=" + cache)

    def train_step_entries():
        return sorted(f for f in os.listdir(cache) if f.startswith("jit_train_step"))

    run_main(*args, "--config.total_steps=2")
    first = train_step_entries()
    assert len(first) == 1, os.listdir(cache)
    p = run_main(*args, "--config.total_steps=4")
    assert "Resumed from" in p.stdout and "steps 2->4" in p.stdout
    assert train_step_entries() == first
    rows = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
