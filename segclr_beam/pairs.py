"""Positive pairs for contrastive training: two sample nodes of one segment's skeleton whose
path length along the skeleton lies in a range, written as a sharded pair table.

Nodes are a segment's sample points (segclr_beam.points), so the pairs' centres are the
nodes an embedding run embeds. Path lengths are shortest paths on the merged skeleton graph
(edge length = distance between its vertices, nm). Each segment gets at most `max_pairs`
pairs, drawn without replacement, so that huge glia or merged objects do not dominate a
table, and at least `min_pairs` (its pairs repeated) if it has any, so that small segments
still count. Draws depend only on (seed, segment id): reruns and any worker layout give the
same table, and the files' bytes are fixed (records sorted per shard, deterministic
serialisation, TFRecord framing of segclr_beam.shards).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, NamedTuple, Sequence

import apache_beam as beam
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.spatial

from segclr_beam import shards
from segclr_beam.records import PAIR_SCHEMA, PAIR_TABLE_PREFIX, Point, pair_example
from segclr_beam.volume import Box

FORMAT_VERSION = 1
INFO_NAME = "info.json"
_BYTEWIDTH = 8  # segment ids are uint64
# Nodes whose paths are searched together, and the most path lengths held at once (~128 MiB).
_BATCH_NODES = 256
_BATCH_VALUES = 1 << 24


@dataclasses.dataclass(frozen=True)
class PairOptions:
    """Which node pairs of a segment are positive pairs, and how many are kept.

    The defaults suit the published network's 129^3 windows at 32 x 32 x 33 nm (4.1 um
    across): 1 um apart along the path at least, so the two windows are two views of the
    cell and not one window augmented twice; 5 um at most, about one window further, so
    both views show neighbouring parts of one compartment and a pair rarely crosses from
    axon to soma or dendrite. With nodes every 1.5 um that is each node's next one to three
    nodes in every direction along the skeleton. At most 1000 pairs per segment (a neuron
    of a cubic millimetre has thousands of nodes, a small fragment a few) and at least 10.
    """

    min_distance_nm: float = 1000.0
    max_distance_nm: float = 5000.0
    min_pairs: int = 10
    max_pairs: int = 1000
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.min_distance_nm <= self.max_distance_nm < np.inf:
            raise ValueError(f"min_distance_nm: need 0 <= min_distance_nm <= max_distance_nm "
                             f"(finite), got {self.min_distance_nm} and {self.max_distance_nm}")
        if self.max_distance_nm <= 0:
            raise ValueError(f"max_distance_nm: must be > 0, got {self.max_distance_nm}")
        if not 0 <= self.min_pairs <= self.max_pairs or self.max_pairs < 1:
            raise ValueError(f"min_pairs: need 0 <= min_pairs <= max_pairs and max_pairs >= 1, "
                             f"got {self.min_pairs} and {self.max_pairs}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")


class Pair(NamedTuple):
    """One positive pair: nodes `node_0` < `node_1` of a segment, voxel centres, path length.
    `repeat` > 0 marks the copies that bring a small segment up to its minimum."""

    segment_id: int
    node_0: int
    node_1: int
    repeat: int
    center_0: tuple[int, int, int]
    center_1: tuple[int, int, int]
    distance_nm: int


# Pairs of one segment -------------------------------------------------------------------

def node_vertices(vertices_nm: np.ndarray, points: Sequence[Point],
                  resolution: Sequence[float]) -> np.ndarray:
    """The skeleton vertex each node sits on (the nearest to its voxel, nm at i * resolution).

    Raises ValueError for a node farther than half a voxel diagonal from every vertex: the
    points and the skeleton are not of one another.
    """
    resolution = np.asarray(resolution, dtype=np.float64)
    xyz = np.array([p[2:] for p in points], dtype=np.float64).reshape(-1, 3) * resolution
    distance, nearest = scipy.spatial.cKDTree(vertices_nm).query(xyz)
    far = np.flatnonzero(distance > 0.5 * np.linalg.norm(resolution))
    if len(far):
        p = points[far[0]]
        raise ValueError(f"segment {p.segment_id}: node {p.node_id} at voxel {tuple(p[2:])} is "
                         f"{distance[far[0]]:.0f} nm from its skeleton ({len(far)} nodes are); "
                         "are the points and skeletons of one run?")
    return nearest


def skeleton_graph(vertices_nm: np.ndarray, edges: np.ndarray) -> scipy.sparse.csr_matrix:
    """The skeleton as a symmetric sparse graph weighted by edge length (nm)."""
    vertices = np.asarray(vertices_nm, dtype=np.float64)
    a, b = edges[:, 0].astype(np.int64), edges[:, 1].astype(np.int64)
    a, b = a[a != b], b[a != b]
    lengths = np.linalg.norm(vertices[a] - vertices[b], axis=1)
    n = len(vertices)
    return scipy.sparse.coo_matrix((np.r_[lengths, lengths], (np.r_[a, b], np.r_[b, a])),
                                   shape=(n, n)).tocsr()


def candidate_pairs(graph: scipy.sparse.csr_matrix, nodes: np.ndarray, min_nm: float,
                    max_nm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All node pairs i < j (indices into `nodes`, vertex ids) whose path length on `graph`
    lies in [min_nm, max_nm]: (i, j, length), sorted by (i, j).

    Nodes are taken in batches of consecutive ones (neighbours along the skeleton, as node
    ids go), and each batch's paths are searched on the part of the graph within `max_nm`
    of it: a path no longer than `max_nm` never leaves it, so lengths are exact, and the
    work grows with the cable near the nodes, not with the whole skeleton per node.
    """
    n, size = len(nodes), graph.shape[0]
    found_i, found_j, found_d = [], [], []
    for start in range(0, n, _BATCH_NODES):
        batch = np.arange(start, min(start + _BATCH_NODES, n))
        reach = scipy.sparse.csgraph.dijkstra(graph, directed=False, indices=nodes[batch],
                                              limit=max_nm, min_only=True)
        near = np.flatnonzero(np.isfinite(reach))
        local = np.full(size, -1, dtype=np.int64)
        local[near] = np.arange(len(near))
        columns = np.flatnonzero(local[nodes] >= 0)  # nodes within max_nm of the batch
        part = graph[near][:, near]
        rows_at_once = max(1, _BATCH_VALUES // max(len(near), 1))
        for first in range(0, len(batch), rows_at_once):
            rows = batch[first:first + rows_at_once]
            lengths = scipy.sparse.csgraph.dijkstra(
                part, directed=False, indices=local[nodes[rows]],
                limit=max_nm)[:, local[nodes[columns]]]
            keep = (lengths >= min_nm) & (lengths <= max_nm) & (columns > rows[:, None])
            i, j = np.nonzero(keep)
            found_i.append(rows[i])
            found_j.append(columns[j])
            found_d.append(lengths[i, j])
    i, j, d = (np.concatenate(found_i or [np.zeros(0, np.int64)]),
               np.concatenate(found_j or [np.zeros(0, np.int64)]),
               np.concatenate(found_d or [np.zeros(0)]))
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def choose(count: int, options: PairOptions, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """Which of `count` candidates a segment keeps, and each one's repeat number.

    Above `max_pairs`, a sample without replacement; below `min_pairs`, every candidate and
    then repeats drawn with replacement; otherwise every candidate.
    """
    if count == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if count > options.max_pairs:
        return np.sort(rng.choice(count, options.max_pairs, replace=False)), \
            np.zeros(options.max_pairs, np.int64)
    extra = np.sort(rng.integers(0, count, max(0, options.min_pairs - count)))
    repeat = 1 + np.arange(len(extra)) - np.searchsorted(extra, extra)  # r-th copy: r
    chosen, repeats = np.r_[np.arange(count), extra], np.r_[np.zeros(count, np.int64), repeat]
    order = np.lexsort((repeats, chosen))
    return chosen[order], repeats[order]


def segment_pairs(segment_id: int, vertices_nm: np.ndarray, edges: np.ndarray,
                  points: Sequence[Point], resolution: Sequence[float],
                  options: PairOptions) -> list[Pair]:
    """The positive pairs of one segment: its sample `points` on its skeleton (nm, voxel i
    at i * resolution), sorted by (node_0, node_1, repeat)."""
    points = sorted(points, key=lambda p: p.node_id)
    if len(points) < 2:
        return []
    nodes = node_vertices(vertices_nm, points, resolution)
    i, j, lengths = candidate_pairs(skeleton_graph(vertices_nm, edges), nodes,
                                    options.min_distance_nm, options.max_distance_nm)
    segment_id = int(segment_id)
    rng = np.random.default_rng([options.seed, segment_id & 0xFFFFFFFF, segment_id >> 32])
    chosen, repeats = choose(len(i), options, rng)
    return [Pair(segment_id, points[i[c]].node_id, points[j[c]].node_id, int(r),
                 tuple(points[i[c]][2:]), tuple(points[j[c]][2:]),
                 int(np.rint(lengths[c])))
            for c, r in zip(chosen.tolist(), repeats.tolist())]


def border_distance_nm(center: Sequence[int], bounds: Box, resolution: Sequence[float]) -> int:
    """Distance from a voxel to the nearest face of `bounds` (its last voxels are 0), nm."""
    c = np.asarray(center)
    voxels = np.minimum(c - np.asarray(bounds.start), np.asarray(bounds.stop) - 1 - c)
    return int(np.rint(np.min(voxels * np.asarray(resolution, dtype=np.float64))))


# Beam --------------------------------------------------------------------------------------

def _counter(name: str):
    return beam.metrics.Metrics.counter("segclr", name)


class PairSegments(beam.DoFn):
    """(segment id, skeleton in nm, its sample points) -> the segment's Pairs."""

    def __init__(self, resolution: Sequence[float], options: PairOptions):
        self._resolution, self._options = tuple(resolution), options
        self._paired, self._unpaired = _counter("segments_paired"), _counter("segments_without_pairs")
        self._capped, self._pairs = _counter("segments_capped"), _counter("pairs_sampled")
        self._repeated = _counter("pairs_repeated")

    def process(self, element):
        segment_id, skeleton, points = element
        pairs = segment_pairs(segment_id, skeleton.vertices, skeleton.edges, points,
                              self._resolution, self._options)
        if not pairs:
            self._unpaired.inc()
            return
        self._paired.inc()
        self._pairs.inc(len(pairs))
        self._repeated.inc(sum(p.repeat > 0 for p in pairs))
        self._capped.inc(int(len(pairs) == self._options.max_pairs))
        yield from pairs


def describe_features() -> dict[str, dict]:
    """The records' features as the info file states them (tf.io.parse_example's spec)."""
    meaning = {
        "center": "cutout centre, voxels (x, y, z) at the table's resolution",
        "skeleton_id": "segment id (uint64 stored bit for bit as int64)",
        "distance": "path length between the two centres along the merged skeleton, nm",
        "dist_to_border": "distance of the centre to the nearest face of the volumes' common "
                          "voxels, nm",
        "vol_name": "the EM volume", "label_volume_name": "the segmentation volume"}
    return {key: {"dtype": dtype, "shape": list(shape), "meaning": meaning[key.split("-")[0]]}
            for key, (shape, dtype) in PAIR_SCHEMA.items()}


def table_file(shard: int | str, num_shards: int) -> str:
    """`pairs.tfrecord-SSSSS-of-NNNNN`; a str shard (e.g. "SSSSS") names the pattern."""
    shard = shard if isinstance(shard, str) else f"{shard:05d}"
    return f"{PAIR_TABLE_PREFIX}-{shard}-of-{num_shards:05d}"


class _Shard(NamedTuple):
    name: str
    segments: int
    pairs: int
    repeated: int


@dataclasses.dataclass(frozen=True)
class _Table:
    """The files of one pair table: shard keys, the records, info.json."""

    staging: shards.Staging
    num_shards: int
    bounds: Box
    resolution: tuple[float, float, float]
    vol_name: str
    label_volume_name: str
    provenance: dict

    def keys(self, pair: Pair) -> list[int]:
        return [shards.shard_of(pair.segment_id, self.num_shards, _BYTEWIDTH)]

    def encode(self, pair: Pair) -> bytes:
        for center in (pair.center_0, pair.center_1):
            if not self.bounds.contains(center):
                raise ValueError(f"segment {pair.segment_id}: node centre {center} lies "
                                 f"outside the volumes' common voxels {self.bounds}")
        border = tuple(border_distance_nm(c, self.bounds, self.resolution)
                       for c in (pair.center_0, pair.center_1))
        return shards.tfrecord(pair_example(
            np.array([pair.center_0, pair.center_1]), pair.segment_id, pair.distance_nm,
            border, self.vol_name, self.label_volume_name))

    def write(self, shard: int, pairs: Iterable[Pair]) -> _Shard:
        pairs = sorted(pairs)
        name = table_file(shard, self.num_shards)
        shards.write_file(self.staging.temp_path("", name),
                          b"".join(self.encode(p) for p in pairs))
        return _Shard(name, len({p.segment_id for p in pairs}), len(pairs),
                      sum(p.repeat > 0 for p in pairs))

    def finalize(self, written: list[_Shard]) -> str:
        """Put every shard in place (empty files for shards without pairs), info.json last."""
        if not sum(w.pairs for w in written):
            shards.delete_tree(self.staging.temp)
            raise ValueError(f"no segment gave a pair: no two nodes of one skeleton lie "
                             f"within the distance range ({self.provenance['config']}); "
                             f"nothing was written to {self.staging.root}")
        names = {w.name for w in written}
        for shard in range(self.num_shards):
            if table_file(shard, self.num_shards) not in names:
                self.write(shard, [])
        info = {
            "format": "segclr-beam pairs",
            "format_version": FORMAT_VERSION,
            "files": table_file("SSSSS", self.num_shards),
            "num_shards": self.num_shards,
            "sharding": shards.SHARDING + f", bytewidth {_BYTEWIDTH}",
            "record": "tf.train.Example, one positive pair per record, sorted by segment, "
                      "node ids and repeat within a file",
            "features": describe_features(),
            "segments": sum(w.segments for w in written),
            "pairs": sum(w.pairs for w in written),
            "repeated_pairs": sum(w.repeated for w in written),
            "vol_name": self.vol_name,
            "label_volume_name": self.label_volume_name,
            "resolution_nm": list(self.resolution),
            "bounds": [*self.bounds.start, *self.bounds.stop],
            **self.provenance,
        }
        marker = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()
        files = sorted(names | {table_file(s, self.num_shards) for s in range(self.num_shards)})
        return self.staging.finalize({"": files}, {INFO_NAME: marker},
                                     stale=(f"{PAIR_TABLE_PREFIX}-*-of-*",))[0]


class WritePairs(beam.PTransform):
    """Pairs -> `output/pairs.tfrecord-SSSSS-of-NNNNN` and `output/info.json`, all or nothing.

    Shards are by segment (md5 of the id, as every output here); a shard's records are sorted,
    so the same pairs give the same bytes. Each record's `dist_to_border` is measured to
    `bounds` (voxels at `resolution`). `provenance` (JSON) goes into info.json. A table
    without any pair fails the job and leaves nothing. Returns the info.json path.
    """

    def __init__(self, output: str, num_shards: int, bounds: Box,
                 resolution: Sequence[float], vol_name: str, label_volume_name: str,
                 provenance: dict[str, Any]):
        super().__init__()
        if not 1 <= num_shards <= 99999:
            raise ValueError(f"num_shards: must be in 1 .. 99999, got {num_shards}")
        json.dumps(provenance)
        self._table = _Table(shards.Staging.below(output), int(num_shards), bounds,
                             tuple(map(float, resolution)), vol_name, label_volume_name,
                             provenance)

    def expand(self, pairs):
        table = self._table
        return pairs | "Shards" >> shards.WriteShards(table.keys, table.write, table.finalize)
