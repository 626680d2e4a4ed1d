"""The Gemma 4 model family in Flax Linen: configs, layers, attention, KV cache, base decoder, drafter.

Shape letters. Every array whose shape matters carries its dims as a suffix (`x_BTD`, `logits_BTV`);
a letter means the same thing in every module of the package:

  B  batch rows                           T  positions of a row (queries)
  S  key/value positions (cache slots)    D  width of the module at hand (embed_dim)
  M  the base's width, seen by the drafter (backbone_hidden_size)
  F  MLP hidden width                     E  experts
  V  vocabulary                           C  centroids of the ordered-embedding head
  L  layers                               P  per-layer-embedding (PLE) width
  N  query heads                          K  key/value heads
  G  query heads per K/V head             H  head dim
  A  draft steps (the "K" of speculative decoding in prose and flags: drafts proposed per round)
  J  verify positions of a round (A + 1)  R  decode rounds
  O  output (new) tokens                  Q  prompt tokens
  U  positions of one chunk (chunked attention / chunked loss)
  u  (lower case) chunks of a row (T / U, rounded up): q_uBUNH, one chunk per step of a map
  Z  token slots of centroid lists (V / C per centroid; k * V / C for the masked head's top-k)
  X  tokens, flattened (B * T)            Y  routed rows of the MoE, one per (token, chosen expert)
  I  blocks of the MoE's grouped matmul   W  rows of one such block (`moe.grouped_mlp`, "blocked")
  k  (lower case) the MoE router's top-k: weights_Xk, ids_BTk
  h  (lower case) rotary frequencies of one head (H / 2; H / 4 per axis of the tower's 2-D RoPE)
  m  (lower case) micro-batches of one train step (gradient accumulation)
  x  (lower case) any leading dims: a function of [..., V] is written `logits_xV`
Images (lower case, the vision tower and the image inputs of a row):
  i  image slots of a row (empty slots have all patch positions -1)
  p  patches of one image (the tower's tokens)   s  soft tokens of one image (p / pooling_kernel**2)
  c  values of one patch (3 * patch_size**2)    e.g. pixel_values_Bipc, pixel_positions_Bip2, soft_BisD
  n  soft tokens of a row, its slots flattened (i * s)
  b  the tower's batch: every image slot of the batch, flattened (B * i)
  d  the vision tower's width (its embedder projects d -> D, the text model's)
  q  patches of one image as keys of the tower's attention (scores are [b, K, G, p, q])

Modules: `config` (frozen ModelConfig / DrafterConfig, the HF config mapping), `layers`, `attention`,
`kv_cache`, `moe` (the MoE block: routed and dense), `transformer` (the base), `drafter` (the
assistant), `flops` (the one FLOP model).
"""
