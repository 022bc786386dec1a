"""The `segclr-beam` command: thin argument parsing over the library's functions."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys


def _triple(text: str, kind=int) -> tuple:
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated values, got {text!r}")
    return tuple(kind(p) for p in parts)


def _synth(args: argparse.Namespace) -> None:
    from segclr_beam import synth

    dataset = synth.write_dataset(args.out, shape=args.shape, seed=args.seed)
    print(synth.summarize(dataset))


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _add_architecture(p: argparse.ArgumentParser) -> None:
    p.add_argument("--widths", type=_widths, default=None, help="stage widths, e.g. 64,128,256,512")
    p.add_argument("--input-size", type=int, default=None, help="cutout edge in voxels")
    p.add_argument("--bottleneck-width", type=int, default=None)
    p.add_argument("--embedding-dim", type=int, default=None)


def _architecture(args: argparse.Namespace):
    """The Architecture of the size flags given (the others published), or None if none is."""
    from segclr_beam import model

    sizes = {"widths": args.widths, "input_size": args.input_size,
             "bottleneck_width": args.bottleneck_width, "embedding_dim": args.embedding_dim}
    given = {k: v for k, v in sizes.items() if v is not None}
    return model.Architecture(**given) if given else None


def _export_model(args: argparse.Namespace) -> None:
    import json

    from segclr_beam import model

    try:
        arch = _architecture(args)  # None: the checkpoint's (if trained here), or published
        identity = model.export_saved_model(args.out, arch, checkpoint=args.checkpoint,
                                            seed=args.seed)
    except (OSError, ValueError) as e:
        raise SystemExit(f"segclr-beam export-model: {e}") from None
    print(json.dumps(identity, indent=2, sort_keys=True))


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with its help; defaults stay the config's."""
    import dataclasses

    from segclr_beam.train import TrainConfig

    kinds = {"int": int, "float": float, "resolution": lambda t: _triple(t, float)}
    for field in dataclasses.fields(TrainConfig):
        if field.name == "architecture":
            _add_architecture(p)
            continue
        kind = kinds.get(field.name, kinds.get(str(field.type), str))
        default = "" if field.default is None else f" (default {field.default})"
        p.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None,
                       required=field.name in ("pairs", "em", "segmentation", "out"),
                       help=field.metadata["help"] + default)


_TRAIN = ("train the SegCLR network, or fine-tune a checkpoint, on a positive-pair table; a "
          "rerun of a killed run resumes it (`segclr-beam train --help` for its options)")


def _train(args: argparse.Namespace) -> None:
    import json

    from segclr_beam import runner, train

    parser = argparse.ArgumentParser(prog="segclr-beam train", description=_TRAIN)
    _add_train_flags(parser)
    args = parser.parse_args(args.forwarded)
    runner.configure_logging()
    try:
        fields = {k: v for k, v in vars(args).items()
                  if k in {f.name for f in dataclasses.fields(train.TrainConfig)} and v is not None}
        arch = _architecture(args)
        config = train.TrainConfig(**fields, **({"architecture": arch} if arch else {}))
        record = train.train(config)
    except (OSError, ValueError) as e:
        raise SystemExit(f"segclr-beam train: {e}") from None
    print(json.dumps(record, indent=2, sort_keys=True))


def _read(args: argparse.Namespace) -> None:
    from segclr_beam import reader

    try:
        tree = reader.EmbeddingReader(args.out, args.num_shards, args.bytewidth)
        print(reader.describe(tree, tree.read_segment(args.segment)))
    except (KeyError, ValueError) as e:
        raise SystemExit(f"segclr-beam read: {e.args[0]}") from None


def _ints(text: str) -> tuple[int, ...]:
    """Comma-separated integers, or @FILE naming a file with one per line."""
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = ",".join(line.strip() for line in f if line.strip())
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text[:80]!r}")


def _points(args: argparse.Namespace) -> None:
    import apache_beam as beam

    from segclr_beam import points, runner, skeleton, volume

    try:
        if args.source:
            source = points.ReadPoints(args.source, args.segments, args.resolution,
                                       args.spacing_nm)
        else:
            if args.bbox is not None and len(args.bbox) != 6:
                raise ValueError(f"--bbox: expected x0,y0,z0,x1,y1,z1, got {args.bbox}")
            if len(args.resolution) != 3:
                raise ValueError(f"--resolution: expected X,Y,Z nm, got {args.resolution}")
            segmentation = volume.open_volume(args.segmentation, "segmentation", args.resolution)
            bbox = volume.Box(args.bbox[:3], args.bbox[3:]) if args.bbox else None
            options = skeleton.SkeletonOptions(chunk_size=args.chunk_size,
                                               min_voxels=args.min_voxels,
                                               spacing_nm=args.spacing_nm)
            source = skeleton.SkeletonizeSegments(segmentation, bbox, options, args.segments,
                                                  args.skeletons)
        write = points.WritePoints(args.out, args.num_shards)
        options = runner.pipeline_options(args.forwarded)
    except ValueError as e:
        raise SystemExit(f"segclr-beam points: {e}") from None
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | "Points" >> source | "Write" >> write
    print("\n".join(points.shard_paths(args.out, args.num_shards)))


