"""Test-only shim: lets PyPI's CUDA torchvision 0.28 import beside the CPU torch 2.13 build.

torchvision's ``_meta_registrations`` registers fake kernels for ``torchvision::nms`` and ``::qnms`` without
checking that its compiled ops loaded; on a CPU torch they did not, and the import fails with
"operator torchvision::nms does not exist". Defining the two schemas first makes the import succeed (the ops
themselves still do not run; nothing in the tests uses them).
"""

_LIBRARY = None


def apply() -> None:
    """Define the torchvision nms/qnms schemas unless torchvision's own ops already did."""
    global _LIBRARY
    import torch

    if _LIBRARY is not None:
        return
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already defined by a real torchvision build
        return
    _LIBRARY = lib
