"""The embedding job: the one place that composes the stages.

    points (skeletons, or a table) -> cutouts -> embeddings -> radius means -> output trees

`prepare` checks everything that can fail before any work (configuration, volumes, model,
output path); `build` adds the stages to a Beam pipeline; `run` does both and reports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Collection

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import StandardOptions

from segclr_beam import (aggregate, cutouts, inference, manifest, model, outputs, points,
                         skeleton)
from segclr_beam.config import ConfigError, EmbedConfig
from segclr_beam.runner import LOCAL_RUNNER, pipeline_options
from segclr_beam.volume import Box, Volume, VolumeError, open_volumes

POINTS_FILE = "points.avro"
RUN_FILE = "run.json"
RAW = outputs.variant_name(None)
_LOG = logging.getLogger(__name__)
# Top-level step names, in data-flow order; the run summary reports time per step.
STAGES = ("Points", "WritePoints", "Cutouts", "Embed", "Aggregate", "Write", "Manifest",
          "Record")


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
        return outputs.output_variants(self.config.radii_nm)

    @property
    def trees(self) -> dict[str, str]:
        """Output tree path of each variant."""
        return {name: _join(self.config.output, name) for name in self.variants}

    def provenance(self) -> dict[str, Any]:
        return {"em": self.em.spec, "segmentation": self.segmentation.spec,
                "resolution_nm": list(self.em.resolution), "bbox": [*self.bbox.start, *self.bbox.stop]}


def _join(root: str, *names: str) -> str:
    return FileSystems.join(root.rstrip("/"), *names)


def _check_output(config: EmbedConfig, variants: dict) -> None:
    """Refuse to mix with a previous run's output; prove the output path is writable."""
    root = config.output
    previous = [_join(root, RUN_FILE), _join(root, POINTS_FILE)]
    previous += [_join(root, name, outputs.INFO_NAME) for name in variants]
    found = [path for path in previous if FileSystems.exists(path)]
    if found and not config.overwrite:
        raise ConfigError(f"output: {root} holds a previous run ({found[0]}); "
                          "choose another path or pass --overwrite")
    probe = _join(root, ".segclr-write-probe")
    try:
        with FileSystems.create(probe) as f:
            f.write(b"")
        FileSystems.delete([probe])
    except Exception as e:  # the filesystem's own error types vary by scheme
        raise ConfigError(f"output: cannot write to {root}: {e}") from None


def _resolve_model(config: EmbedConfig) -> str:
    """The SavedModel to run: `model` itself, or the export of a checkpoint prefix."""
    path = config.model
    if FileSystems.exists(_join(path, "saved_model.pb")):
        return path
    if FileSystems.exists(path + ".index"):
        exported = _join(config.output, "model")
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
    _check_output(config, outputs.output_variants(config.radii_nm))
    model_dir = _resolve_model(config)
    identity = model.model_identity(model_dir)
    if identity["architecture"]["input_size"] != config.cutout_size:
        raise ConfigError(f"cutout_size: {config.cutout_size}, but the model at {model_dir} "
                          f"takes {identity['architecture']['input_size']}^3 cutouts")
    return Job(config, em, segmentation, bbox, model_dir, identity)


class Progress(beam.DoFn):
    """Passes elements through and logs how many went by, at most every `seconds`."""

    def __init__(self, what: str, seconds: float = 10.0):
        self._what, self._seconds = what, seconds

    def setup(self):
        self._count, self._start, self._last = 0, time.monotonic(), 0.0

    def process(self, element):
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self._seconds:
            self._last = now
            rate = self._count / max(now - self._start, 1e-9)
            _LOG.info("%s: %d (%.1f/s)", self._what, self._count, rate)
        yield element


def skeleton_options(config: EmbedConfig) -> skeleton.SkeletonOptions:
    """How the job skeletonizes segments and samples points along them."""
    return skeleton.SkeletonOptions(chunk_size=config.chunk_size, min_voxels=config.min_voxels,
                                    spacing_nm=config.spacing_nm)


