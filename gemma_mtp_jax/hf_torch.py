"""The torch / Hugging Face side of the project, in one place: what the trainer's optional HF check,
the benchmarks and the parity tests need from `transformers` beyond loading a model.

  hf_assistant_patch   lets transformers 5.23 build Gemma 4 assistants (every layer KV-shared: its
                       `kv_sharing_modes` raises for them) and run them with bases that share no
                       K/V (12B, 26B-A4B, 31B: it makes no "store" layers for them)
  hf_assistant         a random-weight Gemma4(Unified)AssistantForCausalLM from a config dict
  torch_composite_loss the joint loss written with HF modules (the benchmark's torch side, and the
                       reference `training.objective.loss_fn` is tested against)
  hf_stale_kv_fix      drops the stale K/V transformers 5.23 hands the assistant after a partial
                       acceptance
  hf_acceptance        tokens per target forward of HF assisted generation with an exported pair

torch and transformers' torch models are imported inside the functions, so importing this module
costs nothing; the library core never imports it (the trainer does, lazily, for `train.hf_check`).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np

from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.model import config as config_lib


def _text_config_classes():
  """The transformers text-config classes whose `kv_sharing_modes` the patch replaces (the unified
  ones are copies, not subclasses, of gemma4's; transformers < 5.10 has no unified family)."""
  from transformers.models.gemma4 import configuration_gemma4 as c4
  classes = [c4.Gemma4TextConfig]
  try:
    from transformers.models.gemma4_unified import configuration_gemma4_unified as cu
    classes.append(cu.Gemma4UnifiedTextConfig)
  except ImportError:
    pass
  return classes


@contextlib.contextmanager
def hf_assistant_patch():
  """Lets transformers 5.23 build and run every released Gemma 4 pair; restores on exit.

  Replaces `kv_sharing_modes` of `Gemma4TextConfig` and `Gemma4UnifiedTextConfig` in two cases:
  - an assistant (every layer KV-shared), which 5.23 refuses to build: all layers "reuse";
  - a base that shares no K/V between its own layers (12B, 26B-A4B, 31B), for which 5.23 makes no
    "store" layer, so `generate(assistant_model=...)` finds no `shared_kv_states` (KeyError
    'full_attention'): the last layer of each type "stores", which is what the assistant reads
    (`ModelConfig.store_layers`). A store layer only records its K/V; the logits are unchanged.
  Other bases (E2B/E4B) keep 5.23's own modes. Layers read the modes when they are built, so build
  or `from_pretrained` both models of a pair inside this context.
  """
  classes = _text_config_classes()
  originals = [cls.kv_sharing_modes for cls in classes]

  def patched(original):
    def kv_sharing_modes(self):
      n, shared = self.num_hidden_layers, self.num_kv_shared_layers
      if shared and shared == n:
        return ["reuse"] * n
      if not shared:
        modes = [None] * n
        for lt in set(self.layer_types):
          modes[max(i for i, t in enumerate(self.layer_types) if t == lt)] = "store"
        return modes
      return original.fget(self)
    return property(kv_sharing_modes)

  for cls, original in zip(classes, originals):
    cls.kv_sharing_modes = patched(original)
  try:
    yield
  finally:
    for cls, original in zip(classes, originals):
      cls.kv_sharing_modes = original


def hf_assistant(assistant_config: dict, seed: int = 0, attn_implementation: str = "eager"):
  """A Gemma4AssistantForCausalLM or Gemma4UnifiedAssistantForCausalLM (after the dict's
  model_type; float32, eval) from a `hf_config.drafter_config_to_hf`-style dict."""
  import torch
  import transformers
  assistant_config = dict(assistant_config)
  assistant_config.pop("architectures", None)
  fam = hf_config.of_model_type(assistant_config.pop("model_type", None))
  with hf_assistant_patch():
    cfg = getattr(transformers, fam.assistant_config_class)(**assistant_config)
    cfg._attn_implementation = attn_implementation
    cfg.text_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, fam.assistant_lm)(cfg).eval().float()
  return model


