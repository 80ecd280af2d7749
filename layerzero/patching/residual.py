"""Recogniser: residual adds of pre-norm decoder layers folded into the kernels around them.

A pre-norm decoder layer (llama, mistral, qwen2/3, phi3, ... in transformers) computes

    h = h + self_attn(input_layernorm(h))
    h = h + mlp(post_attention_layernorm(h))

and each `+` is a pass over the hidden states of its own (62 us for 8192 x 4096 bf16 on the H100,
16 of them in an 8-layer forward). Once the layer's norms and gated MLP are LayerZero's, its forward
becomes

    h, x = rms_norm(a, w, eps, residual=h)       # the add fused into the norm (one kernel)
    h = addmm(h, act, down_proj.weight.T)        # the add as the down projection's epilogue

Recognised by structure: children `input_layernorm`, `post_attention_layernorm` (patched to
lz.rms_norm), `self_attn` and `mlp`. Checked by behaviour before patching: with the four children
swapped for stand-ins (which record what they receive), the layer's own forward and the new one
must compute the same output from a probe and hand the attention module the same keyword
arguments; layers that do more (Gemma's extra norms, dropout in training, other outputs) fail the
check and keep their forward. The down projection is folded in only when it is a plain bias-free
`nn.Linear` without hooks and the MLP is LayerZero's gated MLP; otherwise `h + mlp(x)`.

Runs after the norm and MLP recognisers (`lz.patch` with norm=True): it reads the tags their
forwards carry (`lz_norm`, `lz_gated`).

Recogniser layer of `layerzero.patching`: imports the mechanics (swap, probes) only;
`layerzero.patch` and the integrations may import it.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .. import ops
from .probes import META, agree, param_device, probe_input
from .swap import observe, swap_forward

CHILDREN = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def _tag(module, name: str):
    """The attribute `name` the norm / MLP recognisers put on a module's swapped forward, or None."""
    return getattr(getattr(module.forward, "__func__", None), name, None)


def _plain_linear(m) -> bool:
    """A bias-free nn.Linear without hooks and with its weight present. Per call, so read through
    the module's dicts: nn.Module.__getattr__ (and a getattr default's AttributeError) cost
    microseconds of host time in every decoder layer."""
    if type(m) is not nn.Linear:
        return False
    p = m._parameters
    return (p.get("bias") is None and not m._forward_hooks and not m._forward_pre_hooks
            and "_hf_hook" not in m.__dict__ and not p["weight"].is_meta)


def _addmm_plan(mlp):
    """(fused gate_up, gate function, down projection weight) when the residual add can ride on
    the down projection's GEMM (LayerZero's gated MLP, a plain bias-free Linear), else None."""
    info = _tag(mlp, "lz_gated")
    down = mlp._modules.get("down_proj")
    return (*info, down._parameters["weight"]) if info is not None and _plain_linear(down) else None


def mlp_residual(mlp, x, h):
    """h + mlp(x), with the add done by the down projection's GEMM where it can be. `h` must be
    a tensor the caller owns (it may be updated in place)."""
    plan = _addmm_plan(mlp)
    if plan is None or plan[2].dtype != h.dtype or x.dim() < 2:
        return h + mlp(x)
    fused, gate_fn, w = plan
    observe(mlp, x.shape)
    mods = mlp._modules
    if fused:
        gate, up = mods["gate_up_proj"](x).chunk(2, dim=-1)
    else:
        gate, up = mods["gate_proj"](x), mods["up_proj"](x)
    act = gate_fn(gate, up)
    h2, a2 = h.view(-1, h.shape[-1]), act.view(-1, act.shape[-1])
    if torch.is_grad_enabled() and (h.requires_grad or act.requires_grad):
        return torch.addmm(h2, a2, w.t()).view(h.shape)
    # in place: h is the block's own fresh sum (the fused norm's residual output); out of place,
    # addmm first copies it into its result (a 64 MB device copy for 8192 x 4096 bf16)
    return h2.addmm_(a2, w.t()).view(h.shape)


