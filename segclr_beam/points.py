"""Sample points: the light records that flow from skeletons to cutouts to outputs.

Besides skeletonization (segclr_beam.skeleton), points come from a table of
`segment_id,x,y,z` (CSV, or Avro with those fields) or from an earlier run's points file, and
an allow-list of segment ids can restrict any source. A run's points are written as Avro with
deterministic bytes (sorted records, fixed sync marker), so reruns give identical files. All
files go through Beam's FileSystems, so local paths and gs:// work alike.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import uuid
import zlib
from typing import Collection, Iterable, Iterator, NamedTuple

import apache_beam as beam
import fastavro
from apache_beam.io.filesystems import FileSystems


class Point(NamedTuple):
    """One skeleton sample point; x, y, z in voxels at the embedding resolution."""

    segment_id: int
    node_id: int
    x: int
    y: int
    z: int


class PointsError(ValueError):
    """A points table cannot be read; the message names the file and the line or record."""


AVRO_SCHEMA = fastavro.parse_schema({
    "type": "record",
    "name": "Point",
    "namespace": "segclr_beam",
    "doc": "A skeleton sample point; x, y, z in voxels at the embedding resolution. "
           "segment_id is a uint64 stored as the int64 with the same bits.",
    "fields": [{"name": name, "type": "long"} for name in Point._fields],
})
_SYNC_MARKER = hashlib.md5(b"segclr_beam.points").digest()  # fixed: reruns give equal bytes
_TABLE_COLUMNS = ("segment_id", "x", "y", "z")
_UINT64 = 1 << 64


class TableRow(NamedTuple):
    """A row of a points table; node_id is None when the table has no node ids."""

    segment_id: int
    node_id: int | None
    x: int
    y: int
    z: int


# Avro files -------------------------------------------------------------------------------

def write_avro(stream: io.IOBase, points: Iterable[Point]) -> None:
    """Write points to an open binary stream as Avro, sorted, with deterministic bytes."""
    records = ({"segment_id": p.segment_id - _UINT64 if p.segment_id >= 1 << 63 else p.segment_id,
                "node_id": p.node_id, "x": p.x, "y": p.y, "z": p.z} for p in sorted(points))
    fastavro.writer(stream, AVRO_SCHEMA, records, codec="deflate", sync_marker=_SYNC_MARKER)


def _table_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    for suffix in ("csv", "avro"):
        if name.endswith("." + suffix):
            return suffix
    raise PointsError(f"{path}: unknown points table format (expected .csv, .csv.gz or .avro)")


def _header(path: str) -> list[str]:
    """The column names of a table; checks that the required ones are there."""
    try:
        with FileSystems.open(path) as f:
            if _table_format(path) == "avro":
                columns = [field["name"] for field in fastavro.reader(f).writer_schema["fields"]]
            else:
                line = io.TextIOWrapper(f, encoding="utf-8", newline="").readline()
                columns = next(csv.reader([line]), [])
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as e:
        raise PointsError(f"{path}: cannot read the header: {e}") from None
    columns = [c.strip() for c in columns]
    missing = [c for c in _TABLE_COLUMNS if c not in columns]
    if missing:
        raise PointsError(f"{path}:1: missing column(s) {', '.join(missing)}; found "
                          f"{', '.join(columns) or 'none'} (need segment_id,x,y,z, optional node_id)")
    return columns


def _integer(text, what: str, where: str, whole_float: bool = False) -> int:
    """An integer cell; for coordinates also a float with no fractional part."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        return int(text)
    except (TypeError, ValueError):
        pass
    if whole_float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = None
        if value is not None and value.is_integer():
            return int(value)
    raise PointsError(f"{where}: {what} must be an integer, got {text!r}")


def _row(values: dict, where: str, has_node_id: bool) -> TableRow:
    segment_id = _integer(values["segment_id"], "segment_id", where)
    if -(1 << 63) <= segment_id < 0:
        segment_id += _UINT64  # a uint64 stored in an Avro long
    if not 0 < segment_id < _UINT64:
        raise PointsError(f"{where}: segment_id must be in 1 .. 2**64-1, got {segment_id}")
    node_id = None
    if has_node_id:
        node_id = _integer(values["node_id"], "node_id", where)
        if node_id < 0:
            raise PointsError(f"{where}: node_id must be >= 0, got {node_id}")
    xyz = [_integer(values[c], c, where, whole_float=True) for c in "xyz"]
    return TableRow(segment_id, node_id, *xyz)


def read_table(path: str) -> Iterator[TableRow]:
    """The rows of a CSV (with a header line) or Avro points table.

    Extra columns are ignored. Errors name the file and the line (CSV) or record (Avro).
    """
    columns = _header(path)
    has_node_id = "node_id" in columns
    with FileSystems.open(path) as f:
        if _table_format(path) == "avro":
            records = fastavro.reader(f)
            index = 0
            try:
                for index, record in enumerate(records, start=1):
                    yield _row(record, f"{path}: record {index}", has_node_id)
            except (ValueError, EOFError, zlib.error) as e:
                if isinstance(e, PointsError):
                    raise
                raise PointsError(f"{path}: record {index + 1} is unreadable: {e}") from None
            return
        lines = csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
        try:
            next(lines)  # the header, checked above
            for cells in lines:
                where = f"{path}:{lines.line_num}"
                if not cells or cells == [""]:
                    continue
                if len(cells) != len(columns):
                    raise PointsError(f"{where}: {len(cells)} fields, the header has {len(columns)}")
                yield _row(dict(zip(columns, cells)), where, has_node_id)
        except (csv.Error, UnicodeDecodeError) as e:
            raise PointsError(f"{path}:{lines.line_num + 1}: unreadable: {e}") from None


