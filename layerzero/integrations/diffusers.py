"""LayerZero inside HuggingFace diffusers (>= 0.35; written against 0.42).

- `lz.patch(model)` / `lz.patch(pipeline)`: attention, RoPE, norms and gated feed-forwards of a
  diffusers model (or of every model in a pipeline, transformers text encoders included) run
  through LayerZero's ops; `lz.unpatch` restores them exactly.
- `model.set_attention_backend("layerzero")`, `with attention_backend("layerzero"):`: a
  "layerzero" member of diffusers' `AttentionBackendName` and `_AttentionBackendRegistry`, added by
  a post-import hook when the user imports diffusers (LayerZero never imports it itself).

How attention is patched, by structure: every module with a `processor` (diffusers' `Attention`,
`FluxAttention`, any `AttentionModuleMixin`) keeps its processor object, whose class is swapped
for a subclass whose `__call__` is the processor's own code with two global names rebound:
`F` (torch.nn.functional), whose `scaled_dot_product_attention` becomes `lz.attention` (layout
"bhsd"), and `dispatch_attention_fn`, which becomes `lz.attention` (layout "bshd"). Everything
else the processor does (projections, q/k norms, joint text+image attention, masks, residuals)
is diffusers' own code, so every processor feature is kept. Processors whose `apply_rotary_emb`
is diffusers' (Flux and others) get it rebound to `lz.rope`. A processor computing attention any
other way (bmm + softmax) is reported as skipped.

Nothing is dropped: both replacements take every argument diffusers passes and raise on what
LayerZero cannot apply (`return_lse`, context parallelism, unknown attention kwargs). The
registry backend also sees every keyword, because its supported-names set claims them all
(diffusers #12605: the dispatcher drops keywords a backend does not name).

Norms (diffusers' RMSNorm / LayerNorm / FP32LayerNorm, including those inside AdaLayerNorm*
and attention q/k norms) are the generic ones of `layerzero.patching.norms`; GEGLU / SwiGLU
activation modules (`proj` -> chunk -> act(gate) * up) become `lz.geglu` / `lz.swiglu` after a probe.

Layer: top of the patching stack. Imports `layerzero.patching` (mechanics) and `layerzero.patch`
(`patch` / `unpatch`, per pipeline component); registers itself with `lz.patch` when imported (the
end of this module), which `layerzero.integrations` does on `import layerzero`. Nothing in
`layerzero` below it imports it.
"""
from __future__ import annotations

import functools
import logging
import sys
import threading
import types
import weakref

import torch
from torch import nn

from .. import ops, reference, telemetry
from ..patch import patch as lz_patch
from ..patch import unpatch as lz_unpatch
from ..patching.frameworks import register_integration
from ..patching.hooks import when_imported
from ..patching.probes import META, agree, param_device, probe_input, run_original
from ..patching.rebind import global_uses, rebound_function
from ..patching.record import Item, Record, Report, records
from ..patching.swap import observe, set_attr, swap_forward, watch

log = logging.getLogger("layerzero")
NAME = "layerzero"

# ---- attention functions -----------------------------------------------------------------------


_current = threading.local()   # .module: the attention module whose patched processor is running


def _note(batch: int, sq: int, sk: int) -> None:
    """Note an attention call's sizes on the module whose processor makes it (lz.explain)."""
    m = getattr(_current, "module", None)
    if m is not None:
        observe(m, (batch, sq, sk))


def _noting(call):
    """A processor's __call__ that lets the attention calls it makes know their module."""
    @functools.wraps(call)
    def __call__(self, attn, *args, **kwargs):
        if torch.compiler.is_compiling():
            return call(self, attn, *args, **kwargs)
        prev, _current.module = getattr(_current, "module", None), attn
        try:
            return call(self, attn, *args, **kwargs)
        finally:
            _current.module = prev
    return __call__


_logged_block_masks: set = set()


