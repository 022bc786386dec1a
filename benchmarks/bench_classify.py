"""`classify apply` against reading the tree alone: nodes per second per core.

A tree of random 64-d embeddings (2,000 segments of 50 nodes by default, 32 CSV-ZIP shards)
is written once; a plain and an SNGP classifier of the published size (hidden 128, 2 blocks,
2048 random features) are trained briefly on part of it. Then, on Beam's FnApiRunner with one worker:
- read: every shard file read and parsed into segments (what apply does before classifying);
- read+write: the same, and rows of as many columns as apply writes (the first columns of
  the embeddings standing in for probabilities and uncertainty) sharded by segment as apply
  shards them and written as CSV-ZIP: what apply costs without its classifier;
- plain, sngp: `classify apply` on the same tree (read, classify, write shards and summaries)
  with a plain classifier and with an SNGP one, whose posterior variance costs a product with
  the 2048 x 2048 covariance per node;
- sngp+layer: the SNGP one with the annotation layer of the nodes (`--annotations`).
Nodes per CPU second is the per-core rate (the process's CPU time, which a shared machine
disturbs less than wall time, also printed); the ratios to read and to read+write say what
classifying adds to the reading and to the writing.

    .venv/bin/python benchmarks/bench_classify.py [--segments 2000] [--nodes-per-segment 50]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import apache_beam as beam
import numpy as np

from segclr_beam import apply, classify
from segclr_beam.outputs import CoordinateSystem, WriteEmbeddings, write_csv_zip
from segclr_beam.reader import EmbeddingReader
from segclr_beam.records import EmbeddingTable, Point
from segclr_beam.runner import pipeline_options

DIM = 64
CLASSES = 4
ONE_WORKER = ["--direct_num_workers=1"]


def write_tree(root: str, segments: int, nodes: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, DIM)) * 2
    records = []
    for s in range(segments):
        centre = centres[s % CLASSES]
        xyz = rng.integers(0, 10000, size=(nodes, 3))
        for n in range(nodes):
            records.append((Point(s + 1, n, *xyz[n].tolist()),
                            (centre + rng.normal(size=DIM)).astype(np.float32)))
    model = {"model_id": "segclr-benchmark", "weights_sha256": "0" * 64}
    with beam.Pipeline(options=pipeline_options(ONE_WORKER)) as pipeline:
        _ = ({"agg10um": pipeline | beam.Create(records)}
             | WriteEmbeddings(root, {"agg10um": 10000.0},
                               coordinates=CoordinateSystem.voxels((32, 32, 33)),
                               num_shards=32, bytewidth=8, embedding_dim=DIM,
                               formats=("csv_zip",), model=model,
                               volumes={"bbox": [0, 0, 0, 10000, 10000, 10000]}))
    return f"{root}/agg10um"


class _Read(beam.DoFn):
    def __init__(self, tree: EmbeddingReader):
        self._tree = tree

    def process(self, path):
        yield sum(len(segment) for segment in self._tree.read_shard(path))


def read_only(tree_path: str) -> None:
    tree = EmbeddingReader(tree_path)
    with beam.Pipeline(options=pipeline_options(ONE_WORKER)) as pipeline:
        _ = (pipeline | beam.Create(tree.shard_paths()) | beam.Reshuffle()
             | beam.ParDo(_Read(tree)) | beam.CombineGlobally(sum))


class _ReadRows(beam.DoFn):
    """One shard file -> (shard, EmbeddingTable of `columns` columns) per segment."""

    def __init__(self, tree: EmbeddingReader, columns: int):
        self._tree, self._columns = tree, columns

    def process(self, path):
        for segment in self._tree.read_shard(path):
            yield self._tree.shard_of(segment.segment_id), EmbeddingTable(
                np.full(len(segment), segment.segment_id, np.uint64), segment.node_ids,
                self._tree.coordinates.to_voxels(segment.xyz),
                segment.embeddings[:, :self._columns])


def read_write(tree_path: str, columns: int, output: str) -> None:
    tree = EmbeddingReader(tree_path)

    def write(shard, tables):
        table = EmbeddingTable.concatenate(tables).sorted()
        write_csv_zip(f"{output}/{shard}.zip", table, tree.coordinates)
        return len(table)

    with beam.Pipeline(options=pipeline_options(ONE_WORKER)) as pipeline:
        _ = (pipeline | beam.Create(tree.shard_paths()) | beam.Reshuffle()
             | beam.ParDo(_ReadRows(tree, columns)) | beam.GroupByKey()
             | beam.MapTuple(write) | beam.CombineGlobally(sum))


def timed(function, *args) -> tuple[float, float]:
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic()
    function(*args)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime,
            time.monotonic() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--segments", type=int, default=2000)
    parser.add_argument("--nodes-per-segment", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        tree = write_tree(root, args.segments, args.nodes_per_segment)
        reader = EmbeddingReader(tree)
        x, y, g = [], [], []
        for segment in list(reader)[:400]:
            x.append(segment.embeddings)
            y += [f"class{segment.segment_id % CLASSES}"] * len(segment)
            g += [segment.segment_id] * len(segment)
        for sngp in (False, True):
            classify.train(np.concatenate(x), y, np.array(g), classify.ClassifierConfig(
                sngp=sngp, max_epochs=3), input=classify.tree_input(tree, reader.info)).save(
                f"{root}/{'sngp' if sngp else 'plain'}")
        nodes = args.segments * args.nodes_per_segment
        read_only(tree)  # warm caches and imports once
        os.makedirs(f"{root}/read-write")
        results = {"read": timed(read_only, tree),
                   "read+write": timed(read_write, tree, CLASSES + 1, f"{root}/read-write"),
                   "plain": timed(apply.run, tree, f"{root}/plain", f"{root}/plain-out",
                                  ONE_WORKER),
                   "sngp": timed(apply.run, tree, f"{root}/sngp", f"{root}/sngp-out",
                                 ONE_WORKER),
                   "sngp+layer": timed(apply.run, tree, f"{root}/sngp", f"{root}/layer",
                                       ONE_WORKER, apply.DEFAULT_BATCH_SIZE, False, True)}
    print(f"{nodes:,} nodes, {DIM}-d, 32 shards; classifiers hidden 128 x 2 blocks, SNGP with "
          f"2048 random features")
    for name, (cpu, wall) in results.items():
        print(f"  {name:10s} {nodes / cpu:10,.0f} nodes per CPU s   {nodes / wall:10,.0f} "
              f"nodes per wall s   (CPU {cpu:.1f} s, wall {wall:.1f} s)")
    for base in ("read", "read+write"):
        base_cpu, base_wall = results[base]
        for name in [n for n in results if n not in ("read", base)]:
            cpu, wall = results[name]
            print(f"{name} / {base}: CPU {cpu / base_cpu:.2f}x, wall {wall / base_wall:.2f}x")


if __name__ == "__main__":
    main()
