"""Does a new process get lz.generate's compiled decode step from inductor's caches, or compile
and tune it again? One 8-token lz.generate (1B llama shape, batch 1, bf16, CUDA), then inductor's
counters (FX graph cache hit/miss, coordinate-descent tuning runs) and its cache log lines. Run it
twice; the second process shows what a user's next process pays.

    PYTHONPATH=$PWD python3 scripts/inductor_cache_probe.py; PYTHONPATH=$PWD python3 scripts/inductor_cache_probe.py
"""
import logging
import os
import sys
import time

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import e2e_transformers as E  # noqa: E402

import layerzero as lz  # noqa: E402

lines = []


class Kept(logging.Handler):
    def emit(self, rec):
        m = rec.getMessage()
        if "ypass" in m or " miss " in m or " hit " in m:
            lines.append(m[:300])


for name in ("torch._inductor.codecache", "torch._functorch._aot_autograd.autograd_cache"):
    lg = logging.getLogger(name)
    lg.setLevel(logging.DEBUG)
    lg.addHandler(Kept())
    lg.propagate = False

model = E.build(E.SHAPES["1b"], "cuda", torch.bfloat16)
lz.patch(model)
ids = torch.randint(1, 1000, (1, 128), device="cuda")
t0 = time.perf_counter()
with torch.no_grad():
    lz.generate(model, ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                eos_token_id=None, attention_mask=torch.ones_like(ids))
torch.cuda.synchronize()
print("first call", round(time.perf_counter() - t0, 2), "s")
print({k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd", "stats")})
for m in dict.fromkeys(lines):
    print("  ", m)
