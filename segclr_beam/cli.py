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


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _export_model(args: argparse.Namespace) -> None:
    import json

    from segclr_beam import model

    sizes = {"widths": args.widths, "input_size": args.input_size,
             "bottleneck_width": args.bottleneck_width, "embedding_dim": args.embedding_dim}
    try:
        arch = model.Architecture(**{k: v for k, v in sizes.items() if v is not None})
        identity = model.export_saved_model(args.out, arch, checkpoint=args.checkpoint,
                                            seed=args.seed)
    except (OSError, ValueError) as e:
        raise SystemExit(f"segclr-beam export-model: {e}") from None
    print(json.dumps(identity, indent=2, sort_keys=True))


def _read(args: argparse.Namespace) -> None:
    from segclr_beam import reader

    try:
        tree = reader.EmbeddingReader(args.out, args.num_shards, args.bytewidth)
        print(reader.describe(tree, tree.read_segment(args.segment)))
    except (KeyError, ValueError) as e:
        raise SystemExit(f"segclr-beam read: {e.args[0]}") from None


def _reprocess(args: argparse.Namespace) -> None:
    from pipelines import reprocess

    reprocess.main(args.forwarded)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segclr-beam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("synth", help="write the synthetic EM + segmentation dataset")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--shape", type=_triple, default=None, help="X,Y,Z voxels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_synth)

    p = commands.add_parser(
        "export-model", help="write the SegCLR network as a SavedModel (uint8 cutouts in, "
        "embeddings out); sizes default to the published model")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint prefix (TF1 or tf2resaved layout); without it the weights "
                        "are random")
    p.add_argument("--out", required=True, help="new SavedModel directory (local or gs://)")
    p.add_argument("--widths", type=_widths, default=None, help="stage widths, e.g. 64,128,256,512")
    p.add_argument("--input-size", type=int, default=None, help="cutout edge in voxels")
    p.add_argument("--bottleneck-width", type=int, default=None)
    p.add_argument("--embedding-dim", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(run=_export_model)

    p = commands.add_parser("read", help="summarize one segment of an embedding output tree "
                            "(CSV-ZIP; a public release needs --num-shards and --bytewidth)")
    p.add_argument("out", help="output tree, e.g. OUT/agg10um (local or gs://)")
    p.add_argument("--segment", type=int, required=True, help="segment id")
    p.add_argument("--num-shards", type=int, default=None, help="for a tree without info.json")
    p.add_argument("--bytewidth", type=int, default=None, help="for a tree without info.json")
    p.set_defaults(run=_read)

    p = commands.add_parser("reprocess", add_help=False,
                            help="embed a new segmentation version into a new output tree, "
                                 "re-embedding only what changed since a previous run "
                                 "(`segclr-beam reprocess --help` for its options)")
    p.set_defaults(run=_reprocess, forwarded=[])
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, "forwarded"):  # a command with its own parser gets its arguments as given
        args.forwarded = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
