"""Skeletons of every segment in a box: kimimaro per chunk, fragments merged per segment,
then sample points along each merged skeleton (segclr_beam.points.skeleton_points).

Chunks share one voxel plane with their upper neighbours. kimimaro's `fix_borders` puts a
skeleton endpoint at the same place of a shared plane in both chunks, so the fragments of a
segment meet at identical vertices and merge by consolidation, as in igneous. The merged
skeleton is then traced once more with TEASAR's rule on its own graph (`retrace`), which
removes the loops and parallel paths that chunk borders force, and cleaned of dust and ticks.

Skeletons are handled in nanometres with voxel i at i * resolution (kimimaro's convention);
precomputed skeleton files put vertices at voxel centres, (i + 0.5) * resolution, as
Neuroglancer and igneous do.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
from typing import Collection, Iterable, NamedTuple, Sequence

import apache_beam as beam
import fastremap
import kimimaro
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.spatial
from apache_beam.io.filesystems import FileSystems
from osteoid import Skeleton

from segclr_beam.points import skeleton_points
from segclr_beam.precomputed import skeletons_info, to_precomputed
from segclr_beam.volume import AbsentChunks, Box, Volume, VolumeError

OVERLAP = 1  # voxels a chunk shares with each upper neighbour


@dataclasses.dataclass(frozen=True)
class TeasarParams:
    """kimimaro's TEASAR parameters, lengths in nanometres; defaults suit 32 nm data.

    A path is traced to the farthest voxel not yet within `scale` * (distance to the boundary)
    + `const_nm` of an earlier path; `pdrf_*` weight how hard paths hug the centre line.
    Objects whose distance to the boundary exceeds `soma_detection_nm` are examined as somata.
    """

    scale: float = 1.5
    const_nm: float = 300.0
    pdrf_scale: float = 100000.0
    pdrf_exponent: int = 4
    soma_detection_nm: float = 750.0
    soma_acceptance_nm: float = 3500.0
    soma_invalidation_scale: float = 2.0
    soma_invalidation_const_nm: float = 300.0
    max_paths: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and value < 0:
                raise ValueError(f"teasar.{field.name}: must be >= 0, got {value}")

    def to_kimimaro(self) -> dict:
        return {
            "scale": self.scale,
            "const": self.const_nm,
            "pdrf_scale": self.pdrf_scale,
            "pdrf_exponent": self.pdrf_exponent,
            "soma_detection_threshold": self.soma_detection_nm,
            "soma_acceptance_threshold": self.soma_acceptance_nm,
            "soma_invalidation_scale": self.soma_invalidation_scale,
            "soma_invalidation_const": self.soma_invalidation_const_nm,
            "max_paths": self.max_paths,
        }


@dataclasses.dataclass(frozen=True)
class SkeletonOptions:
    """How segments are skeletonized, cleaned and sampled.

    min_voxels: segments with fewer voxels (summed over all chunks) get no points.
    dust_nm: skeleton pieces of less cable than this are dropped (the longest piece stays).
    tick_nm: branches from a branch point to an end shorter than this are cut.
    postprocess_max_vertices: larger merged skeletons (huge glia, merged objects) are only
      consolidated, not cleaned: the cleaning walks the graph in Python, which would take
      minutes and gigabytes on them.

    kimimaro's fill_holes and fix_avocados are not offered: they hand voxels of one segment
    to another, and every sample point must lie in its own segment.
    """

    chunk_size: tuple[int, int, int] = (512, 512, 512)
    teasar: TeasarParams = TeasarParams()
    fix_branching: bool = True
    min_voxels: int = 1000
    dust_nm: float = 1500.0
    tick_nm: float = 1500.0
    spacing_nm: float = 1500.0
    postprocess_max_vertices: int = 1_000_000

    def __post_init__(self):
        size = np.broadcast_to(np.asarray(self.chunk_size, dtype=np.int64), (3,))
        object.__setattr__(self, "chunk_size", tuple(int(v) for v in size))
        if min(self.chunk_size) <= OVERLAP:
            raise ValueError(f"chunk_size: {self.chunk_size} must be larger than the "
                             f"{OVERLAP}-voxel overlap on every axis")
        for name in ("min_voxels", "dust_nm", "tick_nm", "postprocess_max_vertices"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.spacing_nm > 0:
            raise ValueError(f"spacing_nm: must be > 0, got {self.spacing_nm}")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One unit of skeletonization: `box` is read and skeletonized, `core` counts voxels.

    `box` is `core` plus the voxel plane it shares with each upper neighbour inside the bbox.
    """

    core: Box
    box: Box


