"""Radius means of one huge segment: segclr_beam.aggregate against cKDTree.query_pairs + sums.

One segment of 1e6 nodes, 64-d embeddings, R = 25 um, in two layouts of lines with nodes
1 um apart along them:
- tangle: 5,000 straight 200 um lines in random directions through a 1 mm cube (a merged
  object or glia spanning a volume), ~100 nodes within 25 um of a node;
- sheet: parallel lines 1 um apart in a plane, ~2,000 nodes within 25 um of a node. The
  baseline would hold ~1e9 pairs (> 16 GB) at 1e6 nodes, so here it runs on 1e5 nodes
  and both methods are compared on that size; ours also runs on the full 1e6.
Each method runs in its own subprocess, so peak memory (ru_maxrss) is its own; it includes
the inputs (24 MB positions + 256 MB float32 embeddings at 1e6 nodes) and the interpreter.
Both methods are single-threaded; ratios use CPU time, which a shared machine disturbs
less than wall time (also printed).

    .venv/bin/python benchmarks/bench_aggregate.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np

RADIUS_NM = 25000.0
DIM = 64
SAMPLE = 2000  # nodes whose outputs are compared between the methods


def tangle(n: int, rng: np.random.Generator) -> np.ndarray:
    length = 200
    starts = rng.uniform(0, 1e6, (n // length, 3))
    directions = rng.standard_normal((n // length, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    steps = np.arange(length) * 1000.0
    return (starts[:, None] + steps[None, :, None] * directions[:, None]).reshape(-1, 3)


def sheet(n: int, rng: np.random.Generator) -> np.ndarray:
    side = int(round(np.sqrt(n)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1)
    xy = grid.reshape(-1, 2) * 1000.0
    return np.concatenate([xy, np.zeros((len(xy), 1))], axis=1)


def ours(positions: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    from segclr_beam.aggregate import radius_means

    return radius_means(positions, embeddings, [RADIUS_NM])[RADIUS_NM]


def baseline(positions: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """All pairs from one cKDTree.query_pairs, summed with a symmetric sparse matrix."""
    from scipy import sparse
    from scipy.spatial import cKDTree

    n = len(positions)
    pairs = cKDTree(positions).query_pairs(RADIUS_NM, output_type="ndarray")
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
    del pairs
    within = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    del rows, cols
    embeddings = embeddings.astype(np.float64)
    sums = within @ embeddings + embeddings
    counts = np.diff(within.indptr) + 1.0
    return (sums / counts[:, None]).astype(np.float32)


def child(method: str, layout: str, n: int) -> None:
    rng = np.random.default_rng(0)
    positions = {"tangle": tangle, "sheet": sheet}[layout](n, rng)
    embeddings = rng.standard_normal((len(positions), DIM)).astype(np.float32)
    start, cpu = time.perf_counter(), time.process_time()
    means = {"ours": ours, "baseline": baseline}[method](positions, embeddings)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    sample = np.random.default_rng(1).choice(len(positions), SAMPLE, replace=False)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "n": len(positions),
                      "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                      "sample": means[sample].tolist()}))


def run(method: str, layout: str, n: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", method, layout, str(n)],
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{method} on {layout} ({n} nodes) failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(layout: str, n: int, compare: bool) -> None:
    def numbers(r: dict) -> str:
        return f"{r['cpu']:6.1f} s CPU ({r['seconds']:6.1f} s wall) {r['peak_gb']:5.2f} GB peak"

    a = run("ours", layout, n)
    line = f"{layout:6s} {a['n']:>9,d} nodes | ours {numbers(a)}"
    if compare:
        b = run("baseline", layout, n)
        diff = np.abs(np.array(a["sample"]) - np.array(b["sample"])).max()
        line += (f" | baseline {numbers(b)} | time ratio {a['cpu'] / b['cpu']:.2f}, memory "
                 f"ratio {a['peak_gb'] / b['peak_gb']:.2f}, max |diff| {diff:.1e}")
    print(line, flush=True)


def main() -> None:
    print(f"radius {RADIUS_NM:g} nm, {DIM}-d; ratios are ours / baseline (below 1 is better)")
    report("tangle", 1_000_000, compare=True)
    report("sheet", 100_000, compare=True)
    report("sheet", 1_000_000, compare=False)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
