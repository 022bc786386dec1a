"""The configuration of a run: one dataclass per job (EmbedConfig, PairsConfig) filled from a
JSON file and flags.

Each field carries its help text and, for flags, how to parse it (dataclass field metadata),
so the commands' flags and the Flex Template parameters are generated from this one place.
Defaults of settings a stage has are the stage's own. Validation happens once, before any
work, and every message names the offending field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Callable, Collection, Sequence

from segclr_beam.aggregate import DEFAULT_RADII_NM, check_radii
from segclr_beam.cutouts import DEFAULT_BLOCK_SIZE, DEFAULT_CUTOUT_SIZE, check_cutout_size
from segclr_beam.outputs import FORMATS
from segclr_beam.pairs import PairOptions
from segclr_beam.shards import check_sharding, read_json
from segclr_beam.skeleton import SkeletonOptions
from segclr_beam.volume import DEFAULT_RESOLUTION

COORDINATES = ("voxels", "nm")
_SKELETON = SkeletonOptions()


class ConfigError(ValueError):
    """A configuration field is missing or invalid; the message starts with its name."""


def numbers(kind: type) -> Callable[[str], tuple]:
    """A flag parser of comma-separated numbers of `kind`."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def names(text: str) -> tuple[str, ...]:
    """A flag parser of comma-separated names."""
    return tuple(text.split(","))


def _field(default: Any, help: str, parse: Callable | None = str, *, required: bool = False,
           label: str | None = None) -> Any:
    """A field with its help text; `parse` reads a flag's text (None: an on/off flag);
    `label` puts it among the Flex Template's parameters."""
    return dataclasses.field(default=default, metadata={
        "help": help, "parse": parse, "required": required, "label": label})