def _block_forward(eps_attr: str, offset: float, unfused: bool = False):
    """make(original) -> the layer's new forward. `unfused` (the probe) keeps the modules' own
    calls, so stand-ins see the data flow the fused version computes."""
    def make(original):
        def forward(self, *args, **kwargs):
            if len(args) != 1 or "hidden_states" in kwargs or self.training:
                # a calling convention the probe did not check, or training (dropout) mode
                return original(*args, **kwargs)
            h = args[0]
            mods = self._modules        # not nn.Module.__getattr__: host time in every layer
            out = mods["self_attn"](hidden_states=mods["input_layernorm"](h), **kwargs)
            a = out[0] if isinstance(out, tuple) else out
            post, mlp = mods["post_attention_layernorm"], mods["mlp"]
            params = post._parameters
            w = params["weight"] if "weight" in params else getattr(post, "weight", None)
            if unfused or not isinstance(a, torch.Tensor) or a.shape != h.shape or (
                    w is not None and w.dtype != a.dtype):
                h = h + a
                return h + mlp(post(h))
            observe(post, a.shape)
            x, h = ops.rms_norm(a, w, getattr(post, eps_attr), residual=h, offset=offset)
            return mlp_residual(mlp, x, h)
        forward.__name__ = "lz_prenorm_block_forward"
        return forward
    return make


class _Stand(nn.Module):
    """A stand-in child: a fixed elementwise function of its input; records its keyword args."""

    def __init__(self, fn, pair: bool = False):
        super().__init__()
        self.fn, self.pair, self.seen = fn, pair, []

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        self.seen.append((len(args), kwargs))
        y = self.fn(x)
        return (y, None) if self.pair else y


def _stand_ins():
    return {"input_layernorm": _Stand(lambda x: x * 1.5 + 0.25),
            "self_attn": _Stand(lambda x: torch.tanh(x) * 0.5 - 0.125, pair=True),
            "post_attention_layernorm": _Stand(lambda x: x * 0.75 - 0.5),
            "mlp": _Stand(torch.sin)}


def _check(layer: nn.Module, original_forward, hidden: int, dtype, device) -> str | None:
    """None if the layer's forward has the pre-norm data flow and hands self_attn its keyword
    arguments unchanged; else why not."""
    try:
        params = list(inspect.signature(original_forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return "forward signature not inspectable"
    kw = {p.name: object() for p in params
          if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("output_attentions",)}
    x = probe_input((2, 3, hidden), None, dtype=dtype, device=device)
    saved = {n: layer._modules[n] for n in CHILDREN}
    was = layer.training
    layer.eval()
    try:
        outs, seen = [], []
        for make in (None, _block_forward("eps", 0.0, unfused=True)):
            stands = _stand_ins()
            for n, s in stands.items():
                layer._modules[n] = s
            with torch.no_grad():
                if make is None:
                    outs.append(original_forward(x, **kw))
                else:
                    outs.append(make(original_forward)(layer, x, **kw))
            seen.append(stands["self_attn"].seen)
    except Exception as e:
        return f"probe raised {type(e).__name__}: {e}"
    finally:
        for n, m in saved.items():
            layer._modules[n] = m
        layer.train(was)
    ok, err = agree(outs[0], outs[1], dtype)
    if not ok:
        return f"forward is not h + attn(norm(h)), then h + mlp(norm(h)) (probe error {err:.2g})"
    (a,), (b,) = seen if all(len(s) == 1 for s in seen) else ((None,), (None,))
    if a is None or a[0] != b[0] or a[1].keys() != b[1].keys() or any(a[1][k] is not b[1][k] for k in a[1]):
        return "the attention module gets other arguments than the layer's"
    return None


def patch_blocks(model: nn.Module, report, undo: list) -> None:
    """Fold the residual adds of each recognised pre-norm decoder layer (see module docstring)."""
    for name, m in model.named_modules():
        if not all(isinstance(m._modules.get(c), nn.Module) for c in CHILDREN):
            continue
        cls = type(m).__name__
        post = m.post_attention_layernorm
        info = _tag(post, "lz_norm")
        if info is None or info[0] != "rms_norm" or _tag(m.input_layernorm, "lz_norm") is None:
            report.add(name, "residual", "skipped",
                       detail=f"{cls}: its norms are not LayerZero's rms_norm (left as is)")
            continue
        w = getattr(post, "weight", None)
        device = param_device(m)
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or device is None:
            why = META if device is None else "norm size unknown"
            report.add(name, "residual", "skipped", detail=f"{cls}: {why}")
            continue
        why = _check(m, m.forward, w.shape[0], w.dtype, device)
        if why is not None:
            report.add(name, "residual", "skipped", detail=f"{cls}: {why}")
            continue
        _, eps_attr, offset = info
        swap_forward(m, _block_forward(eps_attr, offset), undo)
        down = "down_proj GEMM" if _addmm_plan(m.mlp) is not None else "an add"
        report.add(name, "residual", "patched", None,
                   f"{cls}: attention residual fused into post_attention_layernorm (rms_norm residual=), "
                   f"MLP residual into {down}")
