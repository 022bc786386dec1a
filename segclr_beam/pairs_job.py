"""The pair-table job: positive pairs of every segment of a box, composed from the stages.

    merged skeletons -> sample points -> pairs -> pair table (pairs.tfrecord-*, info.json)
    (or: an earlier run's points.avro and skeletons/ -> pairs -> pair table)

`prepare` checks everything that can fail before any work; `run` builds and runs the job
and reports. The table is what `segclr-beam train --pairs DIR` reads.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from segclr_beam import pairs, points, skeleton
from segclr_beam.config import ConfigError, PairsConfig
from segclr_beam.job import POINTS_FILE, RUN_FILE, OutputClaim, counters
from segclr_beam.precomputed import SkeletonError, SkeletonSource, from_precomputed, to_precomputed
from segclr_beam.runner import is_local, pipeline_options
from segclr_beam.shards import TEMP_PREFIX, join, read_json
from segclr_beam.volume import Box, Volume, VolumeError, open_volume, open_volumes

SKELETONS = "skeletons"  # an embedding run's --write-skeletons directory, and this job's
# What a run puts below its output (glob patterns): removed before a run when an earlier one
# left them incomplete (or with --overwrite), and after a local run that failed.
OUTPUT_ENTRIES = (pairs.INFO_NAME, "*.tfrecord-*", SKELETONS, TEMP_PREFIX + "*",
                  ".segclr-write-probe")


@dataclasses.dataclass
class PairsJob:
    """A validated pair-table configuration with its volumes and sources opened."""

    config: PairsConfig
    segmentation: Volume
    em: Volume | None
    bbox: Box                        # the box skeletonized
    bounds: Box                      # the volumes' common voxels: centres lie inside
    skeletons: SkeletonSource | None  # an earlier run's, with `points_file`
    points_file: str | None
    claim: OutputClaim               # the output's, held from prepare to the end of the run

    def names(self) -> tuple[str, str]:
        """(vol_name, label_volume_name) of the records."""
        config = self.config
        def text(source) -> str:
            return source if isinstance(source, str) else json.dumps(source, sort_keys=True)
        vol_name = config.vol_name if config.vol_name is not None else (
            text(config.em) if config.em else "")
        label = (config.label_volume_name if config.label_volume_name is not None
                 else text(config.segmentation))
        return vol_name, label

    def provenance(self) -> dict[str, Any]:
        recorded = {k: v for k, v in json.loads(self.config.to_json()).items()
                    if k not in ("output", "overwrite")}
        return {"config": recorded,
                "volumes": {"em": None if self.em is None else self.em.spec,
                            "segmentation": self.segmentation.spec,
                            "bbox": [*self.bbox.start, *self.bbox.stop]}}


def _earlier_run(config: PairsConfig) -> tuple[SkeletonSource, str]:
    """The skeletons and points file of the run at `points_from`, checked."""
    root = config.points_from
    points_file = join(root, POINTS_FILE)
    if not FileSystems.exists(points_file):
        raise ConfigError(f"points_from: {root} has no {POINTS_FILE}; is it an embedding "
                          "run's output root?")
    try:
        source = SkeletonSource.open(join(root, SKELETONS))
    except SkeletonError as e:
        raise ConfigError(f"points_from: {e}; the run must have written its skeletons "
                          "(embed --write-skeletons)") from None
    record = join(root, RUN_FILE)
    if FileSystems.exists(record):
        ran = read_json(record)["config"]
        given = [float(v) for v in config.resolution]
        if [float(v) for v in ran["resolution"]] != given:
            raise ConfigError(f"resolution: {tuple(given)}, but the run at {root} has "
                              f"its points at {tuple(ran['resolution'])}")
    return source, points_file


def prepare(config: PairsConfig) -> PairsJob:
    """Validate `config` against storage before any work; errors name the field."""
    config.validate()
    try:
        if config.em:
            em, segmentation = open_volumes(config.em, config.segmentation, config.resolution)
        else:
            em, segmentation = None, open_volume(config.segmentation, "segmentation",
                                                 config.resolution)
    except VolumeError as e:
        raise ConfigError(f"volumes: {e}") from None
    if not np.issubdtype(segmentation.dtype, np.integer):
        raise ConfigError(f"segmentation: dtype must be an integer type, found "
                          f"{segmentation.dtype}")
    bounds = segmentation.bounds if em is None else em.bounds.intersect(segmentation.bounds)
    bbox = bounds if config.bbox is None else Box(config.bbox[:3], config.bbox[3:])
    if not bbox == bbox.intersect(bounds):
        raise ConfigError(f"bbox: {bbox} leaves the volumes' common voxels {bounds}")
    skeletons = points_file = None
    if config.points_from:
        skeletons, points_file = _earlier_run(config)
    # Skeletons there are this job's only if it writes them (they may be an earlier run's).
    entries = tuple(e for e in OUTPUT_ENTRIES if config.write_skeletons or e != SKELETONS)
    claim = OutputClaim.acquire(config.output, pairs.INFO_NAME, "pair table",
                                config.overwrite, entries=entries)
    return PairsJob(config, segmentation, em, bbox, bounds, skeletons, points_file, claim)


class _ReadSkeleton(beam.DoFn):
    """(segment id, its Points) -> (segment id, skeleton in nm at i * resolution, Points)."""

    def __init__(self, source: SkeletonSource, resolution: tuple[float, float, float]):
        self._source, self._resolution = source, resolution
        self._missing = beam.metrics.Metrics.counter("segclr", "segments_without_skeleton")

    def process(self, element):
        segment_id, found = element
        read = self._source.read(segment_id)
        if read is None or read.empty():
            self._missing.inc()
            return
        read = from_precomputed(read, self._resolution)
        yield segment_id, read, list(found)


def _sampled(element, resolution, spacing_nm: float):
    segment_id, merged = element
    return segment_id, merged, points.skeleton_points(segment_id, merged, resolution, spacing_nm)


def _release(info: str, skeletons: list, claim: OutputClaim) -> str:
    """The last step of a run the driver does not wait for: release the output."""
    claim.finish()
    return info


def build(pipeline: beam.Pipeline, job: PairsJob, release: bool = True) -> beam.PCollection:
    """Add the job's stages to `pipeline`; returns the info.json path once written. With
    `release` the last step, after the table and any skeletons, releases the output's lock."""
    config = job.config
    written = pipeline | "NoSkeletons" >> beam.Create([])
    resolution = job.segmentation.resolution
    if job.points_file:
        segments = (pipeline
                    | "Points" >> points.ReadPoints(job.points_file, config.segments)
                    | "BySegment" >> beam.Map(lambda p: (p.segment_id, p))
                    | "GroupBySegment" >> beam.GroupByKey()
                    | "Skeletons" >> beam.ParDo(_ReadSkeleton(job.skeletons, resolution)))
    else:
        options = skeleton.SkeletonOptions(chunk_size=config.chunk_size,
                                           min_voxels=config.min_voxels,
                                           spacing_nm=config.spacing_nm)
        merged = pipeline | "Skeletons" >> skeleton.MergedSkeletons(
            job.segmentation, job.bbox, options, config.segments)
        segments = merged | "Sample" >> beam.Map(_sampled, resolution, config.spacing_nm)
        if config.write_skeletons:
            written = (merged
                       | "Precomputed" >> beam.Map(
                           lambda item, r: (item[0], to_precomputed(item[1], r)), resolution)
                       | "WriteSkeletons" >> skeleton.WriteSkeletons(
                           join(config.output, SKELETONS)))
    vol_name, label_volume_name = job.names()
    info = (segments
            | "Pairs" >> beam.ParDo(pairs.PairSegments(resolution, config.options()))
            | "Write" >> pairs.WritePairs(config.output, config.num_shards, job.bounds,
                                          resolution, vol_name, label_volume_name,
                                          job.provenance()))
    if not release:
        return info
    return info | "Release" >> beam.Map(_release, beam.pvalue.AsList(written), job.claim)


@dataclasses.dataclass
class PairsSummary:
    """What a run did: counters, wall time, the table's files and info.

    For a job submitted to a remote runner only `result` and `output` are known."""

    result: Any
    counters: dict[str, int]
    wall_seconds: float
    output: str
    info: dict | None


def run(config: PairsConfig, beam_args: list[str] | None = None) -> PairsSummary:
    """Check, build and run the job. Locally it waits and reports, and a local run that fails
    leaves nothing at the output; elsewhere it submits."""
    options = pipeline_options(beam_args or [])
    local = is_local(options)
    job = prepare(config)
    start = time.monotonic()
    try:
        pipeline = beam.Pipeline(options=options)
        build(pipeline, job, release=not local)
        result = pipeline.run()
        if not local:
            return PairsSummary(result, {}, 0.0, config.output, None)
        result.wait_until_finish()
    except BaseException:
        job.claim.discard()
        raise
    job.claim.finish()
    info = read_json(join(config.output, pairs.INFO_NAME))
    return PairsSummary(result, counters(result), time.monotonic() - start, config.output, info)