class Fragment(NamedTuple):
    """The skeleton of one segment inside one chunk, in global voxels: light to shuffle."""

    vertices: np.ndarray  # int32 [N, 3] voxel (x, y, z)
    edges: np.ndarray  # uint32 [E, 2] vertex indices
    radii: np.ndarray  # float32 [N] distance to the segment boundary, nm


def plan_chunks(bbox: Box, chunk_size: Sequence[int], bounds: Box) -> list[Chunk]:
    """Tile `bbox` (which must lie inside the volume `bounds`) into overlapping chunks."""
    size = np.broadcast_to(np.asarray(chunk_size, dtype=np.int64), (3,))
    if (size <= OVERLAP).any():
        raise ValueError(f"chunk size {tuple(int(v) for v in size)} must be larger than the "
                         f"{OVERLAP}-voxel overlap on every axis")
    if bbox.is_empty():
        raise VolumeError(f"bounding box {bbox} is empty")
    if bbox.intersect(bounds) != bbox:
        raise VolumeError(f"bounding box {bbox} is not inside the segmentation's voxels {bounds}")
    starts = [range(a, b, int(s)) for a, b, s in zip(bbox.start, bbox.stop, size)]
    chunks = []
    for start in itertools.product(*starts):
        start = np.asarray(start)
        core = Box(start, np.minimum(start + size, bbox.stop))
        box = Box(start, np.minimum(start + size + OVERLAP, bbox.stop))
        chunks.append(Chunk(core, box))
    return chunks


def skeletonize_chunk(
    labels: np.ndarray,
    chunk: Chunk,
    resolution: Sequence[float],
    options: SkeletonOptions = SkeletonOptions(),
    segment_ids: Collection[int] | None = None,
) -> tuple[dict[int, Fragment], dict[int, int]]:
    """Skeleton fragments and voxel counts of the segments in one chunk.

    `labels` holds `chunk.box`; it is relabelled in place and released, so pass it without
    keeping a reference: the uint64 array is the largest in memory, and kimimaro works on the
    small local ids. Voxels are counted in `chunk.core` only, so counts add up exactly over
    the chunks. Every piece is skeletonized, however small: whether a segment is dust is
    decided on its whole voxel count.
    """
    ids, counts = fastremap.unique(labels[chunk.core.slices(chunk.box.start)],
                                   return_counts=True)
    voxels = {int(i): int(c) for i, c in zip(ids, counts) if i != 0}
    if segment_ids is not None:
        voxels = {i: c for i, c in voxels.items() if i in segment_ids}
    local, local_ids = fastremap.renumber(labels, in_place=True)
    del labels
    segment_of = {int(v): int(k) for k, v in local_ids.items() if k != 0}
    object_ids = None
    if segment_ids is not None:
        object_ids = sorted(v for v, k in segment_of.items() if k in segment_ids)
        if not object_ids:
            return {}, voxels
    resolution = np.asarray(resolution, dtype=np.float32)
    skeletons = kimimaro.skeletonize(
        local,
        teasar_params=options.teasar.to_kimimaro(),
        anisotropy=resolution,
        object_ids=object_ids,
        dust_threshold=0,
        fix_branching=options.fix_branching,
        fix_borders=True,
        in_place=True,
        progress=False,
        parallel=1,
    )
    origin = np.asarray(chunk.box.start, dtype=np.int32)
    fragments = {}
    for local_id, skeleton in skeletons.items():
        vertices = np.rint(skeleton.vertices / resolution).astype(np.int32) + origin
        fragments[segment_of[int(local_id)]] = Fragment(
            vertices, skeleton.edges.astype(np.uint32), skeleton.radius.astype(np.float32))
    return fragments, voxels


