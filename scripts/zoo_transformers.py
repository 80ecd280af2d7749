"""The transformers zoo: LayerZero on every model family of the installed transformers, from tiny
random configs, through both routes, and what happened per family (issue 14).

    .venv/bin/python scripts/zoo_transformers.py                     # every family, 2 workers
    .venv/bin/python scripts/zoo_transformers.py --kind causal --only llama gemma2 --workers 0
    .venv/bin/python scripts/zoo_transformers.py --json zoo.json --markdown zoo.md

Families: the model types of transformers' auto mappings -
  causal   MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (the causal-LM class, logits)
  encoder  MODEL_MAPPING_NAMES types that have a masked-LM class, or a sequence-classification
           class but no causal-LM class, and are not encoder-decoder (the base model,
           last_hidden_state)
  seq2seq  MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES (logits; decoder_input_ids = the first 5 ids)

Tiny config: `AutoConfig.for_model(type)`, shrunk generically on its dict (and every nested config:
text_config, vision_config, encoder/decoder ...): hidden 64, 2 layers (per-layer lists and index
lists cut to the layers kept: the first layer of each kind, so a hybrid keeps an attention layer),
4 heads, 2 KV heads (an MHA default stays MHA), head_dim 16, FFN 128, vocab 128 (pad 0, bos 1,
eos 2), MoE 4 experts top-2, sliding windows 8 (they mask within 16 tokens), ...; rebuilt with
`from_dict`. OVERRIDES fixes the few defaults transformers builds no working model from. A causal
family's config gets is_decoder=True (BERT-likes' LM heads). fp32, torch.manual_seed(0).

Input: a left-padded batch of 2 x 16 tokens (row 1: 4 padding positions, attention_mask 0, id =
pad 0), ids in [3, 128) minus the special token ids (image/audio placeholders ...);
decoder_input_ids = the first 5 ids where the forward takes them; once per codebook for a decoder
with an embedding per codebook (musicgen); use_cache=False only where the forward fails with a cache.

Reference: the model built with attn_implementation="eager". Control (unless --no-sdpa): transformers'
own attn_implementation="sdpa" on the same weights: where LayerZero changes the output, the report
says whether transformers' SDPA path changes it the same way. Routes:
  patch  deep copy, lz.patch, forward, compare on the non-padding positions (atol = rtol = 1e-4),
         what the report patched and which ops ran (lz.metrics()), lz.unpatch, output bit-exact
  attn   the same config built with attn_implementation="layerzero" and the reference's weights;
         a ValueError raised by LayerZero on purpose (from layerzero's code, or saying "lz.patch")
         is "refused"

Status per route: ok / changed (max abs diff) / raises (where: patch, forward, unpatch, build) /
refused (attn) / unpatch-inexact (patch) / not built (the harness could not build or run the
eager reference: a harness limit, not a LayerZero failure) / timeout / crashed (the worker died).

Softmax attention heuristic (`has_softmax_attention`): the built model contains a module whose
class name contains "Attention" (or ends with "MLA") and whose class source (or a transformers base
class's) mentions softmax (any case), scaled_dot_product_attention, eager_attention_forward or
ALL_ATTENTION_FUNCTIONS. Misses attention classes named otherwise; counts a softmax anywhere in
such a class (a router's, say) as attention.

Each worker is a spawned process running families one after another; one that crashes or runs
past --timeout seconds on a family is killed and replaced, so the run goes on.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections import Counter
from multiprocessing.connection import wait as wait_conns

KINDS = ("causal", "encoder", "seq2seq")
BATCH, SEQ, PAD_LEN, VOCAB = 2, 16, 4, 128
ATOL = RTOL = 1e-4
MAX_PARAMS = 30_000_000     # a config the shrinking missed: not built rather than minutes of init

# ---- families ----------------------------------------------------------------------------------


def families(kind: str) -> list[str]:
    """The model types of one kind, in the auto mappings' order."""
    from transformers.models.auto import modeling_auto as ma
    causal = ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    s2s = ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    if kind == "causal":
        return list(causal)
    if kind == "seq2seq":
        return list(s2s)
    if kind == "encoder":
        mlm, cls = ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES, ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        return [t for t in ma.MODEL_MAPPING_NAMES
                if t not in s2s and (t in mlm or (t in cls and t not in causal))]
    raise ValueError(kind)


def class_name(kind: str, family: str) -> str:
    from transformers.models.auto import modeling_auto as ma
    table = {"causal": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "encoder": ma.MODEL_MAPPING_NAMES,
             "seq2seq": ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}[kind]
    name = table[family]
    return name[0] if isinstance(name, (list, tuple)) else name


# ---- tiny configs ------------------------------------------------------------------------------

HIDDEN = ("hidden_size", "d_model", "n_embd", "n_embed", "dim", "embed_dim", "model_dim", "embedding_dim",
          "word_embed_proj_dim", "embedding_size", "audio_hidden_size", "backbone_hidden_size",
          "lru_width", "input_embedding_size", "output_embedding_size", "encoder_hidden_size",
          "cross_attention_hidden_size", "emb_dim", "hidden_size_global", "adapter_in_dim", "adapter_out_dim",
          "adapter_input_size", "projector_input_dim", "projector_output_dim", "out_hidden_size")
