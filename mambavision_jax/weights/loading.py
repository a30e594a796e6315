"""``from_pretrained``: official checkpoints or converted directories -> ``(module, variables)``.

Every source goes through one validation in official-key space: all keys the model expects must be present
with the right shapes, and nothing may be left over; otherwise a CheckpointError names every offending key
and nothing is returned.
"""

import logging
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mambavision_jax.models.mamba_vision import MambaVision
from mambavision_jax.models.registry import check_override_names, create_model, resolve_name
from mambavision_jax.weights.converted import is_converted_dir, load_converted
from mambavision_jax.weights.hub import HUB_SOURCE, download_official
from mambavision_jax.weights.params import (
    expected_torch_keys,
    flat_leaves,
    flax_to_torch_array,
    to_torch_state_dict,
    torch_to_flax_array,
)
from mambavision_jax.weights.readers import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)
HEAD_PREFIX = "head."


def abstract_variables(module: MambaVision) -> dict[str, Any]:
    """Shapes and dtypes of ``module``'s variables, without allocating them."""
    images = jax.ShapeDtypeStruct((1, 64, 64, module.in_chans), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), images)


def load_state_dict(
    state: Mapping[str, np.ndarray],
    module: MambaVision,
    *,
    source: str = "checkpoint",
    replace_head: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Official state_dict -> Flax variables of ``module``; strict, every problem reported at once.

    With ``replace_head`` the checkpoint's ``head.*`` entries are ignored and the head is freshly initialised
    (trunc-normal 0.02 weights, zero bias), as when fine-tuning on another class count.
    """
    abstract = abstract_variables(module)
    expected = expected_torch_keys(abstract)
    leaves = flat_leaves(abstract)
    keep = (lambda k: not k.startswith(HEAD_PREFIX)) if replace_head else (lambda k: True)
    missing = sorted(k for k in expected if keep(k) and k not in state)
    unexpected = sorted(k for k in state if keep(k) and k not in expected)
    mismatched, flat = [], {}
    for key, path in expected.items():
        if not keep(key) or key not in state:
            continue
        want = flax_to_torch_array(path[-1], np.empty(leaves[path].shape, np.uint8)).shape
        if tuple(state[key].shape) != want:
            mismatched.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {want}")
            continue
        flat[path] = torch_to_flax_array(path[-1], np.asarray(state[key], np.float32))
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_report(source, missing, unexpected, mismatched))
    if replace_head and module.num_classes > 0:
        flat.update(_fresh_head(module, seed))
    variables = traverse_util.unflatten_dict(flat)
    return jax.tree.map(jnp.asarray, variables)


def from_pretrained(
    name: Optional[str], source: Optional[str] = None, *, ema: bool = False, seed: int = 0, **overrides: Any
) -> tuple[MambaVision, dict[str, Any]]:
    """Load official or converted weights: ``(module, variables)`` ready for ``module.apply``.

    Args:
      name: registry name or alias (``None``: the name stored in a converted directory).
      source: an official ``.pth``/``.pth.tar`` (``state_dict``/``model``/``state_dict_ema``, ``module.``
        prefixes), a Hugging Face ``model.safetensors`` (with or without ``model.`` prefixes), a directory
        written by ``convert_torch_weights.py``, or ``None`` / ``"hf-hub"``: the official checkpoint of ``name``
        from the Hugging Face Hub (:func:`~mambavision_jax.weights.hub.download_official`, cached after the
        first download).
      ema: take ``state_dict_ema`` from a training checkpoint.
      seed: initialisation seed of a replaced head.
      **overrides: :func:`create_model` overrides. Without ``num_classes`` the model takes the checkpoint head's
        class count; a ``num_classes`` other than the checkpoint's keeps every weight but the head, which is freshly
        initialised (and logged). An unknown model name or override is refused before any download or read.
    """
    if name is not None:
        resolve_name(name)
    check_override_names(overrides)
    if source in (None, HUB_SOURCE):
        if name is None:
            raise ValueError("name is required to download the official weights from the Hugging Face Hub")
        source = download_official(name)
    if is_converted_dir(source):
        manifest, variables = load_converted(source)
        stored = manifest["model_name"]
        if name is not None and resolve_name(name) != stored:
            raise CheckpointError(f"{source!r} holds {stored}, not {resolve_name(name)}")
        name = stored
        overrides = {**manifest.get("overrides", {}), **overrides}
        state = to_torch_state_dict(variables)
    elif name is None:
        raise ValueError("name is required unless source is a converted directory")
    else:
        state = read_checkpoint(source, ema=ema)
    checkpoint_classes = state[HEAD_PREFIX + "bias"].shape[0] if HEAD_PREFIX + "bias" in state else 0
    if checkpoint_classes and "num_classes" not in overrides:  # e.g. a model fine-tuned on 10 classes: its own head
        overrides = {**overrides, "num_classes": checkpoint_classes}
    module = create_model(name, **overrides)
    replace_head = "num_classes" in overrides and overrides["num_classes"] != checkpoint_classes
    if replace_head:
        log.warning(
            "%s: the checkpoint's head has %d classes and the model %d: keeping every other weight and %s.",
            source,
            checkpoint_classes,
            module.num_classes,
            "initialising a new head" if module.num_classes else "dropping the head (the model returns features)",
        )
    return module, load_state_dict(state, module, source=source, replace_head=replace_head, seed=seed)


def _fresh_head(module: MambaVision, seed: int) -> dict[tuple[str, ...], Any]:
    features = module.dim * 2 ** (len(module.depths) - 1)
    head = nn.Dense(module.num_classes, kernel_init=nn.initializers.truncated_normal(0.02))
    params = head.init(jax.random.PRNGKey(seed), jnp.zeros((1, features), jnp.float32))["params"]
    return {("params", "head", k): np.asarray(v) for k, v in params.items()}


def _mismatch_report(source: str, missing, unexpected, mismatched) -> str:
    lines = [f"{source}: the checkpoint does not fit the model; nothing was loaded."]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            lines.append(f"{len(keys)} {title}:")
            lines.extend(f"  {k}" for k in keys)
    return "\n".join(lines)
