"""Release-compatible embedding outputs: sharded CSV-ZIP, TFRecord and a self-describing info.json.

One output tree per variant (`raw/`, `agg10um/`, `agg25um/`), laid out as in
spec/formats.md so the readers of the public h01 and MICrONS releases work unchanged. Each
shard file is written once, by one worker, to a temporary directory; a single finalize step
moves every file of every tree into place only after all shards were written, and writes
each tree's info.json last. A tree without info.json is incomplete. The same records give
byte-identical files.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import shutil
import tempfile
import uuid
import zipfile
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil

from segclr_beam.points import Point

FORMAT_VERSION = 1
INFO_NAME = "info.json"
FORMATS = ("csv_zip", "tfrecord")
MICRONS_OFFSET_NM = (110592.0, 110592.0, 592640.0)
# Fixed member metadata keeps ZIP bytes independent of the clock and the host.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_ZIP_UNIX = 3
_CSV_ROWS_PER_WRITE = 1024


def variant_name(radius_nm: float | None) -> str:
    """Output tree name: `raw` for unaggregated embeddings, else e.g. `agg10um`."""
    if radius_nm is None:
        return "raw"
    if radius_nm % 1000 == 0:
        return f"agg{int(radius_nm) // 1000}um"
    return f"agg{radius_nm:g}nm"


def output_variants(radii_nm: Sequence[float], raw: bool = True) -> dict[str, float | None]:
    """{tree name: aggregation radius or None}: the `variants` argument of WriteEmbeddings."""
    variants = {variant_name(None): None} if raw else {}
    variants.update({variant_name(float(r)): float(r) for r in radii_nm})
    return variants


def shard_of(segment_id: int, num_shards: int, bytewidth: int) -> int:
    """Shard of a segment: MD5 of the id as `bytewidth` little-endian bytes, read little-endian."""
    return _digest(segment_id, bytewidth) % num_shards


def _digest(segment_id: int, bytewidth: int) -> int:
    segment_id = int(segment_id)
    if segment_id < 0:
        raise ValueError(f"segment id {segment_id} is negative")
    try:
        key = segment_id.to_bytes(bytewidth, "little")
    except OverflowError:
        raise ValueError(f"segment id {segment_id} does not fit in bytewidth={bytewidth} bytes "
                         f"(it needs {(segment_id.bit_length() + 7) // 8})") from None
    return int.from_bytes(hashlib.md5(key).digest(), "little")


def check_sharding(num_shards: int, bytewidth: int) -> None:
    """Raise ValueError unless num_shards and bytewidth are positive integers."""
    for name, value in (("num_shards", num_shards), ("bytewidth", bytewidth)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


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


@dataclasses.dataclass(frozen=True)
class EmbeddingTable:
    """(Point, embedding) records as columns, for the per-segment and per-shard work."""

    segment_ids: np.ndarray  # uint64 [N]
    node_ids: np.ndarray  # int64 [N]
    xyz: np.ndarray  # int64 [N, 3], voxels
    embeddings: np.ndarray  # float32 [N, D]

    _BLOCK = 1 << 16

    @classmethod
    def from_records(cls, records: Iterable[tuple[Point, np.ndarray]]) -> "EmbeddingTable":
        """Stack records into fixed-size numpy blocks, never holding them as a Python list."""
        blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        dim = k = 0
        for point, embedding in records:
            if not blocks or k == cls._BLOCK:
                if not blocks:
                    dim = len(embedding)
                blocks.append((np.empty(cls._BLOCK, np.uint64), np.empty((cls._BLOCK, 4), np.int64),
                               np.empty((cls._BLOCK, dim), np.float32)))
                k = 0
            if np.shape(embedding) != (dim,):
                raise ValueError(f"embedding of segment {point.segment_id} node {point.node_id} "
                                 f"has shape {np.shape(embedding)}, expected ({dim},) like the "
                                 f"other nodes")
            segments, nodes, floats = blocks[-1]
            segments[k] = point.segment_id
            nodes[k] = point[1:]
            floats[k] = embedding
            k += 1
        if not blocks:
            return cls(np.empty(0, np.uint64), np.empty(0, np.int64), np.empty((0, 3), np.int64),
                       np.empty((0, 0), np.float32))
        last = len(blocks) - 1
        columns = [np.concatenate([block[c][:k] if b == last else block[c]
                                   for b, block in enumerate(blocks)]) for c in range(3)]
        return cls(columns[0], columns[1][:, 0].copy(), columns[1][:, 1:].copy(), columns[2])

    def __len__(self) -> int:
        return len(self.node_ids)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def points(self) -> Iterator[Point]:
        """The rows as Points, converted a block at a time."""
        for a in range(0, len(self), self._BLOCK):
            b = a + self._BLOCK
            for segment_id, node_id, (x, y, z) in zip(self.segment_ids[a:b].tolist(),
                                                      self.node_ids[a:b].tolist(),
                                                      self.xyz[a:b].tolist()):
                yield Point(segment_id, node_id, x, y, z)

    def take(self, index) -> "EmbeddingTable":
        return EmbeddingTable(self.segment_ids[index], self.node_ids[index], self.xyz[index],
                              self.embeddings[index])

    def sorted(self) -> "EmbeddingTable":
        """Rows ordered by (segment, node); raise if a segment repeats a node id or a position."""
        table = self.take(np.lexsort((self.node_ids, self.segment_ids)))
        same_segment = table.segment_ids[1:] == table.segment_ids[:-1]
        repeated = np.flatnonzero(same_segment & (table.node_ids[1:] == table.node_ids[:-1]))
        if len(repeated):
            k = repeated[0]
            raise ValueError(f"duplicate node id {table.node_ids[k]} in segment "
                             f"{table.segment_ids[k]}")
        by_position = np.lexsort((*table.xyz.T[::-1], table.segment_ids))
        segments, xyz = table.segment_ids[by_position], table.xyz[by_position]
        repeated = np.flatnonzero((segments[1:] == segments[:-1])
                                  & (xyz[1:] == xyz[:-1]).all(axis=1))
        if len(repeated):
            a, b = by_position[repeated[0]], by_position[repeated[0] + 1]
            raise ValueError(f"nodes {table.node_ids[a]} and {table.node_ids[b]} of segment "
                             f"{table.segment_ids[a]} share the position "
                             f"{tuple(table.xyz[a].tolist())}; CSV rows must be unique per x, y, z")
        return table

    def segments(self) -> Iterator["EmbeddingTable"]:
        """Consecutive runs of one segment each (call on a sorted table)."""
        bounds = np.flatnonzero(self.segment_ids[1:] != self.segment_ids[:-1]) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(self)]):
            yield self.take(slice(a, b))


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
            _TFRecordUtil.write_record(out, example.SerializeToString(deterministic=True))


class _Written(NamedTuple):
    """What one shard writer put in the temporary directory."""

    variant: str
    fmt: str
    name: str
    segments: int
    nodes: int


class WriteEmbeddings(beam.PTransform):
    """{variant name: PCollection[(Point, embedding)]} -> one output tree per variant.

    Returns a PCollection of the written info.json paths. Options are checked here, before
    any work; data errors (non-finite embeddings, repeated node ids or positions, ids that
    do not fit `bytewidth`) fail the pipeline before anything is moved into place.
    """

    def __init__(self, output_root: str, variants: Mapping[str, float | None], *,
                 coordinates: CoordinateSystem, num_shards: int = 50000, bytewidth: int = 8,
                 formats: Sequence[str] = FORMATS, tfrecord_shards: int = 64,
                 tfrecord_prefix: str = "embeddings", tfrecord_gzip: bool = False,
                 volumes: Any = None, model: Any = None):
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
        check_sharding(num_shards, bytewidth)
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
        self._root = output_root.rstrip("/")
        self._variants = {name: None if r is None else float(r) for name, r in variants.items()}
        self._options = _Options(formats, int(num_shards), int(bytewidth), tfrecord_shards,
                                 tfrecord_prefix, bool(tfrecord_gzip), coordinates)
        self._provenance = {"volumes": volumes, "model": model}

    def expand(self, inputs: Mapping[str, beam.PCollection]):
        if not isinstance(inputs, Mapping) or set(inputs) != set(self._variants):
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f"WriteEmbeddings expects a dict of PCollections with keys "
                             f"{sorted(self._variants)}, got {got}")
        temp_root = FileSystems.join(self._root, f".temp-{uuid.uuid4().hex}")
        keyed = [inputs[name] | f"KeyByShard[{name}]" >> beam.ParDo(
                     _KeyByShard(name, self._options))
                 for name in sorted(self._variants)]
        grouped = keyed | "Flatten" >> beam.Flatten() | "GroupByShard" >> beam.GroupByKey()
        # Every shard is checked before any is written (a side input is complete before its
        # consumer starts), so bad data fails the run with no file written at all.
        dims = (grouped
                | "CheckShards" >> beam.FlatMap(_check_shard, self._options.formats[0])
                | "DistinctDims" >> beam.Distinct()
                | "CollectDims" >> beam.combiners.ToList()
                | "DimsByVariant" >> beam.Map(_dims_by_variant))
        return (grouped
                | "WriteShards" >> beam.ParDo(_WriteShard(temp_root, self._variants, self._options),
                                              beam.pvalue.AsSingleton(dims))
                | "CollectShards" >> beam.combiners.ToList()
                | "Finalize" >> beam.ParDo(_Finalize(self._root, temp_root, self._variants,
                                                     self._options, self._provenance),
                                           beam.pvalue.AsSingleton(dims)))


class _Options(NamedTuple):
    formats: tuple[str, ...]
    num_shards: int
    bytewidth: int
    tfrecord_shards: int
    tfrecord_prefix: str
    tfrecord_gzip: bool
    coordinates: CoordinateSystem


class _KeyByShard(beam.DoFn):
    """Validate a record and key it by (variant, format, shard) for each output format."""

    def __init__(self, variant: str, options: _Options):
        self._variant = variant
        self._options = options

    def process(self, record: tuple[Point, np.ndarray]):
        point, embedding = record
        if not np.isfinite(embedding).all():
            raise ValueError(f"{self._variant}: embedding of segment {point.segment_id} node "
                             f"{point.node_id} has NaN or infinite values")
        if point.node_id < 0:
            raise ValueError(f"{self._variant}: segment {point.segment_id} has a negative node "
                             f"id {point.node_id}")
        digest = _digest(point.segment_id, self._options.bytewidth)
        for fmt in self._options.formats:
            if fmt == "csv_zip":
                yield (self._variant, fmt, digest % self._options.num_shards), record
            else:
                yield (self._variant, fmt, digest % self._options.tfrecord_shards), record


def _shard_table(variant: str, records: Iterable[tuple[Point, np.ndarray]]) -> EmbeddingTable:
    """One shard's records as a table sorted by (segment, node), checked for repeats."""
    try:
        return EmbeddingTable.from_records(records).sorted()
    except ValueError as e:
        raise ValueError(f"{variant}: {e}") from None


