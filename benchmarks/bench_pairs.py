"""Candidate pairs of one large skeleton: segclr_beam.pairs against a search of the whole
skeleton graph from every batch of nodes.

One segment: a random tree of --vertices vertices ~100 nm apart (2e5: about 20 mm of cable,
a large neuron), branching at 1% of its vertices, sampled every 1.5 um; pairs within
1..5 um along the tree. The baseline runs scipy's Dijkstra from batches of nodes on the
whole graph (lengths [batch, vertices]); ours on the part of the graph within the longest
distance of each batch. Both must find the same pairs and lengths. Ratios use CPU time.

    .venv/bin/python benchmarks/bench_pairs.py [--vertices 200000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse.csgraph

from segclr_beam import pairs
from segclr_beam.points import sample_nodes

RESOLUTION = np.array([32.0, 32.0, 33.0])
MIN_NM, MAX_NM = 1000.0, 5000.0


def tree(vertices: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (nm, on the voxel grid) and edges of a random tree."""
    rng = np.random.default_rng(seed)
    jump = (rng.random(vertices - 1) < 0.01) * rng.integers(0, 1000, vertices - 1)
    parent = np.r_[0, np.clip(np.arange(vertices - 1) - jump, 0, None)]
    steps = rng.standard_normal((vertices, 3))
    steps *= 100.0 / np.linalg.norm(steps, axis=1, keepdims=True)
    position = np.zeros((vertices, 3))
    for v in range(1, vertices):
        position[v] = position[parent[v]] + steps[v]
    return np.rint(position / RESOLUTION) * RESOLUTION, np.c_[np.arange(1, vertices), parent[1:]]


def whole_graph(graph, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The baseline: every batch of nodes searched on the whole graph."""
    n = len(nodes)
    batch = max(1, (1 << 24) // graph.shape[0])
    found = []
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        lengths = scipy.sparse.csgraph.dijkstra(graph, directed=False, indices=nodes[rows],
                                                limit=MAX_NM)[:, nodes]
        i, j = np.nonzero((lengths >= MIN_NM) & (lengths <= MAX_NM)
                          & (np.arange(n) > rows[:, None]))
        found.append((rows[i], j, lengths[i, j]))
    return tuple(np.concatenate(c) for c in zip(*found))


def timed(function, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vertices", type=int, default=200_000)
    args = parser.parse_args()
    vertices, edges = tree(args.vertices)
    nodes = sample_nodes(vertices, edges, 1500.0)
    graph = pairs.skeleton_graph(vertices, edges)
    ours, ours_cpu, ours_wall = timed(pairs.candidate_pairs, graph, nodes, MIN_NM, MAX_NM)
    base, base_cpu, base_wall = timed(whole_graph, graph, nodes)
    order = np.lexsort((base[1], base[0]))
    same = all(np.array_equal(a, b[order]) for a, b in zip(ours[:2], base[:2]))
    if not same or not np.allclose(ours[2], base[2][order], rtol=0, atol=1e-6):
        raise SystemExit("the two searches disagree")
    print(f"{args.vertices} vertices, {len(nodes)} nodes, {len(ours[0])} candidate pairs")
    print(f"whole graph: {base_cpu:8.2f} s CPU ({base_wall:.2f} s wall)")
    print(f"near nodes:  {ours_cpu:8.2f} s CPU ({ours_wall:.2f} s wall)")
    print(f"ratio (whole / near, CPU): {base_cpu / ours_cpu:.1f}x")


if __name__ == "__main__":
    main()
