"""Cutouts: block-grouped reads against one concurrent TensorStore read per cutout.

On the synthetic dataset at its default size (jpeg EM, compressed_segmentation, 64^3 chunks)
with points at the default 1.5 um sampling, measures in one run, each variant in a fresh
process:
- cutouts per second (every cutout made and released, as the model stage would), the
  fastest of --repeat runs, since the machine may be shared;
- IO amplification = bytes decoded / bytes of cutouts delivered, where bytes decoded is the
  voxels of EM and segmentation arrays materialised from storage (inside the volume bounds)
  times their bytes per voxel (1 for uint8 EM, 8 for uint64 segmentation); also the same
  ratio for whole storage chunks, which is what the codecs decode without a chunk cache;
- peak memory: the process's peak resident set (VmHWM, reset before the reads) minus its
  resident set before the reads.

The baseline reads each cutout's window from EM and segmentation concurrently with the
default TensorStore context (no chunk cache, like the grouped reader), masks it with numpy
and lays it out (z, y, x). A chunk cache would make the baseline cheaper here only because
this whole volume fits in it; on a real dataset, points reach a worker in shuffle order
from anywhere in a volume thousands of times larger than its cache. The cached baseline is
printed for reference, not as the target.

Points: one per segment per 1.5 um cube (47 x 47 x 45 voxels) that the segment occupies, at
the segment's voxel nearest the centre of its voxels there. A neurite crossing a cube has
about 1.5 um of cable inside, so this approximates the skeleton sampling of one point per
1.5 um of cable, without minutes of skeletonization. It errs on the sparse side, which only
raises amplification: on the default dataset (seed 0) it gives 2331 points, while kimimaro
skeletons of the same volume (before cleaning) sampled every 1.5 um give 4297 (neurites and
somata: 1250 from cubes, 835 from skeletons; glia: 1081 from cubes, 3462 from skeletons).

    make bench, or: PYTHONPATH=. .venv/bin/python benchmarks/bench_cutouts.py [--repeat 3] ...
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorstore as ts

from segclr_beam import synth
from segclr_beam.cutouts import (DEFAULT_BLOCK_SIZE, DEFAULT_CUTOUT_SIZE,
                                 DEFAULT_MAX_POINTS_PER_GROUP, CutoutReader, CutoutStats,
                                 MakeCutouts, block_of, group_key, window_of)
from segclr_beam.records import Point
from segclr_beam.volume import open_volumes

SPACING_NM = 1500.0
CACHE_BYTES = 1 << 30


def sample_points(segmentation_path: str, resolution, spacing_nm: float = SPACING_NM
                  ) -> list[Point]:
    """One point per (segment, spacing-sized cube) pair: the member voxel nearest their mean."""
    cell = np.maximum(1, np.round(spacing_nm / np.asarray(resolution))).astype(np.int64)
    store = ts.open({"driver": "neuroglancer_precomputed",
                     "kvstore": f"file://{segmentation_path}/"}).result()[..., 0]
    points = []
    for z0 in range(0, store.shape[2], cell[2]):  # one slab of cubes at a time
        labels = store[:, :, z0:min(z0 + cell[2], store.shape[2])].read().result()
        xyz = np.stack(np.nonzero(labels), axis=1)
        segment = labels[tuple(xyz.T)]
        cube = (xyz // cell) @ np.array([1 << 20, 1 << 10, 1])
        order = np.lexsort((cube, segment))
        xyz, segment, cube = xyz[order], segment[order], cube[order]
        new = np.r_[True, (segment[1:] != segment[:-1]) | (cube[1:] != cube[:-1])]
        start, group = np.flatnonzero(new), np.cumsum(new) - 1
        mean = np.add.reduceat(xyz, start) / np.diff(np.r_[start, len(xyz)])[:, None]
        distance = ((xyz - mean[group]) ** 2).sum(axis=1)
        nearest = distance == np.minimum.reduceat(distance, start)[group]
        chosen = np.flatnonzero(nearest)
        chosen = chosen[np.r_[True, group[chosen][1:] != group[chosen][:-1]]]
        points += [Point(int(segment[i]), len(points) + k, int(xyz[i, 0]), int(xyz[i, 1]),
                         int(xyz[i, 2]) + z0) for k, i in enumerate(chosen)]
    return points


def _memory(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    """Reset the peak resident set (VmHWM) to the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _baseline(em, segmentation, points, size) -> CutoutStats:
    stats, accounting = CutoutStats(), CutoutReader(em, segmentation, size)
    for point in points:
        window = window_of(point, size)
        em_read, seg_read = em.read_async(window), segmentation.read_async(window)
        em_window, seg_window = em_read.result(), seg_read.result()
        mask = seg_window == np.uint64(point.segment_id)
        cutout = np.ascontiguousarray((em_window * mask).T)
        stats.bytes_decoded += sum(window.intersect(v.bounds).size * v.dtype.itemsize
                                   for v in (em, segmentation))
        stats.chunk_bytes_decoded += accounting.chunk_bytes([window])
        stats.cutouts += 1
        del cutout
    return stats


