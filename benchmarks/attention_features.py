"""Which kernel serves attention feature calls, and does it run what it was chosen for?

A fixed-seed set of random `lz.attention` calls mixing the features (sliding windows, softcap,
ALiBi, sinks, bool/float masks, GQA, head_dim 64..256, both causal alignments, both layouts,
fp16/bf16, some needing backward). For each call it records the kernel selection predicted
(`lz.which`), the kernel that ran and whether a runtime fallback happened (`lz.metrics()` before
and after, warnings caught), and the error against a float32 reference (float64 on the CPU) under
the flash-attention rule (output and, for grad calls, the gradients of q, k and v). It prints the
counts (calls that ran `reference.attention`, calls that paid a fallback, calls per kernel,
rule violations) and writes everything as JSON.

Only the public API (and `layerzero.reference`) is used, so it runs against any LayerZero
checkout: `PYTHONPATH=<checkout> python3 benchmarks/attention_features.py --out f.json`.

--probe also tries, per call, each of SDPA's kernels directly (their adapters, bypassing
selection), recording what supports() predicted and what the kernel actually did.

    python3 benchmarks/attention_features.py --out /tmp/f.json             # on the GPU host
    python3 benchmarks/attention_features.py --n 40 --out /tmp/f.json       # CPU: small sizes
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import time
import warnings

import torch

import layerzero as lz
from layerzero import reference

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
PROBED = ("torch.sdpa_cudnn", "torch.sdpa_efficient", "torch.sdpa_flash", "torch.sdpa")


def make_calls(n: int, seed: int, device: str):
    """n call descriptions: (description dict, builder(device) -> (q, k, v, kwargs))."""
    rng = random.Random(seed)
    cuda = device == "cuda"
    calls = []
    for i in range(n):
        d = rng.choice([64, 80, 96, 128, 192, 256] if cuda else [16, 40, 64])
        hkv = rng.choice([1, 2, 4, 8] if cuda else [1, 2])
        hq = hkv * rng.choice([1, 2, 4])
        b = rng.choice([1, 2])
        kind = rng.choice(["prefill", "prefill", "chunk", "decode"])
        s = rng.choice([128, 256, 512, 1024] if cuda else [16, 33, 64])
        sq, sk = {"prefill": (s, s), "chunk": (max(1, s // 4), s),
                  "decode": (rng.choice([1, 1, 4]), s)}[kind]
        dtype = rng.choice([torch.bfloat16, torch.float16] if cuda else [torch.float32, torch.bfloat16])
        f = {"layout": rng.choice(["bhsd", "bhsd", "bshd"])}
        if rng.random() < 0.5:
            f["is_causal"] = True
        if rng.random() < 0.6 and (f.get("is_causal") or sq != sk):
            f["causal_align"] = rng.choice(["top_left", "bottom_right"])
        if rng.random() < 0.3:
            left = rng.choice([16, 64, 127])
            f["window"] = (left, rng.choice([-1, 0, 8]) if not f.get("is_causal") else -1)
        if rng.random() < 0.25:
            f["softcap"] = rng.choice([20.0, 30.0, 50.0])
        if rng.random() < 0.2:
            f["alibi"] = rng.choice(["h", "bh"])
        if rng.random() < 0.2:
            f["sinks"] = True
        if rng.random() < 0.25:
            f["mask"] = rng.choice(["bool_pad", "bool_full", "float_full"])
        grad = rng.random() < 0.15
        desc = dict(i=i, b=b, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d, dtype=str(dtype)[6:], kind=kind,
                    grad=grad, **f)
        calls.append((desc, _builder(desc, dtype, seed * 1000 + i)))
    return calls


def _builder(desc, dtype, seed):
    def build(device):
        g = torch.Generator().manual_seed(seed)
        b, hq, hkv, sq, sk, d = (desc[x] for x in ("b", "hq", "hkv", "sq", "sk", "d"))
        bshd = desc["layout"] == "bshd"

        def t(h, s):
            x = torch.randn(*((b, s, h, d) if bshd else (b, h, s, d)), generator=g)
            return x.to(device=device, dtype=dtype)
        q, k, v = t(hq, sq), t(hkv, sk), t(hkv, sk)
        kw = {"layout": desc["layout"]}
        for name in ("is_causal", "causal_align", "window", "softcap"):
            if name in desc:
                kw[name] = desc[name]
        if "alibi" in desc:
            shape = (hq,) if desc["alibi"] == "h" else (b, hq)
            kw["alibi_slopes"] = (torch.rand(*shape, generator=g) * 0.3).to(device)
        if desc.get("sinks"):
            kw["sinks"] = torch.randn(hq, generator=g).to(device)
        m = desc.get("mask")
        if m == "bool_pad":       # padding: each batch row keeps a prefix of its keys
            lens = torch.randint(sk // 2, sk + 1, (b,), generator=g)
            kw["attn_mask"] = (torch.arange(sk)[None, :] < lens[:, None])[:, None, None, :].to(device)
        elif m == "bool_full":
            mask = torch.rand(b, 1, sq, sk, generator=g) > 0.2
            mask[..., 0] = True
            kw["attn_mask"] = mask.to(device)
        elif m == "float_full":
            mask = torch.randn(b, 1, sq, sk, generator=g).clamp(-3, 3)
            kw["attn_mask"] = mask.to(device=device, dtype=dtype)
        return q, k, v, kw
    return build


def _double(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _reference(q, k, v, kw, grad_out, ref_dtype):
    """(out, grads) of the reference in ref_dtype ("upcast") and of plain PyTorch in q's dtype."""
    res = []
    for cast in (True, False):
        qq, kk, vv = ((x.to(ref_dtype) if cast else x).detach().requires_grad_(grad_out is not None)
                      for x in (q, k, v))
        kws = {n: (x.to(ref_dtype) if cast and isinstance(x, torch.Tensor) and x.is_floating_point() else x)
               for n, x in kw.items()}
        with torch.set_grad_enabled(grad_out is not None):
            out = reference.attention(qq, kk, vv, **kws, upcast=cast)
            grads = None
            if grad_out is not None:
                grads = torch.autograd.grad(out, (qq, kk, vv), grad_out.to(out.dtype))
        res.append((out.detach(), grads))
    return res


