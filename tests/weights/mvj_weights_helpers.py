"""Shared constants for the weights tests (imported by name: pytest puts tests/weights on sys.path)."""

# A small official architecture (same code paths as T: conv stages, Mamba and attention blocks, windows).
ARCH = dict(depths=[1, 1, 2, 2], dim=16, in_dim=8, num_heads=[1, 2, 2, 4], window_size=[8, 8, 4, 2])
NAME = "mamba_vision_T"
