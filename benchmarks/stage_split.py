"""Where the training step's speed-up comes from: each model's step split after its two conv stages, ours and,
with ``--compare-official``, the official PyTorch model's, on one card.

    python benchmarks/stage_split.py --models B,T [--compare-official] [--out split.json]

Three bf16 AdamW training steps at batch ``--batch`` (throughput.py's bare step: cross-entropy on hard labels,
donated state, median of 1 s windows):
- ``conv``: the model cut after stage 2 (:class:`ConvStages`): stem, both conv stages with their downsamples, then
  a BatchNorm, global pooling and a 1000-class head on the (B, H/16, W/16, 4·dim) map;
- ``whole``: the whole model;
- ``rest`` = whole − conv: stages 3-4 (their mixers, attention and MLPs), the final norm and head, and the
  optimizer over their parameters (approximately: the two programs are compiled apart).
``--compare-official`` times the official model's conv part the same way in a PyTorch subprocess (bf16 autocast,
channels_last, fused AdamW, as ``.anchor/official_torch.py`` steps; the part never calls the selective scan, so
the parity tests' pure-PyTorch stand-in serves), and its whole step through the anchor
(``throughput.official``), so every ratio comes from one machine. Prints a table; writes JSON (``--out``, or
``$OUT/stage_split.json``).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mambavision_jax as mvj  # noqa: E402
from mambavision_jax.models.mamba_vision import MambaVision  # noqa: E402
from throughput import SHORT, build_training_of, official  # noqa: E402
from timing import median_seconds  # noqa: E402

CONV_STAGES = 2  # stages 1-2 are ConvBlocks in every variant


class ConvStages(MambaVision):
    """MambaVision cut after its conv stages: ``__call__(images (B, H, W, 3), train) -> logits (B, num_classes)``
    from the stem and stages 1-2 (with both downsamples), then the model's final BatchNorm, pooling and head on
    the (B, H/16, W/16, 4·dim) map. Parameters: ``patch_embed``, ``levels_0``, ``levels_1``, ``norm``, ``head``."""

    def _stages(self, images, train):
        self._check_images(images)
        x = self.patch_embed(images.astype(self.dtype), train)
        features = []
        for level in self.levels[:CONV_STAGES]:
            feature, x = level(x, train)
            features.append(feature)
        return features, x


def conv_stages_of(model: MambaVision) -> ConvStages:
    """``model``'s configuration as a :class:`ConvStages`."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(MambaVision) if f.init}
    fields.pop("parent", None), fields.pop("name", None)
    return ConvStages(**fields)


def step_ms(model, batch: int, size: int) -> dict:
    """Our bare training step of ``model``: ms a step, img/s and compile seconds."""
    run, input_sets, compile_s, _ = build_training_of(model, batch, size)
    seconds = median_seconds(run, input_sets, min_window_s=1.0, windows=5)
    return dict(step_ms=1e3 * seconds, img_per_s=batch / seconds, compile_s=compile_s)


def official_conv_stages(name: str):
    """The official ``name`` (PyTorch module) cut as :class:`ConvStages`: stem, ``levels[:2]`` (each ending in its
    downsample), BatchNorm2d, pooling and a 1000-class Linear on the downsampled map."""
    import torch
    from mambavision.models import mamba_vision as official_models

    whole = getattr(official_models, name)()

    class OfficialConvStages(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = whole.patch_embed
            self.levels = torch.nn.ModuleList(list(whole.levels[:CONV_STAGES]))
            width = whole.levels[CONV_STAGES - 1].downsample.reduction[0].out_channels
            self.norm, self.head = torch.nn.BatchNorm2d(width), torch.nn.Linear(width, 1000)

        def forward(self, x):
            x = self.patch_embed(x)
            for level in self.levels:
                x = level(x)
            return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.norm(x), 1), 1))

    return OfficialConvStages()


def official_step(module, batch: int, size: int, device: str = "cuda"):
    """The official protocol's training step of a PyTorch ``module`` (bf16 autocast, channels_last, fused AdamW on
    a GPU) on fixed random inputs: a closure that runs one step and returns its loss tensor."""
    import torch

    module = module.to(device).train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device == "cuda")
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def official_step_ms(module, batch: int, size: int, windows: int = 5, steps: int = 5, warm: int = 10) -> float:
    """:func:`official_step` on the GPU, ms: median of ``windows`` CUDA-event windows of ``steps`` steps after
    ``warm`` steps (cuDNN autotuning on)."""
    import torch

    torch.backends.cudnn.benchmark = True
    step = official_step(module, batch, size)
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(windows):
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return sorted(times)[windows // 2]


def split_row(conv_ms: float, whole_ms: float) -> dict:
    return dict(conv_ms=conv_ms, whole_ms=whole_ms, rest_ms=whole_ms - conv_ms)


def table(ours: dict, theirs: dict) -> str:
    """Markdown rows: model, part, ours ms, official ms, official/ours (the speed-up)."""
    lines = ["| model | part | ours ms | official ms | speed-up |", "| --- | --- | --- | --- | --- |"]
    for model, row in ours.items():
        for part in ("conv", "rest", "whole"):
            mine, other = row[f"{part}_ms"], theirs.get(model, {}).get(f"{part}_ms")
            cells = [f"{other:.2f}", f"{other / mine:.2f}"] if other else ["", ""]
            lines.append(f"| {model} | {part} | {mine:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _official_conv_worker(models: list, batch: int, size: int) -> None:
    """Subprocess body: prints ``RESULT:{model: conv ms}`` for the official conv parts."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
    sys.path[:0] = [os.path.join(root, "ref_shims")]  # the stand-in mamba_ssm, never called by the conv stages
    result = {m: official_step_ms(official_conv_stages(SHORT[m]), batch, size) for m in models}
    print("RESULT:" + json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="B,T")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--compare-official", action="store_true")
    parser.add_argument("--official-conv-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in SHORT]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(SHORT)}")
    if args.official_conv_worker:
        return _official_conv_worker(models, args.batch, args.size)
    if args.compare_official and (args.batch != 128 or args.size != 224):
        raise SystemExit("--compare-official: the anchor trains at batch 128 and size 224 only")

    ours = {}
    for m in models:
        whole = mvj.create_model(SHORT[m], dtype=jnp.bfloat16)
        conv, full = step_ms(conv_stages_of(whole), args.batch, args.size), step_ms(whole, args.batch, args.size)
        ours[m] = dict(split_row(conv["step_ms"], full["step_ms"]), conv_compile_s=conv["compile_s"],
                       whole_compile_s=full["compile_s"])
        print(m, json.dumps(ours[m]), flush=True)
    theirs = {}
    if args.compare_official:
        worker = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--official-conv-worker", "--models", ",".join(models),
             "--batch", str(args.batch), "--size", str(args.size)],
            check=True, capture_output=True, text=True,
        )
        conv_ms = json.loads(worker.stdout.split("RESULT:")[-1])
        anchor = official(models, models)
        for m in models:
            theirs[m] = split_row(conv_ms[m], 1e3 * args.batch / anchor[f"train_{SHORT[m]}_bs{args.batch}"])
    print(table(ours, theirs))
    path = args.out or os.path.join(os.environ.get("OUT", "/tmp"), "stage_split.json")
    with open(path, "w") as f:
        json.dump(dict(ours=ours, official=theirs, batch=args.batch), f, indent=1)


if __name__ == "__main__":
    main()
