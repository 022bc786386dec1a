"""Skeletonization: chunked kimimaro in Beam against kimimaro on the whole volume.

On the synthetic dataset at its default size, both sides go from the segmentation on disk to
sample points (segments of >= 1,000 voxels, a point every 1.5 um) with the same TEASAR
parameters and the same cleaning and sampling:
- baseline: read the whole volume, kimimaro.skeletonize(parallel=2), clean and sample each
  segment in the same process;
- chunked: the SkeletonizeSegments transform (chunks of --chunk-size voxels) writing the
  points as Avro, on the local FnApiRunner with two worker processes.
Each side runs in a fresh child process. Measured: wall time of the child, and peak memory
as the largest proportional set size (PSS: shared pages split between the processes sharing
them) summed over the child's process tree, sampled every 0.5 s; the peak resident set of
the largest single process (getrusage) is printed as well. The machine may be shared, so
the numbers are noisy; --repeat keeps the fastest run of each side.

    .venv/bin/python benchmarks/bench_skeleton.py [--chunk-size 128] [--repeat 1]
        [--data DATASET | --shape X,Y,Z]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

RESOLUTION = (32.0, 32.0, 33.0)


def run_baseline(segmentation_path: str) -> dict:
    import kimimaro

    from segclr_beam.points import skeleton_points
    from segclr_beam.skeleton import SkeletonOptions, clean_skeleton
    from segclr_beam.volume import open_volume

    options = SkeletonOptions()
    segmentation = open_volume(segmentation_path, "segmentation", RESOLUTION)
    labels = segmentation.read(segmentation.bounds)
    start = time.perf_counter()
    skeletons = kimimaro.skeletonize(
        labels, teasar_params=options.teasar.to_kimimaro(), anisotropy=RESOLUTION,
        dust_threshold=options.min_voxels - 1, fix_branching=options.fix_branching,
        progress=False, parallel=2)
    traced = time.perf_counter() - start
    points = [p for i, s in skeletons.items()
              for p in skeleton_points(i, clean_skeleton(s, options), RESOLUTION,
                                       options.spacing_nm)]
    return {"points": len(points), "segments": len(skeletons), "kimimaro_seconds": traced}


def run_chunked(segmentation_path: str, out: str, chunk_size: int, workers: int) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from segclr_beam.points import WritePoints, read_points
    from segclr_beam.skeleton import SkeletonizeSegments, SkeletonOptions
    from segclr_beam.volume import open_volume

    segmentation = open_volume(segmentation_path, "segmentation", RESOLUTION)
    options = PipelineOptions([], direct_num_workers=workers,
                              direct_running_mode="multi_processing")
    path = str(Path(out) / "points.avro")
    with beam.Pipeline(runner="FnApiRunner", options=options) as p:
        _ = (p
             | SkeletonizeSegments(segmentation, options=SkeletonOptions(chunk_size=chunk_size))
             | WritePoints(path))
    points = read_points(path)
    return {"points": len(points), "segments": len({p.segment_id for p in points})}


def _child_env() -> dict:
    """The environment for children (and Beam's workers): this package importable."""
    import segclr_beam

    package_root = str(Path(segclr_beam.__file__).parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [package_root, os.environ.get("PYTHONPATH")]))}


def measure(args: list[str]) -> dict:
    """Run this script as a child with `args`; its result plus wall time and peak memory."""
    start = time.perf_counter()
    child = psutil.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                         env=_child_env())
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            total = 0
            try:
                tree = [child, *child.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for process in tree:
                try:
                    total += process.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            peak = max(peak, total)
            done.wait(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output, _ = child.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed with exit code {child.returncode}")
    result = json.loads(output.decode().strip().splitlines()[-1])
    return {**result, "wall_seconds": wall, "peak_pss_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--data", help="an existing synthetic dataset (default: write one)")
    parser.add_argument("--shape", help="X,Y,Z voxels of the dataset written (default: synth's)")
    parser.add_argument("--side", choices=("baseline", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--segmentation", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # a child: run one side and print its result as the last line
        if args.side == "baseline":
            result = run_baseline(args.segmentation)
        else:
            result = run_chunked(args.segmentation, args.out, args.chunk_size, args.workers)
        result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["max_rss_children_bytes"] = (
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        print(json.dumps(result))
        return

    from segclr_beam import synth

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data:  # written by a child: Linux carries a parent's peak RSS into its children
            data = str(Path(tmp) / "dataset")
            shape = ["--shape", args.shape] if args.shape else []
            subprocess.run([sys.executable, "-m", "segclr_beam.cli", "synth", "--out", data,
                            *shape], check=True, stdout=subprocess.DEVNULL, env=_child_env())
        dataset = synth.load_dataset(data)
        segmentation, shape = dataset.segmentation, dataset.shape
        results = {}
        for side in ("baseline", "chunked"):
            runs = []
            for i in range(args.repeat):
                out = Path(tmp) / f"{side}-{i}"
                out.mkdir()
                runs.append(measure(["--side", side, "--segmentation", segmentation,
                                     "--out", str(out),
                                     "--chunk-size", str(args.chunk_size),
                                     "--workers", str(args.workers)]))
            results[side] = min(runs, key=lambda r: r["wall_seconds"])

    base, chunked = results["baseline"], results["chunked"]
    print(f"synthetic segmentation {' x '.join(map(str, shape))} voxels; chunks of "
          f"{args.chunk_size}^3 on {args.workers} worker processes; best of {args.repeat}")
    for name, r in (("kimimaro whole volume, parallel=2", base),
                    ("chunked Beam (FnApiRunner)", chunked)):
        rss = max(r["max_rss_bytes"], r["max_rss_children_bytes"])
        print(f"  {name:<36} wall {r['wall_seconds']:7.1f} s  peak PSS "
              f"{r['peak_pss_bytes'] / 2**20:7.0f} MiB  largest process RSS "
              f"{rss / 2**20:7.0f} MiB  {r['segments']} segments, {r['points']} points")
    print(f"  (kimimaro.skeletonize alone: {base['kimimaro_seconds']:.1f} s)")
    print(f"  ratio chunked / whole volume: wall time "
          f"{chunked['wall_seconds'] / base['wall_seconds']:.2f}, peak memory "
          f"{chunked['peak_pss_bytes'] / base['peak_pss_bytes']:.2f}")


if __name__ == "__main__":
    main()
