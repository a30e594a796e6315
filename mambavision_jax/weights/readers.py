"""Readers for the official checkpoint files: torch ``.pth``/``.pth.tar`` and Hugging Face ``.safetensors``.

Both return a flat ``{official key: float32 numpy array}`` with wrapper prefixes removed (``module.`` from DDP,
``model.`` from the Hugging Face wrapper). Safetensors needs no torch; torch files import torch lazily and are
read with ``torch.load(weights_only=True)``.
"""

import argparse
import json
import os
import struct
from typing import Mapping

import ml_dtypes  # registers bfloat16 with numpy, so that safetensors.numpy reads BF16 tensors
import numpy as np

from mambavision_jax.weights.params import IGNORED_SUFFIXES

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_MAGIC = b"\x80"  # torch.save's legacy pickle format (then the protocol byte, 2-5)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def detect_format(path: str) -> str:
    """``"torch"`` or ``"safetensors"`` from the file's first bytes; CheckpointError for anything else."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:  # safetensors: little-endian u64 header size, then the JSON header
        (header_size,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_size < os.path.getsize(path):
            return "safetensors"
    if head.startswith(ZIP_MAGIC) or (head[:1] == PICKLE_MAGIC and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "torch"
    raise CheckpointError(
        f"{path!r} is neither a PyTorch checkpoint (.pth/.pth.tar, torch.save) nor a safetensors file"
    )


def read_checkpoint(path: str, ema: bool = False) -> dict[str, np.ndarray]:
    """The official state_dict stored in ``path`` (EMA weights with ``ema=True``, torch files only)."""
    fmt = detect_format(path)
    if fmt == "safetensors":
        if ema:
            raise CheckpointError(
                f"{path!r} is a safetensors file, which holds one set of weights; --ema/ema=True "
                f"applies to .pth.tar training checkpoints that carry 'state_dict_ema'"
            )
        return _strip_prefix(_read_safetensors(path), "model.")
    return _strip_prefix(_read_torch(path, ema), "module.")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or malformed files
        raise CheckpointError(f"could not read {path!r} as safetensors: {e}") from e
    return {
        k: v.astype(np.float32)
        for k, v in tensors.items()
        if np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16  # bfloat16 is no np.floating
    }


def _read_torch(path: str, ema: bool) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading .pth/.pth.tar checkpoints needs PyTorch: pip install 'mambavision-jax[torch]' "
            "(or convert the Hugging Face model.safetensors, which needs no torch)"
        ) from e
    try:
        # timm's CheckpointSaver (the official train.py) stores its argparse.Namespace under 'args'
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle/zip/runtime errors for corrupt or unsafe files
        raise CheckpointError(f"could not read {path!r} as a PyTorch checkpoint: {e}") from e
    state = _select_state_dict(checkpoint, path, ema)
    return {
        k: v.detach().to(torch.float32).numpy()
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point()
    }


def _select_state_dict(checkpoint, path: str, ema: bool) -> Mapping:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(checkpoint).__name__}, not a state_dict or checkpoint dict")
    if ema:
        if "state_dict_ema" not in checkpoint:
            raise CheckpointError(
                f"{path!r} has no 'state_dict_ema' (EMA weights); its top-level keys are "
                f"{sorted(map(str, checkpoint))[:10]}"
            )
        return checkpoint["state_dict_ema"]
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return checkpoint[key]
    return checkpoint


def _strip_prefix(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}


def read_json(path: str) -> dict:
    """A JSON file, with a CheckpointError naming the file when it is missing or malformed."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"could not read {path!r}: {e}") from e