def _err(x, ref, base, dtype):
    err = (x.double() - ref.double()).abs().max().item()
    b = (base.double() - ref.double()).abs().max().item()
    return err, 2 * b + FLOOR[dtype]


def _calls_delta(before, after):
    a = after.get("attention", {})
    b = before.get("attention", {})
    return {kid: n - b.get(kid, 0) for kid, n in a.items() if n != b.get(kid, 0)}


def run_call(desc, build, device, ref_dtype):
    q, k, v, kw = build(device)
    rec = dict(desc)
    rec["chosen"] = lz.which("attention", q, k, v, **kw)
    grad_out = None
    if desc["grad"]:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    m0 = lz.metrics()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = lz.attention(q, k, v, **kw)
            grads = None
            if desc["grad"]:
                g = torch.Generator().manual_seed(desc["i"])
                grad_out = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
                grads = torch.autograd.grad(out, (q, k, v), grad_out)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # recorded, the run goes on
            first = (str(e).strip().splitlines() or [""])[0][:300]
            rec["error"] = f"{type(e).__name__}: {first}"
            out = None
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    m1 = lz.metrics()
    ran = _calls_delta(m0["calls"], m1["calls"])
    rec["ran"] = ",".join(sorted(ran)) or None
    rec["fallbacks"] = {kid: n - m0["fallbacks"].get(kid, 0) for kid, n in m1["fallbacks"].items()
                        if n != m0["fallbacks"].get(kid, 0)}
    rec["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    if out is not None:
        (ref, ref_g), (base, base_g) = _reference(q, k, v, kw, grad_out, ref_dtype)
        rec["err"], rec["bound"] = _err(out, ref, base, q.dtype)
        rec["ok"] = rec["err"] <= rec["bound"] and bool(torch.isfinite(out).all())
        if grads is not None:
            for name, gx, gr, gb in zip("qkv", grads, ref_g, base_g):
                e, bound = _err(gx, gr, gb, q.dtype)
                rec[f"grad_{name}_err"], rec[f"grad_{name}_bound"] = e, bound
                rec["ok"] = rec["ok"] and e <= bound
    return rec


def probe_call(desc, build, device):
    """Per kernel of PROBED: supports()' reasons and what its adapter actually did."""
    from layerzero import ops, registry

    q, k, v, kw = build(device)
    if desc["grad"]:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    spec = lz.explain("attention", q, k, v, **kw).spec
    args = ops.bind("attention", (q, k, v), kw)
    res = {}
    for kid in PROBED:
        kern = registry.get(kid)
        if registry.unavailable_reason(kern):
            continue
        reasons = kern.reasons(spec)
        entry = {"predicted": reasons[:2]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = kern.fn(*args)
                if desc["grad"]:
                    torch.autograd.grad(out.float().sum(), (q, k, v))
                if device == "cuda":
                    torch.cuda.synchronize()
                entry["actual"] = "ran"
            except Exception as e:
                entry["actual"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        entry["torch_warnings"] = sorted({" ".join(str(w.message).split())[:200] for w in caught})[:4]
        res[kid] = entry
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--probe", action="store_true", help="also run each SDPA kernel directly")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    ref_dtype = torch.float32 if a.device == "cuda" else torch.float64
    lz.reset_metrics()
    records = []
    t0 = time.perf_counter()
    for desc, build in make_calls(a.n, a.seed, a.device):
        rec = run_call(desc, build, a.device, ref_dtype)
        if a.probe:
            rec["probe"] = probe_call(desc, build, a.device)
        records.append(rec)
        flag = "" if rec.get("ok") else "  <-- " + (rec.get("error") or "rule violated")
        print(f"{rec['i']:3d} {rec['chosen']:<22} ran {rec['ran']!s:<22} fb {rec['fallbacks'] or ''!s:<6} "
              f"{ {k: v for k, v in desc.items() if k not in ('i',)} }{flag}", flush=True)
        if len(records) % 10 == 0:     # partial results survive a run cut short
            _write(a.out, {"summary": None, "calls": records})
    per_kernel = collections.Counter(r["ran"] for r in records)
    summary = {
        "label": a.label, "calls": len(records),
        "ran_reference": sum(r["ran"] == "reference.attention" for r in records),
        "paid_fallback": sum(bool(r["fallbacks"]) for r in records),
        "chosen_ne_ran": sum(r["chosen"] != r["ran"] for r in records),
        "rule_violations": sum(not r.get("ok", False) for r in records),
        "errors": sum("error" in r for r in records),
        "per_kernel": dict(per_kernel.most_common()),
        "seconds": round(time.perf_counter() - t0, 1),
        "device": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
    }
    print(json.dumps(summary, indent=1))
    _write(a.out, {"summary": summary, "calls": records})


def _write(path, obj):
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
