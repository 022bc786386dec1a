"""Release-compatible embedding outputs: sharded CSV-ZIP, TFRecord and a self-describing info.json.

One output tree per variant (`raw/`, `agg10um/`, `agg25um/`), laid out as in
spec/formats.md so the readers of the public h01 and MICrONS releases work unchanged. Files
are sharded, staged and put in place as segclr_beam.shards does for every output: each tree's
info.json is written last, and a tree without it is incomplete. The same records give
byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import zipfile
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from segclr_beam import shards
from segclr_beam.records import EmbeddingTable, Point

FORMAT_VERSION = 1
INFO_NAME = "info.json"
FORMATS = ("csv_zip", "tfrecord")
MICRONS_OFFSET_NM = (110592.0, 110592.0, 592640.0)
# Fixed member metadata keeps ZIP bytes independent of the clock and the host.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_ZIP_UNIX = 3
_CSV_ROWS_PER_WRITE = 1024


@dataclasses.dataclass(frozen=True)
class CoordinateSystem:
    """How node positions are written to CSV: voxels, or nm as x * resolution + offset."""

    unit: str  # "voxel" or "nm"
    resolution_nm: tuple[float, float, float]
    offset_nm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        if self.unit not in ("voxel", "nm"):
            raise ValueError(f"coordinate unit must be 'voxel' or 'nm', got {self.unit!r}")
        for name in ("resolution_nm", "offset_nm"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or not np.isfinite(value).all():
                raise ValueError(f"{name} must be three finite numbers (x, y, z), got {value}")
            object.__setattr__(self, name, value)
        if min(self.resolution_nm) <= 0:
            raise ValueError(f"resolution_nm must be positive, got {self.resolution_nm}")
        if self.unit == "voxel" and any(self.offset_nm):
            raise ValueError("an offset applies only to nm coordinates, not to voxels")

    @classmethod
    def voxels(cls, resolution_nm: Sequence[float]) -> "CoordinateSystem":
        return cls("voxel", tuple(resolution_nm))

    @classmethod
    def nanometres(cls, resolution_nm: Sequence[float],
                   offset_nm: Sequence[float] = (0.0, 0.0, 0.0)) -> "CoordinateSystem":
        return cls("nm", tuple(resolution_nm), tuple(offset_nm))

    @classmethod
    def microns_public(cls, resolution_nm: Sequence[float]) -> "CoordinateSystem":
        """nm in the frame of the public MICrONS releases."""
        return cls("nm", tuple(resolution_nm), MICRONS_OFFSET_NM)

    def from_voxels(self, xyz: np.ndarray) -> np.ndarray:
        """[N, 3] voxel positions -> written coordinates (int64 voxels or float64 nm)."""
        xyz = np.asarray(xyz, np.int64)
        if self.unit == "voxel":
            return xyz
        return xyz * np.asarray(self.resolution_nm) + np.asarray(self.offset_nm)

    def to_voxels(self, coords: np.ndarray) -> np.ndarray:
        """Written coordinates -> int64 [N, 3] voxel positions."""
        coords = np.asarray(coords, np.float64)
        if self.unit == "nm":
            coords = (coords - np.asarray(self.offset_nm)) / np.asarray(self.resolution_nm)
        return np.rint(coords).astype(np.int64)

    def to_json(self) -> dict:
        return {"unit": self.unit, "resolution_nm": list(self.resolution_nm),
                "offset_nm": list(self.offset_nm)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "CoordinateSystem":
        return cls(value["unit"], tuple(value["resolution_nm"]), tuple(value["offset_nm"]))


def _decimal(value: float) -> str:
    """A coordinate in decimal: integral values without a fraction, others in shortest repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def csv_rows(segment: EmbeddingTable, coordinates: CoordinateSystem) -> Iterator[str]:
    """`node_id,x,y,z,e0,...` lines of one segment's sorted table, in blocks of rows.

    Embedding values use numpy's shortest float32 repr, which parses back (as float64, then
    rounded to float32) to exactly the value computed.
    """
    coords = coordinates.from_voxels(segment.xyz).tolist()
    if coordinates.unit == "nm":
        coords = [[_decimal(v) for v in row] for row in coords]
    nodes = segment.node_ids.tolist()
    with np.printoptions(legacy=False):
        for a in range(0, len(nodes), _CSV_ROWS_PER_WRITE):
            b = a + _CSV_ROWS_PER_WRITE
            yield "".join(f"{node},{x},{y},{z},{','.join(map(str, row))}\n"
                          for node, (x, y, z), row in zip(nodes[a:b], coords[a:b],
                                                          segment.embeddings[a:b]))


