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
import io
import itertools
import zlib
from typing import TYPE_CHECKING, Collection, Iterable, Iterator, NamedTuple, Sequence

import apache_beam as beam
import fastavro
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
from apache_beam.io.filesystems import FileSystems

from segclr_beam import shards
from segclr_beam.precomputed import SkeletonSource, from_precomputed
from segclr_beam.records import Point, as_long, as_uint64

if TYPE_CHECKING:
    from osteoid import Skeleton


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
_AVRO_NAME = "segclr_beam.points"  # fixes the sync marker: reruns give equal bytes
_BYTEWIDTH = 8  # segment ids are uint64
_TABLE_COLUMNS = ("segment_id", "x", "y", "z")


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


# Tables and Avro files ---------------------------------------------------------------------

def encode_avro(points: Iterable[Point]) -> bytes:
    """Points as an Avro file, sorted, with deterministic bytes."""
    records = ({"segment_id": as_long(p.segment_id), "node_id": p.node_id,
                "x": p.x, "y": p.y, "z": p.z} for p in sorted(points))
    return shards.encode_avro(AVRO_SCHEMA, records, _AVRO_NAME)


def write_avro(stream: io.IOBase, points: Iterable[Point]) -> None:
    """Write points to an open binary stream as Avro, sorted, with deterministic bytes."""
    stream.write(encode_avro(points))


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
                columns = shards.avro_fields(f)
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


def _row(values: dict, where: str, has_node_id: bool, avro: bool = False) -> TableRow:
    segment_id = _integer(values["segment_id"], "segment_id", where)
    if avro and -(1 << 63) <= segment_id < 0:
        segment_id = as_uint64(segment_id)  # a uint64 stored in an Avro long
    if not 0 < segment_id < 1 << 64:
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
    Segment ids are unsigned 64-bit (in Avro, a long with the same bits).
    """
    return (row for _, row in located_rows(path))


def located_rows(path: str) -> Iterator[tuple[str, TableRow]]:
    """(where, row) of each row of a table; `where` is "path:line" or "path: record N"."""
    columns = _header(path)
    has_node_id = "node_id" in columns
    with FileSystems.open(path) as f:
        if _table_format(path) == "avro":
            records = shards.read_avro(f)
            index = 0
            try:
                for index, record in enumerate(records, start=1):
                    where = f"{path}: record {index}"
                    yield where, _row(record, where, has_node_id, avro=True)
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
                yield where, _row(dict(zip(columns, cells)), where, has_node_id)
        except (csv.Error, UnicodeDecodeError) as e:
            raise PointsError(f"{path}:{lines.line_num + 1}: unreadable: {e}") from None


def _identities(located: tuple[str, TableRow], has_node_id: bool) -> Iterator[tuple]:
    """What must be unique about a row, each keyed with where the row is: its segment and
    position, and its segment and node id (if the table has node ids)."""
    where, r = located
    yield ("position", r.segment_id, r.x, r.y, r.z), where
    if has_node_id:
        yield ("node", r.segment_id, r.node_id), where


def check_unique(identity: tuple, wheres: Iterable[str]) -> list:
    """Raise PointsError naming two rows that share `identity`; nothing otherwise."""
    wheres = sorted(wheres)
    if len(wheres) > 1:
        what = (f"node id {identity[2]}" if identity[0] == "node"
                else f"position {tuple(identity[2:])}")
        raise PointsError(f"{wheres[1]}: repeats segment {identity[1]} {what} of {wheres[0]}"
                          + (f" ({len(wheres)} rows in all)" if len(wheres) > 2 else ""))
    return []


def number_nodes(segment_id: int, rows: Iterable[TableRow]) -> list[Point]:
    """Points of one segment with node ids 0, 1, ... in (x, y, z) order."""
    xyz = sorted((r.x, r.y, r.z) for r in rows)
    return [Point(segment_id, node, *p) for node, p in enumerate(xyz)]


def read_points(pattern: str, segment_ids: Collection[int] | None = None) -> list[Point]:
    """All points of the tables matching `pattern`, sorted; the plain-Python `ReadPoints`."""
    tables = _match(pattern)
    has_node_id = _node_ids_given(tables)
    located = [(w, r) for t in tables for w, r in located_rows(t)
               if segment_ids is None or r.segment_id in segment_ids]
    seen: dict[tuple, list[str]] = {}
    for item in located:
        for identity, where in _identities(item, has_node_id):
            seen.setdefault(identity, []).append(where)
    for identity, wheres in seen.items():
        check_unique(identity, wheres)
    rows = [r for _, r in located]
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
        skeleton = from_precomputed(skeleton, self._resolution)
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
        located = (pbegin
                   | "Tables" >> beam.Create(self._tables)
                   | "SpreadTables" >> beam.Reshuffle()
                   | "ReadRows" >> beam.FlatMap(located_rows))
        if self._segment_ids is not None:
            located = located | "AllowedSegments" >> beam.Filter(
                lambda item, ids: item[1].segment_id in ids, self._segment_ids)
        repeated = (located
                    | "Identities" >> beam.FlatMap(_identities, self._has_node_id)
                    | "GroupIdentities" >> beam.GroupByKey()
                    | "Unique" >> beam.FlatMapTuple(check_unique))
        # Rows go on only once every row is known to be unique (a side input is complete
        # before the step that reads it starts).
        rows = located | "Rows" >> beam.Map(lambda item, _: item[1],
                                            beam.pvalue.AsList(repeated))
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


class _SegmentsSeen(beam.CombineFn):
    """Segment ids -> (the largest, those of an allow-list among them)."""

    def __init__(self, allowed: frozenset[int] | None):
        self._allowed = allowed or frozenset()

    def create_accumulator(self):
        return 0, frozenset()

    def add_input(self, accumulator, segment_id):
        largest, listed = accumulator
        if segment_id in self._allowed and segment_id not in listed:
            listed = listed | {segment_id}
        return max(largest, segment_id), listed

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        return (max(a[0] for a in accumulators),
                frozenset().union(*(a[1] for a in accumulators)))

    def extract_output(self, accumulator):
        return accumulator


def _verdict(points: int, seen: tuple, source: str, allowed: frozenset[int] | None,
             bytewidth: int) -> bool:
    """CheckPoints' judgement of all the points (their count, and `_SegmentsSeen`)."""
    largest, listed = seen
    if allowed is not None and len(listed) < len(allowed):
        missing = sorted(allowed - listed)
        raise PointsError(
            f"segments: {len(missing)} of the {len(allowed)} listed segment ids have no point "
            f"in {source}: {', '.join(map(str, missing[:10]))}"
            f"{', ...' if len(missing) > 10 else ''} (not there, or too small to sample)")
    if points == 0:
        raise PointsError(f"{source}: no points, so nothing to embed")
    try:
        shards.segment_hash(largest, bytewidth)
    except ValueError as e:
        raise PointsError(f"bytewidth: {e}") from None
    return True


