"""Radius aggregation: each node's embedding averaged over the nearby nodes of its segment.

For every node and radius R, the mean embedding of all nodes of the same segment whose
Euclidean distance (nm) is at most R, the node itself included. Cell-type and
subcompartment classifiers use these 10 um and 25 um means.

The exact ball sums are computed on a grid of cells of side R / 8. Pairs of cells that lie
entirely within R of each other contribute their precomputed cell sums; only pairs that
straddle the ball boundary are resolved node by node. Work proceeds in chunks of query
cells with a bounded number of pairs, so memory stays O(chunk) even for a segment of a
million nodes (glia, merge errors) where the number of neighbour pairs is in the hundreds
of millions.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from segclr_beam.outputs import EmbeddingTable, variant_name
from segclr_beam.points import Point

DEFAULT_RADII_NM = (10000.0, 25000.0)
# Grid cell side as a fraction of the radius: finer cells resolve fewer boundary node pairs
# but enumerate more cell pairs; 1/8 was fastest on both sparse (tangled cable) and dense
# (sheet) million-node segments in benchmarks/bench_aggregate.py.
_CELLS_PER_RADIUS = 8
# Upper bound on the cell or node pairs (and accumulator rows x dim) held at once.
DEFAULT_MAX_PAIRS = 1 << 21


def radius_means(positions_nm: np.ndarray, embeddings: np.ndarray,
                 radii_nm: Sequence[float] = DEFAULT_RADII_NM, *,
                 max_pairs: int = DEFAULT_MAX_PAIRS) -> dict[float, np.ndarray]:
    """Per node, the mean embedding of the nodes within each radius (distance <= R, in nm).

    Args:
      positions_nm: float [N, 3] node positions of one segment in nm.
      embeddings: float32 [N, D] node embeddings.
      radii_nm: the radii; each must be positive and finite.
      max_pairs: memory knob, the number of cell or node pairs processed at once.

    Returns:
      {radius: float32 [N, D]} in the order of `radii_nm`; sums accumulate in float64.
    """
    positions = np.asarray(positions_nm, dtype=np.float64)
    embeddings = np.asarray(embeddings)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions_nm must have shape [N, 3], got {positions.shape}")
    if embeddings.ndim != 2 or len(embeddings) != len(positions):
        raise ValueError(f"embeddings must have shape [{len(positions)}, D] to match "
                         f"positions_nm, got {embeddings.shape}")
    if not np.isfinite(positions).all():
        raise ValueError("positions_nm contains NaN or infinite values")
    radii = [float(r) for r in radii_nm]
    for r in radii:
        if not (np.isfinite(r) and r > 0):
            raise ValueError(f"aggregation radius must be positive and finite, got {r}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    return {r: _ball_means(positions, embeddings, r, max_pairs) for r in radii}


def _squared_norm(d: np.ndarray) -> np.ndarray:
    """Row-wise squared length of [K, 3] differences, in one fixed order of operations.

    The same expression bounds cell pairs and measures node pairs, so monotone rounding
    guarantees that a cell pair judged inside (or outside) the ball holds no node pair that
    the node-level test would judge otherwise.
    """
    return d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]


def _ranges(weights: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive [a, b) slices of `weights` summing to at most `budget` (or one item)."""
    ends = np.cumsum(weights)
    a = 0
    while a < len(weights):
        before = ends[a - 1] if a else 0
        b = max(a + 1, int(np.searchsorted(ends, before + budget, side="right")))
        yield a, b
        a = b


