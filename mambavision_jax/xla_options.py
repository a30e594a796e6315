"""XLA compiler options that make MambaVision faster on a platform: ``jax.jit(f, compiler_options=...)``.

CPU: XLA:CPU hands dots to YNNPACK by default (``xla_cpu_experimental_ynn_fusion_type`` = individual dot). With
that list emptied XLA runs its own (Eigen) kernels, and on the 2-core AVX2 development machine (AMD EPYC, jax
0.10.2) MambaVision-T's 3x3 convolutions ran 1.6x faster (56.8 -> 34.2 ms for 16 maps of 56x56x80), plain GEMMs the
same, whole-model float32 inference 1.23x (batch 16: 13.1 -> 16.1 img/s) and the demo's training step 1.29x
(``benchmarks/NOTES.md``, session 15). Logits move by ~1e-6 of the largest (another summation order).

Other platforms: no options (None).
"""

from __future__ import annotations

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # an empty list: no YNNPACK fusions


def compiler_options(platform: str | None = None) -> dict | None:
    """The options for ``platform`` ("cpu", "gpu", ...; default: JAX's default backend), or None where there are none.

    >>> step = jax.jit(model.apply, compiler_options=mvj.compiler_options())
    """
    platform = platform or jax.default_backend()
    return dict(CPU_OPTIONS) if platform == "cpu" else None
