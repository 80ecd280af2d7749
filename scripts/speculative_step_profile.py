"""Where a step of lz.speculative_generate's graphed loop spends its time on the GPU: the 1B llama
target (random weights) and speculative.py's synthetic one-layer draft, constant k, the loop's
fixed-addressing steps run eagerly (the code its CUDA graphs replay) under torch.profiler: per
batch and k, CUDA kernels per step, GPU time per step, the attention kernels LayerZero picked, and
the kernels with the most time. Kernels of k=8 minus those of k=1, over 7, are a draft token's.

    PYTHONPATH=$PWD python3 scripts/speculative_step_profile.py [--batch 1 8] [--k 1 8] [--dtype float32]
"""
import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import speculative as S  # noqa: E402

import layerzero as lz  # noqa: E402
from layerzero.speculative import graphs  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--k", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--tiny", action="store_true", help="CPU check of this script (tiny model, no kernels)")
    args = ap.parse_args()
    dev = "cpu" if args.tiny else "cuda"
    graphs.FIXED_ON_CPU = args.tiny
    real_init = graphs.StepGraphs.__init__

    def eager_init(self, *a, **kw):          # fixed addressing, no capture: the kernels show up
        real_init(self, *a, **kw)
        self.failed = True

    graphs.StepGraphs.__init__ = eager_init
    target = S.E.build(S.E.TINY if args.tiny else S.E.SHAPES["1b"], dev, getattr(torch, args.dtype))
    per = {}
    for batch in args.batch:
        ids = torch.randint(3, target.config.vocab_size, (batch, 128), device=dev)
        gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new, do_sample=False,
                   eos_token_id=None, pad_token_id=0)
        oracle = torch.cat([ids, target.generate(ids, **gen)[:, 128:]], 1)
        draft = S.OracleDraft(target, oracle, 0.8)
        for k in args.k:
            kw = dict(num_draft_tokens=k, max_draft_tokens=max(args.k), draft_schedule="constant", **gen)
            st = lz.SpeculativeStats()
            lz.reset_metrics()
            lz.speculative_generate(target, draft, ids, stats=st, **kw)
            picked = {op: dict(v) for op, v in lz.metrics()["calls"].items() if "attention" in op}
            st = lz.SpeculativeStats()
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            sync()
            with profile(activities=[ProfilerActivity.CPU if args.tiny else ProfilerActivity.CUDA]) as prof:
                lz.speculative_generate(target, draft, ids, stats=st, **kw)
                sync()
            steps = len(st.draft_lengths)
            kernels = [e for e in prof.events() if e.device_type == (torch.autograd.DeviceType.CPU if args.tiny else torch.autograd.DeviceType.CUDA)]
            names = collections.Counter()
            for e in kernels:
                names[e.name] += e.cpu_time_total if args.tiny else e.device_time_total
            total = sum(names.values())
            per[(batch, k)] = (len(kernels) / steps, total / steps)
            print(f"\nbatch {batch} k {k}: {steps} steps (prefill included in totals); {len(kernels) / steps:.0f} "
                  f"kernels and {total / steps / 1e3:.2f} ms GPU time per step; attention: {picked}", flush=True)
            for name, us in names.most_common(args.top):
                print(f"  {us / steps / 1e3:8.3f} ms/step  {name[:110]}", flush=True)
        lz.unpatch(target)
    for batch in args.batch:
        lo, hi = min(args.k), max(args.k)
        if (batch, lo) in per and (batch, hi) in per and hi > lo:
            n0, t0 = per[(batch, lo)]
            n1, t1 = per[(batch, hi)]
            print(f"batch {batch}: a draft token: {(n1 - n0) / (hi - lo):.0f} kernels, "
                  f"{(t1 - t0) / (hi - lo) / 1e3:.3f} ms GPU time", flush=True)


if __name__ == "__main__":
    main()
