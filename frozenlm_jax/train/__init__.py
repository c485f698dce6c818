"""Training: parameter labels and the optimizer partition, the sharded step."""
