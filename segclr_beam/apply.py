"""`classify apply`: a Beam job that classifies every node of an embedding tree.

    shard files of the tree --read, one element per file--> segments --classifier in a DoFn
    (loaded once per worker), batches fixed per shard--> per-node probabilities and
    uncertainty --shard by segment as the tree--> OUTPUT/{shard}.zip, OUTPUT/segments/,
    [OUTPUT/annotations/], info.json

Each `{shard}.zip` holds a `{segment_id}.csv` per segment with rows
`node_id,x,y,z,p_<class>...,uncertainty` (the CSV-ZIP writer of the embeddings, so
segclr_beam.reader reads it too); `segments/{shard}.csv` has one row per segment: its node
count, majority class, the fraction of its nodes in that class and their mean uncertainty.
Probabilities are the variance-adjusted softmax (plain softmax without SNGP), the uncertainty
the Dempster-Shafer score of the same logits. On request the nodes also go to a Neuroglancer
annotation layer (segclr_beam.annotations) with their class, uncertainty and probabilities.

`prepare` checks before any work that the tree comes from the embedding model and variant
the classifier was trained on, and takes the output's lock (segclr_beam.lock); `run` runs
the job, and a local run that fails removes what it wrote.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from neuroglancer import AnnotationPropertySpec

from segclr_beam import annotations, classify, shards
from segclr_beam.config import ConfigError
from segclr_beam.job import OutputClaim
from segclr_beam.outputs import INFO_NAME, NothingToWriteError, write_csv_zip
from segclr_beam.reader import EmbeddingReader
from segclr_beam.records import EmbeddingTable, Point
from segclr_beam.runner import is_local, pipeline_options
from segclr_beam.volume import Box

FORMAT = "segclr-beam classifications"
FORMAT_VERSION = 1
SEGMENTS_DIR = "segments"
SEGMENT_COLUMNS = "segment_id,nodes,class,fraction,mean_uncertainty"
DEFAULT_BATCH_SIZE = 1024
STAGES = ("Shards", "Classify", "Write")
NODES = "nodes"  # the Classify step's tagged output of annotation records
# What a run puts below its output (glob patterns): removed before a run when an earlier one
# left them incomplete (or with --overwrite), and after a local run that failed.
OUTPUT_ENTRIES = (INFO_NAME, "*.zip", SEGMENTS_DIR, annotations.DIRECTORY,
                  shards.TEMP_PREFIX + "*", ".segclr-write-probe")


def check_compatible(tree: EmbeddingReader, meta: dict, classifier_path: str) -> None:
    """Raise ConfigError unless `tree` holds the embeddings the classifier was trained on."""
    info, trained = tree.info, meta["input"]
    if info is None:
        raise ConfigError(f"tree: {tree.path} has no {INFO_NAME}: cannot check that it holds "
                          f"the embeddings the classifier {classifier_path} was trained on")
    for key in ("variant", "aggregation_radius_nm"):
        if info.get(key) != trained.get(key):
            raise ConfigError(f"{key}: the tree {tree.path} has {info.get(key)!r}, the "
                              f"classifier {classifier_path} was trained on "
                              f"{trained.get(key)!r}")
    mine, theirs = info.get("model") or {}, trained.get("model") or {}
    for key in ("model_id", "weights_sha256"):
        if mine.get(key) != theirs.get(key):
            raise ConfigError(f"embedding model: the tree {tree.path} was embedded by "
                              f"{mine.get('model_id')!r} ({key} {mine.get(key)!r}), the "
                              f"classifier {classifier_path} was trained on embeddings of "
                              f"{theirs.get('model_id')!r} ({key} {theirs.get(key)!r})")
    if info.get("embedding_dim") != meta["embedding_dim"]:
        raise ConfigError(f"embedding_dim: the tree {tree.path} has "
                          f"{info.get('embedding_dim')}, the classifier {classifier_path} "
                          f"takes {meta['embedding_dim']}")


def segment_summary(segment_id: int, probabilities: np.ndarray, uncertainty: np.ndarray,
                    classes: tuple[str, ...]) -> str:
    """One `segment_id,nodes,class,fraction,mean_uncertainty` line: the majority class of
    the nodes' most probable classes (ties to the first class)."""
    votes = np.bincount(probabilities.argmax(axis=1), minlength=len(classes))
    winner = int(votes.argmax())
    fraction = np.float32(votes[winner] / len(probabilities))
    mean = np.float32(np.asarray(uncertainty, np.float64).mean())
    return f"{segment_id},{len(probabilities)},{classes[winner]},{fraction},{mean}\n"


