"""benchmarks/throughput.py's command line: variants of model options timed next to the base options (each with
its tagged result key and merged options), option parsing, and the table's ratios against the official JSON. The
timed functions are stood in for, so nothing compiles."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import extension_build  # noqa: E402
import throughput  # noqa: E402


@pytest.fixture
def anchor_in_place(monkeypatch):
    """A stand-in anchor script path: the real one lives outside the repository, and subprocess.run is faked."""
    monkeypatch.setattr(throughput, "anchor_script", lambda: "official_torch.py")


def test_variants_are_parsed_into_tags_and_typed_options():
    assert throughput.parse_variants(" norm_impl=pallas ; scan_impl=xla, conv_channel_multiple=8;flag=TRUE;") == [
        ("[norm_impl=pallas]", {"norm_impl": "pallas"}),
        ("[scan_impl=xla,conv_channel_multiple=8]", {"scan_impl": "xla", "conv_channel_multiple": 8}),
        ("[flag=TRUE]", {"flag": True}),
    ]
    assert throughput.parse_variants("") == []
    with pytest.raises(ValueError, match="--variants wants NAME=VALUE, got 'norm_impl'"):
        throughput.parse_variants("norm_impl")
    with pytest.raises(ValueError, match="--xla-option wants NAME=VALUE"):
        throughput.parse_compiler_options(["=1"])


def test_each_config_is_timed_with_the_base_options_then_each_variant(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(kind):
        def run(name, batch, dtype, size, options, profile_dir, compiler_options, min_window_s):
            assert min_window_s == 0.5  # --min-window-s reaches every timed config
            calls.append((kind, name, batch, dict(options), compiler_options))
            speed = 1000.0 if options["norm_impl"] == "xla" else 1200.0
            return dict(img_per_s=speed, step_ms=batch / speed * 1e3, compile_s=1.0)

        return run

    monkeypatch.setattr(throughput, "inference", fake("infer"))
    monkeypatch.setattr(throughput, "training", fake("train"))
    official = tmp_path / "official.json"
    official.write_text(json.dumps({"infer_mamba_vision_T_bs256": 500, "train_mamba_vision_B_bs128": 400}))
    out = tmp_path / "results.json"
    argv = ["throughput.py", "--models", "T", "--batches", "256", "--train-models", "B", "--scan-impl", "xla"]
    argv += ["--xla-option", "xla_gpu_autotune_level=2"]
    argv += ["--variants", "norm_impl=pallas;xla_gpu_enable_cudnn_layer_norm=true", "--official-json", str(official)]
    argv += ["--out", str(out), "--min-window-s", "0.5"]
    monkeypatch.setattr(sys, "argv", argv)
    throughput.main()

    base = dict(scan_impl="xla", attention_impl="auto", norm_impl="xla")
    xla = dict(throughput.mvj.compiler_options() or {}, xla_gpu_autotune_level=2)  # the platform's, then --xla-option
    cudnn_norm = dict(xla, xla_gpu_enable_cudnn_layer_norm=True)  # an xla_* name is a compiler option
    runs = [(base, xla), (dict(base, norm_impl="pallas"), xla), (base, cudnn_norm)]
    assert calls == [("infer", "mamba_vision_T", 256, *r) for r in runs] + [
        ("train", "mamba_vision_B", 128, *r) for r in runs
    ]
    results = json.loads(out.read_text())
    assert results["min_window_s"] == 0.5
    tags = ["", "[norm_impl=pallas]", "[xla_gpu_enable_cudnn_layer_norm=true]"]
    assert list(results["inference"]) == [f"T_bs256{t}" for t in tags]
    assert list(results["training"]) == [f"B_bs128{t}" for t in tags]
    table = capsys.readouterr().out.split("ratio")[-1]
    rows = {line.split()[1]: line.split() for line in table.splitlines() if line.strip()}
    assert rows["T_bs256"][2:5] == ["1000", "500", "2.00"]
    assert rows["T_bs256[norm_impl=pallas]"][2:5] == ["1200", "500", "2.40"]
    assert rows["B_bs128[norm_impl=pallas]"][2:5] == ["1200", "400", "3.00"]


def test_compare_official_times_the_official_recipe_for_the_recipe_configs_models(tmp_path, monkeypatch, capsys):
    def fake_recipe(path, batch, mesa, profile_dir, min_window_s):
        name = {"tiny": "mamba_vision_T", "base": "mamba_vision_B"}[os.path.splitext(os.path.basename(path))[0]]
        return dict(img_per_s=3000.0 if name.endswith("B") else 6000.0, compile_s=1.0, model=name, mesa=mesa)

    def fake_run(cmd, check):
        assert cmd[1].endswith("official_recipe.py") and check
        assert cmd[cmd.index("--models") + 1] == "T,B" and cmd[cmd.index("--batch") + 1] == "128"
        assert cmd[-1] == "--mesa"
        rows = {"device": "x", "recipe_mamba_vision_T_bs128_mesa": {"img_per_s": 1000.4}}
        rows["recipe_mamba_vision_B_bs128_mesa"] = {"img_per_s": 750.0}
        with open(cmd[cmd.index("--out") + 1], "w") as f:
            json.dump(rows, f)

    monkeypatch.setattr(throughput, "recipe", fake_recipe)
    monkeypatch.setattr(throughput.subprocess, "run", fake_run)
    monkeypatch.setenv("OUT", str(tmp_path))
    argv = ["throughput.py", "--models", "", "--train-models", ""]
    argv += ["--recipe-configs", "configs/tiny.py,configs/base.py", "--recipe-mesa", "--compare-official"]
    argv += ["--out", str(tmp_path / "results.json")]
    monkeypatch.setattr(sys, "argv", argv)
    throughput.main()

    official = json.loads((tmp_path / "results.json").read_text())["official"]
    assert official == {"recipe_mamba_vision_T_bs128_mesa": 1000, "recipe_mamba_vision_B_bs128_mesa": 750}
    table = capsys.readouterr().out.split("ratio")[-1]
    rows = {line.split()[1]: line.split() for line in table.splitlines() if line.strip()}
    assert rows["tiny_bs128"][2:5] == ["6000", "1000", "6.00"]
    assert rows["base_bs128"][2:5] == ["3000", "750", "4.00"]


def test_the_anchor_trains_the_train_models_even_where_they_are_not_first(tmp_path, monkeypatch, anchor_in_place):
    """The anchor trains the first TRAIN_MODELS of MODELS: B, asked for training only, must be among them."""
    seen = {}

    def fake_run(cmd, env, check):
        seen.update(models=env["MODELS"], train=env["TRAIN_MODELS"])
        with open(os.path.join(env["OUT"], "official_torch.json"), "w") as f:
            json.dump({}, f)

    monkeypatch.setattr(throughput.subprocess, "run", fake_run)
    monkeypatch.setenv("OUT", str(tmp_path))
    throughput.official(["T", "S", "L"], ["B", "T"])
    assert seen == {"models": "mamba_vision_B,mamba_vision_T,mamba_vision_S,mamba_vision_L", "train": "2"}


def test_the_anchor_runs_after_a_killed_builds_lock_is_removed(tmp_path, monkeypatch, capsys, anchor_in_place):
    """A build killed midway leaves <build dir>/lock, on which torch's next build in that directory would wait for
    ever: it is gone by the time the anchor starts."""
    lock = tmp_path / "build" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    monkeypatch.setenv("SS_BUILD", str(lock.parent))
    monkeypatch.setenv("OUT", str(tmp_path))

    def fake_run(cmd, env, check):
        assert not lock.exists()
        with open(os.path.join(env["OUT"], "official_torch.json"), "w") as f:
            json.dump({}, f)

    monkeypatch.setattr(throughput.subprocess, "run", fake_run)
    throughput.official(["T"], [])
    assert "left by a build that was killed midway" in capsys.readouterr().out
    assert not throughput.clear_stale_lock()  # none left: nothing to remove


def test_a_missing_anchor_is_named_before_anything_is_timed(tmp_path, monkeypatch):
    """The anchor script is kept outside the repository: --compare-official without it stops at once, naming it,
    rather than after minutes of JAX timings."""
    monkeypatch.setattr(extension_build, "ROOT", str(tmp_path))
    monkeypatch.setattr(throughput, "inference", lambda *a: pytest.fail("timed before finding the anchor missing"))
    argv = ["throughput.py", "--models", "T", "--batches", "128", "--train-models", "", "--compare-official"]
    monkeypatch.setattr(sys, "argv", argv + ["--out", str(tmp_path / "results.json")])
    with pytest.raises(SystemExit, match=r"\.anchor/official_torch\.py is missing.*not part of this repository"):
        throughput.main()


def test_official_numbers_are_not_paired_with_another_image_size(tmp_path, monkeypatch):
    """The anchor times 224x224 images only: ours at another --size must not be put next to its numbers."""
    timed = []
    monkeypatch.setattr(throughput, "inference", lambda *a: timed.append(a) or dict(img_per_s=1000.0, compile_s=1.0))
    official = tmp_path / "official.json"
    official.write_text(json.dumps({"infer_mamba_vision_T_bs128": 500}))
    argv = ["throughput.py", "--models", "T", "--batches", "128", "--train-models", "", "--size", "160"]
    argv += ["--official-json", str(official), "--out", str(tmp_path / "results.json")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        throughput.main()
    assert not timed


def test_the_recipe_step_runs_micro_batches_of_the_train_batch_and_counts_them_all(tmp_path, monkeypatch):
    """``--train-batch`` rows a micro-batch: an accumulating config's update takes grad_accum_steps of them."""
    from mambavision_jax.train import step as step_lib

    config_file = tmp_path / "accumulating.py"
    config_file.write_text(
        "from tests.train import tiny_config\n\n\ndef get_config():\n"
        "    c = tiny_config.get_config()\n    c.grad_accum_steps = 2\n    return c\n"
    )
    rows, model_inputs = [], step_lib.model_inputs

    def recording_inputs(batch, *args, **kwargs):
        rows.append(int(batch["image"].shape[0]))
        return model_inputs(batch, *args, **kwargs)

    monkeypatch.setattr(step_lib, "model_inputs", recording_inputs)
    result = throughput.recipe(str(config_file), 8, False, None, 0.01)
    assert rows and set(rows) == {8}, rows
    assert result["img_per_s"] * result["step_ms"] / 1e3 == pytest.approx(16)


@pytest.mark.parametrize("kind", ["inference", "training"])
def test_the_bare_steps_count_their_batch(kind):
    """The timed functions themselves, on a tiny model on the CPU: img/s is the batch over the step's time."""
    import jax.numpy as jnp

    from tests.train.tiny_config import TINY_MODEL

    result = getattr(throughput, kind)("mamba_vision_T", 4, jnp.float32, 32, TINY_MODEL, min_window_s=0.01)
    assert result["img_per_s"] * result["step_ms"] / 1e3 == pytest.approx(4)
