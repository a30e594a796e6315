"""Registry of the 11 official MambaVision variants, their friendly aliases and pretrained configs.

Variant hyper-parameters and preprocessing come from the official ``mambavision/models/mamba_vision.py``
(PyPI ``mambavision==1.2.0``): see ``shared/reference/official-mambavision.md`` §1.
"""

import dataclasses
import difflib
import fnmatch
from typing import Any, Optional

from mambavision_jax.models.mamba_vision import MambaVision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_URL = "https://huggingface.co/nvidia/{repo}/resolve/main/{file}"


@dataclasses.dataclass(frozen=True)
class Variant:
    """Architecture and preprocessing of one registered model."""

    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: tuple[int, ...]
    dim: int
    in_dim: int
    drop_path_rate: float
    layer_scale: Optional[float]
    input_size: int = 224
    crop_pct: float = 1.0
    crop_mode: str = "center"
    hf_repo: str = ""
    hf_file: str = ""

    def architecture(self) -> dict[str, Any]:
        return dict(
            depths=self.depths,
            num_heads=self.num_heads,
            window_size=self.window_size,
            dim=self.dim,
            in_dim=self.in_dim,
            mlp_ratio=4.0,
            drop_path_rate=self.drop_path_rate,
            layer_scale=self.layer_scale,
            layer_scale_conv=None,
        )


_SMALL_HEADS, _LARGE_HEADS = (2, 4, 8, 16), (4, 8, 16, 32)
_WIN = (8, 8, 14, 7)
_B = dict(
    depths=(3, 3, 10, 5),
    num_heads=_SMALL_HEADS,
    window_size=_WIN,
    dim=128,
    in_dim=64,
    drop_path_rate=0.3,
    layer_scale=1e-5,
)
_L = dict(_B, num_heads=_LARGE_HEADS, dim=196)
_L2 = dict(_L, depths=(3, 3, 12, 5))
_L3 = dict(depths=(3, 3, 20, 10), num_heads=_LARGE_HEADS, dim=256, in_dim=64, drop_path_rate=0.5, layer_scale=1e-5)

VARIANTS: dict[str, Variant] = {
    "mamba_vision_T": Variant(
        (1, 3, 8, 4),
        _SMALL_HEADS,
        _WIN,
        80,
        32,
        0.2,
        None,
        hf_repo="MambaVision-T-1K",
        hf_file="mambavision_tiny_1k.pth.tar",
    ),
    "mamba_vision_T2": Variant(
        (1, 3, 11, 4),
        _SMALL_HEADS,
        _WIN,
        80,
        32,
        0.2,
        None,
        crop_pct=0.98,
        hf_repo="MambaVision-T2-1K",
        hf_file="mambavision_tiny2_1k.pth.tar",
    ),
    "mamba_vision_S": Variant(
        (3, 3, 7, 5),
        _SMALL_HEADS,
        _WIN,
        96,
        64,
        0.2,
        None,
        crop_pct=0.93,
        hf_repo="MambaVision-S-1K",
        hf_file="mambavision_small_1k.pth.tar",
    ),
    "mamba_vision_B": Variant(**_B, hf_repo="MambaVision-B-1K", hf_file="mambavision_base_1k.pth.tar"),
    "mamba_vision_B_21k": Variant(**_B, hf_repo="MambaVision-B-21K", hf_file="mambavision_base_21k.pth.tar"),
    "mamba_vision_L": Variant(**_L, hf_repo="MambaVision-L-1K", hf_file="mambavision_large_1k.pth.tar"),
    "mamba_vision_L_21k": Variant(**_L, hf_repo="MambaVision-L-21K", hf_file="mambavision_large_21k.pth.tar"),
    "mamba_vision_L2": Variant(**_L2, hf_repo="MambaVision-L2-1K", hf_file="mambavision_large2_1k.pth.tar"),
    "mamba_vision_L2_512_21k": Variant(
        **dict(_L2, window_size=(8, 8, 32, 16)),
        input_size=512,
        crop_pct=0.93,
        crop_mode="squash",
        hf_repo="MambaVision-L2-512-21K",
        hf_file="mambavision_L2_21k_240m_512.pth.tar",
    ),
    "mamba_vision_L3_256_21k": Variant(
        **_L3,
        window_size=(8, 8, 16, 8),
        input_size=256,
        hf_repo="MambaVision-L3-256-21K",
        hf_file="mambavision_L3_21k_740m_256.pth.tar",
    ),
    "mamba_vision_L3_512_21k": Variant(
        **_L3,
        window_size=(8, 8, 32, 16),
        input_size=512,
        crop_pct=0.93,
        crop_mode="squash",
        hf_repo="MambaVision-L3-512-21K",
        hf_file="mambavision_L3_21k_740m_512.pth.tar",
    ),
}

