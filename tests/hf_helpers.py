"""Builders shared by the HF-parity tests: tiny random HF Gemma 4 models (no downloads)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.model import config as config_lib

S, F = config_lib.SLIDING, config_lib.FULL

# Small configs covering every released variant's features.
VARIANTS = {
    # E2B/E4B-style: PLE + KV sharing + double-wide MLP + sliding/global mix.
    "e_style": dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, global_head_dim=32,
        layer_types=[S, S, F, S, S, F, F], sliding_window=6, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=256, num_kv_shared_layers=3, use_double_wide_mlp=True,
        final_logit_softcapping=30.0),
    # 26B-A4B-style: MoE + k_eq_v global layers with fewer global kv heads.
    "moe": dict(
        vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=[S, S, S, F],
        sliding_window=5, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=24,
        final_logit_softcapping=30.0),
    # 31B-style: k_eq_v global layers, no PLE, no KV sharing.
    "k_eq_v": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=[S, S, F, S, S, F],
        sliding_window=4, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
        final_logit_softcapping=30.0),
    # 12B-style ("gemma4_unified"): k_eq_v global layers with one global kv head, no PLE, no MoE,
    # no KV sharing; the last sliding layer (4) sits right before the last full one (5), as 46/47
    # do in the 12B.
    "unified": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=[S, S, S, F, S, F],
        sliding_window=4, final_logit_softcapping=30.0),
}


# The transformers family of each variant (the others: gemma4).
VARIANT_FAMILY = {"unified": hf_config.UNIFIED}


def family_of(variant: str) -> hf_config.Family:
  return hf_config.FAMILIES[VARIANT_FAMILY.get(variant, hf_config.GEMMA4)]


def hf_text_config(variant: str, **over):
  """A tiny text config of the variant's family (`Gemma4TextConfig`, `Gemma4UnifiedTextConfig`),
  eager attention."""
  kw = dict(VARIANTS[variant])
  kw.update(over)
  cfg = getattr(transformers, family_of(variant).text_config_class)(**kw)
  cfg._attn_implementation = "eager"
  return cfg


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
  """Non-trivial values for every tensor (norm scales, layer scalars, router scales too), so a
  wrong layout or a forgotten scale shows up in the outputs."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 or "scale" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(std * torch.randn(p.shape, generator=g) / max(1.0, p.shape[-1] ** 0.5) * 4)
    for name, b in model.named_buffers():
      if name.endswith("layer_scalar"):
        b.copy_(1.0 + 0.1 * torch.randn(b.shape, generator=g))
  return model


def hf_causal_lm(variant: str, seed: int = 0, **over):
  """A tiny random `Gemma4ForCausalLM` (or its family's class). Build it inside
  `hf_torch.hf_assistant_patch` to get the store layers an assistant reads from a base that shares
  no K/V."""
  torch.manual_seed(seed)
  cfg = hf_text_config(variant, **over)
  model = getattr(transformers, family_of(variant).causal_lm)(cfg).eval().float()
  return randomize_(model, seed)


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def hf_unified_assistant_config(vocab_size: int = 256, backbone: int = 64, ordered: bool = False,
                                **text_over) -> dict:
  """A `hf_config.drafter_config_to_hf`-style dict of a tiny 12B-style assistant ([s, s, s, f],
  reading the "unified" variant's K/V: kv heads 2 / 1, head_dim 16 / 32, k_eq_v)."""
  text = dict(model_type="gemma4_unified_text", vocab_size=vocab_size, hidden_size=32,
              intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
              attention_k_eq_v=True, layer_types=[S, S, S, F], sliding_window=4,
              num_kv_shared_layers=4, final_logit_softcapping=None)
  text.update(text_over)
  return dict(model_type="gemma4_unified_assistant", text_config=text,
              backbone_hidden_size=backbone, use_ordered_embeddings=ordered, num_centroids=16,
              centroid_intermediate_top_k=4)


def hf_unified_assistant(vocab_size: int = 256, ordered: bool = False, seed: int = 5):
  """A tiny random `Gemma4UnifiedAssistantForCausalLM` for the "unified" variant (a random token
  ordering when `ordered`)."""
  from gemma_mtp_jax import hf_torch
  assistant = hf_torch.hf_assistant(
      hf_unified_assistant_config(vocab_size=vocab_size, ordered=ordered), seed=1)
  randomize_(assistant, seed=seed)
  if ordered:
    perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(3))
    assistant.masked_embedding.token_ordering.copy_(perm)
  return assistant