def _view(args: argparse.Namespace) -> None:
    import json
    import threading

    from segclr_beam import view

    try:
        if args.state_only:
            print(json.dumps(view.shared_state(args.out), indent=2))
            return
        viewer = view.serve(args.out, args.bind_address, args.port)
    except (OSError, ValueError) as e:
        raise SystemExit(f"segclr-beam view: {e}") from None
    print(f"Neuroglancer viewer of {args.out} (Ctrl-C to stop):\n{viewer.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        viewer.stop()


def _evaluate(args: argparse.Namespace) -> None:
    from segclr_beam import evaluate

    try:
        result = evaluate.evaluate(
            args.output, evaluate.load_labels(args.labels), k=args.k, folds=args.folds,
            seed=args.seed, baseline=args.baseline, segmentation=args.segmentation)
    except (OSError, ValueError) as e:
        raise SystemExit(f"segclr-beam evaluate: {e}") from None
    print(evaluate.format_table(result))
    if args.json:
        evaluate.write_json(result, args.json)
        print(f"written: {args.json}")


def _labels(labels: str | None, compartments: str | None, resolution, tree: str):
    """Labels from a CSV/JSON file, or node labels from a compartment volume (at
    `resolution`, default the tree's) read at the tree's nodes."""
    from segclr_beam import labels as labelling
    from segclr_beam import reader, volume

    if (labels is None) == (compartments is None):
        raise ValueError("give one of --labels and --compartments")
    if compartments is None:
        return labelling.read_labels(labels)
    resolution = resolution or reader.EmbeddingReader(tree).coordinates.resolution_nm
    return labelling.compartment_labels(
        volume.open_volume(compartments, "compartments", resolution), tree)


def _classifier_config(args: argparse.Namespace):
    from segclr_beam.classify import ClassifierConfig

    return ClassifierConfig(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(ClassifierConfig)})


def _classify_train(args: argparse.Namespace) -> None:
    import json

    from segclr_beam import classify

    try:
        labels = _labels(args.labels, args.compartments, args.compartments_resolution,
                         args.tree)
        classifier = classify.train_on_tree(args.tree, labels, _classifier_config(args),
                                            args.classes, verbose=2 if args.verbose else 0)
        classifier.save(args.out)
    except (OSError, ValueError) as e:
        raise SystemExit(f"segclr-beam classify train: {e}") from None
    print(json.dumps({"classifier": args.out, "classes": list(classifier.classes),
                      "metrics": classifier.metrics}, indent=2))


def _classify_apply(args: argparse.Namespace) -> None:
    from segclr_beam import apply, runner
    from segclr_beam.job import root_cause

    runner.configure_logging()
    try:
        result = apply.run(args.tree, args.classifier, args.output, args.forwarded,
                           args.batch_size, args.overwrite, args.annotations)
    except Exception as e:  # a stage's error reaches here wrapped by Beam
        raise SystemExit(f"segclr-beam classify apply: {root_cause(e)}") from None
    info = apply.read_info(args.output)
    if info is None:
        print(f"submitted: {result}")
    else:
        print(f"classified {info['nodes']} nodes of {info['segments']} segments: "
              f"{args.output}")


def _classify_report(args: argparse.Namespace) -> None:
    from segclr_beam import report

    try:
        tasks = {}
        given = {"class": ((args.labels, None), (args.test_labels, None)),
                 "compartment": ((None, args.compartments), (None, args.test_compartments))}
        for task, (train, test) in given.items():
            if train == (None, None):
                continue
            raw = f"{args.train}/raw"
            first = _labels(*train, args.compartments_resolution, raw)
            second = first if test == (None, None) else _labels(
                *test, args.compartments_resolution, f"{args.test or args.train}/raw")
            tasks[task] = (first, second)
        if not tasks:
            raise ValueError("give --labels and/or --compartments")
        keep = {} if args.pictures else None
        rows = report.evaluate(args.train, args.test, tasks, args.variants,
                               _classifier_config(args), args.holdout_classes or (), keep)
    except (OSError, ValueError) as e:
        raise SystemExit(f"segclr-beam classify report: {e}") from None
    print(report.format_rows(rows))
    if args.holdout_classes:
        print(report.format_ood(rows))
    if args.pictures:
        for path in report.pictures(args.pictures, keep["embeddings"], keep["labels"],
                                    keep["predicted"], keep["uncertainty"], keep["classes"],
                                    f"{keep['variant']}, {keep['task']} classifier (SNGP)"):
            print(f"picture {path}")