def write_csv_zip(path: str, table: EmbeddingTable, coordinates: CoordinateSystem) -> None:
    """One shard's ZIP at `path`: a `{segment_id}.csv` member per segment of a sorted table.

    The archive is built in a local temporary file (seekable, so each member's local header
    holds its sizes and CRC instead of a trailing data descriptor, whatever the destination)
    and then copied to `path` through FileSystems. Members are deflated at zlib's default
    level, 6.
    """
    with tempfile.TemporaryFile() as local:
        with zipfile.ZipFile(local, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for segment in table.segments():
                member = zipfile.ZipInfo(f"{segment.segment_ids[0]}.csv", date_time=_ZIP_DATE)
                member.compress_type = zipfile.ZIP_DEFLATED
                member.create_system = _ZIP_UNIX
                member.external_attr = 0o644 << 16
                # Shortest float32 reprs take at most 15 characters plus a comma.
                bound = len(segment) * (100 + 16 * segment.dim)
                with archive.open(member, "w",
                                  force_zip64=bound > zipfile.ZIP64_LIMIT) as out:
                    for text in csv_rows(segment, coordinates):
                        out.write(text.encode("ascii"))
        local.seek(0)
        with FileSystems.create(path, mime_type="application/zip",
                                compression_type=CompressionTypes.UNCOMPRESSED) as out:
            shutil.copyfileobj(local, out, 1 << 24)


def tfrecord_name(prefix: str, shard: int | str, num_shards: int, gzip: bool) -> str:
    """`{prefix}-SSSSS-of-NNNNN.tfrecord[.gz]`; a str shard (e.g. "SSSSS") names the pattern."""
    shard = shard if isinstance(shard, str) else f"{shard:05d}"
    return f"{prefix}-{shard}-of-{num_shards:05d}.tfrecord" + (".gz" if gzip else "")


def write_tfrecord(path: str, table: EmbeddingTable, radius_nm: float | None,
                   gzip: bool) -> None:
    """tf.train.Example records, one per node of a sorted table, with the SegCLR feature names."""
    from tensorflow.core.example import example_pb2  # The writer's only use of TensorFlow.

    compression = CompressionTypes.GZIP if gzip else CompressionTypes.UNCOMPRESSED
    # Example has no unsigned integers: ids at or above 2**63 keep their 64 bits as int64.
    segments = table.segment_ids.astype(np.uint64).view(np.int64).tolist()
    nodes = table.node_ids.tolist()
    centers = table.xyz.tolist()
    with FileSystems.create(path, compression_type=compression) as out:
        for k, embedding in enumerate(table.embeddings):
            example = example_pb2.Example()
            feature = example.features.feature
            feature["skeleton_id"].int64_list.value.append(segments[k])
            feature["node_id"].int64_list.value.append(nodes[k])
            feature["center"].int64_list.value.extend(centers[k])
            feature["embeddings"].float_list.value.extend(embedding.tolist())
            if radius_nm is not None:
                feature["aggregation_radius_nm"].float_list.value.append(radius_nm)
            out.write(shards.tfrecord(example.SerializeToString(deterministic=True)))


class NothingToWriteError(ValueError):
    """A run would write output trees without any embedding."""


class _Written(NamedTuple):
    """What one shard writer put in the staging directory."""

    variant: str
    fmt: str
    name: str
    segments: int
    nodes: int


class _Options(NamedTuple):
    formats: tuple[str, ...]
    num_shards: int
    bytewidth: int
    tfrecord_shards: int
    tfrecord_prefix: str
    tfrecord_gzip: bool
    coordinates: CoordinateSystem
    embedding_dim: int


class WriteEmbeddings(beam.PTransform):
    """{variant name: PCollection[(Point, embedding)]} -> one output tree per variant.

    Returns a PCollection of the written info.json paths. Options are checked here, before
    any work. Records are checked before they are shuffled (finite, `embedding_dim` values,
    ids that fit `bytewidth`), shards while they are written (repeated node ids or
    positions); either fails the pipeline before anything is moved into place.
    """

    def __init__(self, output_root: str, variants: Mapping[str, float | None], *,
                 coordinates: CoordinateSystem, num_shards: int, bytewidth: int,
                 embedding_dim: int, formats: Sequence[str] = FORMATS,
                 tfrecord_shards: int = 64, tfrecord_prefix: str = "embeddings",
                 tfrecord_gzip: bool = False, volumes: Any = None, model: Any = None):
        super().__init__()
        if not isinstance(output_root, str) or not output_root:
            raise ValueError(f"output_root must be a non-empty path, got {output_root!r}")
        if not variants:
            raise ValueError("variants must name at least one output tree")
        for name, radius in variants.items():
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"variant name {name!r} is not a plain directory name")
            if radius is not None and not (np.isfinite(radius) and radius > 0):
                raise ValueError(f"variant {name!r}: aggregation radius must be positive, "
                                 f"got {radius}")
        formats = tuple(formats)
        if not formats or len(set(formats)) != len(formats) or not set(formats) <= set(FORMATS):
            raise ValueError(f"formats must be distinct names among {FORMATS}, got {formats}")
        shards.check_sharding(num_shards, bytewidth)
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) \
                or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be an integer >= 1, got {embedding_dim!r}")
        if not isinstance(tfrecord_shards, int) or not 1 <= tfrecord_shards <= 99999:
            raise ValueError(f"tfrecord_shards must be an integer in [1, 99999], "
                             f"got {tfrecord_shards!r}")
        if not tfrecord_prefix or "/" in tfrecord_prefix:
            raise ValueError(f"tfrecord_prefix {tfrecord_prefix!r} is not a plain file prefix")
        if not isinstance(coordinates, CoordinateSystem):
            raise ValueError(f"coordinates must be a CoordinateSystem, got {coordinates!r}")
        try:
            json.dumps({"volumes": volumes, "model": model}, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"volumes and model must be JSON-serialisable: {e}") from None
        self._variants = {name: None if r is None else float(r) for name, r in variants.items()}
        options = _Options(formats, int(num_shards), int(bytewidth), tfrecord_shards,
                           tfrecord_prefix, bool(tfrecord_gzip), coordinates, embedding_dim)
        staging = shards.Staging.below(output_root)
        self._trees = _Trees(staging, self._variants, options, {"volumes": volumes,
                                                                "model": model})

    def expand(self, inputs: Mapping[str, beam.PCollection]):
        if not isinstance(inputs, Mapping) or set(inputs) != set(self._variants):
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f"WriteEmbeddings expects a dict of PCollections with keys "
                             f"{sorted(self._variants)}, got {got}")
        tagged = [inputs[name] | f"Tag[{name}]" >> beam.Map(lambda record, n: (n, record), name)
                  for name in sorted(self._variants)]
        trees = self._trees
        return (tagged
                | "Flatten" >> beam.Flatten()
                | "Shards" >> shards.WriteShards(trees.keys, _WriteShard(trees), trees.finalize)
                | "InfoFiles" >> beam.FlatMap(lambda paths: paths))


