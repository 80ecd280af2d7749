"""Why lz.generate's time to first token was longer than a whole call (paged_generate.py's lz-static
row): the 1B llama (bf16, random weights) on paged_generate.py's 32 left-padded prompts of
100..4000 tokens; lz.generate with 256 and then with 1 new token, each twice, then once more
under torch.profiler: seconds per call, the attention kernels LayerZero picked, the 8 CUDA
kernels with the most time.

    PYTHONPATH=$PWD python3 scripts/padded_prefill_profile.py
"""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import e2e_transformers as E  # noqa: E402
import paged_generate as P  # noqa: E402

import layerzero as lz  # noqa: E402


def main():
    s = P.setup(False)
    model = E.build(s["shape"], "cuda", s["dtype"])
    E.set_variant(model, "layerzero")
    ids, mask, _ = P.prompts(s)

    def gen(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            lz.generate(model, ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for n in (256, 1):
        lz.reset_metrics()
        first = gen(n)
        calls = {op: dict(v) for op, v in lz.metrics()["calls"].items() if "attention" in op}
        print(n, "first", round(first, 3), calls, flush=True)
        print(n, "again", round(gen(n), 3), flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gen(n)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=90),
              flush=True)


if __name__ == "__main__":
    main()
