"""Benchmark variants as processes of their own (LayerZero's patching and dynamo's caches stay
out of each other's way): `run_children` runs them, `child_result` reads what each printed."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile


def run_children(cmds: dict, parallel: bool = False):
    """Run each command (name -> argv list) as a process of its own; yields (name, returncode,
    stdout, stderr) in the order given. One after another (for timing), or all at once with
    `parallel` (CPU smoke runs: each child spends seconds importing torch and transformers; one
    intra-op thread each then). The repository root goes first on PYTHONPATH (layerzero)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if parallel:
        env["OMP_NUM_THREADS"] = "1"
    names = list(cmds)

    def start(name):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")   # files: no pipe stalls
        return subprocess.Popen(cmds[name], stdout=out, stderr=err, text=True, env=env), out, err

    def finish(name, started):
        proc, out, err = started
        rc = proc.wait()
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        return name, rc, texts[0], texts[1]

    if parallel:
        started = {n: start(n) for n in names}
        for n in names:
            yield finish(n, started[n])
    else:
        for n in names:
            yield finish(n, start(n))


def child_result(stdout: str) -> dict:
    """The JSON a child printed on its last line starting with "RESULT "."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError("the child printed no RESULT line")
    return json.loads(lines[-1][len("RESULT "):])


def describe_error(e: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def variant_results(cmds: dict, parallel: bool, result: dict, errors: list, width: int):
    """`run_children(cmds)`, yielding (name, the child's RESULT dict) for each child that
    succeeded; one that failed (exit status, no RESULT line) is recorded in result["variants"]
    and `errors`, printed (name padded to `width`) and skipped."""
    for name, rc, out, err in run_children(cmds, parallel=parallel):
        try:
            if rc:
                raise RuntimeError(f"exit status {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}")
            res = child_result(out)
        except Exception as e:  # noqa: BLE001 - a failed variant is reported, the others still run
            result["variants"][name] = {"status": "error", "error": describe_error(e), "stderr_tail": err[-3000:]}
            errors.append(name)
            print(f"  {name:<{width}} error: {describe_error(e)}\n{err[-3000:]}", flush=True)
            continue
        yield name, res


def compare_tokens(row: dict, base: str, ref, tokens) -> str | None:
    """Record in `row` how its greedy tokens (rows, new tokens) compare with `base`'s `ref`:
    same_tokens_as_<base>, first_differing_new_token (or None), differing_rows. Returns the
    mismatch's description, or None when they are the same."""
    import torch

    differ = torch.tensor(ref) != torch.tensor(tokens)
    cols = differ.nonzero()[:, 1]
    first = int(cols.min()) if len(cols) else None
    row["same_tokens_as_" + base] = first is None
    row["first_differing_new_token"] = first
    row["differing_rows"] = differ.any(1).nonzero()[:, 0].tolist()
    return None if first is None else f"from new token {first}, rows {row['differing_rows']}"


def finish(result: dict, json_path: str, errors: list, tiny: bool, mismatches: list, base: str) -> dict:
    """The end of a benchmark parent: write the JSON, fail on failed variants and (fp32 --tiny
    runs) on tokens that differ from `base`'s."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    if errors:
        raise SystemExit(f"variants failed: {', '.join(errors)}")
    if tiny and mismatches:
        raise AssertionError(f"fp32 greedy tokens differ from {base}'s: {'; '.join(mismatches)}")
    return result
