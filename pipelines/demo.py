"""The demo: the whole job on the synthetic dataset, a summary and a picture.

    python -m pipelines.demo [--data demo_data] [--out demo_output] [--published-size]
                             [Beam options, e.g. --direct_num_workers=1]

Builds the synthetic dataset and a SegCLR model with random weights if they are absent, runs
the embedding job locally on a class-balanced sample of the segments, prints what it did
(segments, voxels and points per class, and the wall time) and writes `embeddings.png`: a
2-D projection of the embeddings coloured by morphological class, and the sample points
over an EM slice. It opens no viewer: it prints the `segclr-beam view` command that does.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

from segclr_beam import annotations, synth
from segclr_beam.config import EmbedConfig
from segclr_beam.runner import configure_logging

# A quarter of the published widths: about 1/16 of its arithmetic, so the demo runs in
# minutes on a laptop CPU. --published-size runs the published network instead.
DEMO_WIDTHS = (16, 32, 64, 128)
PUBLISHED_WIDTHS = (64, 128, 256, 512)
# Segments embedded per class, drawn at random: every soma, two thirds of the glia and a
# sample of the ~180 dendrites and ~600 axons of the default volume, so that the picture
# shows every class and the job runs in minutes on a laptop.
SAMPLE = {"axon": 24, "dendrite": 12, "soma": 6, "glia": 8}
# Chunks of 128 voxels split the default volume into 18 skeletonization tasks, work for
# every local worker; the chunk size is part of a run's configuration (it shapes skeletons).
CHUNK_SIZE = 128
CLASS_COLOURS = {"axon": "tab:blue", "dendrite": "tab:green", "soma": "tab:red",
                 "glia": "tab:purple"}


def _dataset(path: str) -> synth.Dataset:
    try:
        return synth.load_dataset(path)
    except FileNotFoundError:
        print(f"writing the synthetic dataset to {path} ...", flush=True)
        return synth.write_dataset(path)


def _sample(dataset: synth.Dataset, counts: dict[str, int], seed: int = 0) -> list[int]:
    """Up to `counts[class]` segment ids of each class, drawn at random for `seed`."""
    rng = np.random.default_rng(seed)
    chosen = []
    for kind, count in counts.items():
        ids = sorted(i for i, c in dataset.classes.items() if c == kind)
        chosen += rng.choice(np.array(ids, dtype=np.uint64), min(count, len(ids)),
                             replace=False).tolist()
    return sorted(chosen)


def _class_mix(dataset: synth.Dataset, segment_ids: list[int], sample) -> str:
    """Segments, voxels and points per class of the embedded segments, as text."""
    voxels = synth.segment_voxels(dataset)
    points = collections.Counter(dataset.classes[p.segment_id] for p in sample)
    lines = [f"  {'class':<10}{'segments':>10}{'voxels':>14}{'points':>8}"]
    for kind in synth.CLASSES:
        ids = [i for i in segment_ids if dataset.classes[i] == kind]
        lines.append(f"  {kind:<10}{len(ids):>10}{sum(voxels[i] for i in ids):>14,}"
                     f"{points[kind]:>8}")
    return "\n".join(lines)


def _model(path: str, widths: tuple[int, ...]) -> dict:
    from segclr_beam import model

    if os.path.exists(path):
        identity = model.model_identity(path)
        if tuple(identity["architecture"]["widths"]) == widths:
            return identity
        raise SystemExit(f"{path} holds a model of widths {identity['architecture']['widths']};"
                         f" remove it or pick another --out")
    print(f"exporting a SegCLR network with random weights to {path} ...", flush=True)
    return model.export_saved_model(path, model.Architecture(widths=widths))


def _read_outputs(out: str):
    from segclr_beam import points
    from segclr_beam.reader import EmbeddingReader

    sample = sorted(points.read_points(os.path.join(out, "points.avro")))
    reader = EmbeddingReader(os.path.join(out, "raw"))
    embeddings = {}
    for segment_id in sorted({p.segment_id for p in sample}):
        segment = reader.read_segment(segment_id)
        for node_id, vector in zip(segment.node_ids, segment.embeddings):
            embeddings[(segment_id, int(node_id))] = vector
    return sample, np.stack([embeddings[(p.segment_id, p.node_id)] for p in sample])


def _picture(path: str, dataset: synth.Dataset, sample, embeddings: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segclr_beam.volume import open_volume

    classes = [dataset.classes.get(p.segment_id, "?") for p in sample]
    centred = embeddings - embeddings.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ axes[:2].T
    em = open_volume(dataset.em, "EM")
    z = em.bounds.shape[2] // 2
    section = em.read(em.bounds).take(z, axis=2)
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 6))
    for name, colour in CLASS_COLOURS.items():
        chosen = [i for i, c in enumerate(classes) if c == name]
        left.scatter(projected[chosen, 0], projected[chosen, 1], s=8, c=colour,
                     label=f"{name} ({len(chosen)})")
    left.set_title("SegCLR embeddings, first two principal components")
    left.legend()
    right.imshow(section.T, cmap="gray", origin="lower")
    near = [i for i, p in enumerate(sample) if abs(p.z - z) <= 8]
    right.scatter([sample[i].x for i in near], [sample[i].y for i in near], s=10,
                  c=[CLASS_COLOURS.get(classes[i], "k") for i in near])
    right.set_title(f"sample points within 8 voxels of EM section z={z}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo_data", help="synthetic dataset directory")
    parser.add_argument("--out", default="demo_output", help="output directory")
    parser.add_argument("--published-size", action="store_true",
                        help="run the published network size (slow on a CPU)")
    args, beam_args = parser.parse_known_args(argv)
    configure_logging()

    from segclr_beam import pipeline

    start = time.monotonic()
    dataset = _dataset(args.data)
    print(synth.summarize(dataset), flush=True)
    widths = PUBLISHED_WIDTHS if args.published_size else DEMO_WIDTHS
    model_dir = os.path.join(args.data, "model-" + "-".join(map(str, widths)))
    identity = _model(model_dir, widths)
    segment_ids = _sample(dataset, SAMPLE)
    config = EmbedConfig(em=dataset.em, segmentation=dataset.segmentation, model=model_dir,
                         output=os.path.abspath(args.out), segments=tuple(segment_ids),
                         chunk_size=CHUNK_SIZE, num_shards=64, write_skeletons=True,
                         overwrite=True)
    print(f"running the embedding job on {len(segment_ids)} segments (Beam, local runner) ...",
          flush=True)
    summary = pipeline.run(config.validate(), beam_args)
    sample, embeddings = _read_outputs(config.output)
    picture = os.path.join(config.output, "embeddings.png")
    _picture(picture, dataset, sample, embeddings)

    counters = summary.counters
    size = "published size" if widths == PUBLISHED_WIDTHS else "reduced widths"
    print(f"\nmodel: widths {'/'.join(map(str, widths))} ({size}), weights "
          f"{identity['weights']} -- random weights: the embeddings show the pipeline, "
          f"not learned morphology")
    print(f"segments embedded: {len({p.segment_id for p in sample})}, points: {len(sample)}, "
          f"cutouts: {counters.get('cutouts_emitted', 0)}, embeddings: {counters.get('embeddings', 0)}")
    print(_class_mix(dataset, segment_ids, sample))
    print("seconds per stage (CPU time in Beam steps):")
    for stage, seconds in summary.seconds.items():
        print(f"  {stage:12s} {seconds:8.1f}")
    for name, path in summary.outputs.items():
        print(f"output {name:8s} {path}")
    print(f"annotations    {os.path.join(config.output, annotations.DIRECTORY)}")
    print(f"picture        {picture}")
    command = os.path.join(os.path.dirname(sys.executable), "segclr-beam")
    print(f"to look at it in Neuroglancer: {command} view {config.output}")
    print(f"job wall time {summary.wall_seconds:.0f} s; demo wall time "
          f"{time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
