"""Train a draft/target pair for speculative decoding: a llama-style target (~25M parameters, 16
layers of width 384) and a draft (~3.2M, 1 layer of width 512) on the Python standard library's
.py sources, byte-level.

Data: every .py file under sysconfig.get_paths()["stdlib"] (site-packages left out), read as
bytes; tokens are the bytes (0-255) plus BOS 256, EOS 257, PAD 258 (vocab 264: a multiple of 8).
Each file becomes BOS + bytes + EOS; the files are sorted by path and one in 50 (crc32 of the
relative path % 50 == 0) is held out: eval loss, and the prompts `benchmarks/speculative.py`
takes (`prompts()`). Training: random windows of --seq tokens from the concatenated training
files, AdamW (lr --lr, 1/20 of the steps warm-up, cosine to 10%), bf16 autocast on CUDA; the
target first, then the draft on the same data (no distillation). Both models' configs are in
CONFIGS.

Writes --out (default ~/.cache/layerzero/draft_pair): target/ and draft/ (save_pretrained,
safetensors, fp32: ~100 MB and ~13 MB; nothing goes into the repository) and meta.json (configs,
data split, steps, losses, seconds). Loading: `load_pair(path, device, dtype)`.

On a GPU (defaults: 3000 steps each, batch 64 x 512 tokens; a few minutes on an H100/H200):
    python scripts/train_draft_pair.py
CPU smoke run (tiny models, 30 steps, ~40 files, one thread, a few seconds):
    python scripts/train_draft_pair.py --tiny --out /tmp/pair
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sysconfig
import time
import zlib

import torch

BOS, EOS, PAD = 256, 257, 258
VOCAB = 264
HOLD_OUT = 50
DEFAULT_OUT = pathlib.Path(os.path.expanduser("~/.cache/layerzero/draft_pair"))
# Deep target, one-layer draft: decoding models this small eagerly is bound by kernel launches and
# Python, so a forward costs about its layer count plus a fixed part (embedding, mask, norm, output
# layer); a 4-layer 256-wide draft of the same size would cost ~1/2 of an 8-layer target, this one
# ~1/6 of the 16-layer target.
CONFIGS = {
    "target": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=6,
                   num_key_value_heads=2),
    "draft": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=1, num_attention_heads=8,
                  num_key_value_heads=4),
}
TINY = {
    "target": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2),
    "draft": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1),
}


def stdlib_files(limit: int | None = None) -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    return files[:limit] if limit else files


def held_out(path: pathlib.Path) -> bool:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return zlib.crc32(str(path.relative_to(root)).encode()) % HOLD_OUT == 0


def encode(data: bytes) -> torch.Tensor:
    """BOS + the bytes + EOS as an int32 tensor."""
    body = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32) if data
            else torch.zeros(0, dtype=torch.int32))
    return torch.cat([torch.tensor([BOS], dtype=torch.int32), body, torch.tensor([EOS], dtype=torch.int32)])


def decode(ids) -> str:
    return bytes(int(i) for i in ids if i < 256).decode("utf-8", "replace")


def corpus(limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train tokens, eval tokens, description): int32 tensors."""
    train, held = [], []
    for p in stdlib_files(limit):
        (held if held_out(p) else train).append(encode(p.read_bytes()))
    n_train, n_held = len(train), len(held)
    train = torch.cat(train)
    held = torch.cat(held) if held else None
    if held is None:        # a --tiny run may see no held-out file: hold out its last 10%
        cut = len(train) * 9 // 10
        train, held = train[:cut], train[cut:]
    desc = {"root": sysconfig.get_paths()["stdlib"], "train_files": n_train, "eval_files": n_held,
            "train_tokens": len(train), "eval_tokens": len(held), "hold_out": f"crc32(path) % {HOLD_OUT} == 0"}
    return train, held, desc


def prompts(n: int, length: int, seed: int = 0, limit: int | None = None) -> torch.Tensor:
    """(n, length) LongTensor: windows of held-out files that start at a line start."""
    g = torch.Generator().manual_seed(seed)
    files = [p for p in stdlib_files(limit) if held_out(p)] or stdlib_files(limit)[-5:]
    out = []
    while len(out) < n:
        data = files[int(torch.randint(len(files), (1,), generator=g))].read_bytes()
        starts = [0] + [i + 1 for i, b in enumerate(data[:-length]) if b == 10]
        if len(data) <= length:
            continue
        s = starts[int(torch.randint(len(starts), (1,), generator=g))]
        out.append(list(data[s:s + length]))
    return torch.tensor(out, dtype=torch.long)


