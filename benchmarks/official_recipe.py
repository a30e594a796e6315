"""The official training script's step, timed: one iteration of ``train_one_epoch`` in NVlabs/MambaVision's
``mambavision/train.py`` with its ImageNet-1K recipe, on the official PyTorch model, without the data loader's host
work. Compare it with ``python benchmarks/throughput.py --recipe-configs configs/tiny.py,...``, the step that
``main.py`` runs for the same recipe.

    python benchmarks/official_recipe.py [--models T,B] [--batch 128] [--size 224] [--mesa] [--device cuda]

An iteration, as ``train_one_epoch`` runs it with the recipe (``configs/mambavision_*.yaml``: LAMB, AMP, clip 5.0,
EMA 0.9998, mixup/cutmix, random erasing 0.25, ``channels_last``) and timm's prefetching loader (the default):
- the prefetcher's device work: the uint8 batch to float, normalised, then random erasing (``pixel`` mode, one
  Python-level draw an image, as timm's ``RandomErasing`` on a batch does). Mixup/cutmix run in the loader's collate
  (``FastCollateMixup``) on the host, so the soft targets arrive ready; the batch starts on the device, as in
  ``throughput.py``'s recipe rows. (timm issues this work on a side stream, overlapping the previous step; here it
  runs in the step, ~0.1 ms of device time at batch 128);
- ``channels_last``, the forward under fp16 autocast (the recipe's AMP; ``--bfloat`` is off) and
  ``SoftTargetCrossEntropy``;
- ``optimizer.zero_grad()``, then timm's ``NativeScaler``: scaled backward, unscale, ``clip_grad_norm_`` at 5.0,
  the optimizer step (``create_optimizer_v2``: timm's LAMB, lr 5e-3, betas (0.9, 0.999), eps 1e-8, the variant's
  weight decay, none on biases and norms) and the scale update;
- ``ModelEmaV2.update`` (decay 0.9998) and ``torch.cuda.synchronize()``, which the script calls every iteration.
``--mesa`` adds MESA, which the recipe runs from 25 % (B: 30 %) of the epochs on: the EMA model's forward without
gradients and the variant's weight times ``kdloss`` against it (compare ``throughput.py --recipe-mesa``).
Left out: the learning-rate update (a Python loop over two parameter groups) and the loss's ``.item()`` of a
single-process run (the distributed path has none).
On a GPU the selective scan is mamba_ssm's CUDA kernel as the anchor builds it (``.anchor/official_torch.py``,
kept outside this repository); ``--device cpu`` runs the tests' pure-PyTorch scan instead (to check the harness).
Prints a line a model; writes JSON (``--out``, or ``$OUT/official_recipe.json``).
"""

import argparse
import json
import os
import runpy
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from extension_build import anchor_script, clear_stale_lock  # noqa: E402
from throughput import SHORT  # noqa: E402

from mambavision_jax.train.recipe import VARIANTS  # noqa: E402  (the official per-variant weight decay and MESA)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_official(device: str):
    """The official ``mamba_vision`` module with its selective scan provided: on CUDA the anchor's build of
    mamba_ssm's kernel (the anchor runs up to its scan timings and leaves its stand-in for ``mamba_ssm`` installed),
    on the CPU the tests' pure-PyTorch scan (and their torchvision shim for a CPU torch)."""
    if device == "cuda":
        os.environ["SCAN_ONLY"] = "1"
        anchor = anchor_script()
        clear_stale_lock()
        try:
            runpy.run_path(anchor, run_name="anchor")
        except SystemExit as done:  # SCAN_ONLY: the anchor exits after its scan timings
            if done.code not in (0, None):
                raise
    else:
        sys.path.insert(0, os.path.join(ROOT, "tests", "ref_shims"))
        import tv_cpu_fix

        tv_cpu_fix.apply()
    from mambavision.models import mamba_vision

    return mamba_vision


def kd_loss(output, teacher):
    """``kdloss`` of the official ``train.py``: 50 x KL(softmax(teacher / 3) || softmax(output / 3)), batch mean."""
    import torch

    log_p = torch.nn.functional.log_softmax(output / 3, dim=1)
    q = torch.nn.functional.softmax(teacher / 3, dim=1)
    return 50.0 * torch.nn.functional.kl_div(log_p, q, reduction="batchmean")