def _mask_bshd(attn_mask, query, key):
    """diffusers' native backend convention: a 2-D (B, Sk) mask means (B, 1, 1, Sk)."""
    if (attn_mask is not None and attn_mask.dim() == 2 and attn_mask.shape[0] == query.shape[0]
            and attn_mask.shape[1] == key.shape[1]):
        return attn_mask[:, None, None, :]
    return attn_mask


def attention_backend_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, return_lse=False, _parallel_config=None, **unsupported):
    """The "layerzero" backend of diffusers' attention dispatcher -> `lz.attention(layout="bshd")`.

    query (B, Sq, Hq, D), key/value (B, Sk, Hkv, D) -> (B, Sq, Hq, Dv). attn_mask: bool
    (True = attend) or additive float, broadcastable to (B, Hq, Sq, Sk), or (B, Sk) (a key padding
    mask, as diffusers' native backend reads it). GQA is allowed whatever `enable_gqa` says (it
    only permits what SDPA would otherwise refuse). Raises on `return_lse=True`, on context
    parallelism and on any other keyword: nothing passed here is ignored.
    """
    if unsupported:
        raise TypeError(f"the layerzero attention backend got keyword arguments it cannot apply: "
                        f"{', '.join(sorted(unsupported))}; it takes attn_mask, dropout_p, is_causal, "
                        f"scale, enable_gqa")
    if return_lse:
        raise ValueError("return_lse=True: the layerzero attention backend does not return the "
                         "log-sum-exp; use a diffusers backend that does (e.g. 'flash')")
    if _parallel_config is not None:
        raise ValueError("context parallelism (parallel_config) is not supported by the layerzero "
                         "attention backend; use one listed in _AttentionBackendRegistry._supports_context_parallel")
    _note(query.shape[0], query.shape[1], key.shape[1])
    return ops.attention(query, key, value, attn_mask=_mask_bshd(attn_mask, query, key),
                         is_causal=is_causal, scale=scale, dropout_p=dropout_p, layout="bshd")