def number_nodes(segment_id: int, rows: Iterable[TableRow]) -> list[Point]:
    """Points of one segment with node ids 0, 1, ... in (x, y, z) order."""
    xyz = sorted((r.x, r.y, r.z) for r in rows)
    return [Point(segment_id, node, *p) for node, p in enumerate(xyz)]


def read_points(pattern: str, segment_ids: Collection[int] | None = None) -> list[Point]:
    """All points of the tables matching `pattern`, sorted; the plain-Python `ReadPoints`."""
    tables = _match(pattern)
    has_node_id = _node_ids_given(tables)
    rows = [r for t in tables for r in read_table(t)
            if segment_ids is None or r.segment_id in segment_ids]
    if has_node_id:
        return sorted(Point(*r) for r in rows)
    by_segment: dict[int, list[TableRow]] = {}
    for r in rows:
        by_segment.setdefault(r.segment_id, []).append(r)
    return sorted(p for s, found in by_segment.items() for p in number_nodes(s, found))


def _match(pattern: str) -> list[str]:
    try:
        found = FileSystems.match([pattern])[0].metadata_list
    except (OSError, ValueError) as e:  # Beam raises BeamIOError, an OSError
        raise PointsError(f"{pattern}: cannot list files: {e}") from None
    paths = sorted(m.path for m in found)
    if not paths:
        raise PointsError(f"{pattern}: no points table matches")
    return paths


def _node_ids_given(tables: list[str]) -> bool:
    """Whether the tables carry node ids; all of them or none must."""
    given = {t: "node_id" in _header(t) for t in tables}
    if len(set(given.values())) > 1:
        with_ids = [t for t, g in given.items() if g]
        without = [t for t, g in given.items() if not g]
        raise PointsError(f"{with_ids[0]} has a node_id column but {without[0]} has not")
    return given[tables[0]]


# Beam --------------------------------------------------------------------------------------

class ReadPoints(beam.PTransform):
    """Points from tables (CSV / Avro, e.g. an earlier run's points) matching a glob pattern.

    Tables without node ids get them per segment in (x, y, z) order, which takes a shuffle.
    Headers are checked when the transform is built, rows as they are read; `segment_ids`
    keeps only those segments.
    """

    def __init__(self, pattern: str, segment_ids: Collection[int] | None = None):
        super().__init__()
        self._tables = _match(pattern)
        self._has_node_id = _node_ids_given(self._tables)
        self._segment_ids = None if segment_ids is None else frozenset(map(int, segment_ids))

    def expand(self, pbegin):
        rows = (pbegin
                | "Tables" >> beam.Create(self._tables)
                | "SpreadTables" >> beam.Reshuffle()
                | "ReadRows" >> beam.FlatMap(read_table))
        if self._segment_ids is not None:
            rows = rows | "AllowedSegments" >> beam.Filter(
                lambda r, ids: r.segment_id in ids, self._segment_ids)
        if self._has_node_id:
            return rows | "ToPoints" >> beam.Map(lambda r: Point(*r))
        return (rows
                | "BySegment" >> beam.Map(lambda r: (r.segment_id, r))
                | "GroupBySegment" >> beam.GroupByKey()
                | "NumberNodes" >> beam.FlatMapTuple(number_nodes))


def shard_paths(path: str, num_shards: int) -> list[str]:
    """The files `WritePoints(path, num_shards)` writes: `path` itself for one shard, else
    `{path without .avro}-SSSSS-of-NNNNN.avro`."""
    if num_shards == 1:
        return [path]
    stem = path.removesuffix(".avro")
    return [f"{stem}-{i:05d}-of-{num_shards:05d}.avro" for i in range(num_shards)]


def _shard_of(segment_id: int, num_shards: int) -> int:
    return zlib.crc32(segment_id.to_bytes(8, "little")) % num_shards


@dataclasses.dataclass(frozen=True)
class _ShardWriter:
    """Writes each shard to a temporary file, then moves them all into place at once."""

    paths: tuple[str, ...]
    temp_dir: str

    def write(self, shard: int, points: Iterable[Point]) -> int:
        with FileSystems.create(FileSystems.join(self.temp_dir, str(shard))) as f:
            write_avro(f, points)
        return shard

    def finalize(self, written: list[int]) -> list[str]:
        for shard, path in enumerate(self.paths):
            if shard not in written:  # a shard without points is still a valid, empty file
                self.write(shard, [])
        FileSystems.rename([FileSystems.join(self.temp_dir, str(s)) for s in range(len(self.paths))],
                           list(self.paths))
        FileSystems.delete([self.temp_dir])
        return list(self.paths)


class WritePoints(beam.PTransform):
    """Write points as Avro to `path` (or `num_shards` files, see `shard_paths`).

    Points are sharded by segment and sorted within a shard, so reruns give identical bytes.
    Shards go to a temporary directory first and are moved into place when all are written.
    The output is a PCollection with the list of files.
    """

    def __init__(self, path: str, num_shards: int = 1):
        super().__init__()
        if num_shards < 1:
            raise ValueError(f"num_shards: must be >= 1, got {num_shards}")
        head, tail = os.path.split(path.rstrip("/")) if "://" not in path else path.rsplit("/", 1)
        temp_dir = FileSystems.join(head, f".{tail}.{uuid.uuid4().hex}.tmp")
        self._writer = _ShardWriter(tuple(shard_paths(path, num_shards)), temp_dir)
        self._num_shards = num_shards

    def expand(self, points):
        n = self._num_shards
        return (points
                | "KeyByShard" >> beam.Map(lambda p: (_shard_of(p.segment_id, n), p))
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShards" >> beam.MapTuple(self._writer.write)
                | "AllShards" >> beam.combiners.ToList()
                | "Finalize" >> beam.Map(self._writer.finalize))