def merge_fragments(
    fragments: Iterable[Fragment],
    resolution: Sequence[float],
    options: SkeletonOptions = SkeletonOptions(),
) -> Skeleton:
    """One segment's skeleton (nm) from its fragments: joined at shared vertices, then cleaned.

    Fragments are merged in a canonical order so that the result (radii at shared vertices
    included) does not depend on the order in which they arrive.
    """
    resolution = np.asarray(resolution, dtype=np.float64)
    pieces = sorted(fragments, key=lambda f: (f.vertices.tobytes(), f.edges.tobytes()))
    skeleton = Skeleton.simple_merge([
        Skeleton((f.vertices * resolution).astype(np.float32), f.edges, radii=f.radii,
                 space="physical")
        for f in pieces
    ]).consolidate()
    return clean_skeleton(skeleton, options)


def clean_skeleton(skeleton: Skeleton, options: SkeletonOptions = SkeletonOptions()) -> Skeleton:
    """A tree per piece: close pieces joined, redundant paths retraced away, dust and ticks cut.

    Skeletons above `options.postprocess_max_vertices` are returned as they are.
    """
    if skeleton.empty() or len(skeleton.vertices) > options.postprocess_max_vertices:
        return skeleton
    cleaned = kimimaro.join_close_components(skeleton, restrict_by_radius=True)
    cleaned = retrace(cleaned, options.teasar)
    cleaned = _remove_dust(cleaned, options.dust_nm)
    cleaned = remove_ticks(cleaned, options.tick_nm)
    cleaned.id = skeleton.id
    return cleaned


def retrace(skeleton: Skeleton, teasar: TeasarParams = TeasarParams()) -> Skeleton:
    """TEASAR run again on a skeleton's own graph: a tree per piece without redundant paths.

    Each chunk forces paths to every place where a segment crosses its faces, and cannot see
    the paths its neighbours traced nearby, so a merged skeleton has loops and parallel paths
    that kimimaro on the whole segment would not trace. As TEASAR does on voxels: from a root
    at an end of the piece (the vertex farthest from its thickest point), repeatedly take the
    farthest vertex not yet within `scale` * radius + `const_nm` of a traced path and trace
    the shortest path from it back to the tree. Every piece keeps at least its longest path.
    """
    vertices = skeleton.vertices.astype(np.float64)
    n = len(vertices)
    if n <= 1 or len(skeleton.edges) == 0:
        return skeleton
    a, b = skeleton.edges[:, 0], skeleton.edges[:, 1]
    lengths = np.linalg.norm(vertices[a] - vertices[b], axis=1)
    graph = scipy.sparse.coo_matrix((np.r_[lengths, lengths], (np.r_[a, b], np.r_[b, a])),
                                    shape=(n, n)).tocsr()
    _, piece = scipy.sparse.csgraph.connected_components(graph, directed=False)
    radius = skeleton.radius.astype(np.float64)
    thickest = np.lexsort((np.arange(n), -radius, piece))
    thickest = thickest[np.r_[True, np.diff(piece[thickest]) != 0]]  # one per piece
    distance = scipy.sparse.csgraph.dijkstra(graph, directed=False, indices=thickest,
                                             min_only=True)
    roots = np.lexsort((np.arange(n), -distance, piece))
    roots = roots[np.r_[True, np.diff(piece[roots]) != 0]]
    distance, parent, _ = scipy.sparse.csgraph.dijkstra(
        graph, directed=False, indices=roots, min_only=True, return_predecessors=True)

    reach = teasar.scale * radius + teasar.const_nm
    search = scipy.spatial.cKDTree(vertices)
    valid = np.ones(n, dtype=bool)
    in_tree = np.zeros(n, dtype=bool)
    edges = []

    def invalidate(path: list[int]) -> None:
        near = np.concatenate([np.asarray(found, dtype=np.int64) for found in
                               search.query_ball_point(vertices[path], reach[path])])
        valid[near[piece[near] == piece[path[0]]]] = False

    in_tree[roots] = True
    for target in np.lexsort((np.arange(n), -distance)):
        if not valid[target]:
            continue
        path = [int(target)]
        while not in_tree[path[-1]]:
            path.append(int(parent[path[-1]]))
        edges.extend(zip(path[:-1], path[1:]))
        in_tree[path] = True
        invalidate(path)
    traced = Skeleton(skeleton.vertices, np.array(edges, dtype=np.uint32).reshape(-1, 2),
                      radii=skeleton.radius, segid=skeleton.id, space=skeleton.space)
    return traced.consolidate()


