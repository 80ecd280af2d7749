"""Which FlashInfer single-prefill variants die with SIGFPE on the GPU host? Each runs in its own
process (run: PYTHONPATH=/tmp/site:$PWD python3 scripts/flashinfer_hnd_probe.py). Found: HND K/V
with the fa3 backend (flashinfer 0.7.2 on sm90). See benchmarks/RESULTS.md."""
import subprocess, sys, os
CODE = r'''
import torch, flashinfer, faulthandler, sys
faulthandler.enable()
layout, backend, hk, b = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
hq, s, d = 32, 512, 128
q = torch.randn(s, hq, d, device="cuda", dtype=torch.bfloat16)
shape = (s, hk, d) if layout == "NHD" else (hk, s, d)
k = torch.randn(*shape, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
kw = dict(causal=True, kv_layout=layout, sm_scale=None, window_left=-1, logits_soft_cap=None)
if backend != "default": kw["backend"] = backend
o = flashinfer.single_prefill_with_kv_cache(q, k, v, **kw)
torch.cuda.synchronize()
kk = k.transpose(0, 1) if layout == "HND" else k
ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0,1)[None], kk.transpose(0,1)[None], (v.transpose(0,1) if layout=="NHD" else v)[None], is_causal=True, enable_gqa=True)[0].transpose(0,1)
print("OK maxdiff", (o.float()-ref.float()).abs().max().item())
'''
for args in [("NHD", "default", 8, 1), ("HND", "default", 8, 1), ("HND", "fa2", 8, 1), ("NHD", "fa3", 8, 1), ("HND", "fa3", 8, 1), ("HND", "default", 32, 1)]:
    r = subprocess.run([sys.executable, "-c", CODE, *map(str, args)], capture_output=True, text=True, timeout=150)
    tail = [l for l in (r.stdout + r.stderr).splitlines() if "OK" in l or "File" in l or "Error" in l or "Fatal" in l][-6:]
    print(args, "rc", r.returncode, tail, flush=True)
