"""LayerZero inside HuggingFace transformers (>= 5.0).

- `attn_implementation="layerzero"`: `import layerzero` registers `attention_forward` with
  `AttentionInterface` and transformers' SDPA mask function with `AttentionMaskInterface` under
  that name, through post-import hooks set when this module is imported (transformers is never
  imported by LayerZero itself).
- `lz.patch(model)`: switches the model's attention to "layerzero", gives each module calling its
  modeling module's `apply_rotary_pos_emb` a forward reading `lz.rope`'s version instead (on the
  instance: the module-level function, shared by the family, is never reassigned) and swaps MoE
  experts' `_apply_gate` for `lz.swiglu`/`geglu` (norms and dense gated MLPs are generic, in
  `layerzero.patching`).
- `attn_implementation="layerzero"` on a model whose attention is inline: a ValueError saying what
  to do instead (`inline_attention`).
- `lz.auto_patch()`: `from_pretrained` / `from_config` return patched models.

Everything here is recognised by structure (an attention module is one whose forward calls
`ALL_ATTENTION_FUNCTIONS`; RoPE is the module-level `apply_rotary_pos_emb` transformers looks up at
call time) and checked on a probe before it is patched.

Layer: top of the patching stack. Imports `layerzero.patching` (mechanics, recognisers) and
`layerzero.patch` (`auto_patch_model`); registers itself with `lz.patch` when imported (the end
of this module), which `layerzero.integrations` does on `import layerzero`. Nothing in
`layerzero` below it imports it; `layerzero.integrations.inline` and `.transformers_attention`
(the attention function) are its parts.
"""
from __future__ import annotations

import collections
import functools
import inspect
import logging
import sys
import threading
import types

import torch

from .. import ops, reference
from ..patch import auto_patch_model
from ..patching.frameworks import register_integration
from ..patching.hooks import when_imported
from ..patching.mlps import activation_op
from ..patching.probes import META, agree, param_device, probe_input
from ..patching.rebind import global_names, with_globals
from ..patching.record import Item
from ..patching.swap import set_attr, swap_forward, watch

log = logging.getLogger("layerzero")
NAME = "layerzero"

# ---- registration with transformers (post-import hooks, set at the end of this module) --------


def register_attention(modeling_utils) -> None:
    """AttentionInterface.register("layerzero", attention_forward); and "layerzero" refused, with
    what to do instead, for a model whose attention is written inline (`inline_attention`)."""
    modeling_utils.AttentionInterface.register(NAME, attention_forward)
    cls = modeling_utils.PreTrainedModel
    check = cls.__dict__.get("get_correct_attn_implementation")
    if callable(check) and not hasattr(check, "lz_checks"):
        cls.get_correct_attn_implementation = _refusing_inline(check)


def inline_attention(cls) -> str | None:
    """Why `attn_implementation="layerzero"` cannot reach model class `cls`, or None: its modeling
    module defines attention modules and none of them calls transformers' AttentionInterface
    (falcon, gpt_neo, ...: transformers would raise KeyError 'layerzero' or silently compute
    attention its own way)."""
    mod = sys.modules.get(cls.__module__)
    if mod is None:
        return None
    if not getattr(cls, "_supports_attention_backend", False):
        own = [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, torch.nn.Module)
               and v.__module__ == mod.__name__]
        attention = sorted(v.__name__ for v in own if "Attention" in v.__name__)
        if attention and not any(_calls_interface(v) for v in own):
            return (f'attn_implementation="{NAME}": {cls.__name__} computes attention inline '
                    f'({", ".join(attention)} in {mod.__name__} do not call transformers\' '
                    f"AttentionInterface), so no registered attention function would run. Build it "
                    f'with its own attention (leave attn_implementation unset, or "eager" / "sdpa") '
                    f"and call lz.patch(model): norms, gated MLPs and RoPE then run through "
                    f"LayerZero, attention stays transformers' own (lz.auto_patch() does the same)")
    by_name = sorted(k for k, v in vars(mod).items() if k.endswith("ATTENTION_CLASSES")
                     and isinstance(v, dict) and NAME not in v)
    if by_name:  # git: attention classes picked from a dict by attn_implementation -> KeyError
        return (f'attn_implementation="{NAME}": {cls.__name__} picks attention classes by name from '
                f"{', '.join(by_name)} in {mod.__name__}, which has no {NAME!r} entry. Build it with "
                f"its own attention and call lz.patch(model) instead")
    return None


