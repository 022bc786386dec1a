"""The `segclr-beam` command: thin argument parsing over the library's functions."""

from __future__ import annotations

import argparse
import sys


def _triple(text: str, kind=int) -> tuple:
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated values, got {text!r}")
    return tuple(kind(p) for p in parts)


def _synth(args: argparse.Namespace) -> None:
    from segclr_beam import synth

    dataset = synth.write_dataset(args.out, shape=args.shape, seed=args.seed)
    print(synth.summarize(dataset))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segclr-beam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("synth", help="write the synthetic EM + segmentation dataset")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--shape", type=_triple, default=None, help="X,Y,Z voxels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_synth)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
