"""Attention written inline (not through transformers' AttentionInterface) -> `lz.attention`.

Many transformers families keep their own copy of attention code: BERT-style self-attention
(megatron-bert, rembert, ...), BART-style (xglm, trocr, ...), fused query-key-value projections
with ALiBi (bloom, mpt), ... One module per form (`STYLES`) recognises it by structure and
supplies:

    DESCRIPTION          what the report says it swapped ("inline BERT-style self-attention")
    recognised(m)        does module `m` have this form? (structure only: attributes, signature)
    make_forward(orig)   the replacement forward (self, *args, **kwargs): `lz.attention` for the
                         calls it can run exactly, `orig(*args, **kwargs)` for any other call
    check(m, device)     (ok, why not): both forwards on a probe (`patching.probes.probe`),
                         compared with `patching.probes.agree`, as norms and MLPs are checked
                         before they are swapped
    details(m)           the report's detail ({"op": "attention", "num_heads": .., ...})
    attach(model, name, m, undo)   optional, after the swap: what else the replacement needs
                         from around the module (undone with the rest by `lz.unpatch`)
    ROPE                 optional, True: the replacement also rotates q/k through `lz.rope`
                         (reported as a rope item of the module; the RoPE patch leaves it be)

`patch_inline` swaps each module a style recognises and whose check passes, and reports every
recognised module once (patched, or skipped with the reason). This layer sits above the patching
mechanics of `layerzero.patching` (swaps, undo, probes) and below the transformers integration.
"""
from __future__ import annotations

import importlib
import sys

import torch

from ...patching.probes import agree, param_device, probe
from ...patching.swap import swap_forward, watch

# the forms known, in the order they are tried (first recognising one wins)
STYLES = ("roformer", "convbert", "bert", "bart", "xlm", "gpt_neo", "openai_gpt", "bloom", "mpt", "falcon",
          "gpt_neox_japanese", "canine", "mpnet", "cpmant", "squeezebert", "lilt", "luke")


def styles() -> list:
    return [importlib.import_module(f"{__name__}.{s}") for s in STYLES]


def attentions_recorded() -> bool:
    """Is transformers recording attention probabilities through hooks on the modules' outputs
    (output_attentions on a model using `capture_outputs`; the module itself is not told)? Then a
    replacement must run the module's own forward, which returns them."""
    var = getattr(sys.modules.get("transformers.utils.output_capturing"), "_active_collector", None)
    collected = var.get() if var is not None else None
    return bool(collected) and any(k.endswith("attentions") for k in collected)


def forward_params(m) -> list | None:
    """The names of `type(m).forward`'s parameters after self (what `recognised` compares with a
    form's signature), or None when it has no signature to read."""
    import inspect

    try:
        return list(inspect.signature(type(m).forward).parameters)[1:]
    except (TypeError, ValueError):
        return None


def probe_tuple(m, make_forward, n: int, returns: str, dtype, x, **kwargs) -> tuple[bool, str]:
    """The `check` of a form whose forward returns an n-tuple led by the output: both forwards on
    probe input `x` (and `kwargs`), the outputs compared with `agree`; (ok, why not). `returns`
    names the tuple in the reason when the module's forward returns something else."""
    try:
        want, got = probe(m, make_forward, x, **kwargs)
    except Exception as e:  # noqa: BLE001 - a module we can't call plainly is left alone
        return False, f"probe raised {type(e).__name__}: {e}"
    if not isinstance(want, tuple) or len(want) != n or not isinstance(want[0], torch.Tensor):
        return False, f"its forward does not return {returns}"
    ok, err = agree(got[0], want[0], dtype)
    return ok, "" if ok else f"differs on a probe (err {err:.2g})"


def recognise(m):
    """The style module recognising `m`, or None."""
    for style in styles():
        if style.recognised(m):
            return style
    return None


def patch_inline(model, report, undo, skip=frozenset()) -> dict:
    """Swap every module of `model` written in a known inline form whose probe agrees, and report
    each recognised one; returns {module name: swapped?} for them. `skip`: ids of modules already
    switched to LayerZero through transformers' AttentionInterface."""
    known = styles()
    done = {}
    for name, m in model.named_modules():
        if id(m) in skip:
            continue
        style = next((s for s in known if s.recognised(m)), None)
        if style is None:
            continue
        device = param_device(m)
        done[name] = False
        if device is None:
            report.add(name, "attention", "skipped", detail=f"{type(m).__name__}: weights not loaded (meta)")
            continue
        ok, why = style.check(m, device)
        if not ok:
            report.add(name, "attention", "skipped", detail=f"{type(m).__name__}: {style.DESCRIPTION} {why}")
            continue
        swap_forward(m, style.make_forward, undo)
        watch(m, undo)
        if hasattr(style, "attach"):
            style.attach(model, name, m, undo)
        done[name] = True
        report.add(name, "attention", "patched", "attention",
                   f"{type(m).__name__}: {style.DESCRIPTION} -> lz.attention (plain calls)", style.details(m))
        if getattr(style, "ROPE", False):
            report.add(name, "rope", "patched", "rope",
                       f"{type(m).__name__}: RoPE inside the {style.DESCRIPTION} -> lz.rope", {"op": "rope"})
    return done
