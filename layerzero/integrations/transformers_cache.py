"""A patched model's DynamicCache keeps a prompt's K/V without copying them.

transformers' `DynamicLayer.update` concatenates every update onto what it holds, the first one
onto an empty tensor: a prefill pays a full copy of its K and V per layer (51 us per tensor on
the H100 for an 8k-token Llama-3-8B layer, 0.8 ms of an 8-layer forward). In a patched model's
cache, a layer's first update stores the given tensors themselves instead, when each one owns
its whole storage (so the cache never keeps a larger buffer, such as a fused QKV projection's
output, alive). Later updates concatenate as before (the result no longer aliases the first
tensors); values are identical either way. Subclasses (sliding-window, indexed, quantized layers)
keep their own rules, and a call that is not plain eager (`backends._gpu.eager`: traced by
torch.compile, under a dispatch mode, a tensor subclass) takes transformers' path.

Only the patched model's calls take it: `DynamicLayer.update`, a class attribute shared by every
model, is never reassigned. The patched model's causal attention modules get a forward that,
before running, gives the cache layer they are about to fill (a fresh, uninitialised
`DynamicLayer`) this update as an instance attribute, which removes itself on its one call.

Part of the transformers integration (`patch_model` imports it on first use); uses only
`layerzero.patching.swap` of the patching machinery.
"""
from __future__ import annotations

import types

import torch

from ..backends._gpu import eager
from ..patching.swap import swap_forward


def owns_storage(t: torch.Tensor) -> bool:
    """Is `t` a view over all of its storage and nothing more (a transpose counts)?"""
    return (t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _init_device(layer, key_states) -> None:
    layer.device = key_states.device
    layer.is_initialized = True


def _init_device_dtype(layer, key_states) -> None:
    layer.dtype, layer.device = key_states.dtype, key_states.device
    layer.is_initialized = True


# What DynamicLayer.lazy_initialization sets besides its empty K/V, in the forms seen in
# transformers 5.x; `patch_cache` uses the first that `same_state` confirms for the installed
# version, else transformers' own on empty slices (None). Setting the attributes directly skips
# two torch.tensor([]) on the device and two concatenations onto them: ~20 us of host time per
# layer per prefill.
INITS = (_init_device, _init_device_dtype, None)


def first_update_without_copy(layer_cls, original, init=None):
    """`layer_cls.update` storing a first update's K/V as given (see the module docstring);
    `init(layer, key_states)` sets the rest of the lazily initialised state (None: transformers'
    own initialisation, run on empty slices)."""
    def update(self, key_states, value_states, *args, **kwargs):
        self.__dict__.pop("update", None)   # once: the layer is transformers' own again
        if (not self.is_initialized and type(self) is layer_cls and eager(key_states) and eager(value_states)
                and owns_storage(key_states) and owns_storage(value_states)):
            if init is not None:
                init(self, key_states)
            else:   # (narrow: an Ellipsis index costs ~2 us of host time)
                original(self, key_states.narrow(-2, 0, 0), value_states.narrow(-2, 0, 0), *args, **kwargs)
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        return original(self, key_states, value_states, *args, **kwargs)
    update.__name__ = update.__qualname__ = "update"
    update.__doc__ = (original.__doc__ or "") + "\n(LayerZero: a first update is stored without a copy.)"
    update.__wrapped__ = original
    update.lz_init = init
    return update


def _state(layer) -> dict:
    return {k: (("tensor", v.dtype, v.shape, v.tolist()) if isinstance(v, torch.Tensor) else v)
            for k, v in vars(layer).items()}


def same_state(cls, original, new) -> str | None:
    """None if two updates through `new` leave a fresh layer in the state two through `original`
    do (attributes, K/V values; checked once per transformers version on tiny CPU tensors), else
    what differs: a version whose update keeps counters or more is left alone."""
    g = torch.Generator().manual_seed(0)
    kvs = [tuple(torch.randn(1, 2, n, 4, generator=g, device="cpu") for _ in "kv") for n in (3, 1)]
    try:
        states = []
        for fn in (original, new):
            layer = cls()
            for k, v in kvs:
                fn(layer, k, v)
            states.append(_state(layer))
    except Exception as e:
        return f"probe raised {type(e).__name__}: {e}"
    a, b = states
    if a.keys() != b.keys():
        return f"attributes {sorted(set(a) ^ set(b))}"
    diff = [k for k in a if a[k] != b[k]]
    return f"attributes {diff} differ" if diff else None


def _mark(cache, idx: int, layer_cls, update) -> None:
    """Give layer `idx` of `cache` (the self-attention part of an encoder-decoder cache) the
    one-shot `update` if it is a fresh `layer_cls`."""
    layers = getattr(getattr(cache, "self_attention_cache", cache), "layers", None)
    if isinstance(layers, list) and idx < len(layers):
        layer = layers[idx]
        if type(layer) is layer_cls and not layer.is_initialized:
            layer.update = types.MethodType(update, layer)


def _marking_forward(layer_cls, update):
    """make(original) -> an attention forward marking its cache layer, then running `original`."""
    def make(original):
        def forward(self, *args, **kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and not torch.compiler.is_compiling():
                _mark(cache, self.layer_idx, layer_cls, update)
            return original(*args, **kwargs)
        forward.__name__ = "lz_cache_first_update_forward"
        return forward
    return make


def patch_cache(attention_modules, report, undo) -> None:
    """The no-copy first update for the caches these attention modules fill; one report line
    (none when no module is causal with a `layer_idx`: an encoder keeps no cache)."""
    name = "transformers.cache_utils.DynamicLayer.update"
    mods = [m for m in attention_modules if getattr(m, "is_causal", False) is True
            and isinstance(getattr(m, "layer_idx", None), int)]
    if not mods:
        return
    try:
        from transformers import cache_utils
    except ImportError as e:
        report.add(name, "cache", "skipped", detail=f"cache_utils not importable: {e}")
        return
    cls = getattr(cache_utils, "DynamicLayer", None)
    if not callable(getattr(cls, "update", None)) or not callable(getattr(cls, "lazy_initialization", None)):
        report.add(name, "cache", "skipped", detail="no DynamicLayer with update and lazy_initialization")
        return
    original = cls.update
    whys = []
    for init in INITS:
        new = first_update_without_copy(cls, original, init)
        why = same_state(cls, original, new)
        if why is None:
            break
        whys.append(why)
    else:
        report.add(name, "cache", "skipped", detail=f"DynamicLayer.update keeps other state: {whys[-1]}")
        return
    for m in mods:
        swap_forward(m, _marking_forward(cls, new), undo)
    how = f"initialised by {init.__name__}" if init is not None else "transformers' own initialisation"
    report.add(name, "cache", "patched", None, f"this model's DynamicCache layers keep a prompt's K/V "
               f"without a copy ({how}; {len(mods)} attention modules)")