def _refusing_inline(check):
    @functools.wraps(check)
    def get_correct_attn_implementation(self, requested_attention, *args, **kwargs):
        if requested_attention == NAME:
            why = inline_attention(type(self))
            if why is not None:
                raise ValueError(why)
            mark_additive(self)
        return check(self, requested_attention, *args, **kwargs)
    get_correct_attn_implementation.lz_checks = True
    return get_correct_attn_implementation


def register_mask(masking_utils) -> None:
    """AttentionMaskInterface.register("layerzero", ...): transformers' sdpa_mask (the mask is None
    where `is_causal` or nothing expresses it, else a bool (B, 1, Sq, Sk) mask with True =
    attend), except that a plain causal mask is None under torch.compile too (`causal_mask`).
    Without this registration under the same name, transformers would drop the padding mask."""
    masking_utils.AttentionMaskInterface.register(NAME, causal_mask(masking_utils))


# ids of the configs of models whose own code expects transformers' eager masks (additive float):
# classes without SDPA support (`_supports_sdpa = False`; deepseek_v4 appends a float block bias
# to the mask it gets, a bool mask there turned -inf into True). id -> weakref to the config.
_additive: dict = {}


# Models whose outputs at real tokens read their padding positions' states (blt pools every byte
# position, padding included, into its patches): a padding query, which attends to no key,
# must come out as eager attention makes it (a uniform average over the keys, from the dtype's
# minimum added everywhere), not as the zeros LayerZero (and an empty row's -inf) give. They
# get eager's additive masks, like the models without SDPA support.
PADDING_READERS = frozenset({"BltModel"})


def mark_additive(model) -> None:
    """Note the configs of `model` and its sub-models whose class lacks SDPA support or is a
    PADDING_READERS class: the mask function gives them eager's additive masks (`causal_mask`),
    which LayerZero's attention takes."""
    import weakref

    mu = sys.modules["transformers.modeling_utils"]
    for m in model.modules():
        if isinstance(m, mu.PreTrainedModel) and (not getattr(type(m), "_supports_sdpa", True)
                                                  or type(m).__name__ in PADDING_READERS):
            for c in (m.config, *(getattr(m.config, k, None) for k in getattr(m.config, "sub_configs", {}) or {})):
                if c is not None:
                    _additive[id(c)] = weakref.ref(c, lambda _r, k=id(c): _additive.pop(k, None))


def _wants_additive(config) -> bool:
    ref = _additive.get(id(config)) if config is not None else None
    return ref is not None and ref() is config


def causal_mask(masking_utils):
    """sdpa_mask (eager_mask for the models `mark_additive` noted), but a call that is only causal (no padding mask, Sq == Sk from position 0, no
    window, the plain causal mask function) returns None also while dynamo traces: the attention
    then runs with is_causal=True (flash / cuDNN kernels), not with a materialised (B, 1, Sq, Sk)
    mask. transformers < 5.24 skips the mask only in eager mode (`_ignore_causal_mask_sdpa`
    returns False whenever it traces), so a compiled prefill built and read a 2048 x 2048 mask
    per call. A shape-only decision: nothing is read from tensor values."""
    sdpa_mask, eager_mask = masking_utils.sdpa_mask, masking_utils.eager_mask
    causal_fn = masking_utils.causal_mask_function

    def layerzero_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                       mask_function=causal_fn, attention_mask=None, local_size=None,
                       allow_is_causal_skip=True, *args, **kwargs):
        if not args and _wants_additive(kwargs.get("config")):   # see mark_additive
            return eager_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                              q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                              attention_mask=attention_mask, local_size=local_size, **kwargs)
        if (allow_is_causal_skip and attention_mask is None and mask_function is causal_fn
                and local_size is None and not args and isinstance(q_length, int)
                and q_length == kv_length and q_length > 1
                and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0
                and torch.compiler.is_compiling()):
            return None
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                         attention_mask, local_size, allow_is_causal_skip, *args, **kwargs)

    layerzero_mask.__wrapped__ = sdpa_mask
    return layerzero_mask


# ---- the attention function: transformers_attention.py -----------------------------------------

from .transformers_attention import (_INFORMATIONAL, _unknown, _warned, attention_forward,  # noqa: E402,F401
                                     paged_forward)