def _remove_dust(skeleton: Skeleton, dust_nm: float) -> Skeleton:
    """Drop connected pieces shorter than `dust_nm` of cable, but always keep the longest."""
    pieces = skeleton.components()
    if len(pieces) <= 1:
        return skeleton
    lengths = [piece.cable_length() for piece in pieces]
    longest = int(np.argmax(lengths))
    return Skeleton.simple_merge([
        piece for i, (piece, length) in enumerate(zip(pieces, lengths))
        if i == longest or length >= dust_nm
    ]).consolidate()


def remove_ticks(skeleton: Skeleton, tick_nm: float) -> Skeleton:
    """Cut branches shorter than `tick_nm` from an end to a branch point, shortest first.

    Cutting a branch can turn its branch point into a plain path vertex and so lengthen the
    branch on the other side; lengths are therefore re-measured lazily as they come up. A
    piece without branch points is never cut. (kimimaro.post.remove_ticks can cut a path
    between two branch points and split a tree, so it is not used.)
    """
    if tick_nm <= 0 or skeleton.empty():
        return skeleton
    vertices = skeleton.vertices.astype(np.float64)
    neighbours: list[set[int]] = [set() for _ in range(len(vertices))]
    for a, b in skeleton.edges.tolist():
        if a != b:
            neighbours[a].add(b)
            neighbours[b].add(a)

    def branch(end: int) -> tuple[list[int], float, int] | None:
        """The vertices from an end up to (without) its branch point, their length, the point."""
        path, length, previous, v = [end], 0.0, -1, end
        while True:
            ahead = [u for u in neighbours[v] if u != previous]
            if not ahead:
                return None  # reached another end: the piece is a plain path
            nxt = ahead[0]
            length += float(np.linalg.norm(vertices[nxt] - vertices[v]))
            if len(neighbours[nxt]) != 2:
                return (path, length, nxt) if len(neighbours[nxt]) > 2 else None
            path.append(nxt)
            previous, v = v, nxt

    queue = []
    for end in range(len(vertices)):
        if len(neighbours[end]) == 1 and (found := branch(end)) is not None:
            queue.append((found[1], end))
    heapq.heapify(queue)
    while queue:
        length, end = heapq.heappop(queue)
        found = branch(end) if len(neighbours[end]) == 1 else None
        if found is None:
            continue
        path, actual, point = found
        if actual > length:  # lengthened by an earlier cut: back in line
            heapq.heappush(queue, (actual, end))
            continue
        if actual >= tick_nm:
            break  # every other branch is at least as long
        for a, b in zip(path, path[1:] + [point]):
            neighbours[a].discard(b)
            neighbours[b].discard(a)
    edges = np.array([(a, b) for a in range(len(vertices)) for b in neighbours[a] if a < b],
                     dtype=np.uint32).reshape(-1, 2)
    trimmed = Skeleton(skeleton.vertices, edges, radii=skeleton.radius, segid=skeleton.id,
                       space=skeleton.space)
    return trimmed.consolidate()