# widths that are a multiple of the hidden size (zamba's attention over [hidden, embeddings]) keep it
TIED_TO_HIDDEN = ("attention_hidden_size",)
LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers", "num_blocks",
          "num_decoder_layers", "num_encoder_layers", "speech_encoder_layers", "depth",
          "t2u_encoder_layers", "t2u_decoder_layers")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
         "decoder_attention_heads", "num_encoder_attention_heads", "num_decoder_attention_heads",
         "attention_heads", "swa_num_attention_heads", "speech_encoder_attention_heads",
         "t2u_encoder_attention_heads", "t2u_decoder_attention_heads", "index_n_heads",
         "linear_num_value_heads", "linear_num_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
            "swa_num_key_value_heads", "linear_num_key_heads", "num_query_groups")
HEAD_DIM = ("head_dim", "d_kv", "kv_channels", "attention_head_dim", "dim_head", "d_head",
            "attention_head_size", "swa_head_dim", "index_head_dim", "linear_key_head_dim",
            "linear_value_head_dim", "linear_head_dim", "qk_head_dim", "v_head_dim")
FFN = ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
       "ffn_hidden_size", "dim_ff", "dff", "feed_forward_size", "d_inner", "intermediate_size_mlp",
       "dense_intermediate_size", "mlp_dim", "speech_encoder_intermediate_size",
       "t2u_encoder_ffn_dim", "t2u_decoder_ffn_dim", "expert_ffn_hidden_size")
MOE_FFN = ("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size",
           "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
           "shared_experts_intermediate_size", "shared_intermediate_size")
EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
           "num_routed_experts", "n_experts")
TOPK = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "num_selected_experts")
POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length",
             "seq_length", "max_source_positions", "max_target_positions", "t2u_max_position_embeddings",
             "max_encoder_position_embeddings", "max_decoder_position_embeddings", "context_length",
             )
