"""benchmarks/official_recipe.py: the official training script's iteration on the CPU (the tests' scan), checked
piece by piece against the recipe, and a command-line run."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
official = pytest.importorskip("mambavision.models.mamba_vision")

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import official_recipe  # noqa: E402


def small_official_model():
    """A small official MambaVision (every stage kind) for 64² inputs."""
    return official.MambaVision(
        dim=32, in_dim=16, depths=[1, 1, 2, 1], window_size=[8, 8, 4, 2], mlp_ratio=2.0, num_heads=[1, 2, 4, 4],
        drop_path_rate=0.0, num_classes=1000,
    )  # fmt: skip


@pytest.fixture(scope="module")
def small_step():
    """The iteration on the small model at 64²."""
    return official_recipe.OfficialRecipeStep(small_official_model(), "mamba_vision_B", batch=4, size=64, device="cpu")


def test_kd_loss_is_the_official_kdloss():
    output, teacher = torch.randn(3, 10), torch.randn(3, 10)
    p, q = torch.softmax(output / 3, 1), torch.softmax(teacher / 3, 1)
    expected = 50.0 * float((q * (q.log() - p.log())).sum()) / 3
    assert float(official_recipe.kd_loss(output, teacher)) == pytest.approx(expected, rel=1e-5)


def test_mesa_adds_the_variants_weight_times_kd_against_the_ema_model():
    step = official_recipe.OfficialRecipeStep(
        small_official_model(), "mamba_vision_L", batch=2, size=64, device="cpu", mesa=True
    )
    assert step.mesa == 6.0  # L's MESA weight in the recipe
    with torch.no_grad():  # make the EMA teacher differ from the student
        for p in step.ema.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        loss = step.loss(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, teacher = step.model(x), step.ema.module(x)
            expected = step.loss_fn(output, step.targets) + 6.0 * official_recipe.kd_loss(output, teacher)
    assert float(official_recipe.kd_loss(output, teacher)) > 0.01
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


def test_lamb_decays_the_weights_but_not_biases_and_norms(small_step):
    groups = small_step.optimizer.param_groups
    assert type(small_step.optimizer).__name__ == "Lamb"
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.075]  # B's decay from the recipe
    assert all(g["lr"] == 5e-3 and g["betas"] == (0.9, 0.999) for g in groups)
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)["params"]
    assert no_decay and all(p.ndim <= 1 for p in no_decay)
    decayed = next(g for g in groups if g["weight_decay"] > 0)["params"]
    assert all(p.ndim > 1 for p in decayed)


def test_an_iteration_steps_the_model_and_moves_the_ema_by_its_decay(small_step):
    model, ema = small_step.model, small_step.ema.module
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema_before = {k: v.detach().clone() for k, v in ema.state_dict().items()}
    loss = small_step()
    assert torch.isfinite(loss)
    after, ema_after = model.state_dict(), ema.state_dict()
    weight = "levels.2.blocks.0.mixer.in_proj.weight"
    assert not torch.equal(after[weight], before[weight])  # the scaler did not skip the optimizer step
    for key in (weight, "levels.0.blocks.0.norm1.running_mean"):
        expected = 0.9998 * ema_before[key] + (1 - 0.9998) * after[key]
        # within float32 rounding (2 ulps of the largest value): the default atol (1e-5) let an EMA that never moved
        # pass, its moves being 2e-8 (the weight) and 9e-6 (the running mean, from 0)
        atol = 2 * torch.finfo(torch.float32).eps * float(expected.abs().max())
        torch.testing.assert_close(ema_after[key], expected, rtol=0, atol=atol)


def test_command_line_writes_a_row_a_model(tmp_path):
    out = tmp_path / "recipe.json"
    result = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "official_recipe.py"), "--device", "cpu", "--models", "T",
         "--batch", "2", "--size", "64", "--warmup", "1", "--windows", "1", "--steps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["timm"] and results["torch"]
    row = results["recipe_mamba_vision_T_bs2"]
    assert row["step_ms"] > 0 and row["img_per_s"] == pytest.approx(2 / (row["step_ms"] / 1e3))
    assert "official recipe step T batch 2" in result.stdout
