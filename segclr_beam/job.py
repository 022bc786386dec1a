"""A job: a checked configuration with its volumes and model, and the pieces every composition
of stages shares (pipeline.py embeds everything, reprocess.py what changed).

`prepare` checks everything that can fail before any work (configuration, volumes, model,
output path). `make_points`, `write_results` and `record_run` add the stages both
compositions have in common; `summarize` reports a finished local run.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Collection

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from segclr_beam import aggregate, annotations, model, outputs, points, skeleton
from segclr_beam.config import ConfigError, EmbedConfig
from segclr_beam.manifest import fingerprint_box
from segclr_beam.records import output_variants, variant_name
from segclr_beam.shards import join
from segclr_beam.volume import Box, Volume, VolumeError, open_volumes

POINTS_FILE = "points.avro"
RUN_FILE = "run.json"
RAW = variant_name(None)


@dataclasses.dataclass
class Job:
    """A validated configuration with its volumes opened and its model resolved."""

    config: EmbedConfig
    em: Volume
    segmentation: Volume
    bbox: Box
    model_dir: str         # an exported SavedModel
    model: dict            # its identity record

    @property
    def variants(self) -> dict[str, float | None]:
        return output_variants(self.config.radii_nm)

    @property
    def trees(self) -> dict[str, str]:
        """Output tree path of each variant."""
        return {name: join(self.config.output, name) for name in self.variants}

    @property
    def embedding_dim(self) -> int:
        return int(self.model["architecture"]["embedding_dim"])

    def provenance(self) -> dict[str, Any]:
        return {"em": self.em.spec, "segmentation": self.segmentation.spec,
                "resolution_nm": list(self.em.resolution), "bbox": [*self.bbox.start, *self.bbox.stop]}


# Checks before any work ----------------------------------------------------------------------

def _check_output(config: EmbedConfig, variants: dict) -> None:
    """Refuse to mix with a previous run's output; prove the output path is writable."""
    root = config.output
    previous = [join(root, RUN_FILE), join(root, POINTS_FILE)]
    previous += [join(root, name, outputs.INFO_NAME) for name in variants]
    previous.append(join(root, annotations.DIRECTORY, annotations.INFO_NAME))
    found = [path for path in previous if FileSystems.exists(path)]
    if found and not config.overwrite:
        raise ConfigError(f"output: {root} holds a previous run ({found[0]}); "
                          "choose another path or pass --overwrite")
    probe = join(root, ".segclr-write-probe")
    try:
        with FileSystems.create(probe) as f:
            f.write(b"")
        FileSystems.delete([probe])
    except Exception as e:  # the filesystem's own error types vary by scheme
        raise ConfigError(f"output: cannot write to {root}: {e}") from None


def _resolve_model(config: EmbedConfig) -> str:
    """The SavedModel to run: `model` itself, or the export of a checkpoint prefix."""
    path = config.model
    if FileSystems.exists(join(path, "saved_model.pb")):
        return path
    if FileSystems.exists(path + ".index"):
        exported = join(config.output, "model")
        model.export_saved_model(exported, checkpoint=path)
        return exported
    raise ConfigError(f"model: {path} is neither a SavedModel directory (saved_model.pb) "
                      "nor a checkpoint prefix (.index)")


def prepare(config: EmbedConfig) -> Job:
    """Validate `config` against storage before any work; errors name the field."""
    config.validate()
    try:
        em, segmentation = open_volumes(config.em, config.segmentation, config.resolution)
    except VolumeError as e:
        raise ConfigError(f"volumes: {e}") from None
    both = em.bounds.intersect(segmentation.bounds)
    bbox = both if config.bbox is None else Box(config.bbox[:3], config.bbox[3:])
    if bbox.intersect(both).is_empty():
        raise ConfigError(f"bbox: {bbox} lies outside the volumes' common voxels {both}")
    if config.points is None and not bbox == bbox.intersect(segmentation.bounds):
        raise ConfigError(f"bbox: {bbox} leaves the segmentation's voxels {segmentation.bounds}")
    _check_output(config, output_variants(config.radii_nm))
    model_dir = _resolve_model(config)
    identity = model.model_identity(model_dir)
    if identity["architecture"]["input_size"] != config.cutout_size:
        raise ConfigError(f"cutout_size: {config.cutout_size}, but the model at {model_dir} "
                          f"takes {identity['architecture']['input_size']}^3 cutouts")
    return Job(config, em, segmentation, bbox, model_dir, identity)


def skeleton_options(config: EmbedConfig) -> skeleton.SkeletonOptions:
    """How the job skeletonizes segments and samples points along them."""
    return skeleton.SkeletonOptions(chunk_size=config.chunk_size, min_voxels=config.min_voxels,
                                    spacing_nm=config.spacing_nm)


