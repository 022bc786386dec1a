"""The SegCLR network's forward pass against the machine's fp32 matmul rate, in one run.

Prints, with the TensorFlow thread pools as given (default: TensorFlow's, all cores):
- the fp32 matmul rate: tf.linalg.matmul of two square float32 matrices in a tf.function;
- per layer, for the plain network (the Keras layers, as exports before the serving form
  ran) and the serving network (what exports run now, see ServingNetwork): seconds per
  batch, GFLOP, GFLOP/s; for the serving network also the GFLOP/s of a plain matmul of the
  shape each convolution has as a matrix product (M output voxels, K = taps x input
  channels, N filters). A conv row holds the conv with its bias, ReLU and batch norm; the
  stem row of the serving network includes the uint8 conversion;
- the whole network: cutouts/s, GFLOP/s and the fraction of the matmul rate, for the plain
  network and for the exported SavedModel of the serving network; then the stem before/after.

FLOPs are 2 x the multiply-adds of the network's convolutions and dense layers (pooling,
biases, batch norms and ReLUs are not counted); the serving form computes the same ones. The
machine may be shared: every time is the fastest of --repeat runs, matmul rounds interleaved
with the network's, and the load average is printed. Ratios within one run are what counts;
on a loaded machine the whole-network lines also give the ratio per CPU-second (process CPU
time, which other processes' load does not stretch as it stretches wall time). TensorFlow runs the kernels the package picks (oneDNN,
see segclr_beam/__init__.py); TF_ENABLE_ONEDNN_OPTS=0 in the environment measures its own.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_model.py [--widths published,demo]
        [--batch-size 4] [--repeat 3] [--threads N] [--input-size 129]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

import segclr_beam  # noqa: F401  (before TensorFlow: it picks TensorFlow's CPU kernels)
import tensorflow as tf

from segclr_beam import model as segclr_model
from segclr_beam.inference import EmbeddingModel, configure_tensorflow
from segclr_beam.model import Architecture

WIDTHS = {"published": Architecture().widths, "demo": (16, 32, 64, 128)}
MATMUL_SIZE = 2048
GEMM_ROWS = 32768  # rows of the same-shape matmuls
TARGETS = {"published": 0.75, "demo": 0.5}


def best_times(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Fastest wall time and fastest process CPU time of `repeat` calls, after one warm-up
    call (tracing, allocation)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Fastest wall time of `repeat` calls, after a warm-up call."""
    return best_times(fn, repeat)[0]


def matmul_rate(repeat: int) -> tuple[float, float]:
    """GFLOP per second and per CPU-second of a float32 [n, n] x [n, n] matmul."""
    a, b = (tf.random.stateless_normal([MATMUL_SIZE] * 2, seed=[i, 0]) for i in range(2))
    matmul = tf.function(tf.linalg.matmul)
    flop = 2 * MATMUL_SIZE**3 / 1e9
    return tuple(flop / t for t in best_times(lambda: matmul(a, b).numpy()[0, 0], repeat))