def _grouped(em, segmentation, points, size, block_size, max_points) -> CutoutStats:
    """The grouping MakeCutouts does, without Beam: count per block, key, group, cut."""
    counts = collections.Counter(block_of(p, block_size) for p in points)
    groups = collections.defaultdict(list)
    for point in points:
        groups[group_key(point, block_size,
                         -(-counts[block_of(point, block_size)] // max_points))].append(point)
    reader = CutoutReader(em, segmentation, size)
    for key in sorted(groups):
        for _, cutout in reader.cutouts(groups[key]):
            del cutout
    return reader.stats


def _beam(em, segmentation, points, size, block_size, max_points) -> CutoutStats:
    """MakeCutouts on the local runner, each cutout consumed in the stage that made it."""
    import apache_beam as beam

    pipeline = beam.Pipeline(runner="FnApiRunner")
    _ = (pipeline
         | beam.Create(points, reshuffle=False)
         | MakeCutouts(em, segmentation, block_size, size, max_points)
         | beam.MapTuple(lambda point, cutout: int(cutout[size // 2, size // 2, size // 2]))
         | beam.combiners.Count.Globally())
    result = pipeline.run()
    result.wait_until_finish()
    found = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    return CutoutStats(found["blocks_read"], found["windows_read"], found["bytes_decoded"],
                       found["chunk_bytes_decoded"], found["cutouts_emitted"],
                       found["cutouts_segment_absent"])


def _measure(variant: dict, dataset: synth.Dataset, points: list[Point], size: int, queue):
    em_spec, seg_spec = dataset.em, dataset.segmentation
    if variant.get("cache"):
        context = {"cache_pool": {"total_bytes_limit": CACHE_BYTES}}
        em_spec, seg_spec = ({"driver": "neuroglancer_precomputed", "kvstore": f"file://{p}/",
                              "context": context} for p in (em_spec, seg_spec))
    em, segmentation = open_volumes(em_spec, seg_spec)
    em.store, segmentation.store  # open before measuring
    _reset_peak()
    before = _memory("VmRSS")
    start = time.perf_counter()
    if variant["kind"] == "baseline":
        stats = _baseline(em, segmentation, points, size)
    else:
        run = _grouped if variant["kind"] == "grouped" else _beam
        stats = run(em, segmentation, points, size, variant["block_size"], variant["max_points"])
    seconds = time.perf_counter() - start
    queue.put({"stats": stats, "seconds": seconds, "peak": _memory("VmHWM") - before})


def measure(variant, dataset, points, size, repeat: int) -> dict:
    """Run one variant `repeat` times, each in a fresh process so that its peak memory is its
    own; the fastest run and the largest peak (the machine may be shared)."""
    context = multiprocessing.get_context("spawn")
    runs = []
    for _ in range(repeat):
        queue = context.Queue()
        process = context.Process(target=_measure, args=(variant, dataset, points, size, queue))
        process.start()
        runs.append(queue.get())
        process.join()
    best = min(runs, key=lambda run: run["seconds"])
    return {**best, "peak": max(run["peak"] for run in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split(",")),
                        default=None, help="X,Y,Z voxels (default: the synthetic default)")
    parser.add_argument("--cutout-size", type=int, default=DEFAULT_CUTOUT_SIZE)
    parser.add_argument("--block-sizes", default="64,128,256,512")
    parser.add_argument("--max-points", type=int, default=DEFAULT_MAX_POINTS_PER_GROUP)
    parser.add_argument("--baseline-points", type=int, default=120,
                        help="random subset of points the (slow) baselines cut")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per variant; the fastest counts")
    parser.add_argument("--sparser", default="0.5,0.25,0.005",
                        help="also run the default block size on these fractions of the points")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dataset = synth.write_dataset(Path(tmp) / "synthetic", shape=args.shape)
        print(synth.summarize(dataset))
        print(f"  written in {time.perf_counter() - start:.0f} s")
        points = sample_points(dataset.segmentation, synth.RESOLUTION)
        volume_um3 = np.prod(np.array(dataset.shape) * synth.RESOLUTION) / 1e9
        print(f"{len(points)} points at 1.5 um sampling ({len(points) / volume_um3:.2f} per um^3), "
              f"{len({p.segment_id for p in points})} segments; cutouts {args.cutout_size}^3")
        cutout_bytes = args.cutout_size ** 3
        rng = np.random.default_rng(0)
        subset = [points[i] for i in rng.choice(len(points), min(args.baseline_points,
                                                                  len(points)), replace=False)]
        rows = [("baseline: one read per cutout", {"kind": "baseline"}, subset),
                ("baseline + 1 GiB chunk cache", {"kind": "baseline", "cache": True}, subset)]
        block_sizes = [int(b) for b in args.block_sizes.split(",")]
        for block_size in block_sizes:
            rows.append((f"grouped, block {block_size}", {"kind": "grouped",
                         "block_size": block_size, "max_points": args.max_points}, points))
        default = {"block_size": DEFAULT_BLOCK_SIZE, "max_points": args.max_points}
        rows.append((f"MakeCutouts on FnApiRunner, block {DEFAULT_BLOCK_SIZE}",
                     {"kind": "beam", **default}, points))
        for fraction in (float(f) for f in args.sparser.split(",") if f):
            kept = [points[i] for i in np.sort(rng.choice(
                len(points), int(len(points) * fraction), replace=False))]
            rows.append((f"grouped, block {DEFAULT_BLOCK_SIZE}, {fraction:g} of the points",
                         {"kind": "grouped", **default}, kept))

        print(f"\n{'variant':<40}{'cutouts':>8}{'cut/s':>9}{'reads':>10}{'amplif.':>9}"
              f"{'chunk amp.':>11}{'peak MB':>9}")
        results = {}
        for name, variant, chosen in rows:
            found = measure(variant, dataset, chosen, args.cutout_size, args.repeat)
            stats = found["stats"]
            delivered = stats.cutouts * cutout_bytes
            rate = stats.cutouts / found["seconds"]
            results[name] = rate, stats.bytes_decoded / delivered
            reads = (f"{stats.cutouts} w" if variant["kind"] == "baseline"
                     else f"{stats.blocks_read} b+{stats.windows_read} w")
            print(f"{name:<40}{stats.cutouts:>8}{rate:>9.1f}{reads:>10}"
                  f"{stats.bytes_decoded / delivered:>9.3f}"
                  f"{stats.chunk_bytes_decoded / delivered:>11.3f}{found['peak'] / 2**20:>9.0f}")

        base_rate = results["baseline: one read per cutout"][0]
        rate, amplification = results[f"grouped, block {DEFAULT_BLOCK_SIZE}"]
        print(f"\ndefault (block {DEFAULT_BLOCK_SIZE}): {rate / base_rate:.1f}x the baseline's "
              f"cutouts per second (target >= 4), amplification {amplification:.3f} "
              f"(target <= 0.5)")


if __name__ == "__main__":
    main()
