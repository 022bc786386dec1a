"""Sample points: the light records that flow from skeletons to cutouts to outputs.

Points come from skeletons (sampled every `spacing_nm` of path length: skeletons made by
segclr_beam.skeleton, or existing neuroglancer precomputed skeletons), from a table of
`segment_id,x,y,z` (CSV, or Avro with those fields), or from an earlier run's points file; an
allow-list of segment ids can restrict any source. A run's points are written as Avro with
deterministic bytes (sorted records, fixed sync marker), so reruns give identical files. Files
go through Beam's FileSystems (and TensorStore for sharded skeletons), so gs:// works too.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import struct
import uuid
import zlib
from typing import Any, Collection, Iterable, Iterator, NamedTuple, Sequence

import apache_beam as beam
import fastavro
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import tensorstore as ts
from apache_beam.io.filesystems import FileSystems
from osteoid import Skeleton

from segclr_beam.volume import kvstore_url


class Point(NamedTuple):
    """One skeleton sample point; x, y, z in voxels at the embedding resolution."""

    segment_id: int
    node_id: int
    x: int
    y: int
    z: int


class PointsError(ValueError):
    """A points source cannot be read; the message names the file (and line or record)."""


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


# Sampling along skeletons ---------------------------------------------------------------

def sample_nodes(vertices: np.ndarray, edges: np.ndarray, spacing_nm: float) -> np.ndarray:
    """Indices of the vertices sampled every `spacing_nm` of path length, in node-id order.

    Each connected piece is walked depth first from a canonical root: its first end (or its
    first vertex if it has no end) in (x, y, z) order, neighbours taken in (x, y, z) order.
    The root is sampled; then, along every path away from it, the first vertex at least
    `spacing_nm` of path length past the previous sample. Pieces come in order of their roots.
    """
    n = len(vertices)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(vertices.T[::-1])  # rank -> vertex index, sorted by x, then y, then z
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    position = vertices[order].astype(np.float64)
    a, b = rank[edges[:, 0]], rank[edges[:, 1]]
    a, b = a[a != b], b[a != b]
    graph = scipy.sparse.coo_matrix((np.ones(2 * len(a)), (np.r_[a, b], np.r_[b, a])),
                                    shape=(n, n)).tocsr()
    graph.sort_indices()
    _, piece = scipy.sparse.csgraph.connected_components(graph, directed=False)
    roots: dict[int, int] = {}
    for r in itertools.chain(np.flatnonzero(np.diff(graph.indptr) == 1), range(n)):
        roots.setdefault(piece[r], int(r))
    since = np.zeros(n)  # path length from the last sample above each vertex
    sampled = []
    for root in sorted(roots.values()):
        walk, parent = scipy.sparse.csgraph.depth_first_order(
            graph, root, directed=False, return_predecessors=True)
        sampled.append(root)
        walk = walk[1:]
        steps = np.linalg.norm(position[walk] - position[parent[walk]], axis=1)
        for v, p, step in zip(walk.tolist(), parent[walk].tolist(), steps.tolist()):
            d = since[p] + step
            if d >= spacing_nm:
                sampled.append(v)
                d = 0.0
            since[v] = d
    return order[np.asarray(sampled, dtype=np.int64)]


def skeleton_points(segment_id: int, skeleton: Skeleton, resolution: Sequence[float],
                    spacing_nm: float) -> list[Point]:
    """The sample points of one segment's skeleton (nm, voxel i at i * resolution)."""
    nodes = sample_nodes(skeleton.vertices, skeleton.edges, spacing_nm)
    voxels = np.floor(skeleton.vertices[nodes] / np.asarray(resolution) + 0.5).astype(np.int64)
    return [Point(int(segment_id), node, *map(int, xyz)) for node, xyz in enumerate(voxels)]


# Precomputed skeletons (https://github.com/google/neuroglancer/blob/master/src/datasource/
# precomputed/skeletons.md): one file per segment, or uint64-sharded files read through
# TensorStore's neuroglancer_uint64_sharded key-value store.
_RADIUS = {"id": "radius", "data_type": "float32", "num_components": 1}
_SEGMENT_FILE = re.compile(r"^(\d+)(\.gz)?$")


def to_precomputed(skeleton: Skeleton, resolution: Sequence[float]) -> bytes:
    """A skeleton (nm, voxel i at i * resolution) as a precomputed skeleton file: vertices
    at voxel centres, with the radius as a vertex attribute."""
    centres = skeleton.vertices + 0.5 * np.asarray(resolution, dtype=np.float32)
    out = Skeleton(centres.astype(np.float32), skeleton.edges, radii=skeleton.radius,
                   extra_attributes=[_RADIUS])
    return out.to_precomputed()