def cutouts(batch: int, size: int) -> np.ndarray:
    """Masked-EM-like uint8 cutouts: noise inside a ball, zeros outside."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:size, :size, :size] - size // 2
    inside = zz**2 + yy**2 + xx**2 < (0.4 * size) ** 2
    return (rng.integers(0, 256, (batch, size, size, size)) * inside).astype(np.uint8)


@dataclasses.dataclass
class Row:
    name: str
    flop: float  # per cutout, of the original network
    seconds: float = 0.0  # per batch
    gemm: tuple[int, int, int] | None = None  # the conv as a matmul: M per cutout, K, N
    gemm_rate: float | None = None  # GFLOP/s of a matmul of that shape


def _out(size: int, stride: int) -> int:
    return -(-size // stride)


def layer_gemms(arch: Architecture) -> dict[str, list[tuple[int, int, int]]]:
    """The matmuls (M per cutout, K, N) of every row of the tables, in network order: a
    convolution is one with K = taps x input channels; pooling and adds have none."""
    base = "base_model_0/resnet18"
    size = _out(arch.input_size, 2)
    rows = {f"{base}/stage_1/conv1": [(size**3, 7**3, arch.widths[0])],
            f"{base}/stage_1/pool": []}
    size, cin = _out(size, 2), arch.widths[0]
    for stage, width in enumerate(arch.widths, start=2):
        for block in "ab":
            scope = f"{base}/stage_{stage}/block_{block}"
            stride = 2 if block == "a" and stage > 2 else 1
            out = _out(size, stride)
            rows[f"{scope}/conv_0"] = [(out**3, 27 * cin, width)]
            rows[f"{scope}/conv_1"] = [(out**3, 27 * width, width)]
            if block == "a":
                rows[f"{scope}/shortcut"] = [(out**3, cin, width)]
            rows[f"{scope}/add"] = []
            size, cin = out, width
    head = (cin, arch.bottleneck_width, arch.bottleneck_width, arch.embedding_dim)
    rows[segclr_model.BOTTLENECK] = [(1, k, n) for k, n in zip(head[:-1], head[1:])]
    return rows


def layer_flops(arch: Architecture) -> dict[str, float]:
    """FLOPs per cutout of every row of the tables, in network order (0 for uncounted)."""
    return {name: sum(2.0 * m * k * n for m, k, n in gemms)
            for name, gemms in layer_gemms(arch).items()}


def gemm_rates(rows: list[Row], batch: int, repeat: int) -> None:
    """Set each conv row's gemm_rate: a float32 matmul of its (M, K) x (K, N), M capped.

    What oneDNN's matmul reaches on the shape of the work, narrow N (few filters) and short
    K (few input channels) included: the reference the convolution is held against.
    """
    rates: dict[tuple[int, int, int], float] = {}
    for row in rows:
        if row.gemm is None:
            continue
        m, k, n = row.gemm
        m = min(m * batch, GEMM_ROWS)
        if (m, k, n) not in rates:
            a = tf.random.stateless_normal([m, k], seed=[1, 0])
            b = tf.random.stateless_normal([k, n], seed=[2, 0])
            matmul = tf.function(tf.linalg.matmul)
            seconds = best_seconds(lambda: matmul(a, b).numpy()[0, 0], repeat)
            rates[m, k, n] = 2.0 * m * k * n / seconds / 1e9
        row.gemm_rate = rates[m, k, n]


def _row_of_layer(layer_name: str) -> str:
    """The table row a Keras layer of the plain network belongs to."""
    scope = layer_name.replace(".", "/")
    parent, _, last = scope.rpartition("/")
    if parent.endswith("stage_1"):
        return f"{parent}/pool" if last == "pool" else f"{parent}/conv1"
    if last.startswith(("conv_", "relu_", "bn_")) and last[-1].isdigit():
        return f"{parent}/conv_{last[-1]}"
    if last.startswith("shortcut"):
        return f"{parent}/shortcut"
    if last in ("add", "relu_out"):
        return f"{parent}/add"
    return segclr_model.BOTTLENECK  # global average pool and the head


def plain_rows(network: tf.keras.Model, arch: Architecture, batch: np.ndarray,
               repeat: int) -> list[Row]:
    """Each Keras layer timed on its own input, summed into the rows of its unit."""
    rows = {name: Row(name, flop) for name, flop in layer_flops(arch).items()}
    layers = network.layers[1:]
    probe = tf.keras.Model(network.input, [layer.output for layer in layers])
    outputs = {layer.name: value for layer, value in
               zip(layers, probe(segclr_model.preprocess(batch), training=False))}
    outputs[network.layers[0].name] = segclr_model.preprocess(batch)
    for layer in layers:
        inputs = layer.input if isinstance(layer.input, list) else [layer.input]
        values = [outputs[t._keras_history.operation.name] for t in inputs]
        run = tf.function(lambda *v, layer=layer: layer(v if len(v) > 1 else v[0],
                                                        training=False))
        rows[_row_of_layer(layer.name)].seconds += best_seconds(lambda: run(*values), repeat)
    del outputs
    return list(rows.values())


def serving_rows(network: segclr_model.ServingNetwork, arch: Architecture,
                 batch: np.ndarray, repeat: int) -> list[Row]:
    """Each unit of the serving network timed on its own input."""
    rows = {name: Row(name, sum(2.0 * m * k * n for m, k, n in gemms),
                      gemm=gemms[0] if len(gemms) == 1 else None)
            for name, gemms in layer_gemms(arch).items()}
    base = "base_model_0/resnet18/stage_1"

    def timed(name: str, fn, *inputs):
        run = tf.function(fn)
        rows[name].seconds += best_seconds(lambda: run(*inputs), repeat)
        return run(*inputs)

    x = timed(f"{base}/conv1", network.stem, tf.constant(batch))
    x = timed(f"{base}/pool", network.pool, x)
    for block in network.blocks:
        main = timed(block.convs[0].scope, block.convs[0], x)
        main = timed(block.convs[1].scope, block.convs[1], main)
        shortcut = x
        if block.shortcut is not None:
            shortcut = timed(f"{block.scope}/shortcut", block.shortcut, x)
        x = timed(f"{block.scope}/add", lambda a, b: tf.nn.relu(a + b), main, shortcut)
    timed(segclr_model.BOTTLENECK, network.head, x)
    return list(rows.values())


def print_table(title: str, rows: list[Row], batch: int) -> None:
    print(f"\n  {title}: seconds per batch of {batch}, GFLOP per batch, GFLOP/s"
          + ("; the same-shape matmul's GFLOP/s [K x N]" if rows[0].gemm_rate else ""))
    for row in rows:
        flop = row.flop * batch / 1e9
        rate = f"{flop / row.seconds:8.1f}" if row.flop else "       -"
        gemm = (f"  {row.gemm_rate:6.1f} [{row.gemm[1]} x {row.gemm[2]}]" if row.gemm_rate
                else "")
        print(f"    {row.name.removeprefix('base_model_0/resnet18/'):<28} {row.seconds:8.4f} "
              f"{flop:8.2f} {rate}{gemm}")
    total = sum(r.seconds for r in rows)
    flop = sum(r.flop for r in rows) * batch / 1e9
    print(f"    {'sum of rows':<28} {total:8.4f} {flop:8.2f} {flop / total:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="published,demo",
                        help=f"comma-separated names from {sorted(WIDTHS)}")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow intra- and inter-op threads (default: TensorFlow's)")
    parser.add_argument("--input-size", type=int, default=129)
    args = parser.parse_args()
    configure_tensorflow(args.threads, args.threads)
    print(f"threads intra {tf.config.threading.get_intra_op_parallelism_threads()} inter "
          f"{tf.config.threading.get_inter_op_parallelism_threads()} (0: TensorFlow's choice); "
          f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    rates = [matmul_rate(args.repeat)]
    print(f"fp32 matmul {MATMUL_SIZE}^2: {rates[0][0]:.1f} GFLOP/s, "
          f"{rates[0][1]:.1f} GFLOP per CPU-second")
    batch = cutouts(args.batch_size, args.input_size)
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.widths.split(","):
            arch = Architecture(widths=WIDTHS[name], input_size=args.input_size)
            network = segclr_model.build_model(arch)
            segclr_model.random_init(network, seed=0)
            flop = sum(layer_flops(arch).values())
            print(f"\n{name} widths {list(arch.widths)}, {arch.input_size}^3 cutouts, "
                  f"{flop / 1e9:.2f} GFLOP per cutout, batch {args.batch_size}, best of "
                  f"{args.repeat}; load average {os.getloadavg()[0]:.2f}")
            plain = plain_rows(network, arch, batch, args.repeat)
            serving = serving_rows(segclr_model.ServingNetwork(network, arch), arch, batch,
                                   args.repeat)
            gemm_rates(serving, args.batch_size, args.repeat)
            print_table("plain network, per layer", plain, args.batch_size)
            print_table("serving network, per layer", serving, args.batch_size)

            keras_call = tf.function(
                lambda x: network(segclr_model.preprocess(x), training=False))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model_dir = str(Path(tmp) / name)
                segclr_model.export_saved_model(model_dir, arch, seed=0)
            exported = EmbeddingModel(model_dir, args.batch_size)
            whole = {"plain network": best_times(lambda: keras_call(batch).numpy(),
                                                 args.repeat),
                     "exported SavedModel": best_times(lambda: exported.embed(batch),
                                                       args.repeat)}
            rates.append(matmul_rate(args.repeat))
            matmul, matmul_cpu = (max(r[i] for r in rates) for i in range(2))
            print(f"\n  whole network (matmul {matmul:.1f} GFLOP/s, {matmul_cpu:.1f} per "
                  f"CPU-second, best of the run so far; load average {os.getloadavg()[0]:.2f}):")
            for what, (seconds, cpu) in whole.items():
                gflops = flop * args.batch_size / seconds / 1e9
                per_cpu = flop * args.batch_size / cpu / 1e9
                print(f"    {what:<20} {args.batch_size / seconds:7.3f} cutouts/s "
                      f"{gflops:7.1f} GFLOP/s  {gflops / matmul:.3f} of matmul; "
                      f"per CPU-second {per_cpu:7.1f}, {per_cpu / matmul_cpu:.3f}")
            stem = [rows[0] for rows in (plain, serving)]
            print(f"  stem before/after: {stem[0].seconds:.4f} s -> {stem[1].seconds:.4f} s per "
                  f"batch, {stem[0].seconds / stem[1].seconds:.2f}x")
            summary.append((name, *(flop * args.batch_size / t / 1e9
                                    for t in whole["exported SavedModel"])))
            del network, exported, keras_call
    matmul, matmul_cpu = (max(r[i] for r in rates) for i in range(2))
    print(f"\nexported SavedModel / fp32 matmul ({matmul:.1f} GFLOP/s; per CPU-second "
          f"{matmul_cpu:.1f}):")
    for name, gflops, per_cpu in summary:
        print(f"  {name:<10} {gflops / matmul:.3f}  (target {TARGETS[name]}); per CPU-second "
              f"{per_cpu / matmul_cpu:.3f}")


if __name__ == "__main__":
    main()