class OfficialRecipeStep:
    """One ``train_one_epoch`` iteration of the official recipe on ``model`` (see the module docstring)."""

    def __init__(self, model, name: str, batch: int, size: int, device: str, mesa: bool = False, seed: int = 0):
        import torch
        from timm.data.random_erasing import RandomErasing
        from timm.loss import SoftTargetCrossEntropy
        from timm.models import model_parameters
        from timm.optim import create_optimizer_v2
        from timm.utils import ModelEmaV2, NativeScaler

        torch.manual_seed(seed)
        self.torch, self.device = torch, device
        self.model = model.to(device).train().to(memory_format=torch.channels_last)
        self.optimizer = create_optimizer_v2(
            self.model, opt="lamb", lr=5e-3, weight_decay=VARIANTS[name]["weight_decay"], betas=(0.9, 0.999), eps=1e-8
        )
        self.scaler = NativeScaler() if device == "cuda" else NativeScaler(device=device)  # older timm: CUDA only
        self.ema = ModelEmaV2(self.model, decay=0.9998)
        self.loss_fn = SoftTargetCrossEntropy()
        self.erasing = RandomErasing(0.25, mode="pixel", device=device)
        self.parameters = model_parameters(self.model, exclude_head=False)
        self.mean = torch.tensor([255 * m for m in IMAGENET_MEAN], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in IMAGENET_STD], device=device).view(1, 3, 1, 1)
        self.images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        mixed = torch.softmax(4 * torch.randn(batch, 1000, device=device), -1)  # stands in for mixup's soft targets
        self.targets = 0.9 * mixed + 0.1 / 1000
        self.autocast_dtype = torch.float16 if device == "cuda" else torch.bfloat16  # CPU autocast: bf16 only
        self.mesa = VARIANTS[name]["mesa"] if mesa else 0.0

    def loss(self, x):
        """The recipe's loss on normalised ``x`` under autocast: soft-target cross-entropy, plus with MESA its weight
        times ``kd_loss`` against the EMA model's output (computed without gradients), as ``train_one_epoch``."""
        torch = self.torch
        with torch.autocast(self.device, dtype=self.autocast_dtype):
            output = self.model(x)
            loss = self.loss_fn(output, self.targets)
            if self.mesa:
                with torch.no_grad():
                    teacher = self.ema.module(x).detach()
                loss = loss + self.mesa * kd_loss(output, teacher)
        return loss

    def __call__(self):
        """Runs the iteration; returns the loss, a 0-d tensor on the device."""
        torch = self.torch
        x = self.images.float().sub_(self.mean).div_(self.std)
        x = self.erasing(x).contiguous(memory_format=torch.channels_last)
        loss = self.loss(x)
        self.optimizer.zero_grad()
        self.scaler(loss, self.optimizer, clip_grad=5.0, clip_mode="norm", parameters=self.parameters)
        self.ema.update(self.model)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return loss.detach()

    def loss_scale(self) -> float:
        """The GradScaler's current scale (it halves on every step whose gradients overflowed, which is skipped)."""
        return float(self.scaler.state_dict().get("scale", 1.0))


def time_step(step: OfficialRecipeStep, warmup: int, windows: int, steps: int) -> dict:
    """Median seconds an iteration over ``windows`` windows of ``steps`` iterations after ``warmup`` ones. The
    loss scale before and after the windows shows whether overflow-skipped steps fell into them."""
    losses = [step() for _ in range(warmup)]
    scale_before = step.loss_scale()
    seconds = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            losses.append(step())
        seconds.append((time.perf_counter() - start) / steps)
    return dict(
        step_ms=1e3 * float(np.median(seconds)),
        loss_first=float(losses[0]),
        loss_last=float(losses[-1]),
        loss_scale=[scale_before, step.loss_scale()],
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="T,B", help=f"comma list of {', '.join(SHORT)}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--mesa", action="store_true", help="with MESA's EMA-teacher term (later epochs)")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="iterations a timed window")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in SHORT]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; valid: {', '.join(SHORT)}")
    official = load_official(args.device)
    import timm
    import torch

    torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = dict(device=device_name, torch=torch.__version__, timm=timm.__version__)
    print(f"{device_name}, torch {torch.__version__}, timm {timm.__version__} (the official code pins timm 1.0.15)")
    for short in args.models.split(","):
        name = SHORT[short]
        step = OfficialRecipeStep(getattr(official, name)(), name, args.batch, args.size, args.device, args.mesa)
        r = time_step(step, args.warmup, args.windows, args.steps)
        r["img_per_s"] = args.batch / (r["step_ms"] / 1e3)
        mesa = " MESA on" if args.mesa else ""
        results[f"recipe_{name}_bs{args.batch}{'_mesa' if args.mesa else ''}"] = r
        print(
            f"official recipe step {short} batch {args.batch}{mesa}: "
            f"{r['img_per_s']:.0f} img/s ({r['step_ms']:.2f} ms), "
            f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, loss scale {r['loss_scale']}",
            flush=True,
        )
        del step
        if args.device == "cuda":
            torch.cuda.empty_cache()
    out = args.out or os.path.join(os.environ.get("OUT", "."), "official_recipe.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
