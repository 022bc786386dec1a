"""Masked EM cutouts around sample points, cut from one shared read per spatial block.

Each point needs a window of EM (default 129^3 voxels, the point at index size // 2) in which
voxels of other segments are zero. Windows of nearby points overlap almost entirely, so points
are grouped by spatial block and EM + segmentation are read once for the group (the box
spanned by its windows, at most the block grown by half a window). The uint64 segmentation
is relabelled to small local ids once per read; every mask is then a compare on those ids.
A group whose points are few and far apart is cheaper as separate window reads; the choice
is made per group from the voxels each way reads.

Only points cross the group-by-block shuffle. Cutouts are produced lazily, one at a time,
and are meant to be consumed in the same fused stage by the model: at any moment one read
(block or windows) and one cutout are alive.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zlib
from typing import Callable, Iterable, Iterator, Sequence

import apache_beam as beam
import fastremap
import numpy as np

from segclr_beam.records import Point
from segclr_beam.volume import AbsentChunks, Box, Volume

DEFAULT_BLOCK_SIZE = 256
DEFAULT_CUTOUT_SIZE = 129
DEFAULT_MAX_POINTS_PER_GROUP = 4096

Cutout = tuple[Point, np.ndarray]
_LOG = logging.getLogger(__name__)


class PointOutsideError(ValueError):
    """A point lies outside both the EM and the segmentation volume."""


class SegmentAbsentError(ValueError):
    """Points whose segment does not occur in their cutout window."""


@dataclasses.dataclass
class CutoutStats:
    """What the reads cost and what came out; the Beam stage reports these as counters.

    bytes_decoded: voxels materialised from storage (inside the volume bounds; the zeros
    standing for voxels outside are not counted) times the bytes per voxel of each volume,
    summed over the EM and segmentation reads.
    chunk_bytes_decoded: the same for whole storage chunks, which is what the codecs decode
    when no chunk cache is configured (TensorStore's default).
    """

    blocks_read: int = 0
    windows_read: int = 0
    bytes_decoded: int = 0
    chunk_bytes_decoded: int = 0
    cutouts: int = 0
    segment_absent: int = 0
    absent_chunks_em: int = 0
    absent_chunks_segmentation: int = 0


def block_of(point: Point, block_size: int) -> tuple[int, int, int]:
    """Index (x, y, z) of the spatial block of edge `block_size` voxels holding `point`."""
    return (int(point.x) // block_size, int(point.y) // block_size, int(point.z) // block_size)


def window_of(point: Point, cutout_size: int) -> Box:
    """The cutout window of `point`: `cutout_size` voxels per axis, the point at size // 2."""
    return Box.around((point.x, point.y, point.z), cutout_size)


def windows_box(points: Sequence[Point], cutout_size: int) -> Box:
    """The smallest box holding the windows of all `points`."""
    xyz = np.array([(p.x, p.y, p.z) for p in points], dtype=np.int64)
    half = cutout_size // 2
    return Box(tuple(xyz.min(axis=0) - half), tuple(xyz.max(axis=0) - half + cutout_size))


def check_point(point: Point, em_bounds: Box, segmentation_bounds: Box) -> None:
    """Raise PointOutsideError if `point` lies outside both volumes.

    Such a point means the points and the volumes disagree (another resolution, offset or
    dataset); skipping it would yield an output that looks complete but is not.
    """
    xyz = (point.x, point.y, point.z)
    if not em_bounds.contains(xyz) and not segmentation_bounds.contains(xyz):
        raise PointOutsideError(
            f"point (segment {point.segment_id}, node {point.node_id}) at voxel {xyz} lies "
            f"outside both the EM {em_bounds} and the segmentation {segmentation_bounds}")


def check_cutout_size(cutout_size: int) -> None:
    """Raise ValueError unless `cutout_size` is odd, so that the point sits at the centre."""
    if int(cutout_size) != cutout_size or cutout_size < 1 or cutout_size % 2 == 0:
        raise ValueError(f"cutout_size: must be a positive odd number of voxels, got {cutout_size}")


def cut_block(points: Iterable[Point], box: Box, em: np.ndarray, segmentation: np.ndarray,
              cutout_size: int = DEFAULT_CUTOUT_SIZE, stats: CutoutStats | None = None,
              absent: list[Point] | None = None) -> Iterator[Cutout]:
    """Masked cutouts of `points` from EM and segmentation arrays covering `box`.

    `em` (uint8) and `segmentation` (integer ids) are indexed [x, y, z] as Volume.read
    returns them. Each cutout is a fresh uint8 array (size, size, size) in (z, y, x) order:
    EM where the segmentation equals the point's segment, zero elsewhere and wherever the
    window leaves `box`; so `box` needs to cover only the part of the windows inside the
    segmentation. A point whose segment does not occur in its window (or is 0, background)
    is counted in `stats.segment_absent`; it is appended to `absent` instead of being
    yielded if that list is given, else it gets an all-zero cutout.
    """
    stats = stats if stats is not None else CutoutStats()
    if em.shape != box.shape or segmentation.shape != box.shape:
        raise ValueError(f"arrays of shape {em.shape} (EM) and {segmentation.shape} "
                         f"(segmentation) do not match box {box} of shape {box.shape}")
    # Relabel once to the smallest id type, and lay both arrays out (z, y, x) C-contiguous,
    # so that each window is a view whose masked copy is already in the model's axis order.
    # Arrays read in Fortran order make the layout change free.
    local, labels = fastremap.renumber(segmentation.T, preserve_zero=True)
    del segmentation
    local = np.ascontiguousarray(local)
    em = np.ascontiguousarray(em.T)
    shape = (cutout_size,) * 3
    match = np.empty(shape, dtype=bool)
    for point in points:
        window = window_of(point, cutout_size)
        inside = window.intersect(box)
        cutout = np.zeros(shape, dtype=np.uint8)
        label = labels.get(point.segment_id) if point.segment_id != 0 else None
        present = False
        if label is not None and not inside.is_empty():
            source = inside.slices(box.start)[::-1]
            target = inside.slices(window.start)[::-1]
            mask = match[target]
            np.equal(local[source], local.dtype.type(label), out=mask)
            np.multiply(em[source], mask, out=cutout[target])
            present = bool(mask.any())
        stats.segment_absent += not present
        if not present and absent is not None:
            absent.append(point)
            continue
        stats.cutouts += 1
        yield point, cutout


def _chunk_bytes(box: Box, volume: Volume, chunk: Sequence[int], origin: Sequence[int]) -> int:
    """Bytes of the storage chunks of `volume` that reading `box` decodes."""
    inside = box.intersect(volume.bounds)
    if inside.is_empty():
        return 0
    count = 1
    for a, b, c, o in zip(inside.start, inside.stop, chunk, origin):
        count *= -((o - b) // c) - (a - o) // c
    return count * int(np.prod(chunk)) * volume.dtype.itemsize


class CutoutReader:
    """Reads EM and segmentation for groups of points and yields their masked cutouts.

    A point's segment must occur in its cutout window: a skeleton's points lie inside their
    segment, and a point of a table may sit on a membrane next to it, but a window without
    its segment would embed nothing. Such points raise SegmentAbsentError naming the first
    few of the group, or with `skip_absent` are left out and counted
    (`stats.segment_absent`). Absent storage chunks are counted per volume; more than
    `max_absent_chunks` of one volume raise volume.AbsentChunksError. `stats` accumulates
    over all groups read.
    """

    def __init__(self, em: Volume, segmentation: Volume,
                 cutout_size: int = DEFAULT_CUTOUT_SIZE, skip_absent: bool = False,
                 max_absent_chunks: int = 0):
        check_cutout_size(cutout_size)
        self.em = em
        self.segmentation = segmentation
        self.cutout_size = cutout_size
        self.skip_absent = skip_absent
        self.stats = CutoutStats()
        self._absent_chunks = {v.name: AbsentChunks(v.name, max_absent_chunks)
                               for v in (em, segmentation)}
        self._grids: list[tuple[Volume, tuple, tuple]] | None = None

    def cutouts(self, points: Iterable[Point]) -> Iterator[Cutout]:
        """Masked cutouts of a group of points, from one shared read or one read per window.

        Raises PointOutsideError, before reading anything, for a point outside both volumes,
        and SegmentAbsentError after the group for points whose segment is absent.
        """
        absent: list[Point] = []
        yield from self._cutouts(points, absent)
        if absent and not self.skip_absent:
            shown = "; ".join(f"segment {p.segment_id} node {p.node_id} at voxel "
                              f"{(p.x, p.y, p.z)}" for p in absent[:5])
            raise SegmentAbsentError(
                f"{len(absent)} point(s) whose segment does not occur in its "
                f"{self.cutout_size}^3 cutout window of the segmentation "
                f"{self.segmentation.spec.get('kvstore', self.segmentation.spec)}: {shown}"
                f"{'; ...' if len(absent) > 5 else ''}. The points and the segmentation "
                "disagree (another version, resolution or offset?); --skip-absent leaves "
                "such points out and counts them")

    def _cutouts(self, points: Iterable[Point], absent: list[Point]) -> Iterator[Cutout]:
        points = sorted(points)
        for point in points:
            check_point(point, self.em.bounds, self.segmentation.bounds)
        if not points:
            return
        # Voxels outside the segmentation are masked anyway: they are never read.
        bounds = self.segmentation.bounds
        box = windows_box(points, self.cutout_size).intersect(bounds)
        windows = [window_of(p, self.cutout_size).intersect(bounds) for p in points]
        # Cost is dominated by per-voxel work after decoding (copying, relabelling, laying
        # out), so the shared read wins unless the windows together hold fewer voxels.
        if self._bytes(box) <= sum(self._bytes(w) for w in windows):
            self.stats.blocks_read += not box.is_empty()
            # No local names for the arrays: cut_block drops the uint64 ids once relabelled.
            yield from cut_block(points, box, *self._read_async(box)(), self.cutout_size,
                                 self.stats, absent)
            return
        # Few points far apart: all window reads go out at once (together they decode fewer
        # bytes than the shared read would) and each is released once cut.
        pending = [self._read_async(w) for w in windows]
        self.stats.windows_read += sum(not w.is_empty() for w in windows)
        for point, window in zip(points, windows):
            yield from cut_block([point], window, *pending.pop(0)(), self.cutout_size,
                                 self.stats, absent)

    def _bytes(self, box: Box) -> int:
        """Bytes of EM and segmentation materialised from storage to read `box`."""
        return sum(box.intersect(v.bounds).size * v.dtype.itemsize
                   for v in (self.em, self.segmentation))

    def chunk_bytes(self, boxes: Iterable[Box]) -> int:
        """Bytes of whole storage chunks that reading `boxes` decodes (with no chunk cache)."""
        if self._grids is None:
            self._grids = [(v, *v.chunks) for v in (self.em, self.segmentation)]
        return sum(_chunk_bytes(box, v, chunk, origin)
                   for box in boxes for v, chunk, origin in self._grids)

    def _read_async(self, box: Box) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """Start reading EM and segmentation of `box` concurrently; call the result to wait."""
        if box.is_empty():
            return lambda: (np.zeros(box.shape, np.uint8), np.zeros(box.shape, np.uint8))
        self.stats.bytes_decoded += self._bytes(box)
        self.stats.chunk_bytes_decoded += self.chunk_bytes([box])
        em = self.em.read_async(box, order="F", check_absent=True)
        segmentation = self.segmentation.read_async(box, order="F", check_absent=True)

        def result():
            arrays = em.result(), segmentation.result()
            self.stats.absent_chunks_em += self._absent_chunks[self.em.name].add(em.absent)
            self.stats.absent_chunks_segmentation += self._absent_chunks[
                self.segmentation.name].add(segmentation.absent)
            return arrays

        return result


class Progress:
    """Log lines of a worker's progress through a stage, at most one per `every` seconds.

    Beam's counters reach a local driver only when the run ends, so each worker logs what it
    made itself, against the stage's total (known to every worker from a side input).
    """

    def __init__(self, what: str, every: float = 10.0):
        self._what, self._every = what, every
        self._last = time.monotonic()

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            _LOG.info("%s: %d made by worker %d, of %d points in all", self._what, done,
                      os.getpid(), total)


def group_key(point: Point, block_size: int, groups: int = 1) -> tuple[int, int, int, int]:
    """(block x, y, z, sub-group): a block's points spread over `groups` groups by a hash."""
    sub = zlib.crc32(f"{point.segment_id}:{point.node_id}".encode()) % groups if groups > 1 else 0
    return (*block_of(point, block_size), sub)


def _point(element, keyed: bool) -> Point:
    return element[0] if keyed else element


class _KeyByGroupFn(beam.DoFn):
    """Checks each point and keys it by (block, sub-group); dense blocks get several groups."""

    def __init__(self, em_bounds: Box, segmentation_bounds: Box, block_size: int,
                 max_points_per_group: int, keyed: bool):
        self._bounds = (em_bounds, segmentation_bounds)
        self._block_size = block_size
        self._max = max_points_per_group
        self._keyed = keyed

    def process(self, element, dense: dict):
        point = _point(element, self._keyed)
        check_point(point, *self._bounds)
        count = dense.get(block_of(point, self._block_size), 0)
        yield group_key(point, self._block_size, -(-count // self._max)), element


class _CutFn(beam.DoFn):
    """Reads one group's EM and segmentation and yields (point, cutout) one at a time."""

    _COUNTERS = {"blocks_read": "blocks_read", "windows_read": "windows_read",
                 "bytes_decoded": "bytes_decoded", "chunk_bytes_decoded": "chunk_bytes_decoded",
                 "cutouts": "cutouts_emitted", "segment_absent": "cutouts_segment_absent",
                 "absent_chunks_em": "absent_chunks_em",
                 "absent_chunks_segmentation": "absent_chunks_segmentation_cutouts"}

    def __init__(self, em: Volume, segmentation: Volume, cutout_size: int, keyed: bool,
                 skip_absent: bool, max_absent_chunks: int):
        self._em, self._segmentation, self._cutout_size = em, segmentation, cutout_size
        self._keyed = keyed
        self._skip_absent, self._max_absent = skip_absent, max_absent_chunks

    def setup(self):
        self._reader = CutoutReader(self._em, self._segmentation, self._cutout_size,
                                    self._skip_absent, self._max_absent)
        self._counters = {field: beam.metrics.Metrics.counter("segclr", name)
                          for field, name in self._COUNTERS.items()}
        self._progress = Progress("cutouts")

    def process(self, element, total: int):
        yield from self._cut(element)
        self._progress.update(self._reader.stats.cutouts, total)

    def _cut(self, element):
        _, members = element
        before = dataclasses.replace(self._reader.stats)
        if self._keyed:
            values = dict(members)
            for point, cutout in self._reader.cutouts(values):
                yield (point, values[point]), cutout
        else:
            yield from self._reader.cutouts(members)
        for field, counter in self._counters.items():
            counter.inc(getattr(self._reader.stats, field) - getattr(before, field))


class MakeCutouts(beam.PTransform):
    """PCollection[Point] -> PCollection[(Point, uint8 cutout (z, y, x))], one per point.

    Points are keyed by spatial block and grouped, so each block's EM and segmentation are
    read once for all its points. A block with more than `max_points_per_group` points
    (counted in a light pre-pass) is spread by a hash of (segment, node) over groups of about
    that many points, so no worker holds or works through an unbounded group. Only points are
    shuffled; compose with the model directly (no shuffle after this transform), so each
    cutout is consumed in the stage that made it. A point outside both volumes fails the
    stage with PointOutsideError naming it. With `keyed`, elements are (Point, value) pairs
    (at most one per point) and come out as ((Point, value), cutout): a light value travels
    with its point to where the cutout is made. A point whose segment is absent from its
    window fails the stage, or with `skip_absent` is left out and counted; absent storage
    chunks are counted, and fail the stage past `max_absent_chunks` (see CutoutReader).
    """

    def __init__(self, em: Volume, segmentation: Volume, block_size: int = DEFAULT_BLOCK_SIZE,
                 cutout_size: int = DEFAULT_CUTOUT_SIZE,
                 max_points_per_group: int = DEFAULT_MAX_POINTS_PER_GROUP, keyed: bool = False,
                 skip_absent: bool = False, max_absent_chunks: int = 0):
        super().__init__()
        check_cutout_size(cutout_size)
        for name, value in (("block_size", block_size),
                            ("max_points_per_group", max_points_per_group)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value}")
        self._em, self._segmentation = em, segmentation
        self._block_size, self._cutout_size = block_size, cutout_size
        self._max = max_points_per_group
        self._keyed = keyed
        self._skip_absent, self._max_absent = skip_absent, max_absent_chunks

    def expand(self, points):
        block_size, limit, keyed = self._block_size, self._max, self._keyed
        dense = (points
                 | "BlockOf" >> beam.Map(lambda e: (block_of(_point(e, keyed), block_size), 1))
                 | "CountPerBlock" >> beam.CombinePerKey(sum)
                 | "DenseBlocks" >> beam.Filter(lambda block_count: block_count[1] > limit))
        total = points | "CountPoints" >> beam.combiners.Count.Globally()
        return (points
                | "KeyByGroup" >> beam.ParDo(
                    _KeyByGroupFn(self._em.bounds, self._segmentation.bounds, block_size, limit,
                                  keyed),
                    dense=beam.pvalue.AsDict(dense))
                | "GroupByBlock" >> beam.GroupByKey()
                | "Cut" >> beam.ParDo(_CutFn(self._em, self._segmentation, self._cutout_size,
                                             keyed, self._skip_absent, self._max_absent),
                                      total=beam.pvalue.AsSingleton(total)))