def build(name: str, tiny: bool = False):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                        max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
                        **(TINY if tiny else CONFIGS)[name])
    model = T.LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = PAD
    return model


def batches(tokens: torch.Tensor, batch: int, seq: int, g: torch.Generator, device):
    starts = torch.randint(len(tokens) - seq - 1, (batch,), generator=g)
    idx = starts[:, None] + torch.arange(seq + 1)
    x = tokens[idx].long().to(device)
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def evaluate(model, tokens, seq, device, amp, n_batches=8, batch=16) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(n_batches):
        x, y = batches(tokens, batch, seq, g, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x).logits
        losses.append(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


@torch.enable_grad()   # also when called under no_grad (benchmarks/speculative.py --tiny)
def train(name, train_tokens, eval_tokens, args, device) -> dict:
    torch.manual_seed(args.seed)
    model = build(name, args.tiny).to(device)
    params = sum(p.numel() for p in model.parameters())
    steps = args.steps if name == "target" else args.draft_steps
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    amp = device.type == "cuda"
    g = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    t0 = time.perf_counter()
    loss = float("nan")
    for step in range(steps):
        x, y = batches(train_tokens, args.batch, args.seq, g, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x).logits
        loss_t = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == steps - 1:
            loss = loss_t.item()
            print(f"{name} step {step}/{steps} loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    ev = evaluate(model, eval_tokens, min(args.seq, len(eval_tokens) // 2 - 1), device, amp)
    print(f"{name}: {params / 1e6:.1f}M parameters, train loss {loss:.3f}, eval loss {ev:.3f} "
          f"({ev / math.log(2):.2f} bits/byte), {seconds:.0f} s", flush=True)
    out = pathlib.Path(args.out) / name
    model.eval().save_pretrained(out, safe_serialization=True)
    return {"parameters": params, "steps": steps, "train_loss": loss, "eval_loss": ev, "seconds": seconds,
            "config": (TINY if args.tiny else CONFIGS)[name]}


def load_pair(path=DEFAULT_OUT, device="cpu", dtype=torch.float32):
    """(target, draft) from a directory written by this script, in eval mode."""
    import transformers as T

    path = pathlib.Path(path)
    if not (path / "target").exists() or not (path / "draft").exists():
        raise FileNotFoundError(f"no trained pair in {path}: run python scripts/train_draft_pair.py --out {path}")
    return tuple(T.LlamaForCausalLM.from_pretrained(path / n, dtype=dtype).to(device).eval()
                 for n in ("target", "draft"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--tiny", action="store_true", help="tiny models, 30 steps, ~40 files: a CPU smoke run")
    ap.add_argument("--steps", type=int, default=None, help="target steps (default 3000; --tiny 30)")
    ap.add_argument("--draft-steps", type=int, default=None, help="draft steps (default: --steps)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 64; --tiny 8)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512; --tiny 64)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=200)
    ap.add_argument("--device", default=None, help="default: cuda when available (--tiny: cpu)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (30 if args.tiny else 3000)
    args.draft_steps = args.draft_steps or args.steps
    args.batch = args.batch or (8 if args.tiny else 64)
    args.seq = args.seq or (64 if args.tiny else 512)
    if args.tiny:
        args.log_every = min(args.log_every, 10)
        torch.set_num_threads(1)     # tiny models: more threads only contend on a busy machine
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    t0 = time.perf_counter()
    train_tokens, eval_tokens, data = corpus(40 if args.tiny else None)
    print(f"data: {data['train_files']} files, {data['train_tokens'] / 1e6:.1f}M train tokens, "
          f"{data['eval_tokens'] / 1e6:.2f}M eval tokens ({time.perf_counter() - t0:.1f} s); device {device}",
          flush=True)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    meta = {"vocab": {"size": VOCAB, "bytes": "0-255", "bos": BOS, "eos": EOS, "pad": PAD}, "data": data,
            "device": str(device), "tiny": args.tiny, "batch": args.batch, "seq": args.seq, "lr": args.lr,
            "torch": torch.__version__}
    for name in ("target", "draft"):
        meta[name] = train(name, train_tokens, eval_tokens, args, device)
    meta["seconds"] = time.perf_counter() - t0
    (pathlib.Path(args.out) / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {args.out} ({meta['seconds']:.0f} s)")
    return meta


if __name__ == "__main__":
    main()