def skeletons_info() -> dict:
    """The info file of a directory of skeletons written by `to_precomputed`."""
    return {"@type": "neuroglancer_skeletons", "transform": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
            "vertex_attributes": [_RADIUS]}


@dataclasses.dataclass
class SkeletonSource:
    """A directory of neuroglancer precomputed skeletons, unsharded or uint64-sharded.

    Pickles as its path and info, so Beam workers reopen it lazily.
    """

    path: str
    info: dict
    _shards: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __getstate__(self):
        return {**self.__dict__, "_shards": None}

    @classmethod
    def open(cls, path: str) -> "SkeletonSource":
        path = path.rstrip("/")
        info_path = FileSystems.join(path, "info")
        try:
            with FileSystems.open(info_path) as f:
                info = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise PointsError(f"{path}: not a precomputed skeleton directory "
                              f"({info_path}: {e})") from None
        if info.get("@type") != "neuroglancer_skeletons":
            raise PointsError(f"{info_path}: @type is {info.get('@type')!r}, "
                              "expected 'neuroglancer_skeletons'")
        sharding = info.get("sharding")
        if sharding is not None and sharding.get("@type") != "neuroglancer_uint64_sharded_v1":
            raise PointsError(f"{info_path}: unknown sharding {sharding.get('@type')!r}")
        return cls(path, info)

    @property
    def sharded(self) -> bool:
        return self.info.get("sharding") is not None

    @property
    def shards(self) -> ts.KvStore:
        if self._shards is None:
            self._shards = ts.KvStore.open({
                "driver": "neuroglancer_uint64_sharded", "base": kvstore_url(self.path),
                "metadata": self.info["sharding"]}).result()
        return self._shards

    def segment_ids(self) -> list[int]:
        """Every segment that has a skeleton here, sorted."""
        if self.sharded:
            return sorted(struct.unpack(">Q", key)[0] for key in self.shards.list().result())
        found = FileSystems.match([FileSystems.join(self.path, "*")])[0].metadata_list
        names = (_SEGMENT_FILE.match(m.path.rstrip("/").rsplit("/", 1)[-1]) for m in found)
        return sorted({int(name.group(1)) for name in names if name})

    def read(self, segment_id: int) -> Skeleton | None:
        """A segment's skeleton in nm (the info transform applied), or None if it has none."""
        data = self._read_bytes(segment_id)
        if data is None:
            return None
        attributes = self.info.get("vertex_attributes", [])
        self._check_size(segment_id, data, attributes)
        skeleton = Skeleton.from_precomputed(data, segid=segment_id, vertex_attributes=attributes)
        transform = np.asarray(self.info.get("transform", np.eye(3, 4).ravel()),
                               dtype=np.float64).reshape(3, 4)
        skeleton.vertices = skeleton.vertices @ transform[:, :3].T + transform[:, 3]
        return skeleton

    def _read_bytes(self, segment_id: int) -> bytes | None:
        if self.sharded:
            found = self.shards.read(struct.pack(">Q", segment_id)).result()
            return bytes(found.value) if found.state == "value" else None
        for name in (str(segment_id), f"{segment_id}.gz"):
            path = FileSystems.join(self.path, name)
            if FileSystems.exists(path):
                with FileSystems.open(path) as f:
                    return f.read()
        return None

    def _check_size(self, segment_id: int, data: bytes, attributes: list[dict]) -> None:
        """Fail clearly on a truncated file (the decoder would fail obscurely)."""
        if len(data) >= 8:
            vertices, edges = struct.unpack_from("<II", data)
            size = 8 + 12 * vertices + 8 * edges
            extra = sum(vertices * int(a["num_components"]) * np.dtype(a["data_type"]).itemsize
                        for a in attributes)
            if len(data) in (size, size + extra):
                return
            expected = f"{size} or {size + extra}"
        else:
            expected = "at least 8"
        raise PointsError(f"{self.path}: skeleton of segment {segment_id} has {len(data)} "
                          f"bytes, expected {expected}")


# Tables and Avro files ---------------------------------------------------------------------

def as_long(segment_id: int) -> int:
    """A uint64 segment id as the Avro long (int64) with the same bits."""
    return segment_id - _UINT64 if segment_id >= 1 << 63 else segment_id


def as_uint64(value: int) -> int:
    """The uint64 segment id stored in an Avro long."""
    return value + _UINT64 if value < 0 else value


