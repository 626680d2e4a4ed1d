"""gemma_mtp_jax: Gemma 4 + its multi-token-prediction drafter in JAX/Flax, trained jointly and
exported to Hugging Face safetensors."""

__version__ = "0.1.0"
