"""What lz.generate's decode step does for a call, read off transformers' prepared generation
config, logits processors and stopping criteria (`Plan`), and the options it refuses
(`check_options`: ValueError naming the option and pointing to `model.generate`)."""
from __future__ import annotations

import torch

# transformers' processors and criteria the step runs itself (by class name)
_WARPERS = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"}
_MIN_LENGTH = {"MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor"}
# Processors that need more than the logits and the tokens so far: options model.generate has.
_REFUSED_PROCESSORS = {
    "PrefixConstrainedLogitsProcessor": "prefix_allowed_tokens_fn (constrained decoding)",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "negative_prompt_ids / guidance_scale",
    "ClassifierFreeGuidanceLogitsProcessor": "guidance_scale (classifier-free guidance)",
    "HammingDiversityLogitsProcessor": "diversity_penalty (group beam search)",
}
# generation-config options of other decoding methods (set when not None/False/0/1)
_REFUSED_OPTIONS = {"num_beam_groups": "group beam search", "penalty_alpha": "contrastive search",
                    "dola_layers": "DoLa decoding", "constraints": "constrained beam search",
                    "force_words_ids": "constrained beam search",
                    "prompt_lookup_num_tokens": "prompt lookup decoding",
                    "assistant_early_exit": "self-speculative decoding",
                    "output_attentions": "returning attentions",
                    "output_hidden_states": "returning hidden states"}
# model kwargs transformers prepares that the loop replaces with its own
_OWN_KWARGS = {"attention_mask", "position_ids", "use_cache", "logits_to_keep", "cache",
               "past_key_values", "cache_position", "return_dict", "output_attentions",
               "output_hidden_states"}


def _refuse(what: str) -> ValueError:
    return ValueError(f"lz.generate does not support {what}; use model.generate for it")


def called_by_generate(frame) -> bool:
    """Is `frame` transformers' `generate`, calling a `custom_generate` callable with everything
    prepared (its protocol)? Else the callable was called directly."""
    return (frame.f_code.co_name == "generate"
            and frame.f_globals.get("__name__") == "transformers.generation.utils")


def refused_setting(model, cfg, options: dict) -> str | None:
    """What a custom decode loop refuses in `model` / generation config `cfg` (encoder-decoder,
    beam search, an option of `options` set: name -> decoding method), described; None if none."""
    if model.config.is_encoder_decoder:
        return "encoder-decoder models"
    if cfg.num_beams != 1:
        return f"num_beams={cfg.num_beams} (beam search)"
    for name, what in options.items():
        v = getattr(cfg, name, None)
        off = v is None or v is False or (name == "num_beam_groups" and v == 1) or (
            name == "penalty_alpha" and v == 0)
        if not off:
            return f"{name}={v!r} ({what})"
    return None


def eos_blocked_for(p, prompt_len: int) -> int:
    """New tokens before which transformers' min-length processor `p` (a `_MIN_LENGTH` class)
    blocks EOS, for prompts of `prompt_len` tokens (<= 0: none)."""
    if type(p).__name__ == "MinLengthLogitsProcessor":
        return p.min_length - prompt_len
    return p.min_new_tokens + p.prompt_length_to_skip - prompt_len


class Warpers:
    """The temperature / top-k / top-p / min-p settings of transformers' prepared warpers, as
    lz.sample's arguments (lz.generate's and lz.speculative_generate's plans, which start them
    at 1.0, None, None, None)."""

    def _warper(self, p) -> bool:
        """Take a warper into lz.sample's arguments; False when it has settings lz.sample lacks."""
        if getattr(p, "min_tokens_to_keep", 1) != 1 or getattr(p, "filter_value", -float("inf")) != -float("inf"):
            return False
        name = type(p).__name__
        if name == "TemperatureLogitsWarper":
            self.temperature = float(p.temperature)
        elif name == "TopKLogitsWarper":
            self.top_k = int(p.top_k)
        elif name == "TopPLogitsWarper":
            self.top_p = float(p.top_p)
        else:
            self.min_p = float(p.min_p)
        return True


