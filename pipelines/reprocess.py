"""Embed a new segmentation version, re-embedding only what changed.

    python -m pipelines.reprocess --help

Reads the manifest of the previous run (--previous), compares the voxel fingerprints of the new
segmentation (--segmentation) with it, and writes a complete new output tree at --output; the
previous run is never modified. Every setting defaults to the previous run's. Settings that
change embeddings (model, EM, box, skeleton and cutout settings) refuse unless --full; output
settings (radii, sharding, coordinates, formats, block and batch size) may change. Flags this
command does not know are Beam pipeline options, as for `python -m pipelines.embed`.
"""

from __future__ import annotations

import argparse
import sys

from apache_beam.io.filesystems import FileSystems

from pipelines import embed
from segclr_beam.config import ConfigError
from segclr_beam.runner import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = embed.build_parser()
    parser.prog = "segclr-beam reprocess"
    parser.description = __doc__
    group = parser.add_argument_group("reprocessing")
    group.add_argument("--previous", required=True,
                       help="output root of the previous run (local or gs://); only read")
    group.add_argument("--full", action="store_true",
                       help="embed every segment again (required when settings that change "
                            "embeddings differ from the previous run's)")
    group.add_argument("--changed-ids",
                       help="file with the changed and new segment ids of the new version, one "
                            "per line (e.g. CAVE get_delta_roots new roots); replaces the "
                            "fingerprint pass, every other previous segment is kept")
    group.add_argument("--removed-ids",
                       help="with --changed-ids: file with previous ids that no longer exist "
                            "(e.g. get_delta_roots old roots)")
    return parser


def _ids(path: str, flag: str) -> list[int]:
    try:
        with FileSystems.open(path) as f:
            return [int(word) for word in f.read().decode().split()]
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag}: cannot read segment ids from {path}: {e}") from None


def main(argv: list[str] | None = None) -> None:
    from segclr_beam import reprocess

    configure_logging()
    args, beam_args = embed.parse(build_parser(), argv)
    gpu = embed.gpu_from_args(args)
    try:
        overrides = embed.config_flags(args)
        for name in ("segmentation", "output"):
            if not overrides.get(name):
                raise ConfigError(f"{name}: required (--{name})")
        if args.removed_ids and not args.changed_ids:
            raise ConfigError("removed_ids: only with --changed-ids")
        changed = _ids(args.changed_ids, "--changed-ids") if args.changed_ids else None
        removed = _ids(args.removed_ids, "--removed-ids") if args.removed_ids else ()
        summary = reprocess.reprocess(args.previous, overrides, full=args.full,
                                      changed_ids=changed, removed_ids=removed,
                                      beam_args=beam_args, gpu=gpu)
    except Exception as e:  # a stage's error reaches here wrapped by Beam
        raise embed.failed("reprocess", e) from None
    if summary.full:
        print("embedding every segment again (--full)")
    if summary.changes:
        print(", ".join(f"{count} {name}" for name, count in summary.changes.items())
              + f"; {summary.segments_embedded} segments to re-embed")
    counters = summary.run.counters
    if summary.run.wall_seconds:
        print(f"nodes: {counters.get('nodes_carried', 0)} carried, "
              f"{counters.get('embeddings_reused', 0)} reused by cutout, "
              f"{counters.get('embeddings', 0)} embedded")
        print(summary.run.report())
        return
    print(f"submitted: {summary.run.result}")
    for name, path in summary.run.outputs.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