@dataclasses.dataclass
class EmbedConfig:
    """Everything an embedding run needs. Paths may be local or gs://."""

    em: Any = _field(None, "EM volume: TensorStore spec (JSON text or file) or URL "
                     "(precomputed://, zarr://, zarr3://, n5://, or a path / gs:// URL)",
                     required=True, label="EM volume")
    segmentation: Any = _field(None, "segmentation volume, in the same forms as the EM volume",
                               required=True, label="Segmentation volume")
    model: str | None = _field(None, "SavedModel directory (segclr-beam export-model) or "
                               "checkpoint prefix", required=True, label="Model")
    output: str | None = _field(None, "output root (local or gs://); one tree per variant "
                                "below it", required=True, label="Output root")
    resolution: tuple[float, float, float] = _field(
        DEFAULT_RESOLUTION, "embedding resolution in nm, X,Y,Z; the matching scale is chosen",
        numbers(float), label="Resolution")
    bbox: tuple[int, int, int, int, int, int] | None = _field(
        None, "voxel box X0,Y0,Z0,X1,Y1,Z1 at the embedding resolution (default: the whole "
        "volume)", numbers(int), label="Bounding box")
    points: str | None = _field(None, "points table (.csv/.avro) or precomputed skeletons "
                                "instead of skeletonizing", label="Points")
    segments: tuple[int, ...] | None = _field(None, "only these segment ids, comma-separated",
                                              numbers(int))
    chunk_size: int = _field(_SKELETON.chunk_size[0], "skeletonization chunk edge in voxels",
                             int)
    min_voxels: int = _field(_SKELETON.min_voxels, "skip segments with fewer voxels", int)
    spacing_nm: float = _field(_SKELETON.spacing_nm, "path length between sample points in nm",
                               float)
    block_size: int = _field(DEFAULT_BLOCK_SIZE, "cutout block edge in voxels", int)
    cutout_size: int = _field(DEFAULT_CUTOUT_SIZE, "cutout edge in voxels, odd", int)
    batch_size: int = _field(32, "cutouts per model call", int, label="Batch size")
    radii_nm: tuple[float, ...] = _field(DEFAULT_RADII_NM, "aggregation radii in nm",
                                         numbers(float), label="Aggregation radii")
    num_shards: int = _field(10000, "CSV-ZIP shards; the h01 release has 10000, newer MICrONS "
                             "releases 50000", int, label="Shards")
    bytewidth: int = _field(64, "bytes of the segment id hashed for sharding; h01 uses 64, "
                            "newer MICrONS releases 8", int, label="Shard hash bytewidth")
    tfrecord_shards: int = _field(64, "TFRecord files per output tree", int,
                                  label="TFRecord shards")
    skip_absent: bool = _field(False, "leave out (and count) points whose segment does not "
                               "occur in their cutout window, instead of failing", None)
    max_absent_chunks: int = _field(0, "absent storage chunks of a volume inside the box that "
                                    "the run tolerates (they read as zeros); more fail it", int)
    coordinates: str = _field("voxels", "voxels, or nm (x * resolution + offset)")
    offset_nm: tuple[float, float, float] = _field(
        (0.0, 0.0, 0.0), "added to nm coordinates, X,Y,Z (MICrONS public frame: "
        "110592,110592,592640)", numbers(float))
    formats: tuple[str, ...] = _field(FORMATS, "output formats, comma-separated", names)
    write_skeletons: bool = _field(False, "also write precomputed skeletons for Neuroglancer",
                                   None)
    overwrite: bool = _field(False, "replace a previous run's output at the output root", None)

    @staticmethod
    def read_fields(path: str) -> dict:
        """The fields a JSON config file sets, names checked; errors name the file."""
        return _read_fields(path, EmbedConfig)

    @classmethod
    def from_json(cls, path: str) -> "EmbedConfig":
        return cls().updated(cls.read_fields(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "EmbedConfig":
        _check_names(data, source)
        return cls().updated(data)

    def updated(self, overrides: dict) -> "EmbedConfig":
        """A copy with the non-None values of `overrides` replacing fields, types normalised."""
        values = dataclasses.asdict(self)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("resolution", "bbox", "segments", "radii_nm", "offset_nm", "formats"):
            if values[name] is not None and not isinstance(values[name], (str, dict)):
                values[name] = tuple(values[name])
        return EmbedConfig(**values)

    def validate(self) -> "EmbedConfig":
        """Check every field that can be checked without touching storage."""
        for field in dataclasses.fields(self):
            if field.metadata["required"] and not getattr(self, field.name):
                raise ConfigError(f"{field.name}: required")
        _check_len("resolution", self.resolution, 3)
        if any(float(v) <= 0 for v in self.resolution):
            raise ConfigError(f"resolution: every value must be > 0, got {self.resolution}")
        if self.bbox is not None:
            _check_len("bbox", self.bbox, 6)
            if any(a >= b for a, b in zip(self.bbox[:3], self.bbox[3:])):
                raise ConfigError(f"bbox: start must be below stop on every axis, got {self.bbox}")
        for name in ("chunk_size", "block_size", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.tfrecord_shards <= 99999:
            raise ConfigError(f"tfrecord_shards: must be in 1 .. 99999, got {self.tfrecord_shards}")
        if self.max_absent_chunks < 0:
            raise ConfigError(f"max_absent_chunks: must be >= 0, got {self.max_absent_chunks}")
        if self.min_voxels < 0:
            raise ConfigError(f"min_voxels: must be >= 0, got {self.min_voxels}")
        if self.spacing_nm <= 0:
            raise ConfigError(f"spacing_nm: must be > 0, got {self.spacing_nm}")
        _checked("cutout_size", check_cutout_size, self.cutout_size)
        _checked("radii_nm", check_radii, self.radii_nm)
        _checked("num_shards", check_sharding, self.num_shards, self.bytewidth)
        if self.coordinates not in COORDINATES:
            raise ConfigError(f"coordinates: one of {COORDINATES}, got {self.coordinates!r}")
        _check_len("offset_nm", self.offset_nm, 3)
        if not self.formats or set(self.formats) - set(FORMATS):
            raise ConfigError(f"formats: a non-empty subset of {FORMATS}, got {self.formats}")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _read_fields(path: str, config: type) -> dict:
    """The fields of `config` a JSON config file sets, names checked; errors name the file."""
    try:
        data = read_json(path)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a JSON object of fields")
    _check_names(data, path, config)
    return data


def _same(name: str, **changes) -> Any:
    """EmbedConfig's field `name` (default, help, flag parsing) for another configuration;
    `changes` replace parts of its metadata (e.g. required=False)."""
    field = EmbedConfig.__dataclass_fields__[name]
    return dataclasses.field(default=field.default, metadata={**field.metadata, **changes})


_PAIRS = PairOptions()


@dataclasses.dataclass
class PairsConfig:
    """Everything a pair-table run needs (`segclr-beam pairs`). Paths may be local or gs://.

    Shared settings (volumes, box, skeletonization, sampling) are EmbedConfig's, so a table
    made with the same settings as an embedding run pairs that run's nodes.
    """

    segmentation: Any = _same("segmentation")
    em: Any = _same("em", required=False, label=None,
                    help="EM volume the table is for (optional): its name goes into the "
                         "records and every centre must lie inside it")
    output: str | None = _field(None, "output directory of the pair table (local or gs://)",
                                required=True, label="Output directory")
    points_from: str | None = _field(
        None, "an earlier embedding run's output root: pair the nodes of its points.avro on "
        "its skeletons/ (written with --write-skeletons) instead of skeletonizing",
        label="Earlier run")
    resolution: tuple[float, float, float] = _same("resolution")
    bbox: tuple[int, int, int, int, int, int] | None = _same("bbox")
    segments: tuple[int, ...] | None = _same("segments")
    chunk_size: int = _same("chunk_size")
    min_voxels: int = _same("min_voxels")
    spacing_nm: float = _same("spacing_nm")
    min_distance_nm: float = _field(_PAIRS.min_distance_nm, "shortest path length between "
                                    "the two nodes of a pair along the skeleton, nm", float,
                                    label="Shortest pair distance")
    max_distance_nm: float = _field(_PAIRS.max_distance_nm, "longest path length between the "
                                    "two nodes of a pair along the skeleton, nm", float,
                                    label="Longest pair distance")
    min_pairs: int = _field(_PAIRS.min_pairs, "pairs per segment that has any, at least: a "
                            "segment with fewer repeats its own", int)
    max_pairs: int = _field(_PAIRS.max_pairs, "pairs per segment, at most: more are sampled "
                            "down", int, label="Pairs per segment")
    seed: int = _field(_PAIRS.seed, "seed of the sampling; the same seed gives the same table",
                       int)
    num_shards: int = _field(64, "pair table files", int, label="Files")
    vol_name: str | None = _field(None, "EM volume name in the records (default: --em as "
                                  "given, or empty)")
    label_volume_name: str | None = _field(None, "segmentation name in the records (default: "
                                           "--segmentation as given)")
    write_skeletons: bool = _same("write_skeletons")
    overwrite: bool = _same("overwrite", help="replace a previous pair table in the output "
                            "directory")

    @staticmethod
    def read_fields(path: str) -> dict:
        """The fields a JSON config file sets, names checked; errors name the file."""
        return _read_fields(path, PairsConfig)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "PairsConfig":
        _check_names(data, source, cls)
        return cls().updated(data)

    def updated(self, overrides: dict) -> "PairsConfig":
        """A copy with the non-None values of `overrides` replacing fields, lists as tuples."""
        values = dataclasses.asdict(self)
        values.update({k: tuple(v) if isinstance(v, list) else v
                       for k, v in overrides.items() if v is not None})
        return PairsConfig(**values)

    def options(self) -> PairOptions:
        return PairOptions(self.min_distance_nm, self.max_distance_nm, self.min_pairs,
                           self.max_pairs, self.seed)

    def validate(self) -> "PairsConfig":
        """Check every field that can be checked without touching storage."""
        for field in dataclasses.fields(self):
            if field.metadata["required"] and not getattr(self, field.name):
                raise ConfigError(f"{field.name}: required")
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name in EmbedConfig.__dataclass_fields__}
        EmbedConfig(**{**shared, "em": "-", "model": "-"}).validate()
        _checked("min_distance_nm", self.options)
        if not 1 <= self.num_shards <= 99999:
            raise ConfigError(f"num_shards: must be in 1 .. 99999, got {self.num_shards}")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _check_names(data: dict, source: str, config: type = None) -> None:
    known = {f.name for f in dataclasses.fields(config or EmbedConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown field in {source} "
                          f"(known: {', '.join(sorted(known))})")


def _checked(name: str, check: Callable, *values) -> None:
    """Run a stage's own check of settings; its ValueError becomes a ConfigError that starts
    with the field's name (`name` unless the message names one)."""
    try:
        check(*values)
    except ValueError as e:
        message = str(e)
        known = {f.name for c in (EmbedConfig, PairsConfig) for f in dataclasses.fields(c)}
        if message.split(":")[0] not in known:
            message = f"{name}: {message}"
        raise ConfigError(message) from None


def _check_len(name: str, value: Sequence, n: int) -> None:
    if len(value) != n:
        raise ConfigError(f"{name}: expected {n} values, got {len(value)}")


# Flags ---------------------------------------------------------------------------------------

def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(_shown, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def field_help(field: dataclasses.Field) -> str:
    """A field's help text with its default, as the flags and the Flex Template show it."""
    text = field.metadata["help"]
    if field.default is not None and not isinstance(field.default, bool):
        text += f" (default {_shown(field.default)})"
    return text


def _flag_type(parse: Callable) -> Callable:
    """An argparse type from a field's parser: its ValueError becomes a usage error."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_flags(parser: argparse.ArgumentParser, names: Collection[str] | None = None,
              defaults: bool = False, config: type | None = None) -> None:
    """A flag per field of `config` (EmbedConfig by default), or per field in `names`, e.g.
    --chunk-size.

    Without `defaults` every flag defaults to None, so that only the flags a user gives
    override a JSON file (or a previous run) and the dataclass defaults.
    """
    for field in dataclasses.fields(config or EmbedConfig):
        if names is not None and field.name not in names:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default if defaults else None
        if field.metadata["parse"] is None:
            parser.add_argument(flag, dest=field.name, action="store_true", default=default,
                                help=field.metadata["help"])
        else:
            parser.add_argument(flag, dest=field.name, type=_flag_type(field.metadata["parse"]),
                                default=default, help=field_help(field))
