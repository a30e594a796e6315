"""The official PyTorch MambaVision (PyPI ``mambavision==1.2.0``) with every parameter and BN statistic
randomised, for logit-parity tests. A freshly initialised model hides mistakes (gammas 1e-5, zero dt bias, unit
BN statistics), so every tensor is redrawn at a scale that keeps activations O(1)."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
official = pytest.importorskip("mambavision.models.mamba_vision")


def randomise(model: "torch.nn.Module", seed: int) -> "torch.nn.Module":
    """Redraw every parameter and buffer of ``model`` in place (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        return torch.rand(t.shape, generator=g) * (hi - lo) + lo

    with torch.no_grad():
        for key, t in model.state_dict().items():
            leaf = key.rsplit(".", 1)[-1]
            if leaf == "num_batches_tracked":
                continue
            if t.ndim >= 2 and leaf == "weight":
                fan_in = math.prod(t.shape[1:])
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
            elif leaf == "A_log":
                t.copy_(torch.log(uniform(t, 0.5, 12.0)))
            elif leaf == "D":
                t.copy_(uniform(t, -1.0, 2.0))
            elif leaf.startswith("gamma"):
                t.copy_(uniform(t, 0.2, 1.0))
            elif leaf == "running_var":
                t.copy_(uniform(t, 0.5, 2.0))
            elif leaf == "running_mean":
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif leaf == "weight":  # BatchNorm / LayerNorm scale
                t.copy_(uniform(t, 0.6, 1.4))
            elif key.endswith("dt_proj.bias"):
                t.copy_(uniform(t, -3.0, 0.5))
            elif leaf == "bias":
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            else:
                raise AssertionError(f"randomise() does not know how to redraw {key}")
    return model


def official_model(name: str, seed: int = 0, **kwargs) -> "torch.nn.Module":
    """The official model ``name`` in eval mode, randomised."""
    model = getattr(official, name)(pretrained=False, **kwargs)
    return randomise(model, seed).eval()


def torch_logits(model, images_nhwc: np.ndarray) -> np.ndarray:
    """Run the official model on NHWC float32 images; returns float32 numpy logits."""
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        return model(x).float().numpy()


def state_dict_numpy(model) -> dict:
    """The model's state_dict as float numpy arrays (num_batches_tracked dropped)."""
    return {
        k: v.detach().float().numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
