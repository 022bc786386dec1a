"""The whole job against the bare model on the same cutouts, in one run.

- job: `pipeline.run` on a box of the demo dataset (skeletons, points, cutouts, inference,
  radius means, CSV-ZIP + TFRecord, manifest), locally on the in-process FnApiRunner;
- bare: the same SavedModel called directly on the job's own cutouts (made beforehand,
  untimed), in batches of the job's batch size.

On a CPU the SegCLR network is almost all of the cost, so the ratio says how much the rest of
the job adds. The default box (192 x 192 x 128 voxels of the 384 x 384 x 256 demo volume) and
the published network size keep a run to about ten minutes on two cores.

    .venv/bin/python benchmarks/bench_job.py [--data demo_data] [--bbox X0,Y0,Z0,X1,Y1,Z1]
        [--widths 64,128,256,512] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from segclr_beam import job, model, pipeline, points, synth
from segclr_beam.config import EmbedConfig
from segclr_beam.cutouts import CutoutReader
from segclr_beam.inference import EmbeddingModel
from segclr_beam.volume import open_volumes


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo_data")
    parser.add_argument("--bbox", type=_numbers, default=(0, 0, 0, 192, 192, 128))
    parser.add_argument("--widths", type=_numbers, default=(64, 128, 256, 512))
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    try:
        dataset = synth.load_dataset(args.data)
    except FileNotFoundError:
        dataset = synth.write_dataset(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "model")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export_saved_model(model_dir, model.Architecture(widths=args.widths))
        config = EmbedConfig(em=dataset.em, segmentation=dataset.segmentation, model=model_dir,
                             output=str(Path(tmp) / "out"), bbox=args.bbox,
                             batch_size=args.batch_size).validate()

        start = time.perf_counter()
        summary = pipeline.run(config)
        job_seconds = time.perf_counter() - start

        sample = sorted(points.read_points(str(Path(config.output) / job.POINTS_FILE)))
        em, segmentation = open_volumes(dataset.em, dataset.segmentation)
        cutouts = np.stack([c for _, c in CutoutReader(em, segmentation).cutouts(sample)])
        bare = EmbeddingModel(model_dir, args.batch_size)
        bare.embed(cutouts[:args.batch_size])  # the first call traces the graph
        start = time.perf_counter()
        for i in range(0, len(cutouts), args.batch_size):
            bare.embed(cutouts[i:i + args.batch_size])
        bare_seconds = time.perf_counter() - start

    n = len(sample)
    print(f"box {args.bbox}, network widths {args.widths}, batch {args.batch_size}, "
          f"{n} points of {len({p.segment_id for p in sample})} segments")
    print(f"bare model on the job's cutouts: {bare_seconds:8.1f} s  ({n / bare_seconds:.2f}/s)")
    print(f"whole job:                       {job_seconds:8.1f} s  ({n / job_seconds:.2f}/s)")
    print("job stages (CPU seconds): " + ", ".join(
        f"{k} {v:.1f}" for k, v in summary.seconds.items()))
    print(f"ratio job / bare model: {job_seconds / bare_seconds:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