def torch_composite_loss(target, assistant, tokens, loss_mask, jcfg, dcfg):
  """The joint loss in HF torch, the way `joint.loss_fn` defines it (packing-free batch)."""
  import torch
  import torch.nn.functional as F
  b, t = tokens.shape
  k_steps = jcfg.num_draft_steps
  pos = torch.arange(t).expand(b, t)
  out = target(input_ids=tokens, position_ids=pos, output_hidden_states=True,
               return_shared_kv_states=True, use_cache=False)
  shared = out.shared_kv_states
  h = out.hidden_states[-1]
  embed = target.get_input_embeddings()
  if not jcfg.drafter_grads_to_base:
    shared = {k: (v[0].detach(), v[1].detach()) for k, v in shared.items()}
    h = h.detach()

  def ce(logits, j):  # row i predicts x_{i+j}
    n = t - j
    labels = tokens[:, j:]
    mask = loss_mask[:, j:].float()
    nll = F.cross_entropy(logits[:, :n].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                          reduction="none").view(b, n)
    return (nll * mask).sum() / mask.sum().clamp(min=1)

  loss = ce(out.logits, 1)
  # Row i may read base K/V at positions <= i (sliding: i - W .. i), as at inference.
  q = torch.arange(t)[:, None]
  s = torch.arange(t)[None, :]
  window = dcfg.text.sliding_window
  neg = torch.finfo(torch.float32).min
  masks = {
      "full_attention": torch.where(s <= q, 0.0, neg)[None, None].expand(b, 1, t, t),
      "sliding_attention": torch.where((s <= q) & (s >= q - window), 0.0, neg)[None, None]
                           .expand(b, 1, t, t),
  }
  q_pos = pos + (1 if jcfg.draft_query_position == "next" else 0)
  ordering = assistant.masked_embedding.token_ordering if dcfg.use_ordered_embeddings else None
  if ordering is not None:
    per = dcfg.text.vocab_size // dcfg.num_centroids
    cluster = torch.empty_like(ordering)
    cluster[ordering] = torch.arange(ordering.numel()) // per
  weights = jcfg.step_weights or (1.0,) * k_steps
  for k in range(k_steps):  # the HF-style K-step assistant loop, all anchor rows at once
    tok = torch.nn.functional.pad(tokens[:, k + 1:], (0, k + 1))
    x = assistant.pre_projection(torch.cat([embed(tok), h], dim=-1))
    # output_hidden_states: transformers 5.23 otherwise slices its (absent) per-layer inputs for
    # T > 1 queries in `_maybe_slice_kv_shared_inputs` and fails.
    hid = assistant.model(inputs_embeds=x, attention_mask=masks, position_ids=q_pos,
                          shared_kv_states=shared, use_cache=False,
                          output_hidden_states=True).last_hidden_state
    step_loss = ce(assistant.lm_head(hid), k + 2)
    if ordering is not None and jcfg.centroid_loss_weight:
      cent = assistant.masked_embedding.centroids(hid)
      n = t - k - 2
      mask = loss_mask[:, k + 2:].float()
      c_nll = F.cross_entropy(cent[:, :n].reshape(-1, cent.shape[-1]),
                              cluster[tokens[:, k + 2:]].reshape(-1), reduction="none").view(b, n)
      step_loss = step_loss + jcfg.centroid_loss_weight * (c_nll * mask).sum() / mask.sum()
    loss = loss + jcfg.drafter_loss_weight * weights[k] * step_loss
    h = assistant.post_projection(hid)
  return loss


@contextlib.contextmanager
def hf_stale_kv_fix():
  """Drops the stale K/V that transformers 5.23 hands the assistant after a partial acceptance.

  `SinglePositionMultiTokenCandidateGenerator.get_candidates` slices the target's shared K/V to
  `len(input_ids)`, which counts the bonus token the target has not processed yet: after n < K
  accepted drafts the full-attention K/V keeps one entry computed from the rejected draft n + 1
  (at the bonus token's position), and the sliding-window K/V (not sliced at all in effect) keeps
  all K - n rejected entries. After a full acceptance, and in the first round, there is nothing
  stale. Inside this context the generator sees the K/V of the verified positions only, which is
  exactly the drafting the trainer models (and trains for).
  """
  from transformers.generation import candidate_generator as cg

  cls = cg.SinglePositionMultiTokenCandidateGenerator
  original = cls.get_candidates

  def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None,
                     is_first_iteration=False, n_last_matches=0, **kwargs):
    kv = getattr(model_outputs, "shared_kv_states", None) if model_outputs is not None else None
    if kv and not is_first_iteration:
      full = kv.get(config_lib.FULL) or next(iter(kv.values()))
      # Verified positions: every token but the bonus one; the full-attention K/V holds them all.
      stale = full[0].shape[2] - (input_ids.shape[1] - 1)
      if stale > 0:
        model_outputs.shared_kv_states = {
            name: (k[:, :, :k.shape[2] - stale], v[:, :, :v.shape[2] - stale])
            for name, (k, v) in kv.items()}
    return original(self, input_ids, model_kwargs=model_kwargs, model_outputs=model_outputs,
                    is_first_iteration=is_first_iteration, n_last_matches=n_last_matches, **kwargs)

  cls.get_candidates = get_candidates
  try:
    yield
  finally:
    cls.get_candidates = original


