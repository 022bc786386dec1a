"""The annotation layer's writer against the raw tree's writer on the same nodes.

100,000 nodes of 64-d embeddings in 2,000 segments spread through a 4096 x 4096 x 2048 voxel
box, 64 shards. Both run as one Beam job each on the in-process FnApiRunner, so the ratio is
the cost of writing the layer (colour fit, three sharded indexes) relative to writing the
release formats (CSV-ZIP and TFRecord) of the same records. CPU and wall seconds are printed.

    .venv/bin/python benchmarks/bench_annotations.py
"""

from __future__ import annotations

import tempfile
import time

import apache_beam as beam
import numpy as np

from segclr_beam import annotations, outputs
from segclr_beam.records import Point
from segclr_beam.volume import Box

NODES, SEGMENTS, DIM, NUM_SHARDS = 100_000, 2_000, 64, 64
BOX = Box((0, 0, 0), (4096, 4096, 2048))
RESOLUTION = (32.0, 32.0, 33.0)


def records() -> list:
    rng = np.random.default_rng(0)
    segment_ids = rng.integers(1, 2**63, SEGMENTS)
    segments = np.sort(rng.integers(0, SEGMENTS, NODES))
    starts = rng.integers(BOX.start, np.subtract(BOX.stop, 200), (SEGMENTS, 3))
    xyz = starts[segments] + rng.integers(0, 200, (NODES, 3))
    embeddings = rng.standard_normal((NODES, DIM)).astype(np.float32)
    return [(Point(int(segment_ids[s]), k, *map(int, p)), e)
            for k, (s, p, e) in enumerate(zip(segments, xyz, embeddings))]


def run(write: beam.PTransform, data: list) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    with beam.Pipeline(runner="FnApiRunner") as p:
        _ = p | beam.Create(data, reshuffle=False) | write
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    data = records()
    with tempfile.TemporaryDirectory() as root:
        layer = annotations.Layer(RESOLUTION, BOX, DIM, NUM_SHARDS)
        ours = run(annotations.WriteAnnotations(f"{root}/a", layer), data)
        tree = outputs.WriteEmbeddings(f"{root}/b", {"raw": None},
                                       coordinates=outputs.CoordinateSystem.voxels(RESOLUTION),
                                       num_shards=NUM_SHARDS, bytewidth=8, embedding_dim=DIM)
        baseline = run(_Raw(tree), data)
    print(f"{NODES} nodes, {DIM}-d, {NUM_SHARDS} shards")
    print(f"annotation layer  wall {ours[0]:6.1f} s  cpu {ours[1]:6.1f} s  "
          f"{NODES / ours[0]:8.0f} nodes/s")
    print(f"raw tree          wall {baseline[0]:6.1f} s  cpu {baseline[1]:6.1f} s  "
          f"{NODES / baseline[0]:8.0f} nodes/s")
    print(f"ratio (layer / raw tree), wall: {ours[0] / baseline[0]:.2f}, "
          f"cpu: {ours[1] / baseline[1]:.2f}")


class _Raw(beam.PTransform):
    """The records as the `raw` input of a WriteEmbeddings."""

    def __init__(self, write: outputs.WriteEmbeddings):
        super().__init__()
        self._write = write

    def expand(self, records):
        return {"raw": records} | self._write


if __name__ == "__main__":
    main()