def describe_run(job: Job) -> dict:
    """The "config" and "parameters" a run records in its manifest.

    Parameters hold what was resolved at start-up (volume specs, box, model identity); those
    in manifest.BINDING decide whether a later run may reuse this run's embeddings, the others
    (radii, sharding, coordinates, formats, block and batch size) only shape how outputs are
    written.
    """
    config = job.config
    recorded = json.loads(config.to_json())
    for name in ("output", "overwrite"):
        recorded.pop(name)
    box = fingerprint_box(job.bbox, config.cutout_size)
    parameters = {
        "model": job.model,
        "em": job.em.spec,
        "segmentation": job.segmentation.spec,
        "resolution_nm": list(job.em.resolution),
        "bbox": [*job.bbox.start, *job.bbox.stop],
        "fingerprint_box": [*box.start, *box.stop],
        "chunk_size": config.chunk_size,
        "skeleton": dataclasses.asdict(skeleton_options(config)),
        "cutout_size": config.cutout_size,
        "points": config.points,
        "segments": None if config.segments is None else sorted(config.segments),
        "radii_nm": list(config.radii_nm),
        "num_shards": config.num_shards,
        "bytewidth": config.bytewidth,
        "coordinates": config.coordinates,
        "offset_nm": list(config.offset_nm),
        "formats": list(config.formats),
        "block_size": config.block_size,
        "batch_size": config.batch_size,
    }
    return json.loads(json.dumps({"config": recorded, "parameters": parameters}))


# Stages both compositions share --------------------------------------------------------------

def make_points(pipeline: beam.Pipeline, job: Job,
                segment_ids: Collection[int] | None) -> beam.PCollection:
    """The sample points ("Points") of `segment_ids`, or of every segment if None."""
    config = job.config
    if config.points:
        return pipeline | "Points" >> points.ReadPoints(
            config.points, segment_ids, job.em.resolution, config.spacing_nm)
    return pipeline | "Points" >> skeleton.SkeletonizeSegments(
        job.segmentation, job.bbox, skeleton_options(config), segment_ids=segment_ids,
        skeleton_dir=join(config.output, "skeletons") if config.write_skeletons else None)


def write_results(job: Job, sample_points: beam.PCollection,
                  embeddings: beam.PCollection) -> beam.PCollection:
    """The points table, the radius means, every output tree and the annotation layer of the
    raw embeddings ("Annotations"); returns the info paths."""
    config = job.config
    _ = sample_points | "WritePoints" >> points.WritePoints(join(config.output, POINTS_FILE))
    aggregated = embeddings | "Aggregate" >> aggregate.AggregateEmbeddings(
        job.em.resolution, config.radii_nm)
    coordinates = (outputs.CoordinateSystem.voxels(job.em.resolution)
                   if config.coordinates == "voxels" else
                   outputs.CoordinateSystem.nanometres(job.em.resolution, config.offset_nm))
    trees = {RAW: embeddings, **aggregated} | "Write" >> outputs.WriteEmbeddings(
        config.output, job.variants, coordinates=coordinates, num_shards=config.num_shards,
        bytewidth=config.bytewidth, embedding_dim=job.embedding_dim, formats=config.formats,
        volumes=job.provenance(), model=job.model)
    layer = annotations.Layer(tuple(job.em.resolution), job.bbox, job.embedding_dim,
                              config.num_shards)
    nodes = embeddings | "Annotations" >> annotations.WriteAnnotations(config.output, layer)
    return (trees, nodes) | "AllTrees" >> beam.Flatten()


def _write_record(_, job: Job) -> str:
    """run.json: what produced the outputs. Written last, so its presence marks a whole run."""
    config = {k: v for k, v in json.loads(job.config.to_json()).items() if k != "overwrite"}
    record = {"config": config, "model": job.model, "volumes": job.provenance()}
    path = join(job.config.output, RUN_FILE)
    with FileSystems.create(path) as f:
        f.write(json.dumps(record, indent=2, sort_keys=True).encode())
    return path


def record_run(job: Job, written: list[beam.PCollection]) -> None:
    """Write run.json ("Record") once every PCollection in `written` is complete."""
    _ = (written
         | "Done" >> beam.Flatten()
         | "AllWritten" >> beam.combiners.ToList()
         | "Record" >> beam.Map(_write_record, job))


# Reports -------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunSummary:
    """What a run did: counters, seconds per stage, where the outputs are.

    For a job submitted to a remote runner only `result` and `outputs` are known.
    """

    result: Any            # Beam's PipelineResult
    counters: dict[str, int]
    seconds: dict[str, float]
    wall_seconds: float
    outputs: dict[str, str]
    model: dict


def counters(result) -> dict[str, int]:
    """The project's counters of a finished run, totalled over every worker."""
    return {m.key.metric.name: m.committed for m in result.metrics().query()["counters"]
            if m.key.metric.namespace == "segclr"}


def summarize(result, job: Job, wall: float, stages: Collection[str]) -> RunSummary:
    """The counters and seconds per top-level step in `stages` of a finished local run."""
    seconds = dict.fromkeys(stages, 0.0)
    for m in result.monitoring_metrics().query()["counters"]:
        if m.key.metric.name.endswith("ptransform_execution_time:total_msecs:v1"):
            stage = m.key.step.split("/")[0]
            if stage in seconds:
                seconds[stage] += m.committed / 1000.0
    return RunSummary(result, counters(result), seconds, wall, job.trees, job.model)


def submitted(result, job: Job) -> RunSummary:
    """The summary of a job handed to a remote runner: nothing counted yet."""
    return RunSummary(result, {}, {}, 0.0, job.trees, job.model)