def _check_shard(element, fmt: str) -> Iterator[tuple[str, int]]:
    """(variant, embedding dim) of a shard of format `fmt` (each record is in one of those)."""
    (variant, shard_fmt, _), records = element
    if shard_fmt == fmt:
        yield variant, _shard_table(variant, records).dim


def _dims_by_variant(pairs: list[tuple[str, int]]) -> dict[str, int]:
    dims = collections.defaultdict(set)
    for variant, dim in pairs:
        dims[variant].add(dim)
    for variant, found in dims.items():
        if len(found) > 1:
            raise ValueError(f"{variant}: embeddings of different dimensions {sorted(found)}")
    return {variant: found.pop() for variant, found in dims.items()}


class _WriteShard(beam.DoFn):
    """Write one shard file into the temporary directory and report what it holds."""

    def __init__(self, temp_root: str, variants: Mapping[str, float | None], options: _Options):
        self._temp_root = temp_root
        self._variants = variants
        self._options = options
        self._files = beam.metrics.Metrics.counter("segclr", "shard_files_written")
        self._segments = beam.metrics.Metrics.counter("segclr", "segments_written")
        self._nodes = beam.metrics.Metrics.counter("segclr", "nodes_written")

    def process(self, element, dims: Mapping[str, int]):
        """`dims` is the checked embedding dimension per variant; waiting for it is the point."""
        (variant, fmt, shard), records = element
        table = _shard_table(variant, records)
        assert table.dim == dims[variant]
        segments = len(np.unique(table.segment_ids))
        o = self._options
        if fmt == "csv_zip":
            name = f"{shard}.zip"
            write_csv_zip(FileSystems.join(self._temp_root, variant, name), table, o.coordinates)
        else:
            name = tfrecord_name(o.tfrecord_prefix, shard, o.tfrecord_shards, o.tfrecord_gzip)
            write_tfrecord(FileSystems.join(self._temp_root, variant, name), table,
                           self._variants[variant], o.tfrecord_gzip)
        self._files.inc()
        if fmt == o.formats[0]:
            self._segments.inc(segments)
            self._nodes.inc(len(table))
        yield _Written(variant, fmt, name, segments, len(table))


