"""Embed every segment of a volume with SegCLR: `python -m pipelines.embed --help`.

Configuration comes from `--config FILE.json` and flags (flags win); flags this command does
not know are Beam pipeline options (e.g. --runner=DataflowRunner --project=... --region=...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from segclr_beam.config import EmbedConfig, add_flags, field_help
from segclr_beam.job import root_cause
from segclr_beam.runner import DataflowGpu, check_beam_args, configure_logging

TEMPLATE_DESCRIPTION = (
    "SegCLR embeddings of every segment of an EM segmentation: skeleton sample points, masked "
    "129^3 cutouts, the SegCLR network on GPU workers, 10 / 25 um radius means, CSV-ZIP and "
    "TFRecord outputs as in the public h01 / MICrONS releases.")


def config_flags(args: argparse.Namespace) -> dict:
    """The EmbedConfig fields given by --config and flags (flags win)."""
    given = EmbedConfig.read_fields(args.config) if args.config else {}
    for field in dataclasses.fields(EmbedConfig):
        if getattr(args, field.name) is not None:
            given[field.name] = getattr(args, field.name)
    return given


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segclr-beam embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file with any of the fields below")
    add_flags(parser)
    parser.add_argument("--template-metadata", action="store_true",
                        help="print the Flex Template metadata of these options "
                             "(pipelines/embed_metadata.json) and exit")
    dataflow = parser.add_argument_group("Dataflow GPU workers")
    dataflow.add_argument("--gpu-type", help="accelerator, e.g. nvidia-l4 or nvidia-tesla-t4")
    dataflow.add_argument("--gpu-count", type=int, default=1, help="GPUs per worker (default 1)")
    dataflow.add_argument("--machine-type", default="g2-standard-8", help="worker machine type")
    dataflow.add_argument("--container-image", help="worker image built from docker/Dockerfile")
    return parser


def template_metadata() -> dict:
    """The Flex Template metadata: the required fields, --config, then the labelled fields."""
    fields = dataclasses.fields(EmbedConfig)
    required = [f for f in fields if f.metadata["required"]]
    optional = [f for f in fields if f.metadata["label"] and not f.metadata["required"]]
    config = {"name": "config", "label": "Config file",
              "helpText": "JSON file with any embed option; parameters given here win",
              "isOptional": True}
    return {
        "name": "segclr-beam embed",
        "description": TEMPLATE_DESCRIPTION,
        "streaming": False,
        "parameters": [{"name": f.name.replace("_", "-"), "label": f.metadata["label"],
                        "helpText": field_help(f), "isOptional": False} for f in required]
                      + [config]
                      + [{"name": f.name.replace("_", "-"), "label": f.metadata["label"],
                          "helpText": field_help(f), "isOptional": True} for f in optional],
    }


def gpu_from_args(args: argparse.Namespace) -> DataflowGpu | None:
    """The Dataflow GPU worker settings the flags ask for, if any."""
    if not args.gpu_type:
        return None
    return DataflowGpu(args.gpu_type, args.gpu_count, args.machine_type, args.container_image)


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    return EmbedConfig().updated(config_flags(args)).validate()


def parse(parser: argparse.ArgumentParser, argv: list[str] | None
          ) -> tuple[argparse.Namespace, list[str]]:
    """The command's options and the Beam flags; a flag neither knows is a usage error."""
    args, beam_args = parser.parse_known_args(argv)
    try:
        check_beam_args(beam_args, [o for a in parser._actions for o in a.option_strings])
    except ValueError as e:
        parser.error(str(e))
    return args, beam_args


def failed(command: str, error: BaseException) -> SystemExit:
    """The exit of a command whose job failed: the error naming the input, once."""
    logging.debug("%s failed", command, exc_info=error)
    return SystemExit(f"segclr-beam {command}: {root_cause(error)}")


def main(argv: list[str] | None = None) -> None:
    from segclr_beam import pipeline

    configure_logging()
    args, beam_args = parse(build_parser(), argv)
    if args.template_metadata:
        print(json.dumps(template_metadata(), indent=2))
        return
    gpu = gpu_from_args(args)
    try:
        summary = pipeline.run(config_from_args(args), beam_args, gpu)
    except Exception as e:  # a stage's error reaches here wrapped by Beam
        raise failed("embed", e) from None
    if summary.wall_seconds:
        print(summary.report())
        return
    print(f"submitted: {summary.result}")
    for name, path in summary.outputs.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
