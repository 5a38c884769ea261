#!/usr/bin/env python
"""Checkpoint conversions.

  tst-to-ntp   a TST phase-1 checkpoint (at the switch iteration) -> the start of next-token recovery
               (see megatron_tst/conversion.py; the two-phase launcher runs this for you)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_tst  # noqa: E402,F401  (first: CPU platform layer)
from megatron_tst.checkpointing import CheckpointError  # noqa: E402
from megatron_tst.conversion import tst_to_ntp  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("tst-to-ntp", help="phase-1 checkpoint -> recovery start")
    convert.add_argument("--input", required=True, help="the phase-1 job's --save directory")
    convert.add_argument("--output", required=True, help="the recovery job's --save directory")
    convert.add_argument("--reset-optimizer", action="store_true", help="recovery starts with fresh Adam state")
    convert.add_argument("--reinit-embeddings", action="store_true",
                         help="recovery re-initialises the input embedding and output head")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    try:
        written = tst_to_ntp(args.input, args.output, reset_optimizer=args.reset_optimizer,
                             reinit_embeddings=args.reinit_embeddings, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
