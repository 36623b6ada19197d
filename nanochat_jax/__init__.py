"""nanochat-jax: Karpathy's nanochat pipeline in JAX/Flax."""

__version__ = "0.1.0"
