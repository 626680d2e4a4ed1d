"""The one FLOP model of the base and its drafter, from their configs.

Counts multiply-accumulates (MACs) of the matmuls a token goes through (projections, MLPs, routed
experts, PLE, LM heads); embedding lookups, norms and softmaxes are free. Two users:

- the eval's cost ratio c = drafter step / base forward per token (`flops_ratio`, context attention
  left out: both pay it, and it depends on the context length), which prices greedy speculative
  decoding's expected speedup E / (K c + 1);
- AOT's model FLOPs per training token (`model_flops_per_token`: 2 FLOPs per MAC, attention scores
  included, forward + backward = 3x forward).
"""

from __future__ import annotations

from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import vision_config


def layer_macs(cfg: config_lib.ModelConfig, i: int) -> int:
  """MACs per token of decoder layer i's projections (attention scores excluded). KV-shared layers
  (every drafter layer) own no K/V projections."""
  d, h = cfg.embed_dim, cfg.layer_head_dim(i)
  macs = 2 * d * cfg.num_heads * h  # q and o
  if not cfg.is_kv_shared(i):
    macs += d * cfg.layer_kv_heads(i) * h * (1 if cfg.layer_k_eq_v(i) else 2)
  macs += 3 * d * cfg.layer_hidden_dim(i)  # gate, up, down
  if cfg.enable_moe:  # the router and the top-k experts a token is sent to
    macs += d * cfg.num_experts + cfg.top_k_experts * 3 * d * cfg.moe_hidden_dim
  if cfg.ple_dim:
    macs += 2 * d * cfg.ple_dim
  return macs


def base_macs(cfg: config_lib.ModelConfig) -> int:
  """MACs per token of one base forward: layers, PLE projection, LM head."""
  macs = sum(layer_macs(cfg, i) for i in range(cfg.num_layers)) + cfg.vocab_size * cfg.embed_dim
  if cfg.ple_dim:
    macs += cfg.embed_dim * cfg.num_layers * cfg.ple_dim
  return macs


def drafter_macs(dcfg: config_lib.DrafterConfig, dense_head: bool = False) -> int:
  """MACs per token of one drafter step: pre-projection [2M, D], layers, post-projection [D, M], and
  the head it drafts with (the centroid-masked head scores C centroids, then k * V / C tokens;
  `dense_head`: the full tied head, as trained)."""
  t = dcfg.text
  d, m, v = t.embed_dim, dcfg.backbone_hidden_size, t.vocab_size
  macs = 2 * m * d + d * m + sum(layer_macs(t, i) for i in range(t.num_layers))
  if dcfg.use_ordered_embeddings and not dense_head:
    macs += d * dcfg.num_centroids + dcfg.centroid_intermediate_top_k * (v // dcfg.num_centroids) * d
  else:
    macs += v * d
  return macs


def flops_ratio(base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
                dense_head: bool = False) -> float:
  """c = FLOPs of one drafter step / FLOPs of one base forward, per token (projections and heads;
  the context attention both pay is left out)."""
  return drafter_macs(dcfg, dense_head) / base_macs(base_cfg)


def attention_flops(cfg: config_lib.ModelConfig, seq: int) -> float:
  """FLOPs per token of the attention scores (QK^T and PV) over a causal row of `seq` tokens:
  sliding layers see min(seq, W) keys, global layers seq / 2 on average."""
  f = 0.0
  for i in range(cfg.num_layers):
    span = min(seq, cfg.sliding_window) if cfg.is_sliding(i) else seq / 2
    f += 2 * 2 * cfg.num_heads * cfg.layer_head_dim(i) * span
  return f


def model_flops_per_token(base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
                          seq: int, num_draft_steps: int, train_base: bool) -> float:
  """Training FLOPs per token: the base forward + backward and K drafter steps (dense head, as
  trained), 2 FLOPs per MAC plus the attention scores. Forward + backward = 3x forward; a frozen
  base still runs its forward (and the backward into nothing), so it counts 1x."""
  base = 2 * base_macs(base_cfg) + attention_flops(base_cfg, seq)
  draft = 2 * drafter_macs(dcfg, dense_head=True) + attention_flops(dcfg.text, seq)
  return (3 if train_base else 1) * base + 3 * num_draft_steps * draft


def vision_flops_per_image(base_cfg: config_lib.ModelConfig, num_patches: int) -> float:
  """Forward FLOPs of the vision tower + projection for one image of `num_patches` patches (padding
  patches included: the tower runs on the whole slot): patch embedding, every encoder layer's
  projections, MLP and bidirectional attention over the patches, and the projection of its
  num_patches / pooling_kernel_size**2 soft tokens into the text width. The 12B's patch embedder
  (`model.unified_vision`): its dense layer and the projection, per patch (= soft token)."""
  v = base_cfg.vision
  if isinstance(v, vision_config.UnifiedVisionConfig):
    return 2.0 * num_patches * v.mm_embed_dim * (v.channels + base_cfg.embed_dim)
  d, h = v.hidden_size, v.head_dim
  layer = (2 * d * v.num_attention_heads * h + 2 * d * v.num_key_value_heads * h
           + 3 * d * v.intermediate_size)
  macs = num_patches * (v.channels * d + v.num_hidden_layers * layer)
  macs += num_patches // v.pooling_kernel_size ** 2 * d * base_cfg.embed_dim
  scores = v.num_hidden_layers * 2 * 2 * v.num_attention_heads * h * num_patches * num_patches
  return 2.0 * macs + scores
