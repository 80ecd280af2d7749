"""The `layerzero` command (also `python -m layerzero`).

    layerzero doctor [--json]                       device, versions, every backend's state
    layerzero kernels [--op OP] [--json]            registered kernels, available or why not
    layerzero explain attention --q 1,32,2048,128 --kv-heads 8 --dtype bfloat16 --causal
    layerzero bench rms_norm --x 8,4096             time every eligible kernel and lz's pick
    layerzero tune                                  (needs the performance DB: not available yet)
    layerzero --version                             layerzero X (torch Y)

`explain OP` and `bench OP` describe one call with per-op options (`layerzero explain OP --help`).
`explain` builds the call on the meta device, so it allocates nothing, and asks the selector what
would run on --device (default: cuda when there is one, else cpu; a device this machine has); with
--device cuda --sm 90 it describes an H100 this machine doesn't have. `bench` allocates the call's
tensors on --device and reports each kernel on stderr as it is timed.
Output is a table (rich's, on a terminal, when rich is installed); --json prints JSON instead.
Bad arguments exit with status 2 and a message (an unknown option with its command's usage);
`explain` exits 1 when no kernel can run the call. With a bad LAYERZERO_* variable
(`control.environment_error`) `doctor` reports it and exits 1, every other command exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

OPS = ("attention", "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "sample", "paged_attention")
DTYPES = ("float16", "bfloat16", "float32", "float64")


class UsageError(Exception):
    """A bad combination of arguments: printed as `layerzero: error: ...`, exit status 2."""


# ---- output -----------------------------------------------------------------------------------

def _rich():
    """rich's Console when stdout is a terminal and rich is installed, else None."""
    if not sys.stdout.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console()


def table(title: str, headers: list[str], rows: list[list], footer: str = "") -> None:
    """Print rows under headers: a rich table on a terminal, else aligned plain text."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    console = _rich()
    if console is not None:
        from rich.table import Table
        from rich.text import Text

        t = Table(title=Text(title), title_justify="left", caption=Text(footer) if footer else None,
                  caption_justify="left")
        for h in headers:
            t.add_column(h)
        for r in rows:
            t.add_row(*(Text(c) for c in r))   # Text: reasons may hold "[...]", not rich markup
        console.print(t)
        return
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    print(title)
    for r in [headers] + rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if footer:
        print(footer)


def _json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---- describing one call from arguments -----------------------------------------------------

def _dims(count: int | None, names: str):
    """argparse type: `count` comma-separated positive ints (any number >= 1 when None)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            dims = tuple(int(p) for p in text.split(","))
        except ValueError:
            dims = ()
        if not dims or (count is not None and len(dims) != count) or min(dims) < 1:
            raise argparse.ArgumentTypeError(f"expected {names}: "
                                             f"{count or 'one or more'} comma-separated positive "
                                             f"integers, got {text!r}")
        return dims
    return parse


