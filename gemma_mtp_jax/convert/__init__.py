"""Converters between HF Gemma 4 safetensors and gemma_mtp_jax Flax params."""