# Beam: thin wrappers around the functions above.
_FRAGMENTS, _VOXELS, _SKELETONS = "fragments", "voxels", "skeletons"


def _counter(name: str) -> beam.metrics.metric.Metrics.DelegatingCounter:
    return beam.metrics.Metrics.counter("segclr", name)


class _SkeletonizeChunk(beam.DoFn):
    """Chunk -> (segment id, Fragment), and (segment id, voxel count) tagged `voxels`."""

    def __init__(self, segmentation: Volume, options: SkeletonOptions,
                 segment_ids: frozenset[int] | None, max_absent_chunks: int):
        self._segmentation, self._options, self._segment_ids = segmentation, options, segment_ids
        self._max_absent = max_absent_chunks
        self._chunks, self._fragments = _counter("chunks_skeletonized"), _counter("fragments")
        self._absent_counter = _counter("absent_chunks_segmentation")

    def setup(self):
        self._segmentation.store  # open the TensorStore once per worker
        self._absent = AbsentChunks(self._segmentation.name, self._max_absent)

    def process(self, chunk: Chunk):
        read = self._segmentation.read_async(chunk.box, check_absent=True)
        fragments, voxels = skeletonize_chunk(read.result(), chunk,
                                              self._segmentation.resolution, self._options,
                                              self._segment_ids)
        # Chunks overlap: a storage chunk is counted by the chunk whose core holds its origin.
        self._absent_counter.inc(self._absent.add(
            o for o in read.absent if chunk.core.contains(o)))
        self._chunks.inc()
        self._fragments.inc(len(fragments))
        yield from fragments.items()
        for item in voxels.items():
            yield beam.pvalue.TaggedOutput(_VOXELS, item)


class _MergeSegment(beam.DoFn):
    """(segment id, {fragments, voxels}) -> (segment id, merged skeleton) if it is large
    enough."""

    def __init__(self, resolution: Sequence[float], options: SkeletonOptions):
        self._resolution, self._options = tuple(resolution), options
        self._segments, self._small = _counter("segments_skeletonized"), _counter("segments_too_small")

    def process(self, element):
        segment_id, grouped = element
        if sum(grouped[_VOXELS]) < self._options.min_voxels:
            self._small.inc()
            return
        self._segments.inc()
        yield segment_id, merge_fragments(grouped[_FRAGMENTS], self._resolution, self._options)


class MergedSkeletons(beam.PTransform):
    """(segment id, merged skeleton in nm) of every segment in a bounding box, from chunked
    kimimaro skeletons.

    Chunks of `options.chunk_size` voxels are skeletonized independently and in parallel; the
    fragments of each segment are grouped, merged and cleaned into one skeleton. Segments with
    fewer than `options.min_voxels` voxels inside the box are dropped; `segment_ids`, if
    given, restricts the work to those segments. More than `max_absent_chunks` absent storage
    chunks of the segmentation fail the stage (volume.AbsentChunks); the tolerated ones are
    counted (`absent_chunks_segmentation`). Skeletons are meant for a stage fused after this
    one (sampling, pairs), not for a shuffle.
    """

    def __init__(self, segmentation: Volume, bbox: Box | None = None,
                 options: SkeletonOptions = SkeletonOptions(),
                 segment_ids: Collection[int] | None = None, max_absent_chunks: int = 0):
        super().__init__()
        self._max_absent = max_absent_chunks
        bbox = segmentation.bounds if bbox is None else bbox
        self._chunks = plan_chunks(bbox, options.chunk_size, segmentation.bounds)
        self._segmentation, self._options = segmentation, options
        self._segment_ids = None if segment_ids is None else frozenset(map(int, segment_ids))

    def expand(self, pbegin):
        found = (pbegin
                 | "Chunks" >> beam.Create(self._chunks)
                 | "SpreadChunks" >> beam.Reshuffle()
                 | "Skeletonize" >> beam.ParDo(_SkeletonizeChunk(
                     self._segmentation, self._options, self._segment_ids, self._max_absent)
                 ).with_outputs(_VOXELS, main=_FRAGMENTS))
        voxels = found[_VOXELS] | "SumVoxels" >> beam.CombinePerKey(sum)
        return ({_FRAGMENTS: found[_FRAGMENTS], _VOXELS: voxels}
                | "BySegment" >> beam.CoGroupByKey()
                | "Merge" >> beam.ParDo(_MergeSegment(self._segmentation.resolution,
                                                      self._options)))