# ---- lz.patch(model) ---------------------------------------------------------------------------

def owns(model) -> bool:
    mu = sys.modules.get("transformers.modeling_utils")
    return mu is not None and isinstance(model, mu.PreTrainedModel)


@functools.lru_cache(maxsize=None)
def _calls_interface(cls) -> bool:
    """Does cls.forward compute attention through transformers' AttentionInterface?"""
    fn = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
    code = getattr(fn, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _attr(obj, name):
    """obj.name, or None when it is missing or reading it raises (gemma4's configs raise their
    own error for attributes that differ per layer, such as head_dim)."""
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - any config property may refuse
        return None


def _first(obj, names):
    for n in names:
        v = _attr(obj, n)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _attention_match(m) -> dict:
    """CallSpec fields of the calls an attention module makes (for lz.explain(model))."""
    cfg = getattr(m, "config", None)
    hq = _first(m, ("num_heads", "num_attention_heads", "n_heads")) or _first(cfg, ("num_attention_heads",))
    d = _first(m, ("head_dim", "attention_head_size", "key_value_proj_dim"))
    hkv = _first(m, ("num_key_value_heads", "num_kv_heads"))
    groups = _first(m, ("num_key_value_groups",))
    if hkv is None and hq and groups:
        hkv = hq // groups
    match = {"op": "attention"}
    for k, v in (("num_heads", hq), ("num_kv_heads", hkv), ("head_dim", d)):
        if v:
            match[k] = v
    return match


def _attention_modules(model):
    return [(n, m) for n, m in model.named_modules() if _calls_interface(type(m))]


def interface_items(model) -> list:
    """Attention modules of a model that runs attn_implementation="layerzero" (lz.explain)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) != NAME:
        return []
    return [Item(n, "attention", "patched", "attention", "", _attention_match(m))
            for n, m in _attention_modules(model)]


def _configs(model) -> list:
    """Every config whose _attn_implementation set_attn_implementation may change."""
    out, seen = [], set()
    mu = sys.modules["transformers.modeling_utils"]
    todo = [m.config for m in model.modules() if isinstance(m, mu.PreTrainedModel)]
    while todo:
        c = todo.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        out.append(c)
        todo += [getattr(c, k, None) for k in getattr(c, "sub_configs", {}) or {}]
    return out


def _can_switch(m) -> bool:
    return getattr(type(m), "_can_set_attn_implementation", lambda: True)()


def _switchable_parts(model) -> list:
    """Sub-models of a composite model that can't switch as a whole (got_ocr2, granite_speech:
    an inline vision/audio tower) which can: the first PreTrainedModels below it that can switch
    and whose attention goes through AttentionInterface."""
    mu = sys.modules["transformers.modeling_utils"]
    out, todo = [], list(model.children())
    while todo:
        m = todo.pop(0)
        if isinstance(m, mu.PreTrainedModel) and _can_switch(m) and inline_attention(type(m)) is None:
            if any(_calls_interface(type(x)) for x in m.modules()):
                out.append(m)
            continue
        todo += list(m.children())
    return out


def _patch_attention(model, report, undo) -> None:
    mods = _attention_modules(model)
    cls = type(model)
    can = _can_switch(model)
    refused = inline_attention(cls) if mods and can else None
    if refused is not None:   # some attention of the family can't take the name (git's text decoder)
        report.add(cls.__name__, "attention", "skipped", detail=refused.split(". ")[0] + "; left as is")
        return
    parts = [model] if mods and can else (_switchable_parts(model) if mods else [])
    inside = {id(x) for part in parts for x in part.modules()}
    from .inline import patch_inline   # attention written inline (BERT-style, ...)
    inline = patch_inline(model, report, undo, skip=inside)
    swapped = [n for n, ok in inline.items() if ok]

    def reported(n):  # by patch_inline, or the attention module around one it swapped
        return n in inline or any(s.startswith(n + ".") for s in swapped)
    names = [n for n, m in model.named_modules() if type(m).__name__.endswith("Attention")
             and id(m) not in inside and not reported(n)]
    if not parts and not swapped:
        names = names or [cls.__name__]
    for n in names:
        report.add(n, "attention", "skipped", detail=f"{cls.__name__} computes this attention inline, not "
                   f"through transformers' AttentionInterface; left as is")
    for part in parts:
        _switch(model, part, [(n, m) for n, m in mods if id(m) in {id(x) for x in part.modules()}],
                report, undo)


def _switch(model, part, mods, report, undo) -> None:
    """attn_implementation -> "layerzero" on `part` (the model or one of its sub-models)."""
    configs = _configs(part)
    ids = {id(c) for c in configs}
    for _, m in mods:  # attention modules may hold their own config copy (T5 stacks on 5.17)
        c = getattr(m, "config", None)
        if c is not None and id(c) not in ids:
            ids.add(id(c))
            configs.append(c)
    saved = [(c, c.__dict__.get("_attn_implementation_internal")) for c in configs]
    mark_additive(part)
    part.set_attn_implementation(NAME)
    for _, m in mods:
        c = getattr(m, "config", None)
        if c is not None and getattr(c, "_attn_implementation", None) != NAME:
            c._attn_implementation_internal = NAME

    def restore():
        for c, v in saved:
            c._attn_implementation_internal = v
    undo.append(restore)
    for n, m in mods:
        watch(m, undo)
        report.add(n, "attention", "patched", "attention",
                   f"{type(m).__name__}: attn_implementation={NAME!r}", _attention_match(m))


def _rope_probe(fn):
    """How `fn(q, k, cos, sin, ...)` rotates, or None: {'interleaved', 'partial', 'unsqueeze'}."""
    g = torch.Generator().manual_seed(7)
    q, k, theta = (torch.randn(*shape, generator=g, device="cpu")   # not meta under a device context
                   for shape in ((2, 4, 3, 16), (2, 2, 3, 16), (2, 3, 8)))
    forms = {False: torch.cat((theta, theta), -1), True: theta.repeat_interleave(2, -1)}
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    if len(params) < 4:
        return None
    for interleaved, ang in forms.items():
        cos, sin = ang.cos(), ang.sin()
        try:
            got = fn(q, k, cos, sin)
        except Exception:
            return None
        want = reference.rope(q, k, cos, sin, "bhsd", interleaved)
        if not (isinstance(got, tuple) and len(got) == 2
                and all(agree(a, b, torch.float32)[0] for a, b in zip(got, want))):
            continue
        info = {"interleaved": interleaved, "partial": False,
                "unsqueeze": params.index("unsqueeze_dim") - 4 if "unsqueeze_dim" in params[4:] else None}
        try:  # partial rotary: the first D_rot features rotate, the rest pass through
            pc, ps = cos[..., :8], sin[..., :8]
            if interleaved:
                pc, ps = ang[..., :4].repeat_interleave(2, -1).cos(), ang[..., :4].repeat_interleave(2, -1).sin()
            got = fn(q, k, pc, ps)
            want = reference.rope(q, k, pc, ps, "bhsd", interleaved)
            info["partial"] = all(agree(a, b, torch.float32)[0] for a, b in zip(got, want))
        except Exception:
            pass
        return info
    return None


def _rope_fn(original, info):
    ud_pos, interleaved, partial = info["unsqueeze"], info["interleaved"], info["partial"]

    def apply_rotary_pos_emb(*args, **kwargs):
        # (q, k, cos, sin) given positionally, both q and k: lz.rope; any other call (qwen4_exp
        # rotates q alone, `apply_rotary_pos_emb(q, cos=, sin=)`) runs transformers' function
        if len(args) < 4 or any(n not in ("unsqueeze_dim", "position_ids") for n in kwargs):
            return original(*args, **kwargs)
        q, k, cos, sin, *rest = args
        ud = kwargs.get("unsqueeze_dim", rest[ud_pos] if ud_pos is not None and len(rest) > ud_pos else 1)
        if (k is None or ud not in (1, 2) or cos.dim() != 3 or q.dtype != k.dtype or q.dim() != 4
                or (cos.shape[-1] != q.shape[-1] and not partial)):
            return original(*args, **kwargs)
        return ops.rope(q, k, cos, sin, layout="bhsd" if ud == 1 else "bshd", interleaved=interleaved)

    apply_rotary_pos_emb.__wrapped_original__ = original
    return apply_rotary_pos_emb


_ROPE = "apply_rotary_pos_emb"
_rope_fns: dict = {}    # transformers' function -> LayerZero's (one object each: compiled guards hold)
_rope_forwards: dict = {}   # (class forward, LayerZero's rope) -> the forward reading it


@functools.lru_cache(maxsize=None)
def _reads_rope(cls):
    """The `apply_rotary_pos_emb` cls.forward reads as a global (from its own modeling module), or None."""
    fn = getattr(cls, "forward", None)
    inner = inspect.unwrap(fn) if callable(fn) else None
    code = getattr(inner, "__code__", None)
    if code is None or _ROPE not in global_names(code):
        return None
    rope = inner.__globals__.get(_ROPE)
    return rope if callable(rope) else None


def _own_forward(m) -> bool:
    """Does `m` run its class's forward (nothing swapped on the instance, accelerate hook aside)?"""
    hooked = getattr(m, "_hf_hook", None) is not None and "_old_forward" in m.__dict__
    cur = m.__dict__.get("_old_forward" if hooked else "forward")
    return cur is None or getattr(cur, "__func__", None) is type(m).forward