def _ball_means(positions: np.ndarray, embeddings: np.ndarray, radius: float,
                max_pairs: int) -> np.ndarray:
    n, dim = embeddings.shape
    out = np.empty((n, dim), np.float32)
    if n == 0:
        return out
    r2 = radius * radius

    # Nodes sorted by grid cell: each occupied cell is a contiguous run [start, start+count).
    cells = np.floor(positions / (radius / _CELLS_PER_RADIUS)).astype(np.int64)
    order = np.lexsort(cells.T[::-1])
    cells = cells[order]
    pos = positions[order]
    emb = np.empty((n, dim), np.float64)
    step = max(1, max_pairs // dim)
    for a in range(0, n, step):  # Gather in slices: no full-size float32 temporary.
        emb[a:a + step] = embeddings[order[a:a + step]]
    starts = np.flatnonzero(np.r_[True, np.any(cells[1:] != cells[:-1], axis=1)])
    del cells
    counts = np.diff(np.r_[starts, n])
    ends = starts + counts
    lo = np.minimum.reduceat(pos, starts)
    hi = np.maximum.reduceat(pos, starts)
    cell_sums = np.add.reduceat(emb, starts)

    # Two cells can hold a node pair within R only if their bounding-box centres are within
    # R plus both half-diagonals; the exact test on the boxes follows.
    centres = (lo + hi) / 2
    reach = (radius + np.sqrt(_squared_norm(hi - lo)).max()) * (1 + 1e-9) + 1e-6
    tree = cKDTree(centres)
    cell_pairs = tree.query_ball_point(centres, reach, return_length=True)

    for q0, q1 in _ranges(np.maximum(cell_pairs, counts * dim), max_pairs):
        found = cKDTree(centres[q0:q1]).sparse_distance_matrix(tree, reach, output_type="ndarray")
        q, c = found["i"] + q0, found["j"]
        del found
        far = _squared_norm(np.maximum(hi[c] - lo[q], hi[q] - lo[c]))
        near = _squared_norm(np.maximum(np.maximum(lo[c] - hi[q], lo[q] - hi[c]), 0.0))
        inside = far <= r2
        straddle = ~inside & (near <= r2)

        # Cell pairs entirely within R: add whole cell sums to every node of the query cell.
        within = sparse.csr_matrix((np.ones(inside.sum()), (q[inside] - q0, c[inside])),
                                   shape=(q1 - q0, len(starts)))
        node_cell = np.repeat(np.arange(q1 - q0), counts[q0:q1])
        sums = (within @ cell_sums)[node_cell]
        totals = (within @ counts.astype(np.float64))[node_cell]
        del within

        # Straddling cell pairs: test every node pair, a bounded batch at a time.
        p0, p1 = starts[q0], ends[q1 - 1]
        sq, sc = q[straddle], c[straddle]
        sizes = counts[sq] * counts[sc]
        for a, b in _ranges(sizes, max_pairs):
            i, j = _node_pairs(starts, counts, sq[a:b], sc[a:b], sizes[a:b])
            hit = _squared_norm(pos[i] - pos[j]) <= r2
            i, j = i[hit] - p0, j[hit]
            sums += sparse.csr_matrix((np.ones(len(i)), (i, j)), shape=(p1 - p0, n)) @ emb
            totals += np.bincount(i, minlength=p1 - p0)
        out[order[p0:p1]] = sums / totals[:, None]
    return out


def _node_pairs(starts: np.ndarray, counts: np.ndarray, q_cells: np.ndarray,
                c_cells: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (node in query cell, node in other cell) index pairs of the given cell pairs."""
    pair = np.repeat(np.arange(len(sizes)), sizes)
    offset = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    width = counts[c_cells][pair]
    return (starts[q_cells][pair] + offset // width,
            starts[c_cells][pair] + offset % width)


class AggregateEmbeddings(beam.PTransform):
    """(Point, embedding) records -> {variant name: (Point, radius-mean embedding) records}.

    Groups by segment; the group values are light (a Point and D floats), and the per-segment
    work is `radius_means` on arrays, so a million-node segment costs a few hundred MB.
    """

    def __init__(self, resolution_nm: Sequence[float],
                 radii_nm: Sequence[float] = DEFAULT_RADII_NM):
        super().__init__()
        resolution = tuple(float(v) for v in resolution_nm)
        if len(resolution) != 3 or not all(np.isfinite(v) and v > 0 for v in resolution):
            raise ValueError(f"resolution_nm must be three positive numbers (x, y, z), "
                             f"got {tuple(resolution_nm)}")
        radii = tuple(float(r) for r in radii_nm)
        if not radii:
            raise ValueError("radii_nm must name at least one aggregation radius")
        for r in radii:
            if not (np.isfinite(r) and r > 0):
                raise ValueError(f"aggregation radius must be positive and finite, got {r}")
        names = [variant_name(r) for r in radii]
        if len(set(names)) != len(names):
            raise ValueError(f"radii_nm has duplicates: {radii}")
        self._resolution = resolution
        self._radii = radii

    def expand(self, records):
        names = [variant_name(r) for r in self._radii]
        results = (records
                   | "KeyBySegment" >> beam.Map(lambda record: (record[0].segment_id, record))
                   | "GroupBySegment" >> beam.GroupByKey()
                   | "RadiusMeans" >> beam.ParDo(
                       _AggregateSegment(self._resolution, self._radii)).with_outputs(*names))
        return {name: results[name] for name in names}


class _AggregateSegment(beam.DoFn):
    def __init__(self, resolution_nm: tuple[float, float, float], radii_nm: tuple[float, ...]):
        self._resolution = np.asarray(resolution_nm, np.float64)
        self._radii = radii_nm
        self._segments = beam.metrics.Metrics.counter("segclr", "segments_aggregated")
        self._nodes = beam.metrics.Metrics.counter("segclr", "nodes_aggregated")

    def process(self, element: tuple[int, Iterable[tuple[Point, np.ndarray]]]):
        segment_id, records = element
        table = EmbeddingTable.from_records(records)
        positions = table.xyz * self._resolution
        nodes = table.node_ids.tolist()
        xyz = table.xyz.tolist()
        self._segments.inc()
        self._nodes.inc(len(nodes))
        for radius in self._radii:
            means = radius_means(positions, table.embeddings, [radius])[radius]
            name = variant_name(radius)
            for k, node_id in enumerate(nodes):
                yield beam.pvalue.TaggedOutput(
                    name, (Point(segment_id, node_id, *xyz[k]), means[k]))
