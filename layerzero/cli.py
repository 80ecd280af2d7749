"""`python -m layerzero` / `layerzero`: doctor, kernels."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="layerzero", description="LayerZero kernel selection")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="device, versions and every backend's state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("kernels", help="registered kernels and whether they can run here")
    p.add_argument("--op", help="only this op's kernels")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    import layerzero as lz

    try:
        if args.command == "doctor":
            report = lz.doctor()
            print(json.dumps(report.as_dict(), indent=2, default=str) if args.json else report)
        elif args.command == "kernels":
            rows = lz.kernels(args.op)
            if args.json:
                print(json.dumps([r._asdict() for r in rows], indent=2))
            else:
                for r in rows:
                    print(f"{r.id:<24} {r.op:<11} {'available' if r.available else r.reason}")
    except ValueError as e:
        print(f"layerzero: error: {e}", file=sys.stderr)
        return 2
    return 0