@dataclasses.dataclass
class ApplyJob:
    """A checked `classify apply`: the tree, the classifier and the output's lock."""

    tree: EmbeddingReader
    meta: dict              # the classifier's classifier.json
    classifier: str
    output: str
    batch_size: int
    annotations: bool
    claim: OutputClaim

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta["classes"])

    def layer(self) -> annotations.Layer:
        """The annotation layer of the classified nodes: the tree's embeddings with the
        class, the uncertainty and each class's probability as further properties."""
        box = self.tree.info["volumes"]["bbox"]
        extra = (AnnotationPropertySpec(
                     id="class", type="uint8", description="most probable class",
                     enum_values=list(range(len(self.classes))), enum_labels=list(self.classes)),
                 AnnotationPropertySpec(id="uncertainty", type="float32",
                                        description="Dempster-Shafer uncertainty"),
                 *(AnnotationPropertySpec(id=f"p_{c}", type="float32",
                                          description=f"probability of {c}")
                   for c in self.classes))
        return annotations.Layer(tuple(self.tree.coordinates.resolution_nm),
                                 Box(box[:3], box[3:]), int(self.tree.info["embedding_dim"]),
                                 self.tree.num_shards, extra)


class _ClassifyShard(beam.DoFn):
    """One shard file of the tree -> (segment id, EmbeddingTable of probabilities and
    uncertainty) per segment, and with `annotations` the tagged node records of the
    annotation layer. The classifier is loaded once per worker and called on batches of
    `batch_size` consecutive nodes of the shard in archive order, so a shard's batches, and
    with them its bytes, are the same on every run."""

    def __init__(self, job: ApplyJob):
        self._tree, self._path, self._batch = job.tree, job.classifier, job.batch_size
        self._classes, self._annotations = job.classes, job.annotations
        self._nodes = beam.metrics.Metrics.counter("segclr", "nodes_classified")

    def setup(self):
        self._classifier = classify.load(self._path)

    def process(self, path: str):
        segments = list(self._tree.read_shard(path))
        if not segments:
            return
        embeddings = np.concatenate([s.embeddings for s in segments])
        probabilities, uncertainty = self._classifier.predict(embeddings, self._batch)
        columns = np.concatenate([probabilities, uncertainty[:, None]], axis=1)
        columns = columns.astype(np.float32)
        bounds = np.cumsum([0] + [len(s) for s in segments])
        for segment, a, b in zip(segments, bounds[:-1], bounds[1:]):
            self._nodes.inc(len(segment))
            xyz = self._tree.coordinates.to_voxels(segment.xyz)
            yield segment.segment_id, EmbeddingTable(
                np.full(len(segment), segment.segment_id, np.uint64), segment.node_ids, xyz,
                columns[a:b])
            if self._annotations:
                # Python floats (the float32 values exactly) pickle faster than numpy's.
                for k, (node, (x, y, z), row) in enumerate(zip(
                        segment.node_ids.tolist(), xyz.tolist(), columns[a:b].tolist())):
                    extra = {"class": int(np.argmax(row[:-1])), "uncertainty": row[-1],
                             **{f"p_{c}": row[i] for i, c in enumerate(self._classes)}}
                    yield beam.pvalue.TaggedOutput(NODES, (
                        Point(segment.segment_id, node, x, y, z), segment.embeddings[k], extra))


@dataclasses.dataclass(frozen=True)
class _Output:
    """Where and how one `classify apply` writes: shard names, files and info.json."""

    staging: shards.Staging
    job: ApplyJob
    description: dict

    def keys(self, record: tuple[int, EmbeddingTable]) -> Iterable[int]:
        yield self.job.tree.shard_of(record[0])

    def write(self, shard: int, records: Iterable[tuple[int, EmbeddingTable]]) -> tuple:
        segments = sorted(records, key=lambda r: r[0])
        table = EmbeddingTable.concatenate(t for _, t in segments).sorted()
        name = f"{shard}.zip"
        write_csv_zip(self.staging.temp_path("", name), table, self.job.tree.coordinates)
        classes = self.job.classes
        k = len(classes)
        lines = "".join(segment_summary(s.segment_ids[0], s.embeddings[:, :k],
                                        s.embeddings[:, k], classes)
                        for s in table.segments())
        summary = f"{shard}.csv"
        shards.write_file(self.staging.temp_path(SEGMENTS_DIR, summary),
                          (SEGMENT_COLUMNS + "\n" + lines).encode(), "text/csv")
        return name, summary, len(segments), len(table)

    def finalize(self, written: list[tuple], layer: list[str], release: bool) -> str:
        """Put the files in place, info.json last; with `release` also release the output
        (a run the driver does not wait for)."""
        nodes = sum(w[3] for w in written)
        if not nodes:
            raise NothingToWriteError(f"{self.job.tree.path}: no node was classified")
        columns = ",".join(["node_id,x,y,z", *(f"p_{c}" for c in self.job.classes),
                            "uncertainty"])
        info = {**self.description, "segments": sum(w[2] for w in written), "nodes": nodes,
                "csv_zip": {"files": "{shard}.zip", "count": len(written), "columns": columns},
                "segment_summary": {"files": f"{SEGMENTS_DIR}/{{shard}}.csv",
                                    "columns": SEGMENT_COLUMNS},
                "annotations": annotations.DIRECTORY if layer else None}
        marker = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()
        paths = self.staging.finalize({"": [w[0] for w in written],
                                       SEGMENTS_DIR: [w[1] for w in written]},
                                      {INFO_NAME: marker}, stale=("*.zip", "*.csv"))
        if release:
            self.job.claim.finish()
        return paths[0]


