"""Embed every segment of a volume with SegCLR: `python -m pipelines.embed --help`.

Configuration comes from `--config FILE.json` and flags (flags win); flags this command does
not know are Beam pipeline options (e.g. --runner=DataflowRunner --project=... --region=...).
"""

from __future__ import annotations

import argparse
import sys

from segclr_beam.config import ConfigError, EmbedConfig
from segclr_beam.runner import DataflowGpu, configure_logging


def _numbers(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return parse


# (flag, type, help) for each EmbedConfig field; every default is None so that only the flags
# a user gives override the JSON file and the dataclass defaults.
_FIELDS = [
    ("em", str, "EM volume: TensorStore spec (JSON or file) or URL (precomputed://, zarr://, n5://, path)"),
    ("segmentation", str, "segmentation volume, same forms as --em"),
    ("model", str, "SavedModel directory (segclr-beam export-model) or checkpoint prefix"),
    ("output", str, "output root (local or gs://); one tree per variant below it"),
    ("resolution", _numbers(float), "embedding resolution in nm, X,Y,Z (default 32,32,33)"),
    ("bbox", _numbers(int), "voxel box X0,Y0,Z0,X1,Y1,Z1 (default: the whole volume)"),
    ("points", str, "points table (.csv/.avro) or precomputed skeletons instead of skeletonizing"),
    ("segments", _numbers(int), "only these segment ids, comma-separated"),
    ("chunk_size", int, "skeletonization chunk edge in voxels (default 512)"),
    ("min_voxels", int, "skip segments with fewer voxels (default 1000)"),
    ("spacing_nm", float, "path length between sample points in nm (default 1500)"),
    ("block_size", int, "cutout block edge in voxels (default 256)"),
    ("cutout_size", int, "cutout edge in voxels (default 129)"),
    ("batch_size", int, "cutouts per model call (default 32)"),
    ("radii_nm", _numbers(float), "aggregation radii in nm (default 10000,25000)"),
    ("num_shards", int, "CSV-ZIP / TFRecord shards (default 10000)"),
    ("bytewidth", int, "bytes of the segment id hashed for sharding (default 64)"),
    ("coordinates", str, "voxels or nm (default voxels)"),
    ("offset_nm", _numbers(float), "added to nm coordinates, X,Y,Z"),
    ("formats", lambda s: tuple(s.split(",")), "csv_zip,tfrecord (default both)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segclr-beam embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file with any of the fields below")
    for name, kind, text in _FIELDS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)
    parser.add_argument("--write-skeletons", dest="write_skeletons", action="store_true",
                        default=None, help="also write precomputed skeletons for Neuroglancer")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace a previous run's output at --output")
    dataflow = parser.add_argument_group("Dataflow GPU workers")
    dataflow.add_argument("--gpu-type", help="accelerator, e.g. nvidia-l4 or nvidia-tesla-t4")
    dataflow.add_argument("--gpu-count", type=int, default=1, help="GPUs per worker (default 1)")
    dataflow.add_argument("--machine-type", default="g2-standard-8", help="worker machine type")
    dataflow.add_argument("--container-image", help="worker image built from docker/Dockerfile")
    return parser


def gpu_from_args(args: argparse.Namespace) -> DataflowGpu | None:
    """The Dataflow GPU worker settings the flags ask for, if any."""
    if not args.gpu_type:
        return None
    return DataflowGpu(args.gpu_type, args.gpu_count, args.machine_type, args.container_image)


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    config = EmbedConfig.from_json(args.config) if args.config else EmbedConfig()
    fields = [name for name, _, _ in _FIELDS] + ["write_skeletons", "overwrite"]
    return config.updated({name: getattr(args, name) for name in fields}).validate()


def main(argv: list[str] | None = None) -> None:
    from segclr_beam import pipeline

    configure_logging()
    args, beam_args = build_parser().parse_known_args(argv)
    gpu = gpu_from_args(args)
    try:
        summary = pipeline.run(config_from_args(args), beam_args, gpu)
    except (ConfigError, ValueError) as e:
        sys.exit(f"segclr-beam embed: {e}")
    if not summary.counters:
        print(f"submitted: {summary.result}")
    for name, path in summary.outputs.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