def hf_acceptance(base_dir: str, drafter_dir: str, prompts: Sequence[np.ndarray], num_new: int,
                  stop_ids: Sequence[int], num_assistant_tokens: int,
                  reference: Sequence[np.ndarray] | None = None, fix_stale_kv: bool = False,
                  images: Sequence | None = None) -> dict:
  """Tokens per target forward of HF assisted generation with an exported pair (greedy, batch 1).

  `generate(assistant_model=...)` runs one target forward for the prompt (which yields the first
  token) and then one per drafting round; a forward hook counts them. Tokens per target forward is
  (new tokens - 1) / (forwards - 1), the prefill left out as the trainer's eval leaves it out
  (`GenerateResult.row_stats`).
  fix_stale_kv: generate inside `hf_stale_kv_fix` (keys "hf_fixed/..." instead of "hf/...").
  images: per prompt, its images (pixel_values_ipc, pixel_positions_ip2: the image processor's
  arrays) or None; HF gets them as `pixel_values`, `image_position_ids` and the processor's
  `mm_token_type_ids` (1 on the image placeholder tokens).
  Returns {"<p>/tokens_per_round", "<p>/rounds", "<p>/new_tokens", "<p>/same_as_trainer"}; the
  last is the fraction of prompts whose output equals `reference` (the trainer's JAX greedy
  continuations; greedy speculative decoding must reproduce plain greedy decoding), if given.
  """
  import torch
  import transformers

  with hf_assistant_patch():
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    assistant = transformers.AutoModelForCausalLM.from_pretrained(drafter_dir,
                                                                  dtype=torch.float32).eval()
  assistant.generation_config.num_assistant_tokens = num_assistant_tokens
  assistant.generation_config.num_assistant_tokens_schedule = "constant"
  calls = [0]
  hook = base.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
  rounds = tokens = same_ref = 0
  kw = dict(do_sample=False, max_new_tokens=num_new, eos_token_id=list(stop_ids),
            pad_token_id=base.config.get_text_config().pad_token_id, top_k=None, top_p=None,
            temperature=None)
  try:
    with torch.no_grad(), (hf_stale_kv_fix() if fix_stale_kv else contextlib.nullcontext()):
      for i, prompt in enumerate(prompts):
        ids = torch.as_tensor(np.asarray(prompt, np.int64))[None]
        calls[0] = 0
        out = base.generate(ids, assistant_model=assistant, **kw,
                            **_image_inputs(base, ids, images[i] if images else None))
        rounds += calls[0] - 1
        tokens += out.shape[1] - ids.shape[1] - 1
        if reference is not None:
          same_ref += int(np.array_equal(out[0, ids.shape[1]:].numpy(),
                                         np.asarray(reference[i], np.int64)))
  finally:
    hook.remove()
  p = "hf_fixed" if fix_stale_kv else "hf"
  return {f"{p}/tokens_per_round": tokens / max(rounds, 1), f"{p}/rounds": rounds,
          f"{p}/new_tokens": tokens + len(prompts),
          f"{p}/same_as_trainer": same_ref / max(len(prompts), 1) if reference is not None else None}


def _image_inputs(model, ids, images) -> dict:
  """HF `generate` keyword arguments for one prompt's images (none for None)."""
  import torch
  if images is None:
    return {}
  pixel_values, positions = images
  return dict(pixel_values=torch.as_tensor(np.asarray(pixel_values, np.float32)),
              image_position_ids=torch.as_tensor(np.asarray(positions, np.int64)),
              mm_token_type_ids=(ids == model.config.image_token_id).long(),
              attention_mask=torch.ones_like(ids))
