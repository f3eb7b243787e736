"""The `bnmem` command."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bnmem", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bnmem {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions and available kernel backends")
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        from bnmem_kernels import info

        print(f"bnmem {__version__}")
        info.main()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
