"""Radius aggregation: each node's embedding averaged over the nearby nodes of its segment.

For every node and radius R, the mean embedding of all nodes of the same segment whose
Euclidean distance (nm) is at most R, the node itself included. Cell-type and
subcompartment classifiers use these 10 um and 25 um means.

The exact ball sums are computed on a grid of cells of side R / 6. Pairs of cells that lie
entirely within R of each other contribute their precomputed cell sums; for pairs that
straddle the ball boundary each node is tested against the other cell's bounding box, and
only the node-cell pairs that still straddle it are resolved node by node. Work proceeds in
chunks of query cells with a bounded number of pairs, so beyond the O(N x D) arrays of the
segment itself memory stays O(chunk), even for a segment of a million nodes (glia, merge
errors) with hundreds of millions of neighbour pairs.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from segclr_beam.records import EmbeddingTable, Point, variant_name

DEFAULT_RADII_NM = (10000.0, 25000.0)
# Grid cell side as a fraction of the radius: finer cells leave fewer node pairs to test at
# the ball boundary but enumerate more cell pairs. R / 6 is the best compromise between a
# sparse (tangled cable) and a dense (sheet) million-node segment in
# benchmarks/bench_aggregate.py; R / 4 and R / 8 each lose up to ~1.5x on one of them.
_CELLS_PER_RADIUS = 6
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
        _check_radius(r)
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    return {r: _ball_means(positions, embeddings, r, max_pairs) for r in radii}


def _check_radius(radius: float) -> None:
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"every radius must be > 0 and finite, got {radius}")


def check_radii(radii_nm: Sequence[float]) -> tuple[float, ...]:
    """The radii of a run as floats; ValueError unless there is at least one, each positive
    and finite, and no two name the same output variant."""
    radii = tuple(float(r) for r in radii_nm)
    if not radii:
        raise ValueError("at least one aggregation radius is needed")
    for r in radii:
        _check_radius(r)
    names = [variant_name(r) for r in radii]
    if len(set(names)) != len(names):
        raise ValueError(f"radii must be distinct, got duplicates in {radii}")
    return radii


def _ranges(weights: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive [a, b) slices of `weights` summing to at most `budget` (or one item)."""
    ends = np.cumsum(weights)
    a = 0
    while a < len(weights):
        before = ends[a - 1] if a else 0
        b = max(a + 1, int(np.searchsorted(ends, before + budget, side="right")))
        yield a, b
        a = b


