"""Tensor parallelism applied from outside the model: Megatron-style layers over collectives."""