SET = {  # other sizes: key -> value, applied when the key holds an int larger than the value
    "q_lora_rank": 32, "kv_lora_rank": 32, "o_lora_rank": 32, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "n_shared_experts": 1, "num_shared_experts": 1, "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "state_size": 16, "ssm_state_size": 16,
    "mamba_d_state": 16, "d_state": 16, "time_step_rank": 8, "mamba_dt_rank": 8,
    "index_topk": 8, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16,
    "laurel_rank": 8, "num_centroids": 16, "centroid_intermediate_top_k": 4, "adapter_rank": 8,
    "gated_norm_rank": 8, "loop_gate_rank": 8, "hc_lowrank": 8, "router_hidden_size": 32,
    "num_kv_shared_layers": 0, "relative_attention_num_buckets": 32, "num_mel_bins": 16,
    "decoder_vocab_size": VOCAB, "src_vocab_size": VOCAB, "tgt_vocab_size": VOCAB,
    "sliding_window": 8, "sliding_window_size": 8, "attention_window_size": 8,
    "attention_chunk_size": 8, "local_attention_window_len": 8, "rotary_dim": 8, "num_group": 1,
    "mamba_d_ssm": 128, "num_expert_group": 1, "entity_vocab_size": VOCAB, "attention_window": 8,
    "encoder_hash_byte_group_vocab": VOCAB, "num_filters": 4, "d_latents": 64, "num_latents": 16,
}
# Defaults transformers itself builds no working model from (a None the modeling code uses, a
# hybrid whose default layer pattern has no attention layer, sizes tied in ways the generic rules
# don't know), by config model_type, set after shrinking (nested configs too; dotted keys reach
# into a nested dict).
OVERRIDES = {
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "attention"]},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "hunyuan_v1_dense": {"head_dim": 16},
    "hunyuan_v1_moe": {"head_dim": 16},
    "ministral": {"head_dim": 16},
    "nemotron": {"num_key_value_heads": 2},
    "qwen4_exp_text": {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                       "indexer_budget": 8, "indexer_compress_ratio": 4},
    "hrm_text": {"num_layers_per_stack": 1, "num_hidden_layers": 8},
    "zamba": {"num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 1,
              "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"],
              "attention_head_dim": 32},
    "esm": {"vocab_size": VOCAB},
    "gemma4_assistant": {"text_config.hidden_size_per_layer_input": 0, "text_config.vocab_size_per_layer_input": 0},
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dory": {"num_hidden_layers": 6, "n_input_layers": 2, "n_recurrent_layers": 2, "n_output_layers": 2,
             "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"]},
    "layoutlmv3": {"hidden_size": 96, "coordinate_size": 16, "shape_size": 16, "visual_embed": False},
    "lilt": {"hidden_size": 96},
    "zamba2": {"attention_head_dim": 32, "kv_channels": 32},
    "blt": {"num_hidden_layers": 2},
    "reformer": {"hash_seed": 0, "axial_pos_embds_dim": [32, 32], "axial_pos_shape": [4, 4], "max_position_embeddings": 16,
                 "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4, "num_buckets": 2},
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_config(v) -> bool:
    return isinstance(v, dict) and "model_type" in v


def _layer_lists(d: dict, n: int) -> tuple[dict, dict]:
    """(per-layer lists or strings of length n, lists of layer indices < n) in config dict d."""
    per, idx = {}, {}
    for k, v in d.items():
        if k in ("architectures", "id2label", "label2id") or k.endswith("token_id") or k.endswith("token_ids"):
            continue
        if isinstance(v, (list, tuple)) and len(v) == n and n > 2:
            per[k] = list(v)
        elif isinstance(v, str) and "pattern" in k and len(v) == n and n > 2 and len(set(v)) > 1:
            per[k] = v
        elif (isinstance(v, (list, tuple)) and v and all(_is_int(i) and 0 <= i < n for i in v)
              and "layer" in k and len(v) < n):
            idx[k] = list(v)
    return per, idx


def _layer_keys(d: dict) -> list[int]:
    """The layers a per_layer_config (heterogeneous layers: {"05": {...}}) changes."""
    plc = d.get("per_layer_config")
    return sorted(int(k) for k in plc) if isinstance(plc, dict) else []


def _kept_layers(d: dict, n: int) -> list[int]:
    """Which of the n layers to keep: the first of each kind (every per-layer list's distinct
    values, members and non-members of every index list), at least 2."""
    per, idx = _layer_lists(d, n)
    keep = set()
    for v in per.values():
        first = {}
        for i, x in enumerate(v):
            first.setdefault(json.dumps(x, sort_keys=True, default=str), i)
        if len(first) <= 6:   # a kind per layer, not a per-layer size schedule
            keep |= set(first.values())
    for v in list(idx.values()) + [_layer_keys(d)]:
        if v:
            keep.add(v[0])
            keep.add(next((i for i in range(n) if i not in v), v[0]))
    keep = sorted(keep)[:6]
    i = 0
    while len(keep) < min(2, n):
        if i not in keep:
            keep.append(i)
        i += 1
    return sorted(keep)


def shrink(d: dict, top: bool = True) -> dict:
    """The shrunk copy of a config dict (and of every config nested in it)."""
    d = dict(d)
    for k, v in list(d.items()):
        if _is_config(v):
            d[k] = shrink(v, top=False)
        elif isinstance(v, (list, tuple)) and v and all(_is_config(x) for x in v):
            d[k] = [shrink(x, top=False) for x in v]
    n = next((d[k] for k in LAYERS if _is_int(d.get(k)) and d[k] > 0), None)
    if n is not None:
        keep = _kept_layers(d, n)
        for k, v in d.items():  # a layer pattern repeated over the layers (block_types): one cycle
            if ("type" in k and isinstance(v, list) and 2 < len(v) <= 6 and len(v) < n
                    and all(isinstance(x, str) for x in v) and len(set(v)) > 1):
                keep = list(range(max(len(keep), len(v))))
        parts = [k for k, v in d.items() if _is_int(v) and "layers" in k and k not in LAYERS and 0 < v < n]
        if len(parts) > 1 and sum(d[k] for k in parts) == n:  # input + recurrent + output layers
            for k in parts:
                d[k] = 1
            keep = list(range(len(parts)))
        per, idx = _layer_lists(d, n)
        for k, v in per.items():
            d[k] = "".join(v[i] for i in keep) if isinstance(v, str) else [v[i] for i in keep]
        for k, v in idx.items():
            d[k] = [j for j, i in enumerate(keep) if i in v]
        plc = d.get("per_layer_config")
        if isinstance(plc, dict) and plc:
            width = max(len(str(k)) for k in plc)
            old = {int(k): v for k, v in plc.items()}
            d["per_layer_config"] = {str(j).zfill(width): old[i] for j, i in enumerate(keep) if i in old}
        for k in LAYERS:
            if _is_int(d.get(k)) and d[k] > 0:
                d[k] = len(keep) if d[k] == n else min(d[k], 2)
        for k, v in list(d.items()):  # layer-index bounds (max_window_layers, moe_layer_end_index, ...)
            if _is_int(v) and "layer" in k and k not in LAYERS and n >= v > len(keep) and "size" not in k:
                d[k] = len(keep)
    orig = dict(d)
    hidden = next((k for k in HIDDEN if _is_int(orig.get(k)) and orig[k] > 0), None)
    for k in TIED_TO_HIDDEN:
        if hidden and _is_int(orig.get(k)) and orig[k] % orig[hidden] == 0:
            d[k] = 64 * (orig[k] // orig[hidden])
        elif _is_int(orig.get(k)) and orig[k] > 64:
            d[k] = 64
    if _is_int(d.get("hidden_dim")):  # the width, or (next to a `dim`: distilbert) the FFN's
        d["hidden_dim"] = min(d["hidden_dim"], 128 if _is_int(d.get("dim")) else 64)
    for keys, value in ((HIDDEN, 64), (HEADS, 4), (KV_HEADS, 2), (HEAD_DIM, 16), (FFN, 128),
                        (MOE_FFN, 32), (EXPERTS, 4), (TOPK, 2)):
        for k in keys:
            if _is_int(d.get(k)) and d[k] > value:
                d[k] = value
    for k in POSITIONS:
        if _is_int(d.get(k)) and d[k] > 128:
            d[k] = 128
    for k, value in SET.items():
        if _is_int(d.get(k)) and d[k] > value:
            d[k] = value
    for k, v in list(d.items()):
        if k.endswith("_period") and _is_int(v) and v > 2:
            d[k] = 2
        elif k.endswith("_offset") and _is_int(v) and v > 1 and "layer" in k:
            d[k] = 1
    # SSM heads: heads * head_dim must be expand * hidden
    h = d.get("hidden_size") if _is_int(d.get("hidden_size")) else None
    for heads, hd, exp in (("num_heads", "head_dim", "expand"), ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
                           ("mamba_num_heads", "mamba_head_dim", "mamba_expand"),
                           ("n_mamba_heads", "mamba_headdim", "mamba_expand")):
        if h and _is_int(d.get(heads)) and _is_int(d.get(exp)) and (_is_int(d.get(hd)) or hd not in d):
            d[heads] = max(1, d[exp] * h // 16)
            d[hd] = 16
            if _is_int(d.get("mamba_d_ssm")):
                d["mamba_d_ssm"] = d[heads] * 16
    # an MHA default stays MHA (MLA, models that refuse GQA)
    heads = next((k for k in HEADS if _is_int(orig.get(k))), None)
    for k in KV_HEADS:
        if heads and _is_int(orig.get(k)) and orig[k] == orig[heads]:
            d[k] = d[heads]
    # per-layer overrides keep their ratio to the value they override (gemma4's global head_dim)
    plc = d.get("per_layer_config")
    if isinstance(plc, dict):
        for layer, over in plc.items():
            if isinstance(over, dict):
                plc[layer] = over = dict(over)
                for k, v in over.items():
                    if _is_int(v) and _is_int(orig.get(k)) and orig[k] and k in d:
                        over[k] = max(1, round(d[k] * v / orig[k]))
                        # a layer's MLA split of the global head_dim (dots3's SWA layers) stays a split
                        if (k == "qk_nope_head_dim" and _is_int(orig.get("head_dim"))
                                and orig["head_dim"] == v + orig.get("qk_rope_head_dim", 0)):
                            over[k] = 16 - SET["qk_rope_head_dim"]
    # MLA: a head_dim that is the rotary part follows it; qk_head_dim = nope + rope
    if _is_int(orig.get("qk_rope_head_dim")):
        for k in HEAD_DIM:
            if k not in ("qk_head_dim", "v_head_dim") and orig.get(k) == orig["qk_rope_head_dim"]:
                d[k] = d["qk_rope_head_dim"]
        if _is_int(d.get("qk_nope_head_dim")):
            for k in HEAD_DIM:
                if _is_int(orig.get(k)) and orig[k] == orig["qk_nope_head_dim"] + orig["qk_rope_head_dim"]:
                    d[k] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    for k in ("mamba_headdim",):
        if _is_int(d.get(k)) and d[k] > 16:
            d[k] = 16
    if _is_int(d.get("vocab_size")):
        d["vocab_size"] = VOCAB
    d = _token_ids(d)
    for key, value in OVERRIDES.get(d.get("model_type"), {}).items():
        *path, last = key.split(".")
        sub = d
        for p in path:
            sub[p] = sub = dict(sub[p])
        sub[last] = value
    for key in ("rope_parameters", "rope_scaling"):
        if key in d:
            d[key] = _shrink_rope(d[key])
    return d


def _shrink_rope(rp):
    """Per-dimension RoPE factor lists (longrope) cut to head_dim 16 / 2 frequencies."""
    if not isinstance(rp, dict):
        return rp
    rp = dict(rp)
    for k, v in rp.items():
        if isinstance(v, dict):
            rp[k] = _shrink_rope(v)
        elif k in ("short_factor", "long_factor") and isinstance(v, list) and len(v) > 8:
            rp[k] = v[:8]
        elif k == "original_max_position_embeddings" and _is_int(v) and v > 64:
            rp[k] = 64
    return rp


def _token_ids(d: dict) -> dict:
    """pad 0, bos 1, eos 2; any other special id >= the vocabulary moved below it, from 127 down
    (inputs never use them)."""
    fixed = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    for k, v in fixed.items():
        if k in d and (k == "pad_token_id" or d[k] is not None):
            d[k] = [v] if isinstance(d[k], list) else v
    nxt = VOCAB - 1
    for k, v in sorted(d.items()):
        if k in fixed or not (k.endswith("token_id") or k.endswith("token_index") or k.endswith("token_ids")):
            continue
        if _is_int(v) and v >= 3:
            d[k], nxt = nxt, nxt - 1
        elif isinstance(v, list) and v and all(_is_int(x) for x in v):
            new = []
            for x in v:
                new.append(x if x < 3 else nxt)
                nxt -= 1 if x >= 3 else 0
            d[k] = new
    return d


def special_ids(cfg) -> set:
    """Every special-token id in a config and its nested configs (kept out of the inputs)."""
    out = set()

    def walk(d):
        for k, v in d.items():
            if _is_config(v):
                walk(v)
            elif k.endswith("token_id") or k.endswith("token_index") or k.endswith("token_ids"):
                for x in (v if isinstance(v, list) else [v]):
                    if _is_int(x):
                        out.add(x)
    walk(cfg.to_dict())
    return out


def tiny_config(family: str):
    """The tiny config of a model type (see the module docstring)."""
    from transformers import AutoConfig, CONFIG_MAPPING
    cls = CONFIG_MAPPING[family]
    try:
        base = AutoConfig.for_model(family).to_dict()
    except Exception:  # defaults that do not validate (gemma4_assistant): the fields' defaults
        base = _field_defaults(cls)
    return cls.from_dict(shrink(base))


def _field_defaults(cls) -> dict:
    import dataclasses
    d = {"model_type": cls.model_type}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            d[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            d[f.name] = f.default_factory()
    for name, spec in (getattr(cls, "sub_configs_defaults", None) or {}).items():
        mt = getattr(spec, "model_type", None)
        if mt:
            from transformers import CONFIG_MAPPING
            d[name] = _field_defaults(CONFIG_MAPPING[mt])
    return {k: v for k, v in d.items() if not k.startswith("_")}


# ---- one family --------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _inputs(kind: str, cfg, model):
    """input_ids / attention_mask (and decoder_input_ids where the forward takes them); a
    multi-codebook decoder (musicgen) gets the ids once per codebook."""
    import torch
    bad = special_ids(cfg)
    allowed = torch.tensor([i for i in range(3, VOCAB) if i not in bad])
    g = torch.Generator().manual_seed(1)
    ids = allowed[torch.randint(0, len(allowed), (BATCH, SEQ), generator=g)]
    mask = torch.ones_like(ids)
    mask[1, :PAD_LEN] = 0
    ids[1, :PAD_LEN] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    params = inspect.signature(model.forward).parameters
    if kind == "seq2seq" and "decoder_input_ids" in params:
        kw["decoder_input_ids"] = ids[:, :5].clone()
    books = getattr(cfg, "num_codebooks", None)
    per_book = any(isinstance(m, torch.nn.ModuleList) and len(m) == books and n.endswith("embed_tokens")
                   for n, m in model.named_modules())   # an embedding per codebook
    if _is_int(books) and books > 1 and per_book and "decoder_input_ids" not in params:
        kw["input_ids"] = ids.repeat_interleave(books, 0)
    return kw


def _output(out):
    import torch
    for name in ("logits", "last_hidden_state", "prediction_logits"):
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, torch.Tensor):
        return out
    vals = out.values() if hasattr(out, "values") else out
    for t in vals:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    raise TypeError(f"no tensor output in {type(out).__name__}")


def _forward(model, kw):
    import torch
    with torch.no_grad():
        return _output(model(**kw)).detach().clone()


def _valid(kind, kw, out):
    """The entries compared: the non-padding positions (all decoder positions for seq2seq)."""
    mask = kw["attention_mask"].bool()
    if "decoder_input_ids" in kw or out.dim() < 2 or out.shape[-2 if out.dim() > 2 else -1] != SEQ:
        return out
    rows = out.reshape(-1, *out.shape[-2:]) if out.dim() > 2 else out
    if rows.shape[0] % BATCH:
        return out
    return rows[mask.repeat_interleave(rows.shape[0] // BATCH, 0)]


def compare(kind, kw, got, ref) -> tuple[bool, float]:
    """(close at atol/rtol 1e-4 on the compared entries, max abs diff)."""
    import torch
    if got.shape != ref.shape:
        return False, float("inf")
    a, b = _valid(kind, kw, got).double(), _valid(kind, kw, ref).double()
    ok = torch.allclose(a, b, atol=ATOL, rtol=RTOL, equal_nan=True)
    both_nan = a.isnan() & b.isnan()
    diff = (a - b).abs().masked_fill(both_nan, 0.0)
    err = diff.max().item() if diff.numel() else 0.0
    return ok, (float("nan") if math.isnan(err) else err)


_ATTN_WORDS = ("softmax", "scaled_dot_product_attention", "eager_attention_forward", "ALL_ATTENTION_FUNCTIONS")


def softmax_attention(model) -> tuple[bool, list[str]]:
    """The heuristic of the module docstring: (has softmax attention, attention class names)."""
    names, found = set(), False
    for m in model.modules():
        cls = type(m)
        if "Attention" not in cls.__name__ and not cls.__name__.endswith("MLA"):
            continue
        names.add(cls.__name__)
        for c in cls.__mro__:
            if not c.__module__.startswith("transformers.") or c.__name__ in ("Module",):
                continue
            try:
                src = inspect.getsource(c)
            except (OSError, TypeError):
                continue
            if any(w.lower() in src.lower() for w in _ATTN_WORDS):
                found = True
                break
    return found, sorted(names)


def _engaged(report, calls) -> dict:
    """What lz.patch patched (by kind and op) and which ops ran through LayerZero."""
    patched = [i for i in report.items if i.status == "patched"]
    ops = sorted({i.op for i in patched if i.op})
    kinds = sorted({i.kind for i in patched})
    return {
        "patched_ops": ops, "patched_kinds": kinds,
        "attention": "attention" in kinds, "norm": "norm" in kinds or "residual" in kinds,
        "rope": "rope" in kinds, "mlp": "mlp" in kinds or "experts" in kinds,
        "ran": {op: dict(per) for op, per in calls.items()},
        "attention_ran": bool(calls.get("attention")),
        "skipped": Counter(f"{i.kind}: {i.detail.split(':')[0]}" for i in report.items
                           if i.status == "skipped").most_common(5),
    }


def _is_refusal(e: BaseException) -> bool:
    """A ValueError LayerZero raises on purpose (attn_implementation="layerzero" it can't serve)."""
    if not isinstance(e, ValueError):
        return False
    if "lz.patch" in str(e):
        return True
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and f"{os.sep}layerzero{os.sep}" in last and "layerzero" in str(e)


def _config_for(cls, cfg):
    """The config (cfg or one nested in it) that model class cls takes."""
    if isinstance(cfg, cls.config_class):
        return cfg
    todo = [cfg]
    while todo:
        c = todo.pop(0)
        if isinstance(c, cls.config_class):
            return c
        todo += [v for v in vars(c).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]
    return cfg


def _build(cls, cfg, attn: str):
    """The model, fp32, eval, seed 0; a model that needs a default language (xmod) gets its first."""
    import torch
    torch.manual_seed(0)
    model = cls._from_config(copy.deepcopy(cfg), attn_implementation=attn, dtype=torch.float32).eval()
    langs = getattr(cfg, "languages", None)
    if hasattr(model, "set_default_language") and langs:
        model.set_default_language(getattr(cfg, "default_language", None) or list(langs)[0])
    return model


def run_family(kind: str, family: str, sdpa: bool = True) -> dict:
    """Everything about one family (both routes); never raises. sdpa: also run transformers' own
    attn_implementation="sdpa" (a control: where LayerZero's output differs from eager, does
    transformers' SDPA path differ the same way?)."""
    import torch
    import transformers
    import layerzero as lz

    t0 = time.perf_counter()
    row = {"kind": kind, "family": family, "class": None, "built": False, "not_built": None,
           "params": None, "has_softmax_attention": None, "attention_classes": [],
           "patch": None, "attn": None}
    # ---- the reference
    try:
        row["class"] = class_name(kind, family)
        cls = getattr(transformers, row["class"])
        cfg = _config_for(cls, tiny_config(family))
        if kind == "causal" and getattr(cfg, "is_decoder", None) is False:
            cfg.is_decoder = True    # BERT-likes' causal-LM heads (BertLMHeadModel, ...) decode
        with torch.device("meta"):
            n = sum(p.numel() for p in cls._from_config(copy.deepcopy(cfg), attn_implementation="eager",
                                                        dtype=torch.float32).parameters())
        row["params"] = n
        if n > MAX_PARAMS:
            raise RuntimeError(f"too large after shrinking: {n / 1e6:.0f}M parameters")
        ref_model = _build(cls, cfg, "eager")
        kw = _inputs(kind, cfg, ref_model)
        try:
            ref = _forward(ref_model, kw)
        except Exception as e:  # a cache the model can't build (blt): the forward without one
            try:
                ref = _forward(ref_model, {**kw, "use_cache": False})
            except Exception:
                raise e from None
            kw["use_cache"] = False
            row["use_cache"] = False
        again = _forward(ref_model, kw)
        if not torch.equal(ref, again):
            raise RuntimeError("the eager reference is not deterministic")
        row["built"] = True
        row["has_softmax_attention"], row["attention_classes"] = softmax_attention(ref_model)
    except Exception as e:
        row["not_built"] = _first_line(e)
        if os.environ.get("ZOO_TRACE"):
            row["traceback"] = traceback.format_exc(limit=-6)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        return row

    # ---- control: transformers' own SDPA path, the reference's weights
    sdpa_out = None
    if sdpa:
        try:
            model = _build(cls, cfg, "sdpa")
            model.load_state_dict(ref_model.state_dict(), strict=False)
            sdpa_out = _forward(model, kw)
            ok, err = compare(kind, kw, sdpa_out, ref)
            row["sdpa"] = {"status": "ok" if ok else "changed", "max_diff": err}
        except Exception as e:
            row["sdpa"] = {"status": "raises", "error": _first_line(e)}

    def vs_sdpa(res, out):
        if sdpa_out is not None and res.get("status") == "changed":
            res["same_as_sdpa"], res["vs_sdpa"] = compare(kind, kw, out, sdpa_out)

    # ---- route "patch": lz.patch on a copy, forward, lz.unpatch, forward
    res = {"status": None}
    where = "patch"
    try:
        model = copy.deepcopy(ref_model)
        report = lz.patch(model)
        lz.reset_metrics()     # after patching: the probes' calls don't count as the model's
        where = "forward"
        out = _forward(model, kw)
        res.update(_engaged(report, lz.metrics()["calls"]))
        ok, err = compare(kind, kw, out, ref)
        res["max_diff"] = err
        where = "unpatch"
        lz.unpatch(model)
        res["unpatch_exact"] = torch.equal(_forward(model, kw), ref)
        res["status"] = ("changed" if not ok else "ok" if res["unpatch_exact"] else "unpatch-inexact")
        vs_sdpa(res, out)
    except Exception as e:
        res.update(status="raises", where=where, error=_first_line(e))
    row["patch"] = res

    # ---- route "attn": attn_implementation="layerzero", the reference's weights
    res = {"status": None}
    where = "build"
    try:
        model = _build(cls, cfg, "layerzero")
        missing = model.load_state_dict(ref_model.state_dict(), strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            res["state_dict"] = f"missing {len(missing.missing_keys)}, unexpected {len(missing.unexpected_keys)}"
        res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        where = "forward"
        lz.reset_metrics()
        out = _forward(model, kw)
        calls = lz.metrics()["calls"]
        res["attention_ran"] = bool(calls.get("attention"))
        res["ran"] = {op: dict(per) for op, per in calls.items()}
        ok, err = compare(kind, kw, out, ref)
        res.update(status="ok" if ok else "changed", max_diff=err)
        vs_sdpa(res, out)
    except Exception as e:
        if where == "build" and _is_refusal(e):
            res.update(status="refused", error=_first_line(e))
        else:
            res.update(status="raises", where=where, error=_first_line(e))
    row["attn"] = res
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


# ---- workers -----------------------------------------------------------------------------------

def _quiet() -> None:
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("layerzero").setLevel(logging.ERROR)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except Exception:
        pass


def _worker(conn, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    _quiet()
    import importlib
    for name in ("layerzero", "transformers"):   # loaded once, before the first family's clock starts
        importlib.import_module(name)
    conn.send(("ready", None))
    while True:
        task = conn.recv()
        if task is None:
            return
        try:
            row = run_family(*task)   # (kind, family, sdpa)
        except BaseException as e:  # run_family never raises; a harness bug shows as a row
            row = {"kind": task[0], "family": task[1], "harness_error": traceback.format_exc(limit=3),
                   "built": False, "not_built": f"harness error {_first_line(e)}"}
        conn.send(("row", row))


def _dead_row(kind, family, why: str) -> dict:
    return {"kind": kind, "family": family, "built": True, "not_built": None, "class": None,
            "has_softmax_attention": None, "patch": {"status": why, "error": why},
            "attn": {"status": why, "error": why}, "seconds": None}


def run(tasks: list[tuple[str, str]], workers: int = 2, timeout: float = 60.0, threads: int | None = None,
        progress=None, sdpa: bool = True) -> list[dict]:
    """Rows for (kind, family) tasks, in their order. workers=0 runs them in this process."""
    if workers <= 0:
        _quiet()
        rows = []
        for t in tasks:
            rows.append(run_family(*t, sdpa=sdpa))
            if progress:
                progress(rows[-1])
        return rows
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    todo = list(enumerate(tasks))[::-1]
    results: dict[int, dict] = {}
    slots: list[dict] = []   # {"proc", "conn", "task": (i, task) | None, "since"}

    def start():
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, threads), daemon=True)
        p.start()
        child.close()
        slots.append({"proc": p, "conn": parent, "task": None, "since": time.monotonic(), "ready": False})

    def stop(s, kill=False):
        if kill:
            s["proc"].kill()
        s["proc"].join(5)
        s["conn"].close()
        slots.remove(s)

    def bury(s, status, error):
        """A worker that crashed or ran out of time: its family's row says so; a new one starts."""
        if s["task"] is not None:
            i, (kind, fam) = s["task"]
            results[i] = _dead_row(kind, fam, status)
            results[i]["patch"]["error"] = results[i]["attn"]["error"] = error
            if progress:
                progress(results[i])
        stop(s, kill=True)
        if todo:
            start()

    for _ in range(min(workers, len(tasks))):
        start()
    while todo or any(s["task"] for s in slots):
        for s in list(slots):
            if s["ready"] and s["task"] is None and todo:
                s["task"] = todo.pop()
                s["since"] = time.monotonic()
                s["conn"].send((*s["task"][1], sdpa))
        ready = wait_conns([s["conn"] for s in slots], timeout=1.0)
        now = time.monotonic()
        for s in list(slots):
            if s["conn"] in ready:
                try:
                    what, row = s["conn"].recv()
                except (EOFError, OSError):
                    s["proc"].join(5)
                    bury(s, "crashed", f"worker exit code {s['proc'].exitcode}")
                    continue
                if what == "ready":
                    s["ready"] = True
                else:
                    i, _ = s["task"]
                    results[i] = row
                    s["task"] = None
                    if progress:
                        progress(row)
            elif s["task"] is not None and now - s["since"] > timeout:
                bury(s, "timeout", f"over {timeout:.0f} s")
            elif not s["ready"] and now - s["since"] > 300:
                raise RuntimeError("a worker did not start in 300 s")
    for s in list(slots):
        try:
            s["conn"].send(None)
        except OSError:
            pass
        stop(s)
    return [results[i] for i in range(len(tasks))]


# ---- reports -----------------------------------------------------------------------------------

CATEGORIES = ("ok", "changed", "raises", "refused", "unpatch-inexact", "timeout", "crashed", "not built")


def category(row: dict, route: str) -> str:
    if not row.get("built"):
        return "not built"
    return row[route]["status"]


def summary(rows: list[dict]) -> str:
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    lines = []
    head = f"{'route':<6} {'kind':<8} {'families':>8} " + " ".join(f"{c:>15}" for c in CATEGORIES)
    lines += [head, "-" * len(head)]
    for route in ("patch", "attn"):
        for kind in kinds + ["all"]:
            sel = [r for r in rows if kind == "all" or r["kind"] == kind]
            n = Counter(category(r, route) for r in sel)
            lines.append(f"{route:<6} {kind:<8} {len(sel):>8} " + " ".join(f"{n.get(c, 0):>15}" for c in CATEGORIES))
    built = [r for r in rows if r.get("built") and r.get("patch") and r["patch"].get("status") == "ok"]
    soft = [r for r in built if r.get("has_softmax_attention")]
    eng = [r for r in soft if r["patch"].get("attention_ran")]
    lines.append("")
    lines.append(f"patch ok: {len(built)}; with softmax attention (heuristic): {len(soft)}; "
                 f"attention ran through LayerZero: {len(eng)}; softmax attention not engaged: {len(soft) - len(eng)}")
    attn_ok = [r for r in rows if r.get("built") and r["attn"].get("status") == "ok"]
    lines.append(f"attn ok: {len(attn_ok)}; attention ran through LayerZero: "
                 f"{sum(1 for r in attn_ok if r['attn'].get('attention_ran'))}")
    return "\n".join(lines)


def _fmt_diff(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def failures(rows: list[dict]) -> str:
    lines = []
    for route in ("patch", "attn"):
        for cat in ("changed", "raises", "unpatch-inexact", "timeout", "crashed", "refused"):
            sel = [r for r in rows if r.get("built") and r[route]["status"] == cat]
            if not sel:
                continue
            lines.append(f"\n[{route}] {cat} ({len(sel)})")
            for r in sel:
                res = r[route]
                if cat in ("changed", "unpatch-inexact"):
                    what = f"max diff {_fmt_diff(res.get('max_diff'))}"
                    if "vs_sdpa" in res:
                        what += (f" (= transformers' sdpa, itself {_fmt_diff(r['sdpa'].get('max_diff'))} off eager)"
                                 if res["same_as_sdpa"] else f", {_fmt_diff(res['vs_sdpa'])} off transformers' sdpa")
                    if route == "patch":
                        what += f"; patched {','.join(res.get('patched_ops', []))}"
                else:
                    what = (f"{res.get('where', '')}: " if res.get("where") else "") + str(res.get("error"))
                lines.append(f"  {r['kind']:<8} {r['family']:<28} {what}")
    nb = [r for r in rows if not r.get("built")]
    if nb:
        lines.append(f"\nnot built ({len(nb)})")
        for r in nb:
            lines.append(f"  {r['kind']:<8} {r['family']:<28} {r.get('not_built')}")
    gap = [r for r in rows if r.get("built") and r["patch"].get("status") == "ok" and not r["patch"].get("attention_ran")
           and r["attn"].get("status") == "ok" and r["attn"].get("attention_ran")]
    if gap:
        lines.append(f"\n[patch] attention left as is, but attn_implementation='layerzero' runs LayerZero's ({len(gap)})")
        for r in gap:
            why = next((w for w, _ in r["patch"].get("skipped", []) if w.startswith("attention")), "")
            lines.append(f"  {r['kind']:<8} {r['family']:<28} {why[:110]}")
    soft = [r for r in rows if r.get("built") and r["patch"].get("status") == "ok"
            and r.get("has_softmax_attention") and not r["patch"].get("attention_ran")]
    if soft:
        lines.append(f"\n[patch] ok, softmax attention (heuristic) but LayerZero attention did not run ({len(soft)})")
        for r in soft:
            lines.append(f"  {r['kind']:<8} {r['family']:<28} {', '.join(r.get('attention_classes', [])[:3])}")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    def mark(r, key):
        p = r["patch"]
        if key == "attention":
            return "ran" if p.get("attention_ran") else ("patched" if p.get("attention") else
                                                         ("-" if r.get("has_softmax_attention") else "n/a"))
        if not p.get(key):
            return "-"
        ops = {"norm": ("rms_norm", "layer_norm"), "rope": ("rope",), "mlp": ("swiglu", "geglu")}[key]
        return ", ".join(o for o in p.get("patched_ops", []) if o in ops) or "yes"
    out = ["| kind | family | patch | attn | attention | norm | rope | mlp |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("built"):
            out.append(f"| {r['kind']} | {r['family']} | not built | not built | | | | |")
            continue
        pst, ast = r["patch"]["status"], r["attn"]["status"]
        if r["patch"].get("status") in ("ok", "changed", "unpatch-inexact"):
            cells = [mark(r, k) for k in ("attention", "norm", "rope", "mlp")]
        else:
            cells = [""] * 4
        out.append(f"| {r['kind']} | {r['family']} | {pst} | {ast} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=KINDS + ("all",), default="all")
    ap.add_argument("--only", nargs="+", metavar="TYPE", help="only these model types (TYPE, or KIND:TYPE)")
    ap.add_argument("--json", metavar="PATH", help="write the per-family rows")
    ap.add_argument("--markdown", metavar="PATH", help="write the engagement table (family x attention/norm/rope/mlp)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (0: this process)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per family")
    ap.add_argument("--quiet", action="store_true", help="no line per family")
    ap.add_argument("--no-sdpa", action="store_true",
                    help="skip the control run of transformers' own attn_implementation='sdpa'")
    args = ap.parse_args(argv)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    only = set(args.only or ())
    tasks = [(k, f) for k in kinds for f in families(k) if not only or f in only or f"{k}:{f}" in only]
    if only:
        unknown = only - {f for _, f in tasks} - {f"{k}:{f}" for k, f in tasks}
        if unknown:
            print(f"unknown model types for --kind {args.kind}: {', '.join(sorted(unknown))}", file=sys.stderr)
    t0 = time.time()
    done = [0]

    def progress(row):
        done[0] += 1
        if args.quiet:
            return
        if not row.get("built"):
            what = f"not built: {row.get('not_built')}"
        else:
            p, a = row["patch"], row["attn"]
            what = (f"patch {p['status']}" + (f" ({_fmt_diff(p.get('max_diff'))})" if p["status"] == "changed" else "")
                    + f", attn {a['status']}" + (f" ({_fmt_diff(a.get('max_diff'))})" if a["status"] == "changed" else ""))
        print(f"[{done[0]:>3}/{len(tasks)}] {row['kind']:<8} {row['family']:<28} {what}", flush=True)

    rows = run(tasks, workers=args.workers, timeout=args.timeout, progress=progress, sdpa=not args.no_sdpa)
    print()
    print(summary(rows))
    print(failures(rows))
    print(f"\n{len(rows)} families in {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
