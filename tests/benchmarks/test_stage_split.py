"""benchmarks/stage_split.py: the two cuts (ours and the official's) compute the same function, so the split
compares like with like; the table's arithmetic; the command line without a card (timed steps stood in for)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import stage_split  # noqa: E402

import mambavision_jax as mvj  # noqa: E402
from mambavision_jax.weights.loading import load_state_dict  # noqa: E402


def test_our_cut_holds_only_the_conv_stages_and_the_classifier():
    cut = stage_split.conv_stages_of(mvj.create_model("mamba_vision_T", num_classes=7))
    variables = cut.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert sorted(variables["params"]) == ["head", "levels_0", "levels_1", "norm", "patch_embed"]
    assert variables["params"]["head"]["kernel"].shape == (320, 7)  # 4·dim channels at stride 16
    assert cut.apply(variables, jnp.zeros((2, 64, 64, 3))).shape == (2, 7)
    with pytest.raises(ValueError, match="rank 4"):
        cut.apply(variables, jnp.zeros((64, 64, 3)))


def test_both_cuts_give_the_same_logits_from_the_same_randomised_weights():
    from official_reference import randomise, state_dict_numpy, torch

    official = randomise(stage_split.official_conv_stages("mamba_vision_T"), seed=3).eval()
    state = state_dict_numpy(official)
    ours = stage_split.conv_stages_of(mvj.create_model("mamba_vision_T"))
    variables = load_state_dict(state, ours, source="the official conv stages")
    images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = official(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(ours.apply(variables, jnp.asarray(images)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_the_official_cut_trains_under_the_anchors_protocol():
    """The timed official step (bf16 autocast, AdamW) run on the CPU: it trains every parameter of the cut."""
    from official_reference import torch

    torch.manual_seed(0)
    cut = stage_split.official_conv_stages("mamba_vision_T")
    before = {k: v.detach().clone() for k, v in cut.named_parameters()}
    step = stage_split.official_step(cut, batch=2, size=32, device="cpu")
    losses = [float(step().detach()) for _ in range(2)]
    assert all(np.isfinite(losses))
    assert all(not torch.equal(before[k], v) for k, v in cut.named_parameters())


def test_the_table_gives_rest_as_whole_minus_conv_and_the_speedups():
    ours = {"B": stage_split.split_row(14.0, 39.5)}
    theirs = {"B": stage_split.split_row(21.0, 72.5)}
    assert ours["B"]["rest_ms"] == pytest.approx(25.5)
    rows = stage_split.table(ours, theirs).splitlines()
    assert rows[2] == "| B | conv | 14.00 | 21.00 | 1.50 |"
    assert rows[3] == "| B | rest | 25.50 | 51.50 | 2.02 |"
    assert rows[4] == "| B | whole | 39.50 | 72.50 | 1.84 |"
    assert stage_split.table(ours, {}).splitlines()[2] == "| B | conv | 14.00 |  |  |"


def test_the_command_line_times_both_cuts_and_writes_json(tmp_path, monkeypatch, capsys):
    timed = []

    def fake_step_ms(model, batch, size):
        timed.append((type(model).__name__, model.dtype, batch, size))
        ms = 10.0 if isinstance(model, stage_split.ConvStages) else 30.0
        return dict(step_ms=ms, img_per_s=batch / ms * 1e3, compile_s=1.0)

    monkeypatch.setattr(stage_split, "step_ms", fake_step_ms)
    out = tmp_path / "split.json"
    monkeypatch.setattr(sys, "argv", ["stage_split.py", "--models", "T", "--batch", "8", "--out", str(out)])
    stage_split.main()
    assert timed == [("ConvStages", jnp.bfloat16, 8, 224), ("MambaVision", jnp.bfloat16, 8, 224)]
    assert json.loads(out.read_text())["ours"]["T"]["rest_ms"] == 20.0
    assert "| T | rest | 20.00 |" in capsys.readouterr().out
    for argv, message in ((["--models", "X"], "unknown model"), (["--compare-official", "--batch", "64"], "128")):
        monkeypatch.setattr(sys, "argv", ["stage_split.py", *argv])
        with pytest.raises(SystemExit, match=message):
            stage_split.main()


def test_compare_official_refuses_a_size_the_anchor_does_not_train_at(monkeypatch):
    """The anchor's whole step is at 224x224: ours (and the official conv part) at another --size would not pair."""
    monkeypatch.setattr(stage_split, "step_ms", lambda *a: pytest.fail("timed a step"))
    monkeypatch.setattr(stage_split.subprocess, "run", lambda *a, **k: pytest.fail("ran the official side"))
    monkeypatch.setattr(stage_split, "official", lambda *a: pytest.fail("ran the anchor"))
    monkeypatch.setattr(sys, "argv", ["stage_split.py", "--models", "T", "--compare-official", "--size", "160"])
    with pytest.raises(SystemExit, match="224"):
        stage_split.main()