def _runs(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs of the given sizes laid end to end: each element's run and offset in it."""
    run = np.repeat(np.arange(len(sizes)), sizes)
    return run, np.arange(len(run)) - np.repeat(np.cumsum(sizes) - sizes, sizes)


# Squared distances between axis-aligned boxes (nodes are boxes with lo == hi), from
# coordinate columns [3, M] gathered with take (much faster than gathering [M, 3] rows).
# All use one order of operations, ((dx^2 + dy^2) + dz^2), so by monotone rounding a box
# pair judged within R holds no node pair the node-level test would judge outside, and a
# box pair judged beyond R none it would judge within.

def _far2(lo_a, hi_a, a, lo_b, hi_b, b) -> np.ndarray:
    """Squared largest distance between points of boxes a and b."""
    total = None
    for k in range(3):
        d = np.maximum(hi_b[k].take(b) - lo_a[k].take(a), hi_a[k].take(a) - lo_b[k].take(b))
        total = d * d if total is None else total + d * d
    return total


def _near2(lo_a, hi_a, a, lo_b, hi_b, b) -> np.ndarray:
    """Squared smallest distance between points of boxes a and b."""
    total = None
    for k in range(3):
        d = np.maximum(np.maximum(lo_b[k].take(b) - hi_a[k].take(a),
                                  lo_a[k].take(a) - hi_b[k].take(b)), 0.0)
        total = d * d if total is None else total + d * d
    return total


def _node_d2(xyz, a, b) -> np.ndarray:
    """Squared distance between nodes a and b (equal to _far2 of their degenerate boxes)."""
    total = None
    for k in range(3):
        d = xyz[k].take(b) - xyz[k].take(a)
        total = d * d if total is None else total + d * d
    return total


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
    starts = np.flatnonzero(np.r_[True, np.any(cells[1:] != cells[:-1], axis=1)])
    del cells
    counts = np.diff(np.r_[starts, n])
    num_cells = len(starts)
    xyz = np.ascontiguousarray(positions[order].T)  # [3, N]
    lo = np.minimum.reduceat(xyz, starts, axis=1)
    hi = np.maximum.reduceat(xyz, starts, axis=1)
    emb = np.empty((n, dim), np.float64)
    step = max(1, max_pairs // dim)
    for a in range(0, n, step):  # Gather in slices: no full-size float32 temporary.
        emb[a:a + step] = embeddings[order[a:a + step]]
    members = sparse.csr_matrix((np.ones(n), np.arange(n), np.r_[starts, n]),
                                shape=(num_cells, n))
    cell_sums = members @ emb
    cell_counts = counts.astype(np.float64)
    del members

    # Two cells can hold a node pair within R only if their bounding-box centres are within
    # R plus both half-diagonals; the exact tests on the boxes follow.
    centres = (lo + hi).T / 2
    reach = (radius + np.sqrt(((hi - lo) ** 2).sum(0)).max()) * (1 + 1e-9) + 1e-6
    tree = cKDTree(centres)
    cell_pairs = tree.query_ball_point(centres, reach, return_length=True)

    for q0, q1 in _ranges(np.maximum(cell_pairs, counts * dim), max_pairs):
        p0, p1 = starts[q0], starts[q1 - 1] + counts[q1 - 1]
        found = cKDTree(centres[q0:q1]).sparse_distance_matrix(tree, reach, output_type="ndarray")
        q, c = found["i"] + q0, found["j"]
        del found
        inside = _far2(lo, hi, q, lo, hi, c) <= r2
        straddle = ~inside & (_near2(lo, hi, q, lo, hi, c) <= r2)

        # Cells entirely within R of each other: every node of q gets the sum of cell c.
        within = sparse.csr_matrix((np.ones(inside.sum()), (q[inside] - q0, c[inside])),
                                   shape=(q1 - q0, num_cells))
        node_cell = np.repeat(np.arange(q1 - q0), counts[q0:q1])
        sums = (within @ cell_sums)[node_cell]
        totals = (within @ cell_counts)[node_cell]
        del within, node_cell

        # Straddling cell pairs: each node of q against the box of c, then node by node.
        q, c = q[straddle], c[straddle]
        sizes = counts[q]
        for a, b in _ranges(sizes, max_pairs):
            run, offset = _runs(sizes[a:b])
            i, j = starts[q[a:b]].take(run) + offset, c[a:b].take(run)
            whole = _far2(xyz, xyz, i, lo, hi, j) <= r2
            part = ~whole & (_near2(xyz, xyz, i, lo, hi, j) <= r2)
            nodes_cells = sparse.csr_matrix((np.ones(whole.sum()), (i[whole] - p0, j[whole])),
                                            shape=(p1 - p0, num_cells))
            sums += nodes_cells @ cell_sums
            totals += nodes_cells @ cell_counts
            del nodes_cells
            i, j = i[part], j[part]
            part_sizes = counts[j]
            for e, f in _ranges(part_sizes, max_pairs):
                run, offset = _runs(part_sizes[e:f])
                u, v = i[e:f].take(run), starts[j[e:f]].take(run) + offset
                hit = _node_d2(xyz, u, v) <= r2
                u, v = u[hit] - p0, v[hit]
                sums += sparse.csr_matrix((np.ones(len(u)), (u, v)), shape=(p1 - p0, n)) @ emb
                totals += np.bincount(u, minlength=p1 - p0)
        out[order[p0:p1]] = sums / totals[:, None]
    return out


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
        self._resolution = resolution
        self._radii = check_radii(radii_nm)

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
        self._segments.inc()
        self._nodes.inc(len(table))
        for radius in self._radii:
            name = variant_name(radius)
            means = radius_means(positions, table.embeddings, [radius])[radius]
            for point, row in zip(table.points(), means):
                yield beam.pvalue.TaggedOutput(name, (point, row))