def make_points(pipeline: beam.Pipeline, job: Job,
                segment_ids: Collection[int] | None) -> beam.PCollection:
    """The sample points ("Points") of `segment_ids`, or of every segment if None."""
    config = job.config
    if config.points:
        return pipeline | "Points" >> points.ReadPoints(
            config.points, segment_ids, job.em.resolution, config.spacing_nm)
    return pipeline | "Points" >> skeleton.SkeletonizeSegments(
        job.segmentation, job.bbox, skeleton_options(config), segment_ids=segment_ids,
        skeleton_dir=_join(config.output, "skeletons") if config.write_skeletons else None)


def write_results(job: Job, sample_points: beam.PCollection,
                  embeddings: beam.PCollection) -> beam.PCollection:
    """The points table, the radius means and every output tree; returns the info paths."""
    config = job.config
    _ = sample_points | "WritePoints" >> points.WritePoints(_join(config.output, POINTS_FILE))
    aggregated = embeddings | "Aggregate" >> aggregate.AggregateEmbeddings(
        job.em.resolution, config.radii_nm)
    coordinates = (outputs.CoordinateSystem.voxels(job.em.resolution)
                   if config.coordinates == "voxels" else
                   outputs.CoordinateSystem.nanometres(job.em.resolution, config.offset_nm))
    return {RAW: embeddings, **aggregated} | "Write" >> outputs.WriteEmbeddings(
        config.output, job.variants, coordinates=coordinates, num_shards=config.num_shards,
        bytewidth=config.bytewidth, formats=config.formats, volumes=job.provenance(),
        model=job.model)


def _write_record(_, job: Job) -> str:
    """run.json: what produced the outputs. Written last, so its presence marks a whole run."""
    config = {k: v for k, v in json.loads(job.config.to_json()).items() if k != "overwrite"}
    record = {"config": config, "model": job.model, "volumes": job.provenance()}
    path = _join(job.config.output, RUN_FILE)
    with FileSystems.create(path) as f:
        f.write(json.dumps(record, indent=2, sort_keys=True).encode())
    return path


def build(pipeline: beam.Pipeline, job: Job) -> None:
    """Add the job's stages to `pipeline`."""
    config = job.config
    sample_points = make_points(pipeline, job, config.segments)
    masked = sample_points | "Cutouts" >> cutouts.MakeCutouts(
        job.em, job.segmentation, config.block_size, config.cutout_size)
    embeddings = (
        masked
        | "Embed" >> inference.Embed(job.model_dir, config.batch_size)
        | "Progress" >> beam.ParDo(Progress("embedded cutouts")))
    trees = write_results(job, sample_points, embeddings)
    recorded = ({"cutouts": masked, "embeddings": embeddings}
                | "Manifest" >> manifest.RecordManifest(job, skeleton_options(config)))
    record_run(job, [trees, recorded])


def record_run(job: Job, written: list[beam.PCollection]) -> None:
    """Write run.json ("Record") once every PCollection in `written` is complete."""
    _ = (written
         | "Done" >> beam.Flatten()
         | "AllWritten" >> beam.combiners.ToList()
         | "Record" >> beam.Map(_write_record, job))


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


def summarize(result, job: Job, wall: float) -> RunSummary:
    """The counters and per-stage seconds of a finished local run."""
    counters = {m.key.metric.name: m.committed
                for m in result.metrics().query()["counters"] if m.key.metric.namespace == "segclr"}
    seconds = dict.fromkeys(STAGES, 0.0)
    for m in result.monitoring_metrics().query()["counters"]:
        if m.key.metric.name.endswith("ptransform_execution_time:total_msecs:v1"):
            stage = m.key.step.split("/")[0]
            if stage in seconds:
                seconds[stage] += m.committed / 1000.0
    return RunSummary(result, counters, seconds, wall, job.trees, job.model)


def run(config: EmbedConfig, beam_args: list[str] | None = None, gpu=None) -> RunSummary:
    """Check, build and run the job. Locally it waits and reports; elsewhere it submits."""
    job = prepare(config)
    options = pipeline_options(beam_args or [], gpu)
    start = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    build(pipeline, job)
    result = pipeline.run()
    if options.view_as(StandardOptions).runner != LOCAL_RUNNER:
        return RunSummary(result, {}, {}, 0.0, job.trees, job.model)
    result.wait_until_finish()
    return summarize(result, job, time.monotonic() - start)
