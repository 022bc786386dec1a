"""Inference: embeddings per second of the bare SavedModel against the Beam inference stage.

Both run the same exported model (random weights) on the same cutouts, in one process:
- bare: the loaded SavedModel called on pre-stacked batches of `batch_size` cutouts, after
  one warm-up batch;
- Beam: a FnApiRunner pipeline in which the cutouts are produced inside the stage that runs
  the model (as the real pipeline does: they are never shuffled), keyed by Point, through
  `Embed` (BatchElements + RunInference with the custom handler). Its rate is the marginal
  one, (n2 - n1) / (t(n2) - t(n1)) over two runs, which cancels the fixed costs of a run
  (pipeline start-up, model load, first call); the end-to-end rate of the larger run is
  printed too. The shared variant sends every batch to a model shared across processes.

Sizes: the published network (129^3 cutouts, ~1 s per cutout on 2 CPU cores) and a small
one (8/16/32/64 on 33^3, ~2 ms per cutout, where per-cutout overheads show). The machine may
be shared, so every timing is the fastest of --repeat interleaved runs (garbage collected
before each), and rates are given per wall-clock second and per CPU second of this process
(all its threads; less sensitive to other processes taking the cores).

    .venv/bin/python benchmarks/bench_inference.py [--sizes default,small] [--repeat 3]
        [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import tempfile
import time
import warnings
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import MetricsFilter

from segclr_beam import model as segclr_model
from segclr_beam.inference import Embed, EmbeddingModel, configure_tensorflow
from segclr_beam.model import Architecture
from segclr_beam.records import Point

BANK = 8  # distinct cutouts, cycled


@dataclasses.dataclass(frozen=True)
class Case:
    arch: Architecture
    batch_size: int
    counts: tuple[int, int]  # cutouts of the two Beam runs; the bare model runs the larger


CASES = {
    "default": Case(Architecture(), batch_size=2, counts=(2, 10)),
    "small": Case(Architecture(widths=(8, 16, 32, 64), input_size=33, bottleneck_width=64),
                  batch_size=32, counts=(256, 4096)),
}


def cutout_bank(size: int) -> np.ndarray:
    """Masked-EM-like uint8 cutouts: noise inside a ball, zeros outside."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:size, :size, :size] - size // 2
    inside = zz**2 + yy**2 + xx**2 < (0.4 * size) ** 2
    return (rng.integers(0, 256, (BANK, size, size, size)) * inside).astype(np.uint8)


class MakeCutouts(beam.DoFn):
    """Stands in for the cutout stage: (Point, uint8 cutout) made inside the model's stage."""

    def __init__(self, size: int):
        self._size = size

    def setup(self):
        self._bank = cutout_bank(self._size)

    def process(self, index: int):
        yield Point(index, index, 0, 0, 0), self._bank[index % BANK]


def clock() -> np.ndarray:
    return np.array([time.perf_counter(), time.process_time()])


def collected_clock() -> np.ndarray:
    """The clock, after collecting the garbage of earlier runs (old models, pipelines)."""
    gc.collect()
    return clock()


def bare_seconds(model: EmbeddingModel, case: Case) -> np.ndarray:
    """Wall and CPU seconds for the loaded model to embed the larger count of cutouts."""
    bank = cutout_bank(case.arch.input_size)
    batches = [bank[np.arange(i, i + case.batch_size) % BANK]
               for i in range(0, case.counts[1], case.batch_size)]
    start = collected_clock()
    for batch in batches:
        model.embed(batch)
    return clock() - start


@dataclasses.dataclass(frozen=True)
class BeamRun:
    seconds: np.ndarray  # wall, CPU
    handler_seconds: float  # wall seconds inside the handler's run_inference (Beam's metric)
    batches: int


def beam_run(model_dir: str, case: Case, count: int, threads, shared: bool) -> BeamRun:
    """Time a pipeline that makes `count` cutouts and embeds them in the same stage."""
    pipeline = beam.Pipeline(runner="FnApiRunner")
    _ = (pipeline
         | beam.Create(range(count))
         | beam.ParDo(MakeCutouts(case.arch.input_size))
         | Embed(model_dir, case.batch_size, share_model_across_processes=shared,
                 intra_op_threads=threads, inter_op_threads=threads))
    start = collected_clock()
    result = pipeline.run()
    result.wait_until_finish()
    seconds = clock() - start
    metrics = result.metrics().query(MetricsFilter().with_namespace("segclr"))
    counters = {c.key.metric.name: c.committed for c in metrics["counters"]}
    assert counters["embeddings"] == count, counters
    latency = {d.key.metric.name: d.committed for d in metrics["distributions"]}
    return BeamRun(seconds, latency["inference_batch_latency_micro_secs"].sum / 1e6,
                   counters["inference_batches"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="default,small")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow intra- and inter-op threads (default: TensorFlow's)")
    args = parser.parse_args()
    configure_tensorflow(args.threads, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes.split(","):
            case = CASES[name]
            model_dir = str(Path(tmp) / name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                segclr_model.export_saved_model(model_dir, case.arch)
            model = EmbeddingModel(model_dir, case.batch_size)
            model.embed(cutout_bank(case.arch.input_size)[:case.batch_size])  # warm-up
            bare, runs = [], {}
            for _ in range(args.repeat):
                bare.append(bare_seconds(model, case))
                for shared in (False, True):
                    for count in case.counts:
                        runs.setdefault((shared, count), []).append(
                            beam_run(model_dir, case, count, args.threads, shared))
            n1, n2 = case.counts
            bare_rate = n2 / np.min(bare, axis=0)
            print(f"\n{name}: widths {list(case.arch.widths)}, cutouts "
                  f"{case.arch.input_size}^3, batch {case.batch_size}, Beam runs of {n1} and "
                  f"{n2} cutouts, best of {args.repeat}; embeddings per wall s | per CPU s")
            print(f"  bare model          {bare_rate[0]:9.2f} | {bare_rate[1]:9.2f}")
            for shared in (False, True):
                t1, t2 = (np.min([run.seconds for run in runs[shared, n]], axis=0)
                          for n in case.counts)
                marginal = (n2 - n1) / (t2 - t1)
                ratio = marginal / bare_rate
                in_handler = n2 / min(run.handler_seconds for run in runs[shared, n2])
                print(f"  {'Beam, shared model' if shared else 'Beam stage':<19} "
                      f"{marginal[0]:9.2f} | {marginal[1]:9.2f}   marginal, ratio to bare "
                      f"{ratio[0]:.3f} | {ratio[1]:.3f}")
                print(f"      inside run_inference {in_handler:.2f}/s wall (ratio "
                      f"{in_handler / bare_rate[0]:.3f}); end-to-end {n2 / t2[0]:.2f}/s wall, "
                      f"{t2[0] - n2 / marginal[0]:.1f} s fixed per run; "
                      f"{runs[shared, n2][0].batches} batches")


if __name__ == "__main__":
    main()