def hf_unified_multimodal(seed: int = 3, **text_over):
  """A tiny random `Gemma4UnifiedForConditionalGeneration`: the "unified" text model, a patch
  embedder of 8 x 8 model patches, an audio embedder (carried through by the converters)."""
  cfg = transformers.Gemma4UnifiedConfig(
      text_config=hf_text_config("unified", **text_over).to_dict(),
      vision_config=dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=16, mm_posemb_size=32,
                         output_proj_dims=16),
      audio_config=dict(audio_embed_dim=8))
  torch.manual_seed(seed)
  model = transformers.Gemma4UnifiedForConditionalGeneration(cfg).eval()
  return randomize_(model, seed=seed)


def jax_pair_from_hf(target: torch.nn.Module, assistant: torch.nn.Module):
  """(base config, drafter config, params {"base", "drafter"} as jax arrays, the drafter's
  variables with its "buffers") converted from an HF base + assistant: the JAX side of every "ours == HF's torch composite" test."""
  import jax
  import jax.numpy as jnp

  from gemma_mtp_jax import hf_torch
  from gemma_mtp_jax.checkpoint import hf_assistant as convert_drafter
  from gemma_mtp_jax.checkpoint import hf_base as convert_base

  base = hf_config.model_config_from_hf(target.config.to_dict())
  params = {"base": convert_base.state_dict_to_params(base, numpy_state(target))}
  with hf_torch.hf_assistant_patch():
    dcfg = hf_config.drafter_config_from_hf(assistant.config.to_dict())
  variables = convert_drafter.state_dict_to_variables(dcfg, numpy_state(assistant))
  params["drafter"] = variables["params"]
  return base, dcfg, jax.tree.map(jnp.asarray, params), variables



# google/gemma-4-12B's released configs (the 12B family, `configs/12b.py`). The text_config as
# transformers 5.10 wrote it: global_head_dim and num_global_key_value_heads, and the PLE / MoE keys
# its config class no longer has.
_ROPE = {S: {"rope_type": "default", "rope_theta": 10000.0},
         F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}
RELEASED_12B_TEXT = dict(
    model_type="gemma4_unified_text", vocab_size=262144, hidden_size=3840, intermediate_size=15360,
    num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8,
    num_global_key_value_heads=1, head_dim=256, global_head_dim=512, attention_k_eq_v=True,
    layer_types=[F if (i + 1) % 6 == 0 else S for i in range(48)], sliding_window=1024,
    rope_parameters=_ROPE, final_logit_softcapping=30.0, max_position_embeddings=262144,
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
    num_kv_shared_layers=0, use_double_wide_mlp=False, hidden_size_per_layer_input=0,
    vocab_size_per_layer_input=262144, enable_moe_block=False, num_experts=None,
    top_k_experts=None, moe_intermediate_size=None, use_bidirectional_attention="vision",
    pad_token_id=0, bos_token_id=2, eos_token_id=1)
RELEASED_12B_BASE = dict(
    model_type="gemma4_unified", architectures=["Gemma4UnifiedForConditionalGeneration"],
    text_config=RELEASED_12B_TEXT, tie_word_embeddings=True,
    vision_config=dict(model_type="gemma4_unified_vision", patch_size=16, pooling_kernel_size=3,
                       mm_embed_dim=3840, mm_posemb_size=1120, output_proj_dims=3840),
    audio_config=dict(model_type="gemma4_unified_audio", audio_embed_dim=640))
RELEASED_12B_ASSISTANT = dict(
    model_type="gemma4_unified_assistant", architectures=["Gemma4UnifiedAssistantForCausalLM"],
    backbone_hidden_size=3840, use_ordered_embeddings=False, num_centroids=2048,
    centroid_intermediate_top_k=32, tie_word_embeddings=True,
    text_config=dict(
        model_type="gemma4_unified_text", vocab_size=262144, hidden_size=1024,
        intermediate_size=8192, num_hidden_layers=4, layer_types=[S, S, S, F],
        num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=1, head_dim=256,
        global_head_dim=512, attention_k_eq_v=True, sliding_window=1024, num_kv_shared_layers=4,
        final_logit_softcapping=None, rope_parameters=_ROPE, max_position_embeddings=262144))


def with_12b_embedder(base):
  """The 12B with its released image front end (`model.unified_vision`) and token ids."""
  from gemma_mtp_jax.model import vision_config
  return base.replace(vision=vision_config.UnifiedVisionConfig(), image_token_id=258_880,
                      boi_token_id=255_999, eoi_token_id=258_882, video_token_id=258_884,
                      audio_token_id=258_881)
