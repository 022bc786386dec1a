"""Write the positive-pair table of a segmentation: `python -m pipelines.pairs --help`.

Configuration comes from `--config FILE.json` and flags (flags win); flags this command does
not know are Beam pipeline options (e.g. --runner=DataflowRunner --project=... --region=...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from segclr_beam.config import ConfigError, PairsConfig, add_flags
from segclr_beam.runner import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segclr-beam pairs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file with any of the fields below")
    add_flags(parser, config=PairsConfig)
    return parser


def config_from_args(args: argparse.Namespace) -> PairsConfig:
    """The PairsConfig of --config and flags (flags win), validated."""
    given = PairsConfig.read_fields(args.config) if args.config else {}
    for field in dataclasses.fields(PairsConfig):
        if getattr(args, field.name) is not None:
            given[field.name] = getattr(args, field.name)
    return PairsConfig().updated(given).validate()


def main(argv: list[str] | None = None) -> None:
    from segclr_beam import pairs_job

    configure_logging()
    args, beam_args = build_parser().parse_known_args(argv)
    try:
        summary = pairs_job.run(config_from_args(args), beam_args)
    except (ConfigError, ValueError) as e:
        sys.exit(f"segclr-beam pairs: {e}")
    if summary.info is None:
        print(f"submitted: {summary.result}")
        return
    shown = {k: summary.info[k] for k in ("segments", "pairs", "repeated_pairs", "files")}
    print(json.dumps({"output": summary.output, **shown, "counters": summary.counters,
                      "seconds": round(summary.wall_seconds, 1)}, indent=2, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
