"""Training: the whole step (views cut and augmented by the input pipeline) against the same
step on batches already in memory, and one step against one inference batch.

On a synthetic dataset and a pair table of nearby voxels of one segment, for each setting
(network widths, cutout size, pairs per step):
- pipeline: `steps` training steps fed by PairViews.batches (threads cutting, augmenting
  and prefetching while the model runs), the pipeline started with the run, so the wait for
  its first window is included (choose `steps` several windows long);
- in memory: the same steps on the same batches, materialised beforehand;
- inference: the network's forward pass (inference mode) on one batch of as many cutouts
  as a step embeds (two per pair).
The input pipeline's overhead is pipeline / in memory - 1 (target <= 10%). The machine may
be shared, so every timing is the fastest of --repeat interleaved runs, in wall-clock and
CPU seconds of this process (all its threads).

    .venv/bin/python benchmarks/bench_train.py [--settings demo] [--steps 32] [--repeat 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segclr_beam import model as segclr_model  # noqa: E402
from segclr_beam import synth, train, views, volume  # noqa: E402
from segclr_beam.model import Architecture  # noqa: E402
from tests.pairs import sample_pairs, write_pair_table  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    widths: tuple[int, ...]
    input_size: int
    batch_size: int

    def arch(self) -> Architecture:
        return Architecture(widths=self.widths, input_size=self.input_size, bottleneck_width=64)

    def __str__(self) -> str:
        return f"{','.join(map(str, self.widths))} {self.input_size}^3 x{self.batch_size}"


SETTINGS = {
    "demo": [Setting((8, 16, 32, 64), 33, 16)],
    "table": [Setting((8, 16, 32, 64), 33, 16), Setting((8, 16, 32, 64), 33, 32),
              Setting((16, 32, 64, 128), 33, 16), Setting((8, 16, 32, 64), 65, 16)],
}


def clock() -> np.ndarray:
    return np.array([time.perf_counter(), time.process_time()])


def timed(run) -> np.ndarray:
    gc.collect()
    start = clock()
    run()
    return clock() - start


def bench(setting: Setting, dataset, pairs: str, steps: int, repeat: int, warmup: int) -> None:
    config = train.TrainConfig(pairs=pairs, em=dataset.em, segmentation=dataset.segmentation,
                               out="unused", architecture=setting.arch(),
                               batch_size=setting.batch_size, steps=10**6, warmup_steps=0)
    trainer = train.Trainer(config)
    trainer.initialize()
    em, segmentation = volume.open_volumes(dataset.em, dataset.segmentation)
    source = views.PairViews(views.read_pair_table(pairs), em, segmentation,
                             setting.input_size, setting.batch_size)
    for batch in source.batches(0, warmup):
        trainer.train_step(batch)
    inference = segclr_model.build_model(setting.arch())
    forward = tf.function(lambda x: inference(segclr_model.preprocess(x), training=False))

    best = {"pipeline": np.inf, "memory": np.inf, "inference": np.inf}
    for r in range(repeat):
        first = warmup + r * steps
        # A fresh pipeline per run, started with the run: its first window is waited for.
        fresh = views.PairViews(source.table, em, segmentation, setting.input_size,
                                setting.batch_size)
        pipeline = lambda: [trainer.train_step(b) for b in fresh.batches(first, first + steps)]
        best["pipeline"] = np.minimum(best["pipeline"], timed(pipeline) / steps)
        memory = list(source.batches(first, first + steps))
        best["memory"] = np.minimum(
            best["memory"], timed(lambda: [trainer.train_step(b) for b in memory]) / steps)
        cutouts = tf.constant(memory[0].views.reshape((-1,) + (setting.input_size,) * 3))
        forward(cutouts)
        best["inference"] = np.minimum(
            best["inference"], timed(lambda: [forward(cutouts).numpy() for _ in range(4)]) / 4)
    pipeline, memory, inference = best["pipeline"], best["memory"], best["inference"]
    print(f"{str(setting):<22} {pipeline[0]:7.2f} {pipeline[1]:7.2f} "
          f"{setting.batch_size / pipeline[0]:7.1f} {memory[0]:7.2f} {memory[1]:7.2f} "
          f"{100 * (pipeline[0] / memory[0] - 1):+7.1f}% {inference[0]:7.3f} "
          f"{memory[0] / inference[0]:7.1f}x", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", choices=sorted(SETTINGS), default="demo")
    parser.add_argument("--steps", type=int, default=32, help="timed steps per run")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        dataset = synth.write_dataset(Path(tmp) / "dataset", shape=(128, 128, 96), seed=0)
        _, segmentation = volume.open_volumes(dataset.em, dataset.segmentation)
        pairs = write_pair_table(f"{tmp}/pairs/pairs.tfrecord",
                                 sample_pairs(segmentation.read(segmentation.bounds), 1024, 8, 0))
        print("setting (widths, cutout, pairs/step): seconds per step wall / CPU and examples "
              "(pairs) per wall second through the input pipeline, the same on batches in "
              "memory, the pipeline's overhead, one inference batch of as many cutouts "
              "(wall) and a step's cost in inference batches")
        print(f"{'setting':<22} {'wall':>7} {'cpu':>7} {'ex/s':>7} {'wall':>7} {'cpu':>7} "
              f"{'overhd':>8} {'infer':>7} {'ratio':>8}")
        for setting in SETTINGS[args.settings]:
            bench(setting, dataset, pairs, args.steps, args.repeat, args.warmup)


if __name__ == "__main__":
    main()