def write_avro(stream: io.IOBase, points: Iterable[Point]) -> None:
    """Write points to an open binary stream as Avro, sorted, with deterministic bytes."""
    records = ({"segment_id": as_long(p.segment_id), "node_id": p.node_id,
                "x": p.x, "y": p.y, "z": p.z} for p in sorted(points))
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
                line = io.TextIOWrapper(f, encoding="utf-8-sig", newline="").readline()
                columns = next(csv.reader([line]), [])
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as e:
        raise PointsError(f"{path}: cannot read the header: {e}") from None
    columns = [c.strip() for c in columns]
    missing = [c for c in _TABLE_COLUMNS if c not in columns]
    if missing:
        raise PointsError(f"{path}:1: missing column(s) {', '.join(missing)}; found "
                          f"{', '.join(columns) or 'none'} (need segment_id,x,y,z, optional node_id)")
    return columns


def _integer(cell, what: str, where: str, whole_float: bool = False) -> int:
    """An integer cell (text or Avro value); for coordinates also a whole float."""
    if isinstance(cell, int) and not isinstance(cell, bool):
        return cell
    value = cell
    if isinstance(cell, str):
        try:
            return int(cell)
        except ValueError:
            pass
        try:
            value = float(cell)
        except ValueError:
            pass
    if whole_float and isinstance(value, float) and value.is_integer():
        return int(value)
    raise PointsError(f"{where}: {what} must be an integer, got {cell!r}")


def _row(values: dict, where: str, has_node_id: bool) -> TableRow:
    segment_id = _integer(values["segment_id"], "segment_id", where)
    if -(1 << 63) <= segment_id < 0:
        segment_id = as_uint64(segment_id)  # a uint64 stored in an Avro long
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
        lines = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
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

class _SkeletonPoints(beam.DoFn):
    """Segment id -> Points sampled along its precomputed skeleton."""

    def __init__(self, source: SkeletonSource, resolution: Sequence[float], spacing_nm: float):
        self._source, self._resolution, self._spacing_nm = source, tuple(resolution), spacing_nm
        self._segments = beam.metrics.Metrics.counter("segclr", "skeletons_read")
        self._missing = beam.metrics.Metrics.counter("segclr", "segments_without_skeleton")
        self._points = beam.metrics.Metrics.counter("segclr", "points_sampled")

    def process(self, segment_id: int):
        skeleton = self._source.read(segment_id)
        if skeleton is None or skeleton.empty():
            self._missing.inc()
            return
        # The files put voxel i's centre at (i + 0.5) * resolution.
        skeleton.vertices = skeleton.vertices - 0.5 * np.asarray(self._resolution)
        points = skeleton_points(segment_id, skeleton, self._resolution, self._spacing_nm)
        self._segments.inc()
        self._points.inc(len(points))
        yield from points


class ReadPoints(beam.PTransform):
    """Points from an existing source: precomputed skeletons, or points tables.

    `source` is either a directory of neuroglancer precomputed skeletons (its `info` says
    so), whose vertices (nm) are mapped to voxels at `resolution` and sampled every
    `spacing_nm` of path length; or a glob pattern of CSV / Avro tables, such as an earlier
    run's points. Tables without node ids get them per segment in (x, y, z) order, which takes
    a shuffle. `segment_ids` keeps only those segments. The source and table headers are
    checked when the transform is built, rows as they are read.
    """

    def __init__(self, source: str, segment_ids: Collection[int] | None = None,
                 resolution: Sequence[float] | None = None, spacing_nm: float = 1500.0):
        super().__init__()
        self._segment_ids = None if segment_ids is None else frozenset(map(int, segment_ids))
        self._skeletons = self._tables = None
        if FileSystems.exists(FileSystems.join(source.rstrip("/"), "info")):
            if resolution is None:
                raise PointsError(f"{source}: precomputed skeletons need the resolution (nm) "
                                  "to map their vertices to voxels")
            if not spacing_nm > 0:
                raise ValueError(f"spacing_nm: must be > 0, got {spacing_nm}")
            self._skeletons = SkeletonSource.open(source)
            self._resolution, self._spacing_nm = tuple(map(float, resolution)), float(spacing_nm)
        else:
            self._tables = _match(source)
            self._has_node_id = _node_ids_given(self._tables)

    def expand(self, pbegin):
        if self._skeletons is not None:
            return self._from_skeletons(pbegin)
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

    def _from_skeletons(self, pbegin):
        if self._segment_ids is None:
            ids = (pbegin
                   | "Directory" >> beam.Create([self._skeletons])
                   | "ListSegments" >> beam.FlatMap(SkeletonSource.segment_ids))
        else:
            ids = pbegin | "Segments" >> beam.Create(sorted(self._segment_ids))
        return (ids
                | "SpreadSegments" >> beam.Reshuffle()
                | "Sample" >> beam.ParDo(_SkeletonPoints(
                    self._skeletons, self._resolution, self._spacing_nm)))


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