def prepare(tree_path: str, classifier_path: str, output: str, overwrite: bool = False,
            batch_size: int = DEFAULT_BATCH_SIZE, annotations: bool = False) -> ApplyJob:
    """Every check before any work: the tree, the classifier, their match, the output.

    Claims the output (its lock); the job's `claim` holds it until finished or discarded. What an
    incomplete earlier run left at the output is removed, and with `overwrite` a complete one.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    try:
        tree = EmbeddingReader(tree_path)
    except ValueError as e:
        raise ConfigError(f"tree: {e}") from None
    try:
        meta = classify.read_meta(classifier_path)
    except ValueError as e:
        raise ConfigError(f"classifier: {e}") from None
    check_compatible(tree, meta, classifier_path)
    if not tree.shard_paths():
        raise ConfigError(f"tree: {tree.path} holds no shard files")
    if annotations and "bbox" not in (tree.info.get("volumes") or {}):
        raise ConfigError(f"annotations: the tree {tree.path} records no box (volumes.bbox "
                          f"in its {INFO_NAME}) for the annotation layer")
    output = output.rstrip("/")
    if output == tree.path:
        raise ConfigError(f"output: {output} is the tree being classified")
    claim = OutputClaim.acquire(output, INFO_NAME, "classification", overwrite,
                                entries=OUTPUT_ENTRIES)
    return ApplyJob(tree, meta, classifier_path, output, batch_size, annotations, claim)


def build(pipeline: beam.Pipeline, job: ApplyJob, release: bool = True) -> beam.PCollection:
    """Add the job to `pipeline`; returns the PCollection of the written info.json path.
    With `release` the last step releases the output's lock."""
    tree = job.tree
    description = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "classes": list(job.classes),
        "variant": tree.info["variant"],
        "aggregation_radius_nm": tree.info["aggregation_radius_nm"],
        "num_shards": tree.num_shards, "bytewidth": tree.bytewidth,
        "sharding": shards.SHARDING, "coordinates": tree.info["coordinates"],
        "tree": tree.path, "classifier": job.classifier.rstrip("/"),
        "classifier_input": job.meta["input"], "classifier_metrics": job.meta["metrics"],
        "probabilities": "softmax of logits / sqrt(1 + pi/8 * GP variance) (plain softmax "
                         "without SNGP)",
        "uncertainty": "Dempster-Shafer K / (K + sum exp(logits)) of the same logits"}
    out = _Output(shards.Staging.below(job.output), job, description)
    classified = (pipeline
                  | "Shards" >> beam.Create(tree.shard_paths())
                  | "Spread" >> beam.Reshuffle()
                  | "Classify" >> beam.ParDo(_ClassifyShard(job)).with_outputs(
                      NODES, main="segments"))
    layer = pipeline | "NoLayer" >> beam.Create([])
    if job.annotations:
        layer = classified[NODES] | "Annotations" >> annotations.WriteAnnotations(
            job.output, job.layer())
    return (classified.segments
            | "Write" >> shards.WriteShards(out.keys, out.write, out.finalize,
                                            beam.pvalue.AsList(layer), release))


def run(tree_path: str, classifier_path: str, output: str, beam_args: list[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE, overwrite: bool = False,
        annotations: bool = False) -> Any:
    """Check, build and run the job; locally it waits, and a local run that fails leaves
    nothing at the output. Returns Beam's PipelineResult."""
    options = pipeline_options(beam_args or [])
    local = is_local(options)
    job = prepare(tree_path, classifier_path, output, overwrite, batch_size, annotations)
    try:
        pipeline = beam.Pipeline(options=options)
        build(pipeline, job, release=not local)
        result = pipeline.run()
        if local:
            result.wait_until_finish()
            job.claim.finish()
    except BaseException:
        job.claim.discard()
        raise
    return result


def read_info(output: str) -> dict | None:
    """The info.json of a finished `classify apply` output, None if there is none."""
    path = shards.join(output, INFO_NAME)
    if not FileSystems.exists(path):
        return None
    return shards.read_json(path)


def read_segment_summary(output: str) -> dict[int, tuple[int, str, float, float]]:
    """{segment id: (nodes, class, fraction, mean uncertainty)} of a `classify apply` output."""
    result = {}
    for file in sorted(shards.list_names(shards.join(output, SEGMENTS_DIR), "*.csv")):
        with FileSystems.open(shards.join(output, SEGMENTS_DIR, file)) as f:
            for line in f.read().decode().splitlines()[1:]:
                segment, nodes, name, fraction, mean = line.split(",")
                result[int(segment)] = (int(nodes), name, float(fraction), float(mean))
    return result