class _Plan(Warpers):
    """What the step does, read off transformers' prepared processors and criteria."""

    def __init__(self, cfg, processors, criteria, prompt_len: int, device):
        self.greedy = not cfg.do_sample
        self.temperature, self.top_k, self.top_p, self.min_p = 1.0, None, None, None
        self.min_new = 0
        self.eos = None
        self.max_new = None
        self.eager_processors, self.eager_criteria = [], []
        inline = True
        for p in processors or ():
            name = type(p).__name__
            if name in _REFUSED_PROCESSORS:
                raise _refuse(_REFUSED_PROCESSORS[name])
            if name in _MIN_LENGTH:
                self.min_new = max(self.min_new, eos_blocked_for(p, prompt_len))
                self._min_eos = torch.as_tensor(p.eos_token_id, device=device).view(-1)
            elif name in _WARPERS and self._warper(p):
                pass
            else:
                inline = False
        for c in criteria or ():
            name = type(c).__name__
            if name == "MaxLengthCriteria":
                self.max_new = c.max_length - prompt_len
            elif name == "EosTokenCriteria":
                self.eos = torch.as_tensor(c.eos_token_id, device=device).view(-1)
            else:
                self.eager_criteria.append(c)
        if self.max_new is None:
            raise ValueError("generation has no max_length / max_new_tokens: lz.generate needs a bound")
        self.has_eos_criteria = any(hasattr(c, "eos_token_id") for c in criteria or ())
        if not inline:  # run transformers' processors as they are, eagerly, between steps
            self.eager_processors = list(processors)
            self.temperature, self.top_k, self.top_p, self.min_p, self.min_new = 1.0, None, None, None, 0

    @property
    def stepwise(self) -> bool:
        return bool(self.eager_processors or self.eager_criteria)

    def key(self) -> tuple:
        eos = None if self.eos is None else tuple(self.eos.tolist())
        return (self.greedy, self.temperature, self.top_k, self.top_p, self.min_p, self.min_new,
                eos, self.has_eos_criteria, self.stepwise)


def refused_call(model, cfg, model_kwargs: dict, options: dict, own_kwargs: set) -> str | None:
    """What a custom decode loop refuses in a prepared call, described (None if nothing):
    `refused_setting`, a cache_implementation other than dynamic / static, and model inputs
    other than those the loop makes itself (`own_kwargs`)."""
    why = refused_setting(model, cfg, options)
    if why:
        return why
    if cfg.cache_implementation not in (None, "static", "dynamic"):
        return f"cache_implementation={cfg.cache_implementation!r} (it takes 'dynamic' or 'static')"
    extra = sorted(k for k, v in model_kwargs.items() if k not in own_kwargs and v is not None)
    if extra:
        return f"the model input(s) {', '.join(extra)} (it takes input_ids and attention_mask)"
    return None


def _check_options(model, cfg, model_kwargs: dict) -> None:
    why = refused_call(model, cfg, model_kwargs, _REFUSED_OPTIONS, _OWN_KWARGS)
    if why:
        raise _refuse(why)
    from ..paged.cache import PagedKVCache

    for k in ("cache", "past_key_values"):
        c = model_kwargs.get(k)
        if c is None:
            continue
        paged = isinstance(c, PagedKVCache)
        if paged and c.graph_mode:
            raise ValueError(f"{k}=: this lz.PagedKVCache is in graph mode (pages reserved by an "
                             f"earlier decode loop); call cache.reset() before lz.generate")
        if c.get_seq_length() != 0:
            raise _refuse(f"{k}= holding {int(c.get_seq_length())} tokens (continuing from a cache)")
        # transformers marks a cache the caller passed; its own (dynamic / static, empty) the
        # loop replaces with its static cache, as it would any cache of those kinds
        if getattr(c, "_is_user_defined", False) and not paged:
            raise _refuse(f"{k}={type(c).__name__} (lz.generate keeps K/V in a static cache of its "
                          f"own, or in an empty lz.PagedKVCache passed as {k}=)")


def _paged_cache(model_kwargs: dict):
    """The empty `lz.PagedKVCache` the caller passed (checked by `_check_options`), or None."""
    from ..paged.cache import PagedKVCache

    for k in ("cache", "past_key_values"):
        if isinstance(model_kwargs.get(k), PagedKVCache):
            return model_kwargs[k]
    return None