def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
    """Stands in for diffusers' `dispatch_attention_fn` inside patched processors (same signature,
    q/k/v (B, S, H, D)): every argument reaches `attention_backend_fn`, which raises on what it
    cannot apply. `backend` (the processor's own choice) is replaced by LayerZero's selection,
    except for a flex `BlockMask` (AnyFlow, Kandinsky 6 SR, LTX-2's VAE), which only flex takes:
    such a call goes to diffusers' own dispatcher with the processor's backend (logged once,
    counted in lz.metrics() as kernel "diffusers.<backend>")."""
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        if type(attn_mask).__name__ not in _logged_block_masks:
            _logged_block_masks.add(type(attn_mask).__name__)
            log.info("layerzero: an attention call with a %s mask runs diffusers' %s backend",
                     type(attn_mask).__name__, backend)
        own = sys.modules["diffusers.models.attention_dispatch"].dispatch_attention_fn
        # counted as what it is: a call LayerZero handed to diffusers' own backend
        telemetry.count_call(("attention", f"diffusers.{getattr(backend, 'value', backend) or 'default'}", False))
        return own(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                   attention_kwargs, backend=backend, parallel_config=parallel_config)
    return attention_backend_fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                _parallel_config=parallel_config, **(attention_kwargs or {}))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention`'s signature and semantics, run by `lz.attention`.

    query (B, Hq, Sq, D) (or (N, Sq, D)), key/value (B, Hkv, Sk, D). attn_mask as SDPA's:
    bool (True = attend) or additive float, broadcastable to (B, Hq, Sq, Sk). GQA is allowed.
    """
    if query.dim() == 3:  # (N, S, D): one more leading dim, masks broadcast the same way
        return scaled_dot_product_attention(query[None], key[None], value[None], attn_mask, dropout_p,
                                            is_causal, scale, enable_gqa)[0]
    _note(query.shape[0], query.shape[-2], key.shape[-2])
    return ops.attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                         dropout_p=dropout_p)


# torch.nn.functional as processors see it once patched (a module, so torch.compile traces it)
functional = types.ModuleType("layerzero.integrations.diffusers.functional",
                              "torch.nn.functional with scaled_dot_product_attention -> lz.attention")
functional.__dict__.update({k: v for k, v in vars(torch.nn.functional).items() if not k.startswith("__")})
functional.scaled_dot_product_attention = scaled_dot_product_attention

# ---- RoPE --------------------------------------------------------------------------------------

_rope_warned: set = set()


def _rotary(original, rope_fn):
    """diffusers' `apply_rotary_emb(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)` by
    `rope_fn` (`ops.rope`, or `reference.rope` for the patch-time probe).

    x (B, H, S, D) for sequence_dim=2 or (B, S, H, D) for 1; freqs_cis = (cos, sin), each (S, D).
    use_real_unbind_dim=-1 rotates adjacent pairs (Flux: interleaved=True); -2 rotates halves.
    `lz.rope` rotates a (q, k) pair; here k is x's first head only, whose result is dropped (1/H
    extra work). Other forms (complex freqs, other shapes) run the original and are counted."""
    def apply_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        cos, sin = freqs_cis if use_real and isinstance(freqs_cis, (tuple, list)) else (None, None)
        why = None
        if cos is None:
            why = "complex freqs_cis (use_real=False)"
        elif use_real_unbind_dim not in (-1, -2) or sequence_dim not in (1, 2):
            why = f"use_real_unbind_dim={use_real_unbind_dim}, sequence_dim={sequence_dim}"
        elif (not isinstance(cos, torch.Tensor) or not isinstance(sin, torch.Tensor) or x.dim() != 4
              or cos.dim() != 2 or cos.shape != sin.shape or cos.shape[-1] != x.shape[-1]
              or cos.shape[0] != x.shape[sequence_dim]):
            why = "freqs of shape other than (S, head_dim)"
        if why is not None:
            if why not in _rope_warned:
                _rope_warned.add(why)
                log.info("layerzero: apply_rotary_emb with %s runs diffusers' own code", why)
            telemetry.count_call(("rope", "diffusers.apply_rotary_emb", False))
            return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
        layout, head_axis = ("bhsd", 1) if sequence_dim == 2 else ("bshd", 2)
        cos, sin = cos.to(x.device), sin.to(x.device)
        return rope_fn(x, x.narrow(head_axis, 0, 1), cos, sin, layout=layout,
                       interleaved=use_real_unbind_dim == -1)[0]

    apply_rotary_emb.__wrapped_original__ = original
    return apply_rotary_emb


def _rotary_agrees(original) -> bool:
    """Does our apply_rotary_emb (with the reference rope) match `original` on a probe?"""
    fn = _rotary(original, reference.rope)
    g = torch.Generator().manual_seed(5)
    for seq_dim in (1, 2):
        shape = (2, 3, 5, 8) if seq_dim == 2 else (2, 5, 3, 8)
        x, theta = torch.randn(shape, generator=g, device="cpu"), torch.randn(5, 4, generator=g, device="cpu")
        for unbind, ang in ((-1, theta.repeat_interleave(2, -1)), (-2, torch.cat((theta, theta), -1))):
            args = (x, (ang.cos(), ang.sin()), True, unbind, seq_dim)
            try:
                ok, _ = agree(fn(*args), original(*args), torch.float32)
            except Exception:
                return False
            if not ok:
                return False
    return True


# ---- the "layerzero" backend in diffusers' registry (post-import hook, set at the end) ---------

class _EveryName(frozenset):
    """The supported-argument set diffusers filters keywords by: it contains every name, so the
    dispatcher drops none and `attention_backend_fn` sees (and raises on) what it cannot apply."""

    def __contains__(self, name) -> bool:
        return True


def _backend_member(enum_cls):
    """AttentionBackendName("layerzero"), added to the closed Enum once."""
    member = enum_cls._value2member_map_.get(NAME)
    if member is not None:
        return member
    member = str.__new__(enum_cls, NAME)
    member._name_, member._value_ = "LAYERZERO", NAME
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_["LAYERZERO"] = member
    enum_cls._value2member_map_[NAME] = member
    enum_cls._member_names_.append("LAYERZERO")
    type.__setattr__(enum_cls, "LAYERZERO", member)
    return member


def register_backend(attention_dispatch=None) -> None:
    """Make "layerzero" a diffusers attention backend (idempotent). Called by the post-import hook
    on `diffusers.models.attention_dispatch`, and by `lz.patch` for diffusers objects."""
    ad = attention_dispatch or sys.modules.get("diffusers.models.attention_dispatch")
    if ad is None:
        import importlib
        ad = importlib.import_module("diffusers.models.attention_dispatch")
    reg = ad._AttentionBackendRegistry
    member = _backend_member(ad.AttentionBackendName)
    if reg._backends.get(member) is attention_backend_fn:
        return
    checks = [c for c in (getattr(ad, "_check_device", None), getattr(ad, "_check_shape", None)) if c]
    reg.register(member, constraints=checks)(attention_backend_fn)
    reg._supported_arg_names[member] = _EveryName(reg._supported_arg_names[member])


# ---- recognising processors --------------------------------------------------------------------

def _is_diffusers_fn(obj, module: str, name: str) -> bool:
    return getattr(obj, "__module__", None) == module and getattr(obj, "__name__", None) == name


_plans: dict = {}   # (processor class, attention, rope) -> plan
_rotaries: dict = {}    # diffusers' apply_rotary_emb -> LayerZero's


def _plan(cls, attention: bool, rope: bool) -> dict:
    """What patching processors of class `cls` means: {'sub': patched subclass or None,
    'attention': description or None, 'why': reason attention is not patched, 'rope': ...}."""
    key = (cls, attention, rope)
    if key in _plans:
        return _plans[key]
    fn = getattr(cls, "__call__", None)
    code = getattr(fn, "__code__", None)
    plan = {"sub": None, "attention": None, "why": None, "rope": None, "rope_why": None}
    if code is None:
        plan["why"] = f"{cls.__name__}.__call__ is not a Python function"
        _plans[key] = plan
        return plan
    g = fn.__globals__
    names, owners = global_uses(code)
    rebind, what = {}, []
    for n in sorted(owners):
        if g.get(n) is torch.nn.functional:
            rebind[n] = functional
            what.append(f"{n}.scaled_dot_product_attention -> lz.attention")
    if g.get("scaled_dot_product_attention") is torch.nn.functional.scaled_dot_product_attention \
            and "scaled_dot_product_attention" in names:
        rebind["scaled_dot_product_attention"] = scaled_dot_product_attention
        what.append("scaled_dot_product_attention -> lz.attention")
    for n in sorted(names):
        if _is_diffusers_fn(g.get(n), "diffusers.models.attention_dispatch", "dispatch_attention_fn"):
            rebind[n] = dispatch_attention_fn
            what.append("dispatch_attention_fn -> lz.attention(layout='bshd')")
    if not attention:
        rebind.clear()
    elif not rebind:
        plan["why"] = (f"{cls.__name__}.__call__ computes attention without F.scaled_dot_product_attention "
                       f"or dispatch_attention_fn (e.g. bmm + softmax); left as is")
    else:
        plan["attention"] = "; ".join(what)
    if rope:
        for n in sorted(names):
            obj = g.get(n)
            if _is_diffusers_fn(obj, "diffusers.models.embeddings", "apply_rotary_emb"):
                if _rotary_agrees(obj):   # one object per original: rebound namespaces stay put
                    rebind[n] = _rotaries.get(obj) or _rotaries.setdefault(obj, _rotary(obj, ops.rope))
                    plan["rope"] = f"{cls.__name__}: {n} (real cos/sin, pairs or halves) -> lz.rope"
                else:
                    plan["rope_why"] = f"{cls.__name__}: {n} does not rotate like lz.rope on a probe"
            elif callable(obj) and "rotary" in n.lower() and plan["rope"] is None:
                plan["rope_why"] = f"{cls.__name__}: rotary helper {n} is not diffusers' apply_rotary_emb"
    if rebind:
        plan["sub"] = type(cls)(cls.__name__, (cls,), {
            "__call__": _noting(rebound_function(fn, rebind)), "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__, "_layerzero_original_class": cls})
    _plans[key] = plan
    return plan


def _attention_match(m) -> dict:
    heads = getattr(m, "heads", None)
    d = getattr(m, "head_dim", None)
    if not isinstance(d, int):
        inner = getattr(getattr(m, "to_k", None), "out_features", None)
        d = inner // heads if isinstance(inner, int) and isinstance(heads, int) and heads else None
    match = {"op": "attention"}
    if isinstance(heads, int):
        match["num_heads"] = heads
    if isinstance(d, int):
        match["head_dim"] = d
    return match


def _swap_class(proc, sub, undo) -> None:
    cls = type(proc)
    proc.__class__ = sub

    def restore():
        if type(proc) is sub:
            proc.__class__ = cls
    undo.append(restore)


def _patch_attention(model, report, undo, options) -> None:
    swapped: dict[int, object] = {}
    rope_done: set = set()
    for name, m in model.named_modules():
        proc = getattr(m, "processor", None)
        if proc is None or not callable(proc) or not callable(getattr(m, "set_processor", None)):
            continue
        cls = type(proc)
        base = getattr(cls, "_layerzero_original_class", cls)
        mod_cls = type(m).__name__
        if getattr(proc, "_parallel_config", None) is not None:
            if options["attention"]:
                report.add(name, "attention", "skipped", detail=f"{mod_cls}/{base.__name__}: context "
                           f"parallelism is enabled; diffusers' own backend does the exchange")
            continue
        plan = _plan(base, options["attention"], options["rope"])
        if plan["sub"] is not None and id(proc) not in swapped and cls is base:
            _swap_class(proc, plan["sub"], undo)
            swapped[id(proc)] = proc
        if options["attention"]:
            if plan["attention"]:
                backend = getattr(proc, "_attention_backend", None)
                note = (f" (replaces the processor's backend {getattr(backend, 'value', backend)!r})"
                        if backend is not None and getattr(backend, "value", backend) != NAME else "")
                watch(m, undo)
                report.add(name, "attention", "patched", "attention",
                           f"{mod_cls}/{base.__name__}: {plan['attention']}{note}", _attention_match(m))
            else:
                report.add(name, "attention", "skipped", detail=f"{mod_cls}/{plan['why']}")
        if options["rope"] and base not in rope_done and (plan["rope"] or plan["rope_why"]):
            rope_done.add(base)
            item = f"{base.__module__.rpartition('.')[2]}.{base.__name__}.apply_rotary_emb"
            if plan["rope"]:
                match = {"op": "rope"}
                if "head_dim" in _attention_match(m):
                    match["head_dim"] = _attention_match(m)["head_dim"]
                report.add(item, "rope", "patched", "rope", plan["rope"], match)
            else:
                report.add(item, "rope", "skipped", detail=plan["rope_why"])


# ---- gated feed-forwards -----------------------------------------------------------------------

_GLU_FORMS = (("swiglu", None), ("geglu", "none"), ("geglu", "tanh"))


def _glu_forward(up_first: bool, gate_fn):
    """act(gate) * up over `proj(x)` split in two halves; `gate_fn(gate, up)` is the op."""
    def make(original):
        def forward(self, hidden_states, *args, **kwargs):
            if args or kwargs:  # diffusers' deprecated `scale` argument: its own code warns
                return original(hidden_states, *args, **kwargs)
            observe(self, hidden_states.shape)
            first, second = self.proj(hidden_states).chunk(2, dim=-1)
            return gate_fn(second, first) if up_first else gate_fn(first, second)
        forward.__name__ = "lz_glu_forward"
        return forward
    return make


def _gate_op(op, approximate, ref: bool):
    if op == "swiglu":
        return reference.swiglu if ref else ops.swiglu
    if ref:
        return lambda g, u: reference.geglu(g, u, approximate)
    return lambda g, u: ops.geglu(g, u, approximate)


def _patch_glu(name: str, act: nn.Module, report, undo) -> str | None:
    """Patch a gated activation module (`proj` -> chunk(2) -> act(gate) * up, the gate half first
    or second, SiLU or GELU); None if patched, else why not."""
    cls = type(act).__name__
    proj = act.proj
    device = param_device(act)
    if device is None:
        return f"{cls}: {META}"
    dtype = proj.weight.dtype
    x = probe_input((2, 3, proj.in_features), None, dtype=dtype, device=device)
    try:
        got = run_original(act, x)
        with torch.no_grad():
            cands = [(op, a, up_first, _glu_forward(up_first, _gate_op(op, a, True))(None)(act, x))
                     for op, a in _GLU_FORMS for up_first in (True, False)]
    except Exception as e:
        return f"{cls}: probe raised {type(e).__name__}: {e}"
    for op, approximate, up_first, want in cands:
        if agree(got, want, dtype)[0]:
            swap_forward(act, _glu_forward(up_first, _gate_op(op, approximate, False)), undo)
            watch(act, undo)
            form = op if op == "swiglu" else f"geglu(approximate={approximate!r})"
            report.add(name, "mlp", "patched", op, f"{cls}: proj -> chunk -> act(gate) * up -> {form}",
                       {"op": op, "head_dim": proj.out_features // 2})
            return None
    return f"{cls}: forward is not act(one half of proj(x)) * the other half (SiLU/GELU) on a probe"


def _gated(ff: nn.Module) -> bool:
    """Does FeedForward `ff` gate? Its activation's projection is then twice as wide as the input
    of the next Linear in `net` (GEGLU, SwiGLU) rather than as wide (GELU, ApproximateGELU...)."""
    proj = ff.net[0].proj
    nxt = next((m for m in list(ff.net)[1:] if isinstance(m, nn.Linear)), None)
    return nxt is not None and proj.out_features == 2 * nxt.in_features


def _patch_feedforwards(model, report, undo) -> None:
    """diffusers FeedForward (`net` = [activation with `proj`, dropout, Linear, ...]) and gated
    activation modules elsewhere. Reported under the FeedForward's name (so the generic gated-MLP
    pass does not report it again)."""
    act_mod = sys.modules.get("diffusers.models.activations")
    seen = set()
    for name, m in model.named_modules():
        net = getattr(m, "net", None)
        if isinstance(net, nn.ModuleList) and len(net) and isinstance(getattr(net[0], "proj", None), nn.Linear):
            seen.add(id(net[0]))
            act = net[0]
            if not _gated(m):
                how = getattr(act, "approximate", None)
                report.add(name, "mlp", "skipped", detail=f"{type(m).__name__}: {type(act).__name__}"
                           f"{f'(approximate={how!r})' if how else ''} is not gated (proj -> activation); "
                           f"LayerZero has no op for an ungated activation")
                continue
            why = _patch_glu(name, act, report, undo)
            if why is not None:
                report.add(name, "mlp", "skipped", detail=f"{type(m).__name__}: {why}")
            else:   # reported under the FeedForward's name: its calls are the activation's
                set_attr(m, "_lz_seen", act._lz_seen, undo)
        elif (act_mod is not None and type(m).__module__ == act_mod.__name__ and id(m) not in seen
              and type(m).__name__ in ("GEGLU", "SwiGLU") and isinstance(getattr(m, "proj", None), nn.Linear)):
            why = _patch_glu(name, m, report, undo)
            if why is not None:
                report.add(name, "mlp", "skipped", detail=why)


# ---- lz.patch(model) ---------------------------------------------------------------------------

def owns(model) -> bool:
    """A diffusers model, or any module holding diffusers attention modules."""
    mu = sys.modules.get("diffusers.models.modeling_utils")
    if mu is None:
        return False
    if isinstance(model, mu.ModelMixin):
        return True
    ap = sys.modules.get("diffusers.models.attention_processor")
    return ap is not None and any(isinstance(m, ap.Attention) for m in model.modules())


def patch_model(model, report, undo, options) -> None:
    """The diffusers-specific part of lz.patch (norms come from layerzero.patching): attention and
    RoPE inside attention processors, gated activations of feed-forwards."""
    register_backend()
    if options["attention"] or options["rope"]:
        _patch_attention(model, report, undo, options)
    if options["mlp"]:
        _patch_feedforwards(model, report, undo)


# ---- lz.patch(pipeline) ------------------------------------------------------------------------

def is_pipeline(obj) -> bool:
    pu = sys.modules.get("diffusers.pipelines.pipeline_utils")
    return pu is not None and isinstance(obj, pu.DiffusionPipeline)


def _components(pipe) -> dict:
    """name -> component, for the config entries that name a (library, class) component."""
    return {k: getattr(pipe, k, None) for k, v in pipe.config.items()
            if not k.startswith("_") and isinstance(v, (tuple, list)) and len(v) == 2}


def patch_pipeline(pipe, *, attention: bool = True, norm: bool = True, rope: bool = True,
                   mlp: bool = True) -> Report:
    """`lz.patch` every torch module of a pipeline (unet / transformer, vae, text encoders...), each
    through its own integration; returns one report whose item names are prefixed by the component
    name. `lz.unpatch(pipe)` unpatches them all. Idempotent like `lz.patch`."""
    options = {"attention": attention, "norm": norm, "rope": rope, "mlp": mlp}
    for flag, v in options.items():
        if not isinstance(v, bool):
            raise TypeError(f"{flag} must be a bool, got {type(v).__name__}")
    rec = records.get(pipe)
    if rec is not None:
        if rec.report.options == options:
            return rec.report
        lz_unpatch(pipe)
    report = Report(type(pipe).__name__, options=options)
    done = []
    try:
        for cname, comp in _components(pipe).items():
            if not isinstance(comp, nn.Module):
                if comp is not None:
                    report.untouched[type(comp).__name__] += 1
                continue
            sub = lz_patch(comp, **options)
            done.append(comp)
            for i in sub.items:
                report.items.append(Item(f"{cname}.{i.name}" if i.name else cname, i.kind, i.status,
                                           i.op, i.detail, i.match))
            report.untouched.update(sub.untouched)
    except BaseException:
        for comp in reversed(done):
            lz_unpatch(comp)
        raise
    refs = [weakref.ref(c) for c in done]

    def unpatch_components():
        for r in reversed(refs):
            c = r()
            if c is not None:
                lz_unpatch(c)
    records[pipe] = Record(report, [unpatch_components])
    log.info("%s", report)
    return report


def patch_diffusers(obj, *, attention: bool = True, norm: bool = True, rope: bool = True,
                    mlp: bool = True) -> Report:
    """`lz.patch` for a diffusers pipeline or model (what `lz.patch` routes diffusers objects to)."""
    if is_pipeline(obj):
        return patch_pipeline(obj, attention=attention, norm=norm, rope=rope, mlp=mlp)
    return lz_patch(obj, attention=attention, norm=norm, rope=rope, mlp=mlp)


# ---- registration, on import -------------------------------------------------------------------

register_integration("diffusers", owns=owns, patch_model=patch_model, is_pipeline=is_pipeline,
                     patch_pipeline=patch_pipeline)
when_imported("diffusers.models.attention_dispatch", register_backend)
