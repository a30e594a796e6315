"""Metric sinks: ``<workdir>/metrics.jsonl`` (one JSON object per line), TensorBoard (tensorboardX) and a tqdm
progress bar with ETA. Only process 0 writes; other processes get no-op writers."""

from __future__ import annotations

import json
import math
import os
import time

import jax


def _to_py(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return v
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf: write "nan"/"inf" strings


class MetricWriter:
    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int | None = None,
        initial_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
    ):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:
                self._tb = None
        if progress and total_steps:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, mininterval=1.0)

    def write(self, step: int, split: str, metrics: dict):
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, **{k: _to_py(v) for k, v in metrics.items()}}
        row["time"] = time.time()
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                try:
                    self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
                except (TypeError, ValueError):
                    pass
        if self._bar is not None and split == "train":
            self._bar.set_postfix({k: f"{float(metrics[k]):.4g}" for k in ("loss", "lr") if k in metrics})
        if self._bar is not None and split == "eval" and "top1" in metrics:
            self._bar.write(
                f"step {step} eval: "
                + ", ".join(f"{k}={_to_py(v):.4f}" for k, v in metrics.items() if isinstance(_to_py(v), float))
            )

    def advance(self, step: int):
        if self._bar is not None:
            self._bar.n = int(step)
            self._bar.refresh()

    def log(self, msg: str):
        if self.enabled:
            if self._bar is not None:
                self._bar.write(msg)
            else:
                print(msg, flush=True)

    def close(self):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
