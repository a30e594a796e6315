"""MambaVision in JAX/Flax."""