ALIASES: dict[str, str] = {
    "mambavision_tiny": "mamba_vision_T",
    "mambavision_tiny2": "mamba_vision_T2",
    "mambavision_small": "mamba_vision_S",
    "mambavision_base": "mamba_vision_B",
    "mambavision_base_21k": "mamba_vision_B_21k",
    "mambavision_large": "mamba_vision_L",
    "mambavision_large_21k": "mamba_vision_L_21k",
    "mambavision_large2": "mamba_vision_L2",
    "mambavision_large2_512_21k": "mamba_vision_L2_512_21k",
    "mambavision_large3_256_21k": "mamba_vision_L3_256_21k",
    "mambavision_large3_512_21k": "mamba_vision_L3_512_21k",
}
# Hugging Face repository names (nvidia/MambaVision-T-1K, ...) resolve too.
ALIASES.update({v.hf_repo.lower(): k for k, v in VARIANTS.items()})
ALIASES.update({f"nvidia/{v.hf_repo.lower()}": k for k, v in VARIANTS.items()})

_MODEL_FIELDS = {f.name for f in dataclasses.fields(MambaVision) if f.name not in ("parent", "name")}


def list_models(filter: str = "", *, include_aliases: bool = False) -> list[str]:
    """The registered official names (and the aliases, if asked), as timm's ``list_models``: only those matching
    the shell-style pattern ``filter`` (e.g. ``"mamba_vision_L*"``) if one is given."""
    if not isinstance(filter, str):
        raise TypeError(f"filter must be a name pattern such as 'mamba_vision_L*'; got {filter!r}")
    names = list(VARIANTS)
    if include_aliases:
        names += sorted(a for a in ALIASES if "/" not in a and "-" not in a)
    return [n for n in names if fnmatch.fnmatchcase(n, filter)] if filter else names


def resolve_name(name: str) -> str:
    """Official name for ``name`` (an official name, an alias or a HF repo name); ValueError listing the
    valid names otherwise."""
    if name in VARIANTS:
        return name
    if name.lower() in ALIASES:
        return ALIASES[name.lower()]
    valid = list_models(include_aliases=True)
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown MambaVision model {name!r}.{hint} Valid names: {', '.join(valid)}.")


def check_override_names(overrides: dict[str, Any]) -> None:
    """ValueError naming every key of ``overrides`` that is not a :class:`MambaVision` field."""
    unknown = sorted(set(overrides) - _MODEL_FIELDS)
    if unknown:
        raise ValueError(f"Unknown override(s) {unknown} for create_model; valid: {sorted(_MODEL_FIELDS)}.")


def create_model(name: str, **overrides: Any) -> MambaVision:
    """An uninitialised :class:`MambaVision` linen module for ``name`` with keyword overrides.

    Overrides are any :class:`MambaVision` field: ``num_classes``, ``drop_path_rate``, ``window_size``,
    ``depths``, ``dim``, ``dtype``, ``scan_impl``, ... Unknown keywords raise a ValueError naming them.
    """
    variant = VARIANTS[resolve_name(name)]
    check_override_names(overrides)
    kwargs = dict(variant.architecture(), **overrides)
    for key in ("depths", "num_heads", "window_size"):
        kwargs[key] = tuple(int(v) for v in kwargs[key])
    if not len(kwargs["depths"]) == len(kwargs["num_heads"]) == len(kwargs["window_size"]) == 4:
        raise ValueError("depths, num_heads and window_size must each have 4 entries (one per stage).")
    for key in ("num_heads", "window_size"):
        if min(kwargs[key]) < 1:
            raise ValueError(f"{key} must be >= 1 in every stage; got {kwargs[key]}")
    if int(kwargs.get("num_classes", 0)) < 0:
        raise ValueError(f"num_classes must be >= 0 (0: no head, pooled features); got {kwargs['num_classes']}")
    return MambaVision(**kwargs)


def pretrained_cfg(name: str) -> dict[str, Any]:
    """Preprocessing of the official checkpoint of ``name`` (timm pretrained_cfg semantics)."""
    variant = VARIANTS[resolve_name(name)]
    return dict(
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=(3, variant.input_size, variant.input_size),
        crop_pct=variant.crop_pct,
        crop_mode=variant.crop_mode,
        interpolation="bicubic",
        num_classes=1000,
        url=HF_URL.format(repo=variant.hf_repo, file=variant.hf_file),
    )
