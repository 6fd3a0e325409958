"""The ``hiso`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hiso", description="Zeroth-order and scalar-only federated fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, built kernels, available backends, direction spec")
    args = parser.parse_args(argv)
    if args.command == "info":
        from hiso_kernels.info import report

        print(report())
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
