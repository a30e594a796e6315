"""Training infrastructure: optimizer/schedule, sharding, train state, steps, checkpointing, metrics, loops."""