def _add_classify(commands) -> None:
    from segclr_beam.apply import DEFAULT_BATCH_SIZE
    from segclr_beam.classify import ClassifierConfig
    from segclr_beam.config import add_flags, names, numbers

    group = commands.add_parser(
        "classify", help="classifiers on embeddings: train, apply (a Beam job), report")
    steps = group.add_subparsers(dest="step", required=True)

    def labels(p, prefix=""):
        p.add_argument(f"--{prefix}labels", default=None,
                       help="CSV (segment_id,class | segment_id,node_id,class | "
                            "segment_id,x,y,z,class) or JSON {segment id: class}")
        p.add_argument(f"--{prefix}compartments", default=None,
                       help="per-voxel compartment volume (the synthetic dataset's uint8 "
                            "codes: 1 axon, 2 shaft, 3 spine, 4 soma, 5 glia) read at the nodes")

    def compartments_resolution(p):
        p.add_argument("--compartments-resolution", type=numbers(float), default=None,
                       help="the scale of the compartment volume to read, X,Y,Z nm "
                            "(default: the tree's resolution)")

    p = steps.add_parser("train", help="train a classifier on the labelled nodes of a tree")
    p.add_argument("--tree", required=True, help="embedding tree, e.g. OUT/agg10um")
    labels(p)
    compartments_resolution(p)
    p.add_argument("--out", required=True, help="new classifier directory (local or gs://)")
    p.add_argument("--classes", type=names, default=None,
                   help="only nodes of these classes, comma-separated (default: every label)")
    p.add_argument("--verbose", action="store_true", help="print every epoch")
    add_flags(p, defaults=True, config=ClassifierConfig)
    p.set_defaults(run=_classify_train)

    p = steps.add_parser("apply", help="classify every node of a tree (a Beam job; other "
                         "flags go to Beam)")
    p.add_argument("--tree", required=True, help="embedding tree, e.g. OUT/agg10um")
    p.add_argument("--classifier", required=True, help="classifier directory")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"nodes per classifier call (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--annotations", action="store_true",
                   help="also write a Neuroglancer annotation layer of the nodes with their "
                        "class, uncertainty and probabilities (OUTPUT/annotations/)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous output")
    p.set_defaults(run=_classify_apply, forwarded=[])

    p = steps.add_parser(
        "report", help="train on one output root, test on another: node balanced accuracy "
        "and segment accuracy per variant, plain vs SNGP, OOD AUROC of the uncertainty, "
        "pictures")
    p.add_argument("--train", required=True, help="output root to train on")
    p.add_argument("--test", default=None, help="output root to test on (default: a third "
                   "of the segments of --train, held out)")
    labels(p)
    labels(p, "test-")
    compartments_resolution(p)
    p.add_argument("--variants", type=names, default=None,
                   help="trees below each root (default: every tree, raw first)")
    p.add_argument("--holdout-classes", type=names, default=None,
                   help="leave each of these classes out of one more training per head "
                        "and variant and report the AUROC of the uncertainty for its nodes "
                        "(the table gives their mean)")
    p.add_argument("--pictures", default=None,
                   help="write umap.png and confusion.png here (SNGP, first task, last "
                        "variant)")
    add_flags(p, defaults=True, config=ClassifierConfig)
    p.set_defaults(run=_classify_report)


# Jobs with a parser of their own in pipelines/: `segclr-beam JOB ...` is `python -m pipelines.JOB ...`.
_JOBS = {
    "embed": "embed every segment of a volume: points, cutouts, SegCLR, radius means, outputs "
             "(`segclr-beam embed --help` for its options)",
    "reprocess": "embed a new segmentation version into a new output tree, re-embedding only "
                 "what changed since a previous run (`segclr-beam reprocess --help` for its "
                 "options)",
    "pairs": "write the positive-pair table for training: node pairs of every segment's "
             "skeleton within a path distance range (`segclr-beam pairs --help` for its "
             "options)",
}


def _job(args: argparse.Namespace) -> None:
    importlib.import_module(f"pipelines.{args.command}").main(args.forwarded)


