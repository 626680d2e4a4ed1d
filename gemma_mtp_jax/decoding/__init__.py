"""Decoding a Gemma 4 base with its assistant drafter.

  sampling     greedy / temperature / top-k / top-p filters, lossless acceptance, GenerateError
  inputs       request checks, prompt padding, image slots
  speculative  prefill + one jitted decode loop (`decode_prompts`: what `generate`, the trainer's
               eval and the decode benchmark run)
  request      one request from model dirs and a prompt: loading a pair, the default stop ids,
               the chat encoder, the JSON report (`python -m gemma_mtp_jax.generate`'s body)
"""
