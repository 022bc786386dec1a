"""Reprocessing a new segmentation version against a full run on the same data, in one process.

Data: the synthetic dataset at its default size (384 x 384 x 256 voxels, about 800 segments),
or --shape.
Model: the published network's widths (64, 128, 256, 512; random weights) on 65^3 cutouts
instead of 129^3, i.e. 8x fewer voxels per cutout: a mid-size model whose share of a full run
is printed below (the published network on 129^3 cutouts is ~98% of a CPU run).
Version 2: about 5% of the segments (neurons: axons, dendrites, somata) each lose a 7^3 box
of voxels around one of their voxels, as a proofreading cut would.

Prints the wall time of the full run on version 1 (with seconds per stage), of reprocessing
version 2 from it (both of its Beam jobs), their ratio (target: at most 0.15), and how the
version-2 nodes were obtained. With --verify, version 2 is also run in full and every output
file compared byte for byte. The machine may be shared: times are noisy.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_reprocess.py [--workdir DIR] [--verify]
        [--shape X,Y,Z]  (a smaller synthetic volume for a quick run)
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import tensorstore as ts

from segclr_beam import model, pipeline, reprocess, synth
from segclr_beam.config import EmbedConfig
from segclr_beam.volume import open_volume

EDITED_FRACTION = 0.05
BOX = 7  # edge of the box of voxels each edit removes


def edit_segments(dataset: synth.Dataset, out: Path, seed: int = 0) -> list[int]:
    """Write version 2 of the segmentation to `out`; returns the edited segment ids."""
    volume = open_volume(dataset.segmentation, "segmentation", synth.RESOLUTION)
    labels = volume.read(volume.bounds)
    neurons = sorted(i for i, kind in dataset.classes.items() if kind != "glia")
    rng = np.random.default_rng(seed)
    count = max(1, round(EDITED_FRACTION * len(dataset.classes)))
    edited = sorted(neurons[k] for k in rng.choice(len(neurons), size=count, replace=False))
    v2 = labels.copy()
    for segment_id in edited:
        voxels = np.argwhere(labels == segment_id)
        at = voxels[rng.integers(len(voxels))]
        box = tuple(slice(max(0, v - BOX // 2), v + BOX // 2 + 1) for v in at)
        v2[box][labels[box] == segment_id] = 0
    shutil.copytree(dataset.segmentation, out)
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{out}/"},
                    write=True).result()
    store[..., 0].write(v2).result()
    return edited


def digests(root: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != "run.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="keep data and outputs here (default: a temp dir)")
    parser.add_argument("--shape", type=lambda t: tuple(int(v) for v in t.split(",")),
                        default=synth.DEFAULT_SHAPE, help="synthetic volume X,Y,Z voxels")
    parser.add_argument("--verify", action="store_true",
                        help="also run version 2 in full and compare every output file")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-reprocess-"))
    for name in ("v1", "v2", "model", "full1", "full2", "reprocessed"):
        shutil.rmtree(work / name, ignore_errors=True)

    dataset = synth.write_dataset(work / "v1", shape=args.shape)
    edited = edit_segments(dataset, work / "v2")
    arch = model.Architecture(input_size=65)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: timing only
        model.export_saved_model(str(work / "model"), arch)

    def config(segmentation: str, output: str) -> EmbedConfig:
        return EmbedConfig(em=dataset.em, segmentation=segmentation, model=str(work / "model"),
                           output=output, resolution=synth.RESOLUTION,
                           cutout_size=arch.input_size, batch_size=16, num_shards=64,
                           formats=("csv_zip",))

    start = time.monotonic()
    full = pipeline.run(config(dataset.segmentation, str(work / "full1")))
    full_seconds = time.monotonic() - start
    start = time.monotonic()
    again = reprocess.reprocess(str(work / "full1"), {"segmentation": str(work / "v2"),
                                                      "output": str(work / "reprocessed")})
    reprocess_seconds = time.monotonic() - start

    counters = again.run.counters
    print(f"dataset: {' x '.join(map(str, dataset.shape))} voxels, {len(dataset.classes)} "
          f"segments; version 2 edits {len(edited)} ({len(edited) / len(dataset.classes):.1%})")
    print(f"model: widths {arch.widths}, {arch.input_size}^3 cutouts, embedding dim "
          f"{arch.embedding_dim} (random weights)")
    print(f"full run (version 1): {full_seconds:.1f} s, {full.counters['embeddings']} "
          f"embeddings; seconds per stage: "
          + ", ".join(f"{k} {v:.1f}" for k, v in full.seconds.items()))
    print(f"  inference (Embed) share of the full run: "
          f"{full.seconds['Embed'] / full_seconds:.1%}")
    print(f"reprocess (version 2): {reprocess_seconds:.1f} s; segments {again.changes}; "
          f"nodes: {counters.get('nodes_carried', 0)} carried, "
          f"{counters.get('embeddings_reused', 0)} reused by cutout digest, "
          f"{counters.get('embeddings', 0)} embedded")
    print(f"ratio reprocess / full: {reprocess_seconds / full_seconds:.3f} (target <= 0.15)")
    if args.verify:
        pipeline.run(config(str(work / "v2"), str(work / "full2")))
        same = digests(str(work / "reprocessed")) == digests(str(work / "full2"))
        print(f"reprocessed tree equals the full run on version 2, byte for byte: {same}")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