class _SampleSegment(beam.DoFn):
    """(segment id, merged skeleton) -> its Points, and its skeleton file (tagged
    `skeletons`) when skeletons are written."""

    def __init__(self, resolution: Sequence[float], spacing_nm: float, write_skeletons: bool):
        self._resolution, self._spacing_nm = tuple(resolution), spacing_nm
        self._write_skeletons = write_skeletons
        self._empty, self._points = _counter("segments_without_skeleton"), _counter("points_sampled")

    def process(self, element):
        segment_id, skeleton = element
        points = skeleton_points(segment_id, skeleton, self._resolution, self._spacing_nm)
        if not points:  # only pieces of single voxels, which kimimaro does not skeletonize
            self._empty.inc()
            return
        self._points.inc(len(points))
        yield from points
        if self._write_skeletons:
            yield beam.pvalue.TaggedOutput(
                _SKELETONS, (segment_id, to_precomputed(skeleton, self._resolution)))


class SkeletonizeSegments(beam.PTransform):
    """Sample points of every segment in a bounding box, from chunked kimimaro skeletons
    (`MergedSkeletons`), every `options.spacing_nm` of path length along each. With
    `skeleton_dir`, the merged skeletons are also written there as neuroglancer precomputed
    skeletons (the info file last).
    """

    def __init__(self, segmentation: Volume, bbox: Box | None = None,
                 options: SkeletonOptions = SkeletonOptions(),
                 segment_ids: Collection[int] | None = None, skeleton_dir: str | None = None,
                 max_absent_chunks: int = 0):
        super().__init__()
        self._skeletons = MergedSkeletons(segmentation, bbox, options, segment_ids,
                                          max_absent_chunks)
        self._resolution, self._spacing_nm = segmentation.resolution, options.spacing_nm
        self._skeleton_dir = skeleton_dir

    def expand(self, pbegin):
        sampled = (pbegin
                   | "Skeletons" >> self._skeletons
                   | "Sample" >> beam.ParDo(_SampleSegment(
                       self._resolution, self._spacing_nm, self._skeleton_dir is not None)
                   ).with_outputs(_SKELETONS, main="points"))
        if self._skeleton_dir is not None:
            _ = sampled[_SKELETONS] | "WriteSkeletons" >> WriteSkeletons(self._skeleton_dir)
        return sampled["points"]


class WriteSkeletons(beam.PTransform):
    """(segment id, precomputed bytes) -> files `{directory}/{segment id}`, then `info`."""

    def __init__(self, directory: str):
        super().__init__()
        self._directory = directory.rstrip("/")

    def _write(self, segment_id: int, data: bytes) -> None:
        with FileSystems.create(FileSystems.join(self._directory, str(segment_id))) as f:
            f.write(data)

    def _write_info(self, _) -> None:
        with FileSystems.create(FileSystems.join(self._directory, "info")) as f:
            f.write(json.dumps(skeletons_info(), indent=1).encode())

    def expand(self, skeletons):
        return (skeletons
                | "WriteFiles" >> beam.MapTuple(self._write)
                | "AllWritten" >> beam.combiners.Count.Globally()
                | "WriteInfo" >> beam.Map(self._write_info))