@dataclasses.dataclass(frozen=True)
class _Trees:
    """The output trees of one WriteEmbeddings: shard keys, file names and info.json."""

    staging: shards.Staging
    variants: Mapping[str, float | None]
    options: _Options
    provenance: Mapping[str, Any]

    def keys(self, tagged: tuple[str, tuple[Point, np.ndarray]]) -> Iterator[tuple]:
        """Check a record and key it by (variant, format, shard) for each output format."""
        variant, (point, embedding) = tagged
        o = self.options
        if np.shape(embedding) != (o.embedding_dim,):
            raise ValueError(f"{variant}: embedding of segment {point.segment_id} node "
                             f"{point.node_id} has shape {np.shape(embedding)}, expected "
                             f"({o.embedding_dim},)")
        if not np.isfinite(embedding).all():
            raise ValueError(f"{variant}: embedding of segment {point.segment_id} node "
                             f"{point.node_id} has NaN or infinite values")
        if point.node_id < 0:
            raise ValueError(f"{variant}: segment {point.segment_id} has a negative node "
                             f"id {point.node_id}")
        digest = shards.segment_hash(point.segment_id, o.bytewidth)
        for fmt in o.formats:
            count = o.num_shards if fmt == "csv_zip" else o.tfrecord_shards
            yield variant, fmt, digest % count

    def name(self, fmt: str, shard: int) -> str:
        o = self.options
        if fmt == "csv_zip":
            return f"{shard}.zip"
        return tfrecord_name(o.tfrecord_prefix, shard, o.tfrecord_shards, o.tfrecord_gzip)

    def write(self, variant: str, fmt: str, shard: int, table: EmbeddingTable) -> str:
        name = self.name(fmt, shard)
        path = self.staging.temp_path(variant, name)
        if fmt == "csv_zip":
            write_csv_zip(path, table, self.options.coordinates)
        else:
            write_tfrecord(path, table, self.variants[variant], self.options.tfrecord_gzip)
        return name

    def finalize(self, written: list[_Written]) -> list[str]:
        """Write the empty TFRecord shards, put every file in place, info.json last.

        Refuses (NothingToWriteError) to write trees without a single embedding."""
        if not written:
            raise NothingToWriteError(f"{self.staging.root}: no embeddings to write (every "
                                      "point was left out, or there were none)")
        o = self.options
        files, markers = {}, {}
        for variant, radius in sorted(self.variants.items()):
            mine = [w for w in written if w.variant == variant]
            names = {w.name for w in mine}
            if "tfrecord" in o.formats:
                for shard in range(o.tfrecord_shards):
                    name = self.name("tfrecord", shard)
                    if name not in names:  # A shard with no segment is an empty file.
                        self.write(variant, "tfrecord", shard, EmbeddingTable.from_records([]))
                        names.add(name)
            counted = [w for w in mine if w.fmt == o.formats[0]]
            info = self._info(variant, radius, sum(w.segments for w in counted),
                              sum(w.nodes for w in counted), sum(w.fmt == "csv_zip" for w in mine))
            files[variant] = sorted(names)
            markers[f"{variant}/{INFO_NAME}"] = (json.dumps(info, indent=2, sort_keys=True)
                                                 + "\n").encode()
        return self.staging.finalize(files, markers,
                                     stale=("*.zip", "*.tfrecord", "*.tfrecord.gz"))

    def _info(self, variant: str, radius: float | None, segments: int, nodes: int,
              zips: int) -> dict:
        o = self.options
        info = {
            "format": "segclr-beam embeddings",
            "format_version": FORMAT_VERSION,
            "variant": variant,
            "aggregation_radius_nm": radius,
            "embedding_dim": o.embedding_dim,
            "num_shards": o.num_shards,
            "bytewidth": o.bytewidth,
            "sharding": shards.SHARDING,
            "coordinates": o.coordinates.to_json(),
            "segments": segments,
            "nodes": nodes,
            **self.provenance,
        }
        if "csv_zip" in o.formats:
            info["csv_zip"] = {"files": "{shard}.zip", "count": zips,
                               "columns": "node_id,x,y,z,e0..e{D-1}"}
        if "tfrecord" in o.formats:
            info["tfrecord"] = {
                "files": tfrecord_name(o.tfrecord_prefix, "SSSSS", o.tfrecord_shards,
                                       o.tfrecord_gzip),
                "prefix": o.tfrecord_prefix, "num_shards": o.tfrecord_shards,
                "compression": "gzip" if o.tfrecord_gzip else "none",
                "skeleton_id": "uint64 segment id stored bit for bit as int64",
                "sharding": "shard of the segment with num_shards = tfrecord num_shards"}
        return info


class _WriteShard(beam.DoFn):
    """Write one shard file into the staging directory and report what it holds."""

    def __init__(self, trees: _Trees):
        self._trees = trees
        self._files = beam.metrics.Metrics.counter("segclr", "shard_files_written")
        self._segments = beam.metrics.Metrics.counter("segclr", "segments_written")
        self._nodes = beam.metrics.Metrics.counter("segclr", "nodes_written")

    def process(self, element):
        (variant, fmt, shard), tagged = element
        try:
            table = EmbeddingTable.from_records(record for _, record in tagged).sorted()
        except ValueError as e:
            raise ValueError(f"{variant}: {e}") from None
        segments = len(np.unique(table.segment_ids))
        name = self._trees.write(variant, fmt, shard, table)
        self._files.inc()
        if fmt == self._trees.options.formats[0]:
            self._segments.inc(segments)
            self._nodes.inc(len(table))
        yield _Written(variant, fmt, name, segments, len(table))