class _Finalize(beam.DoFn):
    """Move every shard file into its tree, then write each tree's info.json last."""

    def __init__(self, root: str, temp_root: str, variants: Mapping[str, float | None],
                 options: _Options, provenance: Mapping[str, Any]):
        self._root = root
        self._temp_root = temp_root
        self._variants = variants
        self._options = options
        self._provenance = provenance

    def process(self, written: list[_Written], dims: Mapping[str, int]):
        o = self._options
        by_variant = collections.defaultdict(list)
        for w in written:
            by_variant[w.variant].append(w)
        files_by_variant = {}
        for variant, radius in sorted(self._variants.items()):
            files = by_variant[variant]
            names = {w.name for w in files}
            if "tfrecord" in o.formats:
                for shard in range(o.tfrecord_shards):
                    name = tfrecord_name(o.tfrecord_prefix, shard, o.tfrecord_shards,
                                         o.tfrecord_gzip)
                    if name not in names:  # A shard with no segment is an empty file.
                        write_tfrecord(FileSystems.join(self._temp_root, variant, name),
                                       EmbeddingTable.from_records([]), radius, o.tfrecord_gzip)
                        names.add(name)
            counted = [w for w in files if w.fmt == o.formats[0]]
            info = self._info(variant, radius, dims.get(variant),
                              sum(w.segments for w in counted), sum(w.nodes for w in counted),
                              sum(w.fmt == "csv_zip" for w in files))
            with FileSystems.create(FileSystems.join(self._temp_root, variant, INFO_NAME),
                                    mime_type="application/json",
                                    compression_type=CompressionTypes.UNCOMPRESSED) as out:
                out.write((json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
            files_by_variant[variant] = sorted(names)

        for variant in files_by_variant:  # Trees being replaced stop looking complete first.
            info = FileSystems.join(self._root, variant, INFO_NAME)
            if FileSystems.exists(info):
                FileSystems.delete([info])
        for variant, names in files_by_variant.items():
            tree = FileSystems.join(self._root, variant)
            if not FileSystems.exists(tree):
                FileSystems.mkdirs(tree)
            self._move(variant, names)
            self._delete_stale(variant, names)
        for variant in files_by_variant:
            self._move(variant, [INFO_NAME])
            yield FileSystems.join(self._root, variant, INFO_NAME)
        delete_tree(self._temp_root)

    def _move(self, variant: str, names: list[str]) -> None:
        """Rename files from the temporary directory into the variant's tree.

        Idempotent, so a retried finalize finishes the job: a file already moved is skipped.
        """
        temp = FileSystems.join(self._temp_root, variant)
        tree = FileSystems.join(self._root, variant)
        in_temp, in_tree = _list_names(temp, "*"), _list_names(tree, "*")
        missing = [n for n in names if n not in in_temp and n not in in_tree]
        if missing:
            raise RuntimeError(f"{variant}: files vanished before finalize: {missing[:5]}")
        pending = [n for n in names if n in in_temp]
        if pending:
            FileSystems.rename([FileSystems.join(temp, n) for n in pending],
                               [FileSystems.join(tree, n) for n in pending])

    def _delete_stale(self, variant: str, keep: list[str]) -> None:
        """Delete shard files that an earlier run with other settings left in the tree."""
        tree = FileSystems.join(self._root, variant)
        stale = _list_names(tree, "*.zip", "*.tfrecord", "*.tfrecord.gz") - set(keep)
        if stale:
            FileSystems.delete([FileSystems.join(tree, n) for n in sorted(stale)])

    def _info(self, variant: str, radius: float | None, dim: int | None, segments: int,
              nodes: int, zips: int) -> dict:
        o = self._options
        info = {
            "format": "segclr-beam embeddings",
            "format_version": FORMAT_VERSION,
            "variant": variant,
            "aggregation_radius_nm": radius,
            "embedding_dim": dim,
            "num_shards": o.num_shards,
            "bytewidth": o.bytewidth,
            "sharding": "md5 of the segment id as bytewidth little-endian bytes, digest read "
                        "as a little-endian integer, modulo num_shards",
            "coordinates": o.coordinates.to_json(),
            "segments": segments,
            "nodes": nodes,
            **self._provenance,
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


def _list_names(directory: str, *patterns: str) -> set[str]:
    """Names of the files directly in `directory` that match any of the glob patterns."""
    results = FileSystems.match([FileSystems.join(directory, p) for p in patterns])
    return {m.path.rstrip("/").rsplit("/", 1)[-1] for r in results for m in r.metadata_list}


def delete_tree(directory: str) -> None:
    """Delete a directory and everything below it, locally or on an object store."""
    if FileSystems.get_scheme(directory) in (None, "file"):
        if FileSystems.exists(directory):
            FileSystems.delete([directory])
    else:  # Object stores delete everything under a prefix given with a trailing slash.
        FileSystems.delete([directory + "/"])
