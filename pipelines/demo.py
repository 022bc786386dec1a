"""The demo: train a small SegCLR network on one synthetic volume, embed another with it and
with random weights, score both, and draw the trained embeddings.

    python -m pipelines.demo [--data demo_data] [--out demo_output] [--published-size]
                             [Beam options, e.g. --direct_num_workers=1]

The first run writes two synthetic datasets (a training volume and an evaluation volume of
another seed: evaluation never sees the training volume), adds the demo resolution to both,
makes the positive-pair table of the training volume (`segclr-beam pairs`), trains the demo
network for a fixed number of steps (`segclr-beam train`) and keeps all of it under `--data`;
later runs reuse it. Every run then embeds a class-balanced sample of the evaluation volume's
segments with the trained network and with the same network's random weights (the embedding
job, locally), scores both by k-NN and a linear probe cross-validated by segment, beside a
trivial baseline of mask features, and writes `embeddings.png`: a 2-D projection of the
trained embeddings coloured by morphological class, and the sample points over an EM slice.
It opens no viewer: it prints the `segclr-beam view` command that does.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import sys
import time

import numpy as np

from segclr_beam import annotations, synth
from segclr_beam.config import EmbedConfig, PairsConfig
from segclr_beam.runner import configure_logging


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """The network and the data it sees: resolution, cutout and widths, and its training."""

    name: str
    downsampling: int  # the demo resolution is the synthetic one times this, per axis
    widths: tuple[int, ...]
    cutout_size: int
    bottleneck_width: int
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    min_distance_nm: float
    max_distance_nm: float

    @property
    def tag(self) -> str:
        """Names the pair table, training run and models of this size under --data (a cache
        made with other data, widths, cutouts or training budget is not reused)."""
        return (f"{self.name}-v{synth.VERSION}-{'-'.join(map(str, self.widths))}-{self.cutout_size}"
                f"at{self.downsampling}x-{self.steps}x{self.batch_size}")

    @property
    def resolution(self) -> tuple[float, float, float]:
        return tuple(r * self.downsampling for r in synth.RESOLUTION)

    @property
    def chunk_size(self) -> int:
        """Skeletonization chunks of 256 synthetic voxels (8 um): four tasks for the default
        volume at every resolution, work for every local worker; the chunk size is part of a
        run's configuration (it shapes skeletons)."""
        return CHUNK_VOXELS // self.downsampling

    @property
    def min_voxels(self) -> int:
        """The synthetic dataset's smallest segment counted at the demo resolution, so that
        downsampling drops no segment from skeletonization (thin axons hold a few hundred
        voxels at 4x)."""
        return max(1, synth.MIN_SEGMENT_VOXELS // self.downsampling ** 3)

    def architecture(self):
        from segclr_beam.model import Architecture

        return Architecture(widths=self.widths, input_size=self.cutout_size,
                            bottleneck_width=self.bottleneck_width)


# A CPU affords a thousand or so training steps of 16 pairs in minutes only on a small
# network with small cutouts. The demo network has an eighth of the published widths and
# 33^3 cutouts at four times the synthetic voxel size: windows 4.2 um across, the published
# field of view, at 1/3800 of the published arithmetic. Supervised on the four classes, this
# network reads them from such windows better than from 2.1 um ones (at 2x): per node 0.73
# against 0.63 balanced accuracy on the evaluation volume after 800 steps of 32 cutouts
# (synthetic data of generator version 1).
DEMO = DemoSize("demo", downsampling=4, widths=(8, 16, 32, 64), cutout_size=33,
                bottleneck_width=64, steps=1500, batch_size=16, learning_rate=1e-3,
                warmup_steps=30, min_distance_nm=500.0, max_distance_nm=2500.0)
# The published network: 129^3 cutouts at the synthetic resolution (4 um across); for a GPU.
PUBLISHED = DemoSize("published", downsampling=1, widths=(64, 128, 256, 512), cutout_size=129,
                     bottleneck_width=512, steps=3000, batch_size=32, learning_rate=1e-3,
                     warmup_steps=100, min_distance_nm=1000.0, max_distance_nm=5000.0)
TRAINING_SEED, EVALUATION_SEED = 0, 1
# Segments embedded per class, drawn at random from the evaluation volume: every soma and
# glia cell and a sample of the ~180 dendrites and ~600 axons, so that every class has
# segments enough for folds by segment and the two embedding runs take a minute or two.
SAMPLE = {"axon": 30, "dendrite": 30, "soma": 6, "glia": 12}
CHUNK_VOXELS = 256
CLASS_COLOURS = {"axon": "tab:blue", "dendrite": "tab:green", "soma": "tab:red",
                 "glia": "tab:purple"}


def _dataset(path: str, seed: int) -> synth.Dataset:
    try:
        return synth.load_dataset(path)
    except FileNotFoundError:
        print(f"writing the synthetic dataset of seed {seed} to {path} ...", flush=True)
        return synth.write_dataset(path, seed=seed)


def _add_scale(path: str, factor: int, method: str) -> None:
    """Add the scale `factor` times coarser to the precomputed volume at `path`, unless it has
    it: TensorStore's downsampling (`method` "mean" for EM, "mode" for labels)."""
    import tensorstore as ts

    with open(os.path.join(path, "info")) as f:
        info = json.load(f)
    base = info["scales"][0]
    resolution = [r * factor for r in base["resolution"]]
    if any(np.allclose(s["resolution"], resolution) for s in info["scales"]):
        return
    spec = {"driver": "neuroglancer_precomputed", "kvstore": f"file://{os.path.abspath(path)}/"}
    source = ts.downsample(ts.open(spec).result(), [factor] * 3 + [1], method)
    scale = {key: base[key] for key in ("encoding", "jpeg_quality",
                                        "compressed_segmentation_block_size") if key in base}
    scale.update(size=list(source.shape[:3]), resolution=resolution, voxel_offset=[0, 0, 0],
                 chunk_size=base["chunk_sizes"][0])
    target = ts.open({**spec, "scale_metadata": scale, "store_data_equal_to_fill_value": True},
                     create=True).result()
    target.write(source.read().result()).result()


def _volumes(data: str, seed: int, size: DemoSize) -> synth.Dataset:
    dataset = _dataset(os.path.join(data, f"volume-v{synth.VERSION}-seed{seed}"), seed)
    if size.downsampling > 1:
        _add_scale(dataset.em, size.downsampling, "mean")
        _add_scale(dataset.segmentation, size.downsampling, "mode")
    return dataset


def _sample(dataset: synth.Dataset, counts: dict[str, int], seed: int = 0) -> list[int]:
    """Up to `counts[class]` segment ids of each class, drawn at random for `seed`."""
    rng = np.random.default_rng(seed)
    chosen = []
    for kind, count in counts.items():
        ids = sorted(i for i, c in dataset.classes.items() if c == kind)
        chosen += rng.choice(np.array(ids, dtype=np.uint64), min(count, len(ids)),
                             replace=False).tolist()
    return sorted(chosen)


def _trained_checkpoint(data: str, dataset: synth.Dataset, size: DemoSize,
                        beam_args: list[str]) -> tuple[str, dict]:
    """The demo network trained on `dataset`: made on the first run, then reused."""
    from segclr_beam import model, pairs, pairs_job, train

    table = os.path.join(data, f"pairs-{size.tag}")
    if not os.path.exists(os.path.join(table, pairs.INFO_NAME)):
        print(f"making the pair table of the training volume in {table} ...", flush=True)
        start = time.monotonic()
        summary = pairs_job.run(PairsConfig(
            segmentation=dataset.segmentation, em=dataset.em, output=table,
            resolution=size.resolution, chunk_size=size.chunk_size,
            min_voxels=size.min_voxels,
            min_distance_nm=size.min_distance_nm, max_distance_nm=size.max_distance_nm,
            num_shards=4, overwrite=True).validate(), beam_args)
        print(f"  {summary.info['pairs']} pairs of {summary.info['segments']} segments in "
              f"{time.monotonic() - start:.0f} s", flush=True)
    config = train.TrainConfig(
        pairs=table, em=dataset.em, segmentation=dataset.segmentation,
        out=os.path.join(data, f"training-{size.tag}"), resolution=size.resolution,
        architecture=size.architecture(), steps=size.steps, batch_size=size.batch_size,
        learning_rate=size.learning_rate, warmup_steps=size.warmup_steps,
        checkpoint_every=100, log_every=25)
    record_path = os.path.join(config.out, model.TRAINING_RECORD)
    if os.path.exists(record_path):
        # A finished run is reused as it is, also in a checkout moved since: its config names
        # the volumes by absolute path, and the cache's name fixes the settings.
        with open(record_path) as f:
            record = json.load(f)
    else:
        print(f"training the {size.name} network for {size.steps} steps of {size.batch_size} "
              f"pairs in {config.out} ...", flush=True)
        start = time.monotonic()
        record = train.train(config)
        print(f"  trained in {time.monotonic() - start:.0f} s, final loss "
              f"{record['final_loss']:.3f}", flush=True)
    return os.path.join(config.out, record["checkpoint"]), record


def _models(data: str, size: DemoSize, checkpoint: str, record: dict) -> dict[str, str]:
    """SavedModels of the trained network (exported again after another training run) and
    of random weights of the same architecture."""
    from segclr_beam import model

    trained = os.path.join(data, f"model-{size.tag}-trained")
    if os.path.exists(trained) and model.model_identity(trained).get("training") != record:
        shutil.rmtree(trained)
    if not os.path.exists(trained):
        model.export_saved_model(trained, checkpoint=checkpoint)
    random = os.path.join(data, f"model-{size.tag}-random")
    if os.path.exists(random):
        if model.model_identity(random)["architecture"] != size.architecture().to_dict():
            raise SystemExit(f"{random} holds a model of another architecture; remove it")
    else:
        model.export_saved_model(random, size.architecture())
    return {"trained": trained, "random": random}


def _embed(dataset: synth.Dataset, size: DemoSize, models: dict[str, str], out: str,
           beam_args: list[str]):
    """Embed a class-balanced sample of `dataset` with each model; their run summaries.

    The first run skeletonizes; the others embed its points."""
    from segclr_beam import pipeline
    from segclr_beam.job import POINTS_FILE

    segment_ids = _sample(dataset, SAMPLE)
    summaries = {}
    for name, model_dir in models.items():
        first = not summaries
        config = EmbedConfig(
            em=dataset.em, segmentation=dataset.segmentation, model=model_dir,
            output=os.path.join(out, name), resolution=size.resolution,
            cutout_size=size.cutout_size, chunk_size=size.chunk_size,
            min_voxels=size.min_voxels, num_shards=64, overwrite=True,
            write_skeletons=first, segments=tuple(segment_ids) if first else None,
            points=None if first else os.path.join(out, next(iter(models)), POINTS_FILE))
        print(f"embedding {len(segment_ids)} segments of the evaluation volume with the "
              f"{name} network (Beam, local runner) ...", flush=True)
        summaries[name] = pipeline.run(config.validate(), beam_args)
    return segment_ids, summaries


def _read_outputs(out: str):
    from segclr_beam import points
    from segclr_beam.job import POINTS_FILE
    from segclr_beam.reader import EmbeddingReader

    sample = sorted(points.read_points(os.path.join(out, POINTS_FILE)))
    reader = EmbeddingReader(os.path.join(out, "raw"))
    embeddings = {}
    for segment_id in sorted({p.segment_id for p in sample}):
        segment = reader.read_segment(segment_id)
        for node_id, vector in zip(segment.node_ids, segment.embeddings):
            embeddings[(segment_id, int(node_id))] = vector
    return sample, np.stack([embeddings[(p.segment_id, p.node_id)] for p in sample])


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


def _comparison(results: dict[str, dict]) -> str:
    """k-NN balanced accuracy and per-class recall of every network and the baseline, per
    variant (raw, 10 um and 25 um means), side by side."""
    from segclr_beam.evaluate import MASK

    trained = results["trained"]
    classes = list(trained["classes"])
    columns = {"trained": trained["variants"], "random": results["random"]["variants"],
               "mask": {name[len(MASK) + 1:]: s for name, s in trained["variants"].items()
                        if name.startswith(MASK + "/")}}
    head = "".join(f"{c[:8]:>9}" for c in classes)
    lines = [f"k-NN (k={trained['k']}) balanced accuracy, {trained['folds']} folds by segment;"
             f" recall per class",
             f"{'variant':<9}" + "".join(f"{n:>9}" for n in columns) + "  | "
             + " | ".join(f"{n:^{len(head)}}" for n in columns),
             f"{'':<9}" + " " * 9 * len(columns) + "  | " + " | ".join(head for _ in columns)]
    for variant in (v for v in trained["variants"] if not v.startswith(MASK + "/")):
        scores = [columns[n][variant]["knn"] for n in columns]
        lines.append(f"{variant:<9}" + "".join(f"{s['balanced_accuracy']:9.3f}" for s in scores)
                     + "  | " + " | ".join("".join(f"{s['recall'][c]:9.3f}" for c in classes)
                                           for s in scores))
    return "\n".join(lines)


def _picture(path: str, dataset: synth.Dataset, sample, embeddings: np.ndarray,
             size: DemoSize, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segclr_beam.volume import open_volume

    classes = [dataset.classes.get(p.segment_id, "?") for p in sample]
    centred = embeddings - embeddings.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ axes[:2].T
    em = open_volume(dataset.em, "EM", size.resolution)
    z = em.bounds.shape[2] // 2
    section = em.read(em.bounds).take(z, axis=2)
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 6))
    for name, colour in CLASS_COLOURS.items():
        chosen = [i for i, c in enumerate(classes) if c == name]
        left.scatter(projected[chosen, 0], projected[chosen, 1], s=8, c=colour,
                     label=f"{name} ({len(chosen)})")
    left.set_title(f"{title}: first two principal components")
    left.legend()
    right.imshow(section.T, cmap="gray", origin="lower")
    near = [i for i, p in enumerate(sample) if abs(p.z - z) <= 8 // size.downsampling]
    right.scatter([sample[i].x for i in near], [sample[i].y for i in near], s=10,
                  c=[CLASS_COLOURS.get(classes[i], "k") for i in near])
    right.set_title(f"sample points near EM section z={z}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _classify(dataset: synth.Dataset, run: str, beam_args: list[str]) -> None:
    """Classifiers on the trained network's embeddings (`classify report`), raw, 10 um and
    25 um means side by side: cell classes and compartments, trained on two thirds of the
    segments and tested on the rest, plain and SNGP; for the cell classes also the
    out-of-distribution AUROC with each class held out of training in turn. The SNGP
    cell-class classifier of the 25 um means is applied to the whole tree
    (`classify apply`); the report's pictures."""
    from segclr_beam import apply, classify, report
    from segclr_beam.labels import Labels, compartment_labels
    from segclr_beam.volume import open_volume

    start = time.monotonic()
    # A quarter of the published width and of its random features: on a few hundred nodes
    # each of the report's classifiers then trains in seconds.
    config = classify.ClassifierConfig(hidden=32, random_features=512, patience=5)
    classes = Labels(synth.CLASSES_FILE, by_segment=dataset.classes)
    compartments = compartment_labels(
        open_volume(dataset.compartments, "compartments", synth.RESOLUTION),
        os.path.join(run, "raw"))
    variants = ["raw", "agg10um", "agg25um"]
    keep = {}
    rows = report.evaluate(run, None, {"class": (classes, classes)}, variants, config,
                           holdout=synth.CLASSES, keep=keep)
    rows += report.evaluate(run, None, {"compartment": (compartments, compartments)},
                            variants, config)
    directory = os.path.join(run, "classify")
    pictures = report.pictures(directory, keep["embeddings"], keep["labels"],
                               keep["predicted"], keep["uncertainty"], keep["classes"],
                               f"{keep['variant']}, {keep['task']} classifier (SNGP)")
    classifier = os.path.join(directory, "classifier")
    shutil.rmtree(classifier, ignore_errors=True)
    keep["classifier"].save(classifier)
    applied = os.path.join(directory, "classes")
    # The tree is small: one in-process worker, unless the demo's Beam options say otherwise.
    apply.run(os.path.join(run, keep["variant"]), classifier, applied,
              ["--direct_num_workers=1", *beam_args], overwrite=True)
    summary = apply.read_segment_summary(applied)
    right = np.mean([summary[s][1] == dataset.classes[s] for s in summary])
    command = os.path.join(os.path.dirname(sys.executable), "segclr-beam")
    print(f"\nclassifiers on the raw embeddings and the 10 and 25 um means, plain vs SNGP "
          f"(tested on a third of the segments, held out; OOD AUROC: the mean over the cell "
          f"classes, each left out of training in turn)\n{report.format_rows(rows)}"
          f"\nOOD AUROC by held-out class\n{report.format_ood(rows)}"
          f"\nclassify apply of the SNGP cell-class classifier: {len(summary)} segments, "
          f"majority class right for {right:.2f} (two thirds were trained on): {applied}\n"
          f"again: {command} classify report --train {run} --labels "
          f"{os.path.join(dataset.root, synth.CLASSES_FILE)} --holdout-classes "
          f"{','.join(synth.CLASSES)} --hidden {config.hidden} --random-features "
          f"{config.random_features} --patience {config.patience}")
    for path in pictures:
        print(f"picture        {path}")
    print(f"classifiers    {time.monotonic() - start:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo_data",
                        help="synthetic datasets, pair table, training run and models")
    parser.add_argument("--out", default="demo_output", help="output directory")
    parser.add_argument("--published-size", action="store_true",
                        help="train and run the published network size (for a GPU machine)")
    args, beam_args = parser.parse_known_args(argv)
    configure_logging()

    from segclr_beam import evaluate

    start = time.monotonic()
    size = PUBLISHED if args.published_size else DEMO
    training_volume = _volumes(args.data, TRAINING_SEED, size)
    evaluation_volume = _volumes(args.data, EVALUATION_SEED, size)
    print(synth.summarize(evaluation_volume), flush=True)
    checkpoint, record = _trained_checkpoint(args.data, training_volume, size, beam_args)
    models = _models(args.data, size, checkpoint, record)
    out = os.path.abspath(args.out)
    segment_ids, summaries = _embed(evaluation_volume, size, models, out, beam_args)
    labels = evaluation_volume.classes
    results = {name: evaluate.evaluate(os.path.join(out, name), labels,
                                       baseline=name == "trained")
               for name in models}
    for name, result in results.items():
        evaluate.write_json(result, os.path.join(out, f"evaluation-{name}.json"))
    sample, embeddings = _read_outputs(os.path.join(out, "trained"))
    picture = os.path.join(out, "embeddings.png")
    _picture(picture, evaluation_volume, sample, embeddings, size,
             f"SegCLR embeddings after {record['steps']} training steps")

    arch = size.architecture()
    print(f"\nnetwork: widths {'/'.join(map(str, arch.widths))}, {arch.input_size}^3 cutouts "
          f"at {' x '.join(f'{r:g}' for r in size.resolution)} nm, trained {record['steps']} "
          f"steps on the volume of seed {TRAINING_SEED} (final loss "
          f"{record['final_loss']:.3f}); evaluated on the volume of seed {EVALUATION_SEED}")
    trained = summaries["trained"]
    print(f"segments embedded: {len({p.segment_id for p in sample})}, points: {len(sample)}, "
          f"cutouts: {trained.counters.get('cutouts_emitted', 0)}")
    print(_class_mix(evaluation_volume, segment_ids, sample))
    for name, result in results.items():
        print(f"\n{name} network\n{evaluate.format_table(result)}")
    print("\n" + _comparison(results))
    print()
    for name, summary in summaries.items():
        print(f"embedding job ({name}) wall time {summary.wall_seconds:.0f} s; outputs "
              f"{os.path.join(out, name)}")
    print(f"annotations    {os.path.join(out, 'trained', annotations.DIRECTORY)}")
    print(f"picture        {picture}")
    _classify(evaluation_volume, os.path.join(out, "trained"), beam_args)
    command = os.path.join(os.path.dirname(sys.executable), "segclr-beam")
    print(f"to look at it in Neuroglancer: {command} view {os.path.join(out, 'trained')}")
    print(f"demo wall time {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
