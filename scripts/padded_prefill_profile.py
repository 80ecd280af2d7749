"""Why lz.generate's time to first token was longer than a whole call (paged_generate.py's lz-static
row): the 1B llama (bf16, random weights) on paged_generate.py's 32 left-padded prompts of
100..4000 tokens; lz.generate with 256 and then with 1 new token, each twice, then once more
under torch.profiler: seconds per call, the attention kernels LayerZero picked, the 12 CUDA
kernels with the most time. --paged: the same with an lz.PagedKVCache (pages of 16) as the cache
(paged_generate.py's lz-paged variant, whose decode step took 4.3 ms against lz-static's 1.66).

    PYTHONPATH=$PWD python3 scripts/padded_prefill_profile.py [--paged] [--new 256 1]
"""
import argparse
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paged", action="store_true", help="an lz.PagedKVCache as the cache")
    ap.add_argument("--new", nargs="+", type=int, default=[256, 1], help="new tokens of each profiled call")
    args = ap.parse_args()
    s = P.setup(False)
    model = E.build(s["shape"], "cuda", s["dtype"])
    E.set_variant(model, "layerzero")
    ids, mask, lengths = P.prompts(s)
    extra = {}
    if args.paged:
        pages = sum(-(-(n + max(args.new)) // s["page"]) for n in lengths)
        extra["cache"] = lz.PagedKVCache(model.config, page_size=s["page"], num_pages=pages,
                                         max_batch_size=s["batch"])

    def gen(n):
        if "cache" in extra:
            extra["cache"].reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            lz.generate(model, ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0, eos_token_id=None, **extra)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for n in args.new:
        lz.reset_metrics()
        first = gen(n)
        calls = {op: dict(v) for op, v in lz.metrics()["calls"].items() if "attention" in op}
        print(n, "first", round(first, 3), calls, flush=True)
        print(n, "again", round(gen(n), 3), flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gen(n)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=90),
              flush=True)


if __name__ == "__main__":
    main()