def build_parser() -> argparse.ArgumentParser:
    from segclr_beam import evaluate
    from segclr_beam.config import add_flags

    parser = argparse.ArgumentParser(prog="segclr-beam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("synth", help="write the synthetic EM + segmentation dataset")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--shape", type=_triple, default=None, help="X,Y,Z voxels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_synth)

    p = commands.add_parser(
        "export-model", help="write the SegCLR network as a SavedModel (uint8 cutouts in, "
        "embeddings out); sizes default to the published model")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint prefix (TF1 or tf2resaved layout); without it the weights "
                        "are random")
    p.add_argument("--out", required=True, help="new SavedModel directory (local or gs://)")
    _add_architecture(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(run=_export_model)

    commands.add_parser("train", add_help=False, help=_TRAIN).set_defaults(run=_train,
                                                                           forwarded=[])

    p = commands.add_parser("read", help="summarize one segment of an embedding output tree "
                            "(CSV-ZIP; a public release needs --num-shards and --bytewidth)")
    p.add_argument("out", help="output tree, e.g. OUT/agg10um (local or gs://)")
    p.add_argument("--segment", type=int, required=True, help="segment id")
    p.add_argument("--num-shards", type=int, default=None, help="for a tree without info.json")
    p.add_argument("--bytewidth", type=int, default=None, help="for a tree without info.json")
    p.set_defaults(run=_read)

    p = commands.add_parser(
        "points", help="write the sample points of a run as Avro: from chunked skeletons of a "
        "segmentation, or from precomputed skeletons or a points table; other flags go to Beam")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--segmentation", help="segmentation volume to skeletonize (TensorStore "
                        "spec, JSON file or URL)")
    source.add_argument("--from", dest="source", help="precomputed skeleton directory, or glob "
                        "of CSV / Avro tables with segment_id,x,y,z[,node_id]")
    p.add_argument("--out", required=True, help="points file, e.g. OUT/points.avro (or gs://)")
    add_flags(p, ("resolution", "bbox", "chunk_size", "min_voxels", "spacing_nm"), defaults=True)
    p.add_argument("--segments", type=_ints, default=None,
                   help="only these segment ids: ID,ID,... or @FILE with one per line")
    p.add_argument("--skeletons", default=None,
                   help="also write the merged skeletons here (precomputed, for Neuroglancer)")
    p.add_argument("--num-shards", type=int, default=1, help="points files")
    p.set_defaults(run=_points, forwarded=[])

    p = commands.add_parser(
        "view", help="serve a Neuroglancer viewer of a run (EM, segmentation, skeletons, "
        "embeddings as annotations) on this machine and print its URL")
    p.add_argument("out", help="the run's output directory (local or gs://)")
    p.add_argument("--state-only", action="store_true",
                   help="print the Neuroglancer JSON state of a run on gs://, with gs:// "
                        "sources, instead of serving")
    p.add_argument("--bind-address", default="127.0.0.1",
                   help="address the viewer and the local file servers listen on")
    p.add_argument("--port", type=int, default=0, help="viewer port (0: any free port)")
    p.set_defaults(run=_view)

    p = commands.add_parser(
        "evaluate", help="how well a run's embeddings separate labelled classes: k-NN and "
        "linear-probe classification cross-validated by segment, on every variant")
    p.add_argument("output", help="an embedding run's output root (local or gs://)")
    p.add_argument("--labels", required=True, help="segment id -> class: JSON ({id: class}, "
                   "or a synthetic dataset's classes.json) or CSV with segment_id,class")
    p.add_argument("--json", default=None, help="also write the scores here as JSON")
    p.add_argument("--k", type=int, default=evaluate.DEFAULT_K,
                   help=f"neighbours of k-NN (default {evaluate.DEFAULT_K})")
    p.add_argument("--folds", type=int, default=evaluate.DEFAULT_FOLDS,
                   help=f"cross-validation folds (default {evaluate.DEFAULT_FOLDS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds (default 0)")
    p.add_argument("--baseline", action="store_true",
                   help="also score the trivial baseline: hand features of each node's mask "
                        "in its cutout window (voxel fraction, extents, spread)")
    p.add_argument("--segmentation", default=None,
                   help="segmentation for the baseline (default: the run's, from run.json)")
    p.set_defaults(run=_evaluate)

    _add_classify(commands)

    for name, text in _JOBS.items():
        commands.add_parser(name, add_help=False, help=text).set_defaults(run=_job, forwarded=[])
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, "forwarded"):  # a command with its own parser gets its arguments as given
        args.forwarded = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