def _count(text: str) -> int:
    """argparse type: a positive int (a count of heads, keys or features; 0 is not one)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _window(text: str) -> tuple[int, int]:
    try:
        left, right = (int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT (ints, -1 = unbounded), got {text!r}") from None
    return left, right


_NEGATIVE_PAIR = re.compile(r"-\d+,-?\d+")


def _join_windows(argv: list[str]) -> list[str]:
    """`--window -1,0` as `--window=-1,0`: argparse takes a value that starts with '-' (and is
    not a plain negative number) for an option, so it would say "expected one argument"."""
    out = []
    for arg in argv:
        if out and out[-1] == "--window" and _NEGATIVE_PAIR.fullmatch(arg):
            out[-1] = f"--window={arg}"
        else:
            out.append(arg)
    return out


def _command(sub, name: str, **kw) -> argparse.ArgumentParser:
    """A (sub)command's parser, which records itself in the namespace: arguments no parser knows
    are then reported with the usage of the innermost command given (see `main`)."""
    p = sub.add_parser(name, **kw)
    p.set_defaults(usage_of=p)
    return p


def _add_op_parsers(command: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    ops = command.add_subparsers(dest="op", metavar="OP", required=True,
                                 title="ops", description=", ".join(OPS))
    a = _command(ops, "attention", parents=[common], help="lz.attention")
    a.add_argument("--q", type=_dims(4, "B,H,S,D"), default=(1, 8, 128, 64), metavar="B,H,S,D",
                   help="q's batch, heads, sequence and head_dim, whatever the layout (default 1,8,128,64)")
    a.add_argument("--kv-heads", type=_count, help="k/v heads (default: q's; fewer = GQA/MQA)")
    a.add_argument("--seq-k", type=_count, help="k/v sequence length (default: q's)")
    a.add_argument("--head-dim-v", type=_count, help="v's head_dim (default: q's)")
    a.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd")
    a.add_argument("--causal", action="store_true")
    a.add_argument("--causal-align", choices=("top_left", "bottom_right"), default="top_left")
    a.add_argument("--window", type=_window, metavar="LEFT,RIGHT",
                   help="sliding window: each query sees LEFT keys before its position and RIGHT "
                        "after, -1 = unbounded (e.g. --window -1,0 or --window=-1,0)")
    a.add_argument("--softcap", type=float)
    a.add_argument("--alibi", action="store_true", help="pass ALiBi slopes (Hq,)")
    a.add_argument("--sinks", action="store_true", help="pass attention-sink logits (Hq,)")
    a.add_argument("--mask", choices=("bool", "float"), help="pass an attn_mask of (1, 1, Sq, Sk)")
    a.add_argument("--dropout", type=float, default=0.0, metavar="P")
    a.add_argument("--scale", type=float)
    for name in ("rms_norm", "layer_norm"):
        p = _command(ops, name, parents=[common], help=f"lz.{name}")
        p.add_argument("--x", type=_dims(None, "...,HIDDEN"), default=(4, 1024), metavar="...,HIDDEN",
                       help="x's shape, the last dim normalised (default 4,1024)")
        p.add_argument("--residual", action="store_true")
        p.add_argument("--no-weight", action="store_true")
        p.add_argument("--eps", type=float)
        if name == "rms_norm":
            p.add_argument("--offset", type=float, default=0.0, help="1.0 = Gemma's (1 + w)")
        else:
            p.add_argument("--no-bias", action="store_true")
    p = _command(ops, "rope", parents=[common], help="lz.rope")
    p.add_argument("--q", type=_dims(4, "B,H,S,D"), default=(1, 8, 128, 64), metavar="B,H,S,D")
    p.add_argument("--kv-heads", type=_count, help="k heads (default: q's)")
    p.add_argument("--rot-dim", type=_count, help="rotated features per head (default: head_dim)")
    p.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd")
    p.add_argument("--interleaved", action="store_true")
    for name in ("swiglu", "geglu"):
        p = _command(ops, name, parents=[common], help=f"lz.{name}")
        p.add_argument("--x", type=_dims(None, "...,HIDDEN"), default=(4, 4096), metavar="...,HIDDEN",
                       help="shape of gate and up (default 4,4096)")
        if name == "geglu":
            p.add_argument("--approximate", choices=("none", "tanh"), default="none")
    p = _command(ops, "sample", parents=[common], help="lz.sample")
    p.add_argument("--x", type=_dims(2, "B,V"), default=(4, 32000), metavar="B,V",
                   help="logits' shape (default 4,32000)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p = _command(ops, "paged_attention", parents=[common], help="lz.paged_attention")
    p.add_argument("--q", type=_dims(4, "B,H,S,D"), default=(1, 8, 1, 64), metavar="B,H,S,D",
                   help="q's batch, heads, new tokens and head_dim, whatever the layout "
                        "(default 1,8,1,64: a decode step)")
    p.add_argument("--kv-heads", type=_count, help="the pages' kv heads (default: q's; fewer = GQA/MQA)")
    p.add_argument("--seq-k", type=_count, default=128, help="keys per row, in pages (default 128)")
    p.add_argument("--page-size", type=_count, default=16, help="keys per page (default 16)")
    p.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd")
    p.add_argument("--no-causal", action="store_true", help="queries see every key of their row")
    p.add_argument("--window", type=_window, metavar="LEFT,RIGHT",
                   help="sliding window, -1 = unbounded (e.g. --window 127,0 or --window=-1,0)")
    p.add_argument("--softcap", type=float)
    p.add_argument("--sinks", action="store_true", help="pass attention-sink logits (Hq,)")
    p.add_argument("--scale", type=float)


def build_call(a: argparse.Namespace, device: str) -> tuple[tuple, dict]:
    """(args, kwargs) of the `lz.<a.op>` call the arguments describe, as random tensors on
    `device` ("meta" allocates nothing)."""
    import torch

    dtype = getattr(torch, a.dtype)

    def t(*shape, dt=dtype, grad=a.grad):
        x = torch.randn(shape, dtype=dt, device=device)
        return x.requires_grad_() if grad else x

    if a.op in ("attention", "rope"):
        b, h, s, d = a.q
        hk = h if a.kv_heads is None else a.kv_heads
        if a.op == "attention":
            sk = s if a.seq_k is None else a.seq_k
            dv = d if a.head_dim_v is None else a.head_dim_v
        else:
            sk, dv = s, d
        shapes = [(b, h, s, d), (b, hk, sk, d), (b, hk, sk, dv)]
        if a.layout == "bshd":
            shapes = [(x[0], x[2], x[1], x[3]) for x in shapes]
        q, k, v = (t(*shape) for shape in shapes)
        if a.op == "rope":
            rot = d if a.rot_dim is None else a.rot_dim
            cos, sin = t(s, rot, grad=False), t(s, rot, grad=False)
            return (q, k, cos, sin), {"layout": a.layout, "interleaved": a.interleaved}
        kw = {"is_causal": a.causal, "causal_align": a.causal_align, "layout": a.layout,
              "window": a.window, "softcap": a.softcap, "dropout_p": a.dropout, "scale": a.scale}
        if a.mask == "bool":
            kw["attn_mask"] = torch.rand((1, 1, s, sk), device=device) > 0.1
        elif a.mask == "float":
            kw["attn_mask"] = t(1, 1, s, sk, grad=False)
        if a.alibi:
            kw["alibi_slopes"] = torch.rand((h,), device=device)
        if a.sinks:
            kw["sinks"] = torch.randn((h,), device=device)
        return (q, k, v), kw
    if a.op in ("rms_norm", "layer_norm"):
        hidden = a.x[-1]
        args = [t(*a.x), None if a.no_weight else t(hidden)]
        if a.op == "layer_norm":
            args.append(None if a.no_bias else t(hidden))
        kw = {"residual": t(*a.x) if a.residual else None}
        if a.eps is not None:
            kw["eps"] = a.eps
        if a.op == "rms_norm":
            kw["offset"] = a.offset
        return tuple(args), kw
    if a.op in ("swiglu", "geglu"):
        kw = {"approximate": a.approximate} if a.op == "geglu" else {}
        return (t(*a.x), t(*a.x)), kw
    if a.op == "paged_attention":   # every row holds --seq-k keys in pages of its own, in order
        b, h, s, d = a.q
        hk = h if a.kv_heads is None else a.kv_heads
        n = -(-a.seq_k // a.page_size)
        q = t(b, h, s, d) if a.layout == "bhsd" else t(b, s, h, d)
        k_pages, v_pages = t(b * n, a.page_size, hk, d), t(b * n, a.page_size, hk, d)
        table = torch.arange(b * n, dtype=torch.int32, device=device).reshape(b, n)
        lens = torch.full((b,), a.seq_k, dtype=torch.int32, device=device)
        kw = {"is_causal": not a.no_causal, "window": a.window, "softcap": a.softcap,
              "scale": a.scale, "layout": a.layout}
        if a.sinks:
            kw["sinks"] = torch.randn((h,), device=device)
        return (q, k_pages, v_pages, table, lens), kw
    return (t(*a.x, grad=False),), {"temperature": a.temperature, "top_k": a.top_k,
                                    "top_p": a.top_p, "min_p": a.min_p}


def _target(a: argparse.Namespace, *, real: bool) -> tuple[str, int]:
    """(device type, sm) the call is described for. The device must exist here, except a CUDA
    GPU described by --sm (explain only: real=False)."""
    import torch

    from .call import device_sm
    from .doctor import devices

    name = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if a.sm is not None:
        if dev.type != "cuda":
            raise UsageError(f"--sm describes a CUDA GPU; pass --device cuda with it (got {name!r})")
        return dev.type, a.sm
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            hint = "" if real else "; pass --sm (e.g. 90 for H100) to describe one"
            raise UsageError(f"no CUDA device here{hint}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return dev.type, device_sm(dev if dev.index is not None else torch.device("cuda"))
    here = list(dict.fromkeys(d for d, _ in devices()))
    if dev.type not in here:
        raise UsageError(f"--device {name!r} is not available here; devices here: {', '.join(here)}")
    return dev.type, 0


def _apply_policy(a: argparse.Namespace) -> None:
    if getattr(a, "policy", None):
        import layerzero as lz
        lz.configure(policy=a.policy)


# ---- commands -------------------------------------------------------------------------------

def cmd_doctor(a) -> int:
    """The report; exit status 1 when it lists problems (a bad LAYERZERO_* variable)."""
    import layerzero as lz

    report = lz.doctor()
    if a.json:
        _json(report.as_dict())
    elif _rich() is None:
        print(report)
    else:
        d = report.as_dict()
        table("LayerZero doctor", ["", "value"], [[k, v] for k, v in d["system"].items()])
        table("packages", ["package", "version", "state"],
              [[p["package"], p["version"] or "-", p["state"]] for p in d["packages"]])
        _print_kernels(report.kernels)
        if report.problems:
            table("problems", ["problem"], [[m] for m in report.problems])
    return 1 if report.problems else 0


def _print_kernels(rows) -> None:
    table("kernels", ["kernel", "op", "backend", "state"],
          [[r.id, r.op, r.backend, "available" if r.available else f"unavailable: {r.reason}"]
           for r in rows])


def cmd_kernels(a) -> int:
    from .doctor import kernel_rows

    rows = kernel_rows(a.op)
    if a.json:
        _json([r._asdict() for r in rows])
    else:
        _print_kernels(rows)
    return 0


def _decision_json(op: str, d) -> dict:
    return {"op": op, "spec": d.spec.as_dict(), "chosen": d.chosen, "note": d.note, "error": d.error,
            "candidates": [{"kernel": c.kernel, "status": c.status, "reasons": c.reasons,
                            "score": c.score} for c in d.candidates]}


def _describe(a, device: str, sm: int | None):
    """(CallSpec, args, kwargs, bound args) for the described call; spec set to device/sm."""
    from . import ops

    args, kwargs = build_call(a, "meta" if sm is not None else device)
    spec, vals = ops.describe(a.op, args, kwargs)
    if sm is not None:
        spec = spec._replace(device=device, sm=sm)
    return spec, args, kwargs, vals


def cmd_explain(a) -> int:
    from . import dispatch

    _apply_policy(a)
    device, sm = _target(a, real=False)
    spec, *_ = _describe(a, device, sm)
    d = dispatch.decide(spec)
    if a.json:
        _json(_decision_json(a.op, d))
    else:
        rank = {"chosen": 0, "eligible": 1, "denied": 2, "rejected": 3, "unavailable": 4}
        cands = sorted(d.candidates, key=lambda c: (rank.get(c.status, 5), -(c.score or 0)))
        brief = ", ".join(f"{k}={v}" for k, v in spec.as_dict().items()
                          if v not in (0, False, None, [], "none") and k != "op")
        table(f"{a.op}: {brief}" + (f" ({d.note})" if d.note else ""),
              ["kernel", "status", "score", "reasons"],
              [[c.kernel, c.status, c.score, "; ".join(c.reasons)] for c in cands],
              f"chosen: {d.chosen}" if d.chosen else f"error: {d.error}")
    return 0 if d.chosen else 1


def _time(fn, args, warmup: int, repeat: int, sync) -> tuple[list[float], int]:
    """(seconds per call of each of `repeat` samples, calls per sample). A sample runs enough
    back-to-back calls to last >= 2 ms (as timeit's autorange), then waits for the device, so
    short calls are timed as they run in a model: queued, not synchronised one by one."""
    for _ in range(warmup):
        fn(*args)
    sync()
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn(*args)
        sync()
        took = time.perf_counter() - t0
        if took >= 2e-3 or number >= 1000:
            break
        number = min(1000, number * max(2, int(2e-3 / max(took, 1e-7)) + 1))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(*args)
        sync()
        times.append((time.perf_counter() - t0) / number)
    return times, number


def cmd_bench(a) -> int:
    import contextlib

    import torch

    from . import dispatch, ops, registry

    if a.repeat < 1 or a.warmup < 0:
        raise UsageError(f"--repeat must be >= 1 and --warmup >= 0, got {a.repeat} and {a.warmup}")
    _apply_policy(a)
    device, _ = _target(a, real=True)
    dev = torch.device(a.device) if a.device else torch.device(device)
    spec, args, kwargs, vals = _describe(a, str(dev), None)
    d = dispatch.decide(spec)
    if d.error:
        raise ValueError(d.error)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    grad = contextlib.nullcontext() if a.grad else torch.no_grad()
    results = []
    runnable = [c for c in d.candidates if c.status in ("chosen", "eligible")]
    n = len(runnable) + 1

    def progress(i: int, name: str, done: str | None = None) -> None:
        """`bench: [i/n] name ...` on stderr while it runs, the time when done."""
        if done is None:
            print(f"bench: [{i}/{n}] {name} ...", end="", file=sys.stderr, flush=True)
        else:
            print(f" {done}", file=sys.stderr, flush=True)

    with grad:
        for i, c in enumerate(runnable, 1):
            row = {"kernel": c.kernel, "status": c.status, "score": c.score}
            progress(i, c.kernel)
            try:
                ts, number = _time(registry.get(c.kernel).fn, vals, a.warmup, a.repeat, sync)
                row.update(median_s=statistics.median(ts), min_s=min(ts), calls_per_sample=number)
                progress(i, c.kernel, f"{row['median_s'] * 1e3:.4f} ms")
            except Exception as e:  # a kernel that fails here is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                progress(i, c.kernel, f"failed ({row['error']})")
            results.append(row)
        public = ops.PUBLIC[a.op]
        progress(n, f"lz.{a.op}")
        ts, number = _time(lambda *args: public(*args, **kwargs), args, a.warmup, a.repeat, sync)
        progress(n, f"lz.{a.op}", f"{statistics.median(ts) * 1e3:.4f} ms")
    timed = [r for r in results if "median_s" in r]
    fastest = min(timed, key=lambda r: r["median_s"])["kernel"] if timed else None
    pick = {"kernel": d.chosen, "median_s": statistics.median(ts), "min_s": min(ts),
            "calls_per_sample": number}
    out = {"op": a.op, "device": str(dev), "spec": spec.as_dict(), "repeat": a.repeat,
           "chosen": d.chosen, "fastest": fastest, "kernels": results, "lz": pick}
    if a.json:
        _json(out)
        return 0
    best = min(r["median_s"] for r in timed) if timed else None

    def ms(x):
        return f"{x * 1e3:.4f}"

    rows = [[r["kernel"], r["status"], ms(r["median_s"]), ms(r["min_s"]),
             f"{r['median_s'] / best:.2f}x"] if "median_s" in r
            else [r["kernel"], r["status"], "-", "-", r["error"]] for r in results]
    rows.append([f"lz.{a.op} (runs {d.chosen})", "", ms(pick["median_s"]), ms(pick["min_s"]),
                 f"{pick['median_s'] / best:.2f}x" if best else ""])
    table(f"bench {a.op} on {dev} (median and min of {a.repeat} samples per kernel, each "
          f">= 2 ms of back-to-back calls, after {a.warmup} warm-up calls)",
          ["kernel", "status", "median ms", "min ms", "vs fastest"], rows,
          f"fastest: {fastest}; lz picks: {d.chosen}")
    return 0


def cmd_warmup(a) -> int:
    """Build what the described call's kernels need (FlashInfer JIT variants, flex compiles) and
    wait; exit 1 when a build failed or was still running at --timeout."""
    from .warmup import warmup

    _apply_policy(a)
    device, _ = _target(a, real=True)
    args, kwargs = build_call(a, a.device or device)
    t0 = time.perf_counter()
    report = warmup(a.op, *args, timeout=a.timeout, **kwargs)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if a.json:
        _json(report)
    else:
        rows = ([[w, "built"] for w in report["built"]] + [[w, "ready"] for w in report["ready"]]
                + [[w, f"failed: {e}"] for w, e in report["failed"].items()]
                + [[w, "still building"] for w in report["building"]])
        table(f"warmup {a.op} ({report['seconds']} s)", ["variant", "state"], rows,
              f"the call now runs {report['kernel']}")
    return 1 if report["failed"] or report["building"] else 0


def cmd_tune(a) -> int:
    print("layerzero: error: `layerzero tune` needs LayerZero's performance database, which is not "
          "implemented yet, so there is nothing to store timings in. `layerzero bench OP ...` times "
          "every eligible kernel of a call on this machine in the meantime.", file=sys.stderr)
    return 1


# ---- entry point ----------------------------------------------------------------------------

def _version() -> str:
    import torch

    from . import __version__
    return f"layerzero {__version__} (torch {torch.__version__})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerzero", description="LayerZero: which kernel runs each "
                                "PyTorch op call, and why.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="machine-readable JSON output")

    s = _command(sub, "doctor", parents=[out], help="device, versions and every backend's state")
    s.set_defaults(run=cmd_doctor)
    s = _command(sub, "kernels", parents=[out], help="registered kernels and whether they can run here")
    s.add_argument("--op", choices=OPS, help="only this op's kernels")
    s.set_defaults(run=cmd_kernels)

    common = argparse.ArgumentParser(add_help=False, parents=[out])
    common.add_argument("--dtype", choices=DTYPES, default="float32")
    common.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    common.add_argument("--grad", action="store_true", help="inputs require grad (training call)")
    common.add_argument("--policy", metavar="PATH", help="apply this policy file first")
    explain_opts = argparse.ArgumentParser(add_help=False, parents=[common])
    explain_opts.add_argument("--sm", type=int, help="describe a CUDA GPU of this compute "
                              "capability x10 (90 = H100) instead of the one here")
    s = _command(sub, "explain", help="which kernel would run a described call, and why not the others")
    _add_op_parsers(s, explain_opts)
    s.set_defaults(run=cmd_explain)
    bench_opts = argparse.ArgumentParser(add_help=False, parents=[common])
    bench_opts.add_argument("--repeat", type=int, default=20,
                            help="timed samples per kernel, each >= 2 ms of calls (default 20)")
    bench_opts.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    bench_opts.set_defaults(sm=None)
    s = _command(sub, "bench", help="time every eligible kernel of a described call, and lz's pick")
    _add_op_parsers(s, bench_opts)
    s.set_defaults(run=cmd_bench)
    warmup_opts = argparse.ArgumentParser(add_help=False, parents=[common])
    warmup_opts.add_argument("--timeout", type=float, help="seconds to wait for builds (default: no limit)")
    warmup_opts.set_defaults(sm=None)
    s = _command(sub, "warmup", help="build ahead what a described call's kernels need, and wait")
    _add_op_parsers(s, warmup_opts)
    s.set_defaults(run=cmd_warmup)
    s = _command(sub, "tune", help="measure kernels into the performance DB (not available yet)")
    s.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    s.set_defaults(run=cmd_tune)
    return p


def main(argv=None) -> int:
    """Run the command line; returns the exit status (2: bad arguments or a bad LAYERZERO_*
    environment variable, see docs/telemetry.md)."""
    from . import control

    p = parser()
    a, unknown = p.parse_known_args(_join_windows(sys.argv[1:] if argv is None else list(argv)))
    if unknown:
        getattr(a, "usage_of", p).error(f"unrecognized arguments: {' '.join(unknown)}")
    if control.environment_error and a.command != "doctor":
        print(f"layerzero: error: {control.environment_error}", file=sys.stderr)
        return 2
    try:
        return a.run(a)
    except (UsageError, ValueError, TypeError) as e:
        print(f"layerzero {a.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `layerzero ... | head`: the reader left; don't print a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