def _patch_rope(model, report, undo) -> None:
    """Each module whose forward calls its modeling module's `apply_rotary_pos_emb` runs, on the
    instance, a copy of that forward reading LayerZero's version instead (`with_globals`): the
    module-level function, shared with every other model of the family, is never touched."""
    users: dict = {}        # transformers' function -> [(name, module)]
    for name, m in model.named_modules():
        rope = _reads_rope(type(m))
        if rope is not None:
            users.setdefault(rope, []).append((name, m))
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads, hidden = _attr(cfg, "num_attention_heads"), _attr(cfg, "hidden_size")
    d = _attr(cfg, "head_dim") or (hidden // heads if isinstance(heads, int) and isinstance(hidden, int)
                                   and heads else None)
    match = {"op": "rope", "head_dim": d} if isinstance(d, int) else {"op": "rope"}
    for original, mods in sorted(users.items(), key=lambda kv: kv[0].__module__ or ""):
        item = f"{original.__module__}.{_ROPE}"
        info = _rope_probe(original)
        if info is None:
            report.add(item, "rope", "skipped", detail="does not rotate like apply_rotary_pos_emb "
                       "(halves or pairs) on a probe")
            continue
        fn = _rope_fns.get(original) or _rope_fns.setdefault(original, _rope_fn(original, info))
        done = []
        inline = {i.name for i in report.items if i.kind == "rope" and i.status == "patched"}
        for name, m in mods:
            if name in inline:   # an inline attention replacement rotating through lz.rope
                continue
            cls = type(m)
            key = (cls.forward, fn)
            if key not in _rope_forwards:
                _rope_forwards[key] = with_globals(cls.forward, {_ROPE: fn})
            new = _rope_forwards[key]
            if new is None or not _own_forward(m):
                why = ("a decorator of its forward hides the function it wraps" if new is None
                       else "its forward was already replaced on the instance")
                report.add(name, "rope", "skipped", detail=f"{cls.__name__}: {why}")
                continue
            swap_forward(m, lambda original_forward, new=new: new, undo)
            done.append(cls.__name__)
        if done:
            kinds = ", ".join(f"{n} x{c}" for n, c in sorted(collections.Counter(done).items()))
            report.add(item, "rope", "patched", "rope",
                       f"{'interleaved' if info['interleaved'] else 'rotate_half'}"
                       f"{', partial rotary' if info['partial'] else ''} -> lz.rope in this model's {kinds}",
                       match)


