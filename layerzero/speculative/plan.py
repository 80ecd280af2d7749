"""What lz.speculative_generate accepts: transformers' prepared processors and criteria as a plan
(`_Plan`), the options it refuses (ValueError naming the option and pointing to model.generate),
the draft/target pair check (`check_pair`) and the layer types it can roll back."""
from __future__ import annotations

import torch

from ..generation.plan import (_MIN_LENGTH, _REFUSED_OPTIONS, _REFUSED_PROCESSORS, _WARPERS, Warpers,
                               eos_blocked_for, refused_call)

# transformers' processors / criteria this loop can't run, by the option that adds them
_PROCESSOR_OPTIONS = {
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "EncoderNoRepeatNGramLogitsProcessor": "encoder_no_repeat_ngram_size",
    "NoBadWordsLogitsProcessor": "bad_words_ids", "SequenceBiasLogitsProcessor": "sequence_bias",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id",
    "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "SuppressTokensLogitsProcessor": "suppress_tokens",
    "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
    "InfNanRemoveLogitsProcessor": "remove_invalid_values", "LogitNormalization": "renormalize_logits",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
    "TypicalLogitsWarper": "typical_p", "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff", "TopHLogitsWarper": "top_h",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
    "WatermarkLogitsProcessor": "watermarking_config",
}
_CRITERIA_OPTIONS = {"StopStringCriteria": "stop_strings", "MaxTimeCriteria": "max_time"}
_OPTIONS = {**_REFUSED_OPTIONS,
            "prompt_lookup_num_tokens": "transformers' prompt lookup; pass prompt_lookup=n instead"}
# model kwargs transformers prepares that the loop replaces with its own
_OWN_KWARGS = {"attention_mask", "position_ids", "use_cache", "logits_to_keep", "cache",
               "past_key_values", "cache_position", "return_dict"}


def _refuse(what: str) -> ValueError:
    return ValueError(f"lz.speculative_generate does not support {what}; use model.generate for it")


def _special_ids(model, name: str):
    v = getattr(getattr(model, "generation_config", None), name, None)
    if v is None:
        v = getattr(model.config.get_text_config(decoder=True), name, None)
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    return tuple(sorted(set(v))) if isinstance(v, (list, tuple)) else v


def _vocab(model) -> int:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(out, "weight", None)
    return int(w.shape[0]) if w is not None else int(model.config.get_text_config(decoder=True).vocab_size)


def check_pair(target, draft) -> None:
    """Raise ValueError unless `draft` can draft for `target`: a decoder-only model on the same
    device with the same number of logits (output embedding rows), config vocab_size and special
    token ids (bos, eos, pad: generation config, else model config). Without a tokenizer this is
    what can be checked; the message lists every difference."""
    if getattr(draft.config, "is_encoder_decoder", False):
        raise ValueError("the draft is an encoder-decoder model; speculative_generate needs a causal LM")
    diffs = []
    tv, dv = _vocab(target), _vocab(draft)
    if tv != dv:
        diffs.append(f"vocab size (logits): target {tv}, draft {dv}")
    tc = target.config.get_text_config(decoder=True).vocab_size
    dc = draft.config.get_text_config(decoder=True).vocab_size
    if tc != dc:
        diffs.append(f"config.vocab_size: target {tc}, draft {dc}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        t, d = _special_ids(target, name), _special_ids(draft, name)
        if t != d:
            diffs.append(f"{name}: target {t}, draft {d}")
    if diffs:
        raise ValueError("draft and target must share the vocabulary; they differ in " + "; ".join(diffs))
    td, dd = next(target.parameters()).device, next(draft.parameters()).device
    if td != dd:
        raise ValueError(f"draft on {dd}, target on {td}: put both on one device")


class _Plan(Warpers):
    """What each position's logits go through, read off transformers' prepared processors and
    criteria; anything else raises ValueError naming the option."""

    def __init__(self, cfg, processors, criteria, prompt_len: int):
        self.greedy = not cfg.do_sample
        self.temperature, self.top_k, self.top_p, self.min_p = 1.0, None, None, None
        self.min_new, self.min_eos, self.eos, self.max_new = 0, None, None, None
        for p in processors or ():
            name = type(p).__name__
            if name in _REFUSED_PROCESSORS:
                raise _refuse(_REFUSED_PROCESSORS[name])
            if name in _MIN_LENGTH:
                n = eos_blocked_for(p, prompt_len)
                if n > 0:
                    self.min_new = max(self.min_new, n)
                    self.min_eos = torch.as_tensor(p.eos_token_id).view(-1)
            elif name in _WARPERS and self._warper(p):
                pass
            else:
                opt = _PROCESSOR_OPTIONS.get(name)
                raise _refuse(f"{opt} (its logits processor {name})" if opt else f"the logits processor {name}")
        for c in criteria or ():
            name = type(c).__name__
            if name == "MaxLengthCriteria":
                self.max_new = c.max_length - prompt_len
            elif name == "EosTokenCriteria":
                self.eos = torch.as_tensor(c.eos_token_id).view(-1)
            else:
                opt = _CRITERIA_OPTIONS.get(name)
                raise _refuse(f"{opt} (its stopping criterion {name})" if opt else f"the stopping criterion {name}")
        if self.max_new is None:
            raise ValueError("generation has no max_length / max_new_tokens: speculative_generate needs a bound")

    def key(self) -> tuple:
        """What the steps do, as a key (a kept graphed loop serves calls of equal keys)."""
        ids = [None if t is None else tuple(t.tolist()) for t in (self.min_eos, self.eos)]
        return (self.greedy, self.temperature, self.top_k, self.top_p, self.min_p, self.min_new, *ids, self.max_new)


def _check_options(model, cfg, model_kwargs: dict) -> None:
    why = refused_call(model, cfg, model_kwargs, _OPTIONS, _OWN_KWARGS)
    if why:
        raise _refuse(why)


def _layer_types(model) -> list[str]:
    cfg = model.config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"
        types = [kind] * cfg.num_hidden_layers
    odd = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise _refuse(f"layer type(s) {', '.join(odd)} (only full and sliding-window attention layers)")
    return list(types)