class CheckPoints(beam.PTransform):
    """Points -> the same points, passed on only once all of them are known to make sense.

    Refuses (PointsError, failing the job before any cutout is made) no points at all, ids
    of the allow-list `segment_ids` that have no point, and segment ids that do not fit the
    output's shard hash `bytewidth`. `source` says where the points come from, for the
    messages.
    """

    def __init__(self, source: str, segment_ids: Collection[int] | None, bytewidth: int):
        super().__init__()
        self._source, self._bytewidth = source, bytewidth
        self._allowed = None if segment_ids is None else frozenset(map(int, segment_ids))

    def expand(self, points):
        count = points | "CountPoints" >> beam.combiners.Count.Globally()
        seen = (points
                | "SegmentIds" >> beam.Map(lambda p: p.segment_id)
                | "SegmentsSeen" >> beam.CombineGlobally(_SegmentsSeen(self._allowed)))
        verdict = count | "Verdict" >> beam.Map(_verdict, beam.pvalue.AsSingleton(seen),
                                                self._source, self._allowed, self._bytewidth)
        return points | "Checked" >> beam.Map(lambda p, _: p, beam.pvalue.AsSingleton(verdict))


def shard_paths(path: str, num_shards: int) -> list[str]:
    """The files `WritePoints(path, num_shards)` writes: `path` itself for one shard, else
    `{path without .avro}-SSSSS-of-NNNNN.avro`."""
    if num_shards == 1:
        return [path]
    stem = path.removesuffix(".avro")
    return [f"{stem}-{i:05d}-of-{num_shards:05d}.avro" for i in range(num_shards)]


@dataclasses.dataclass(frozen=True)
class _PointsFiles:
    """The shard files of a points file, staged below the directory that holds them."""

    names: tuple[str, ...]
    staging: shards.Staging

    def keys(self, point: Point) -> list[int]:
        return [shards.shard_of(point.segment_id, len(self.names), _BYTEWIDTH)]

    def write(self, shard: int, points: Iterable[Point]) -> int:
        points = list(points)
        shards.write_file(self.staging.temp_path("", self.names[shard]), encode_avro(points))
        # A shard holds whole segments, so these add up to the run's points and segments.
        beam.metrics.Metrics.counter("segclr", "points_written").inc(len(points))
        beam.metrics.Metrics.counter("segclr", "segments_with_points").inc(
            len({p.segment_id for p in points}))
        return shard

    def finalize(self, written: list[int]) -> list[str]:
        for shard in set(range(len(self.names))) - set(written):
            self.write(shard, [])  # a shard without points is still a valid, empty file
        self.staging.finalize({"": self.names})
        return [self.staging.final_path("", name) for name in self.names]


class WritePoints(beam.PTransform):
    """Write points as Avro to `path` (or `num_shards` files, see `shard_paths`).

    Points are sharded by segment (the output trees' rule) and sorted within a shard, so
    reruns give identical bytes. Shards are staged and moved into place when all are written
    (see segclr_beam.shards). The output is a PCollection with the list of files.
    """

    def __init__(self, path: str, num_shards: int = 1):
        super().__init__()
        if num_shards < 1:
            raise ValueError(f"num_shards: must be >= 1, got {num_shards}")
        directory = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
        names = tuple(p.rsplit("/", 1)[-1] for p in shard_paths(path.rstrip("/"), num_shards))
        self._files = _PointsFiles(names, shards.Staging.below(directory))

    def expand(self, points):
        files = self._files
        return points | "Shards" >> shards.WriteShards(files.keys, files.write, files.finalize)