def _gate_fn(op, kw):
    if op == "swiglu":
        return lambda self, x: ops.swiglu(*x.chunk(2, dim=-1))
    return lambda self, x: ops.geglu(*x.chunk(2, dim=-1), approximate=kw["approximate"])


def _patch_experts(model, report, undo) -> None:
    for name, m in model.named_modules():
        gate = getattr(m, "_apply_gate", None)
        if not callable(gate) or not hasattr(m, "act_fn"):
            continue
        cls = type(m).__name__
        found = activation_op(m.act_fn)
        impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
        p = next(m.parameters(), None)
        if found is None:
            report.add(name, "experts", "skipped", detail=f"{cls}: activation is neither SiLU nor GELU")
            continue
        op, kw = found
        if p is not None and param_device(m) is None:
            report.add(name, "experts", "skipped", detail=f"{cls}: {META}")
            continue
        x = probe_input((5, 16), p, device=param_device(m))
        try:
            with torch.no_grad():
                got = gate(x)
        except Exception as e:
            report.add(name, "experts", "skipped", detail=f"{cls}: probe raised {type(e).__name__}: {e}")
            continue
        g, u = x.chunk(2, dim=-1)
        want = reference.swiglu(g, u) if op == "swiglu" else reference.geglu(g, u, kw["approximate"])
        ok, err = agree(got, want, x.dtype)
        if not ok:
            report.add(name, "experts", "skipped", detail=f"{cls}._apply_gate is not act(gate) * up "
                       f"(probe error {err:.2g})")
            continue
        if impl == "eager":
            report.add(name, "experts", "skipped", detail=f"{cls}: the eager experts forward inlines "
                       f"act_fn(gate) * up; model.set_experts_implementation('grouped_mm') routes it "
                       f"through _apply_gate, which lz.patch swaps")
            continue
        set_attr(m, "_apply_gate", types.MethodType(_gate_fn(op, kw), m), undo)
        inter = p.shape[1] // 2 if p is not None and p.dim() == 3 else None
        report.add(name, "experts", "patched", op, f"{cls}._apply_gate ({impl}) -> {op}",
                   {"op": op, "head_dim": inter} if inter else {"op": op})


