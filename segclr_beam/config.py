"""The configuration of an embedding run: one dataclass filled from a JSON file and flags.

Validation happens once, before any work, and every message names the offending field.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from segclr_beam.outputs import FORMATS
from segclr_beam.volume import DEFAULT_RESOLUTION

COORDINATES = ("voxels", "nm")


class ConfigError(ValueError):
    """A configuration field is missing or invalid; the message starts with its name."""


@dataclasses.dataclass
class EmbedConfig:
    """Everything an embedding run needs. Paths may be local or gs://."""

    em: Any = None                       # TensorStore spec (object, JSON text, file) or URL
    segmentation: Any = None
    model: str | None = None             # SavedModel directory or checkpoint prefix
    output: str | None = None            # output root; one tree per variant below it
    resolution: tuple[float, float, float] = DEFAULT_RESOLUTION
    bbox: tuple[int, int, int, int, int, int] | None = None  # x0,y0,z0,x1,y1,z1 voxels
    points: str | None = None            # points table (CSV/Avro) or precomputed skeletons
    segments: tuple[int, ...] | None = None  # allow-list of segment ids
    chunk_size: int = 512                # skeletonization chunk edge, voxels
    min_voxels: int = 1000               # segments smaller than this are not embedded
    spacing_nm: float = 1500.0           # path length between sample points
    block_size: int = 256                # cutout block edge, voxels
    cutout_size: int = 129
    batch_size: int = 32
    radii_nm: tuple[float, ...] = (10000.0, 25000.0)
    num_shards: int = 10000
    bytewidth: int = 64
    coordinates: str = "voxels"          # voxels at the embedding resolution, or nm
    offset_nm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added to nm coordinates
    formats: tuple[str, ...] = FORMATS
    write_skeletons: bool = False
    overwrite: bool = False

    @classmethod
    def from_json(cls, path: str) -> "EmbedConfig":
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(path) as f:
                data = json.loads(f.read())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"config file {path}: {e}") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "EmbedConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown field in {source} "
                              f"(known: {', '.join(sorted(names))})")
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
        for name in ("em", "segmentation", "model", "output"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")
        _check_len("resolution", self.resolution, 3)
        if any(float(v) <= 0 for v in self.resolution):
            raise ConfigError(f"resolution: every value must be > 0, got {self.resolution}")
        if self.bbox is not None:
            _check_len("bbox", self.bbox, 6)
            if any(a >= b for a, b in zip(self.bbox[:3], self.bbox[3:])):
                raise ConfigError(f"bbox: start must be below stop on every axis, got {self.bbox}")
        for name in ("chunk_size", "block_size", "batch_size", "num_shards", "bytewidth"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.min_voxels < 0:
            raise ConfigError(f"min_voxels: must be >= 0, got {self.min_voxels}")
        if self.spacing_nm <= 0:
            raise ConfigError(f"spacing_nm: must be > 0, got {self.spacing_nm}")
        if self.cutout_size < 1 or self.cutout_size % 2 == 0:
            raise ConfigError(f"cutout_size: must be a positive odd number, got {self.cutout_size}")
        if not self.radii_nm or any(float(r) <= 0 for r in self.radii_nm):
            raise ConfigError(f"radii_nm: every radius must be > 0, got {self.radii_nm}")
        if len(set(self.radii_nm)) != len(self.radii_nm):
            raise ConfigError(f"radii_nm: radii must be distinct, got {self.radii_nm}")
        if self.coordinates not in COORDINATES:
            raise ConfigError(f"coordinates: one of {COORDINATES}, got {self.coordinates!r}")
        _check_len("offset_nm", self.offset_nm, 3)
        if not self.formats or set(self.formats) - set(FORMATS):
            raise ConfigError(f"formats: a non-empty subset of {FORMATS}, got {self.formats}")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _check_len(name: str, value: Sequence, n: int) -> None:
    if len(value) != n:
        raise ConfigError(f"{name}: expected {n} values, got {len(value)}")
