"""Stand-ins for GPU packages, for CPU tests of the backend adapters.

Each stand-in is a module object put into sys.modules for one test. Its functions record the
arguments they receive and compute what the real package computes *in the real package's own
conventions* (bottom-right masks, paged caches, halves of cos/sin, in-place writes ...) with
`layerzero.reference`, so an end-to-end `lz.<op>` call through an adapter is checked
numerically: a translation mistake gives a wrong number, not just a wrong argument.

`use_standins(monkeypatch, modules, kernels)` installs them and makes the named kernels see
their calls as CUDA calls on an sm90 GPU (the stand-ins run on the CPU).
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import torch

from layerzero import control, reference, registry


def module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)   # find_spec() needs one
    m.__dict__.update(attrs)
    return m


def use_standins(monkeypatch, modules: dict, kernels=(), sm: int = 90) -> None:
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(registry, "_module_reasons", {})   # restored after the test
    for kid in kernels:
        k = registry.get(kid)
        orig = k.supports
        monkeypatch.setattr(k, "supports", lambda spec, orig=orig: orig(spec._replace(device="cuda", sm=sm)))
    control.changed()                                       # drop cached decisions


def fa_semantics(q, k, v, *, softmax_scale, causal, window, softcap=0.0, alibi_slopes=None,
                 sinks=None):
    """flash-attn's own semantics on (B, S, H, D) tensors: causal and window bottom-right,
    window (left, right) inclusive with -1 / None unbounded, softcap 0 = off, ALiBi bottom-right."""
    left, right = (-1 if w is None else w for w in window)
    win = None if (left, right) == (-1, -1) else (left, right)
    return reference.attention(q, k, v, is_causal=causal, scale=softmax_scale, window=win,
                               softcap=softcap or None, alibi_slopes=alibi_slopes, sinks=sinks,
                               layout="bshd", causal_align="bottom_right")


def flash_attn_modules(calls: list) -> dict:
    """flash_attn (FA2), flash_attn_interface (FA3) and flash_attn.cute (FA4) stand-ins."""
    def fa2(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
            softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        calls.append(dict(api="fa2", q=q, k=k, v=v, dropout_p=dropout_p, softmax_scale=softmax_scale,
                          causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes))
        assert q.stride(-1) == 1 and q.dim() == 4
        return fa_semantics(q, k, v, softmax_scale=softmax_scale, causal=causal, window=window_size,
                            softcap=softcap, alibi_slopes=alibi_slopes)

    def fa3(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
            v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
            pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
        calls.append(dict(api="fa3", q=q, k=k, v=v, softmax_scale=softmax_scale, causal=causal,
                          window_size=window_size, softcap=softcap))
        out = fa_semantics(q, k, v, softmax_scale=softmax_scale, causal=causal, window=window_size,
                           softcap=softcap)
        return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])   # older FA3 returns (out, lse)

    def fa4(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
            window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
            **kw):
        calls.append(dict(api="fa4", q=q, k=k, v=v, softmax_scale=softmax_scale, causal=causal,
                          window_size=window_size, learnable_sink=learnable_sink, softcap=softcap,
                          num_splits=num_splits))
        assert all(w is None or w >= 0 for w in window_size), "FA4 takes None, not -1, for unbounded"
        out = fa_semantics(q, k, v, softmax_scale=softmax_scale, causal=causal, window=window_size,
                           softcap=softcap, sinks=learnable_sink)
        return out, None

    cute = module("flash_attn.cute", flash_attn_func=fa4)
    fa = module("flash_attn", flash_attn_func=fa2, cute=cute)
    return {"flash_attn": fa, "flash_attn.flash_attn_interface": module("flash_attn.flash_attn_interface",
                                                                        flash_attn_func=fa2),
            "flash_attn.cute": cute, "flash_attn_interface": module("flash_attn_interface", flash_attn_func=fa3)}


# ---- FlashInfer ---------------------------------------------------------------------------------

def _fi_attend(q, k, v, *, causal, window_left, mask, sm_scale, logits_soft_cap):
    """One request in FlashInfer's conventions: q (Sq, Hq, D), k/v (Sk, Hk, D); bottom-right
    causal/window; a custom mask replaces causal. Rows the mask empties come back as NaN (what
    the real kernel writes there is unspecified)."""
    win = (window_left, -1) if window_left is not None and window_left >= 0 else None
    out = reference.attention(q[None], k[None], v[None], attn_mask=mask, is_causal=causal and mask is None,
                              scale=sm_scale, window=None if mask is not None else win,
                              softcap=logits_soft_cap or None, layout="bshd", causal_align="bottom_right")[0]
    if mask is not None:
        out = out.masked_fill(~mask.any(-1)[:, None, None], float("nan"))
    return out


def _nhd(t, kv_layout):
    return t if kv_layout == "NHD" else t.transpose(-3, -2)


def _request_kv(cache, indptr, indices, last, b, kv_layout):
    pages = [_nhd(cache[p], kv_layout) for p in indices[indptr[b]:indptr[b + 1]].tolist()]
    if not pages:                                                         # a request holding no key
        return _nhd(cache[0], kv_layout)[:0]
    kv = torch.cat(pages, 0)                                              # (tokens, Hk, D)
    return kv[: (len(pages) - 1) * pages[0].shape[0] + int(last[b])]


def _check_paged_kv(indptr, indices, last, page_size):
    """FlashInfer's paged-KV metadata as its kernels read it: int32, indices[indptr[b]:indptr[b+1]]
    the pages of request b, 1 <= last_page_len <= page_size where a request has pages (0 where
    none: FlashInfer's get_seq_lens then gives 0 keys)."""
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32, "FlashInfer's paged metadata is int32"
    assert indptr.dim() == 1 and tuple(last.shape) == (indptr.shape[0] - 1,)
    assert int(indptr[0]) == 0 and indices.shape == (int(indptr[-1]),), "indices has indptr[-1] entries"
    n = indptr[1:] - indptr[:-1]
    ok = ((n > 0) & (last >= 1) & (last <= page_size)) | ((n == 0) & (last == 0))
    assert bool((n >= 0).all() and ok.all()), f"last_page_len {last.tolist()} for page counts {n.tolist()}"


def _check_run(p, q, kv, kv_layout):
    """run()'s q and paged cache against what plan() was told (FlashInfer raises on these)."""
    k, v = kv
    assert q.dim() == 3 and q.is_contiguous(), "FlashInfer takes q as contiguous (tokens, H, D)"
    assert q.shape[0] == int(p["qo_indptr"][-1]), f"q has {q.shape[0]} tokens, qo_indptr says {p['qo_indptr']}"
    assert k.dim() == 4 and k.shape[:3] == v.shape[:3] and k.dtype == v.dtype
    ps, hk = (k.shape[1], k.shape[2]) if kv_layout == "NHD" else (k.shape[2], k.shape[1])
    assert (ps, hk, q.shape[1], q.shape[2]) == (p["page_size"], p["num_kv_heads"], p["num_qo_heads"],
                                                p["head_dim"]), "run() shapes differ from plan()"
    assert q.dtype == (p["q_data_type"] or torch.float16), "q dtype differs from plan's q_data_type"
    assert k.dtype == (p["kv_data_type"] or q.dtype), "k/v dtype differs from plan's kv_data_type"


def flashinfer_module(calls: list) -> types.ModuleType:
    def single_prefill_with_kv_cache(q, k, v, custom_mask=None, causal=False, kv_layout="NHD",
                                     sm_scale=None, window_left=-1, logits_soft_cap=None, **kw):
        calls.append(dict(api="single_prefill", q=q, k=k, custom_mask=custom_mask, causal=causal,
                          kv_layout=kv_layout, window_left=window_left, sm_scale=sm_scale,
                          logits_soft_cap=logits_soft_cap, backend=kw.get("backend", "auto")))
        assert q.is_contiguous() and q.dim() == 3
        return _fi_attend(q, _nhd(k, kv_layout), _nhd(v, kv_layout), causal=causal, window_left=window_left,
                          mask=custom_mask, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap)

    def single_decode_with_kv_cache(q, k, v, kv_layout="NHD", use_tensor_cores=False, sm_scale=None,
                                    window_left=-1, logits_soft_cap=None, **kw):
        calls.append(dict(api="single_decode", q=q, kv_layout=kv_layout, window_left=window_left))
        return _fi_attend(q[None], _nhd(k, kv_layout), _nhd(v, kv_layout), causal=False,
                          window_left=window_left, mask=None, sm_scale=sm_scale,
                          logits_soft_cap=logits_soft_cap)[0]

    class BatchPrefillWithPagedKVCacheWrapper:
        kind = "prefill"

        def __init__(self, workspace, kv_layout="NHD", **kw):
            self.kv_layout = kv_layout
            calls.append(dict(api="prefill.init", kv_layout=kv_layout, backend=kw.get("backend", "auto")))

        def plan(self, qo_indptr, indptr, indices, last_page_len, num_qo_heads, num_kv_heads,
                 head_dim_qk, page_size, head_dim_vo=None, custom_mask=None, causal=False,
                 sm_scale=None, window_left=-1, logits_soft_cap=None, q_data_type=None,
                 kv_data_type=None, **kw):
            _check_paged_kv(indptr, indices, last_page_len, page_size)
            assert qo_indptr.dtype == torch.int32 and qo_indptr.shape == indptr.shape
            calls.append(dict(api="prefill.plan", causal=causal, window_left=window_left,
                              custom_mask=custom_mask, page_size=page_size, kv_layout=self.kv_layout,
                              qo_indptr=qo_indptr, indptr=indptr, indices=indices, last_page_len=last_page_len,
                              num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim_qk,
                              head_dim_vo=head_dim_vo, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                              q_data_type=q_data_type, kv_data_type=kv_data_type))
            self.p = dict(qo_indptr=qo_indptr, indptr=indptr, indices=indices, last=last_page_len,
                          mask=custom_mask, causal=causal, window_left=window_left, sm_scale=sm_scale,
                          logits_soft_cap=logits_soft_cap, page_size=page_size, num_qo_heads=num_qo_heads,
                          num_kv_heads=num_kv_heads, head_dim=head_dim_qk, q_data_type=q_data_type,
                          kv_data_type=kv_data_type)

        def run(self, q, kv):
            calls.append(dict(api=f"{self.kind}.run", q=q, kv=kv))
            _check_run(self.p, q, kv, self.kv_layout)
            p, outs, moff = self.p, [], 0
            for b in range(len(p["qo_indptr"]) - 1):
                qb = q[p["qo_indptr"][b]:p["qo_indptr"][b + 1]]
                kb, vb = (_request_kv(c, p["indptr"], p["indices"], p["last"], b, self.kv_layout) for c in kv)
                if kb.shape[0] == 0:           # no key: what the real kernel writes is unspecified
                    outs.append(qb.new_full(qb.shape[:-1] + vb.shape[-1:], float("nan")))
                    continue
                mb = None
                if p["mask"] is not None:
                    n = qb.shape[0] * kb.shape[0]
                    mb = p["mask"][moff:moff + n].view(qb.shape[0], kb.shape[0])
                    moff += n
                o = _fi_attend(qb, kb, vb, causal=p["causal"], window_left=p["window_left"],
                               mask=mb, sm_scale=p["sm_scale"], logits_soft_cap=p["logits_soft_cap"])
                if p["causal"] and mb is None and qb.shape[0] > kb.shape[0]:   # qo_len > kv_len: the
                    o[: qb.shape[0] - kb.shape[0]] = float("nan")           # first queries see no key
                outs.append(o)
            return torch.cat(outs, 0)

    class BatchDecodeWithPagedKVCacheWrapper(BatchPrefillWithPagedKVCacheWrapper):
        kind = "decode"

        def __init__(self, workspace, kv_layout="NHD", use_tensor_cores=False, **kw):
            self.kv_layout = kv_layout
            calls.append(dict(api="decode.init", kv_layout=kv_layout, use_tensor_cores=use_tensor_cores))

        def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
                 page_size, pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None,
                 q_data_type=None, kv_data_type=None, sm_scale=None, **kw):
            _check_paged_kv(indptr, indices, last_page_len, page_size)
            calls.append(dict(api="decode.plan", window_left=window_left, kv_layout=self.kv_layout,
                              indptr=indptr, indices=indices, last_page_len=last_page_len,
                              page_size=page_size, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                              q_data_type=q_data_type, kv_data_type=kv_data_type))
            b = len(indptr) - 1
            self.p = dict(qo_indptr=list(range(b + 1)), indptr=indptr, indices=indices,
                          last=last_page_len, mask=None, causal=False, window_left=window_left,
                          sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, page_size=page_size,
                          num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          q_data_type=q_data_type, kv_data_type=kv_data_type)

    def rmsnorm(x, w, eps=1e-6, **kw):
        calls.append(dict(api="rmsnorm", x=x, w=w, eps=eps))
        assert x.dim() == 2 and x.is_contiguous() and w.dtype == x.dtype, "FlashInfer: 2-D contiguous, w in x's dtype"
        return reference.rms_norm(x, w, eps)

    def apply_rope_with_cos_sin_cache(positions, query, key, head_size, cos_sin_cache, is_neox=True):
        calls.append(dict(api="rope", positions=positions, query=query, cache=cos_sin_cache, is_neox=is_neox))
        assert cos_sin_cache.dtype == torch.float32 and query.dim() == 2
        half = cos_sin_cache.shape[-1] // 2
        cos, sin = cos_sin_cache[positions, :half], cos_sin_cache[positions, half:]   # (nnz, R/2)

        def rot(x):
            x = x.view(x.shape[0], -1, head_size).float()
            c, s = cos[:, None], sin[:, None]
            if is_neox:
                x1, x2 = x[..., :half], x[..., half:2 * half]
                y = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * half:]), -1)
            else:
                x1, x2 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
                y = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(-2)
                y = torch.cat((y, x[..., 2 * half:]), -1)
            return y.flatten(1)
        return rot(query).to(query.dtype), rot(key).to(key.dtype)

    def top_k_renorm_probs(probs, top_k):
        calls.append(dict(api="top_k_renorm", top_k=top_k))
        kth = probs.topk(top_k, -1).values[..., -1:]
        p = probs.masked_fill(probs < kth, 0)
        return p / p.sum(-1, keepdim=True)

    def top_p_renorm_probs(probs, top_p):
        calls.append(dict(api="top_p_renorm", top_p=top_p))
        x = reference.filter_logits(probs.log(), top_p=top_p)
        return x.softmax(-1)

    def min_p_sampling_from_probs(probs, min_p, generator=None, **kw):
        calls.append(dict(api="min_p_sampling", min_p=min_p))
        keep = probs >= min_p * probs.amax(-1, keepdim=True)
        return torch.multinomial(probs * keep, 1, generator=generator).squeeze(-1).int()

    def sampling_from_probs(probs, generator=None, **kw):
        calls.append(dict(api="sampling"))
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1).int()

    return module(
        "flashinfer", single_prefill_with_kv_cache=single_prefill_with_kv_cache,
        single_decode_with_kv_cache=single_decode_with_kv_cache,
        BatchPrefillWithPagedKVCacheWrapper=BatchPrefillWithPagedKVCacheWrapper,
        BatchDecodeWithPagedKVCacheWrapper=BatchDecodeWithPagedKVCacheWrapper,
        norm=module("flashinfer.norm", rmsnorm=rmsnorm),
        rope=module("flashinfer.rope", apply_rope_with_cos_sin_cache=apply_rope_with_cos_sin_cache),
        sampling=module("flashinfer.sampling", top_k_renorm_probs=top_k_renorm_probs,
                        top_p_renorm_probs=top_p_renorm_probs,
                        min_p_sampling_from_probs=min_p_sampling_from_probs,
                        sampling_from_probs=sampling_from_probs))