def patch_model(model, report, undo, options) -> None:
    """The transformers-specific part of lz.patch: attention, RoPE, MoE experts' gating."""
    if options["attention"]:
        _patch_attention(model, report, undo)
    if options["rope"]:
        _patch_rope(model, report, undo)
    if options["attention"] and any(i.kind == "attention" and i.status == "patched" for i in report.items):
        from .transformers_cache import patch_cache   # after RoPE: it wraps the attention forwards
        patch_cache([m for _, m in _attention_modules(model)], report, undo)
    if options["mlp"]:
        _patch_experts(model, report, undo)


# ---- lz.auto_patch -----------------------------------------------------------------------------

_saved: dict = {}
_tls = threading.local()


def _requested_attention(args, kwargs):
    """The attn_implementation a from_pretrained / _from_config call asks for: the keyword, else
    the one set on the config it is given (which transformers then keeps); None if neither."""
    if kwargs.get("attn_implementation") is not None:
        return kwargs["attn_implementation"]
    cfg = kwargs.get("config", args[0] if args else None)
    return getattr(cfg, "_attn_implementation_internal", None)


def _inside_model_init(frame) -> bool:
    """Is a PreTrainedModel's __init__ running above `frame` (a head building its base model with
    AutoModel.from_config)? That model is the outer one's part, patched (or not) with it."""
    mu = sys.modules["transformers.modeling_utils"]
    while frame is not None:
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), mu.PreTrainedModel):
            return True
        frame = frame.f_back
    return False


def _builder(fn):
    @functools.wraps(fn)
    def build(cls, *args, **kwargs):
        depth = getattr(_tls, "depth", 0)
        requested = _requested_attention(args, kwargs)
        _tls.depth = depth + 1
        try:
            out = fn(cls, *args, **kwargs)
        finally:
            _tls.depth = depth
        if depth == 0 and not _inside_model_init(sys._getframe(1)):
            auto_patch_model(out[0] if isinstance(out, tuple) else out,
                             None if requested == NAME else requested)
        return out
    return build


def install_auto_patch(modeling_utils) -> None:
    """Wrap PreTrainedModel.from_pretrained / _from_config (what AutoModel*.from_config calls) so
    the models they build are patched while `lz.auto_patch` is on."""
    cls = modeling_utils.PreTrainedModel
    if _saved:
        return
    for name in ("from_pretrained", "_from_config"):
        raw = cls.__dict__.get(name)
        if isinstance(raw, classmethod):
            _saved[name] = (cls, raw)
            setattr(cls, name, classmethod(_builder(raw.__func__)))


def remove_auto_patch() -> None:
    for name, (cls, raw) in list(_saved.items()):
        setattr(cls, name, raw)
    _saved.clear()


def set_auto_patch(on: bool) -> None:
    """`lz.auto_patch` on: wrap the builders (now, or once transformers is imported); off: unwrap."""
    if on:
        when_imported("transformers.modeling_utils", install_auto_patch)
    elif "transformers.modeling_utils" in sys.modules:
        remove_auto_patch()


# ---- registration, on import -------------------------------------------------------------------

register_integration("transformers", owns=owns, patch_model=patch_model, interface_items=interface_items,
                     auto_patch=set_auto_patch)
when_imported("transformers.modeling_utils", register_attention)
when_imported("transformers.masking_utils", register_mask)
