"""The embedding job: every segment of the box, composed from the stages.

    points (skeletons, or a table) -> cutouts -> embeddings -> radius means -> output trees

`build` adds the stages to a Beam pipeline; `run` checks the configuration (job.prepare),
builds and runs the job and reports.
"""

from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions

from segclr_beam import cutouts, inference, manifest
from segclr_beam.config import EmbedConfig
from segclr_beam.job import (Job, RunSummary, describe_run, make_points, prepare, record_run,
                             submitted, summarize, write_results)
from segclr_beam.runner import LOCAL_RUNNER, pipeline_options

# Top-level step names, in data-flow order; the run summary reports time per step.
STAGES = ("Points", "WritePoints", "Cutouts", "Embed", "Aggregate", "Write", "Annotations",
          "Manifest", "Record")


def build(pipeline: beam.Pipeline, job: Job) -> None:
    """Add the job's stages to `pipeline`."""
    config = job.config
    sample_points = make_points(pipeline, job, config.segments)
    masked = sample_points | "Cutouts" >> cutouts.MakeCutouts(
        job.em, job.segmentation, config.block_size, config.cutout_size)
    embeddings = masked | "Embed" >> inference.Embed(job.model_dir, config.batch_size)
    trees = write_results(job, sample_points, embeddings)
    fingerprints = manifest.Fingerprints(
        job.segmentation, manifest.fingerprint_box(job.bbox, config.cutout_size),
        config.chunk_size)
    write = manifest.WriteManifest(config.output, describe_run(job), config.num_shards,
                                   config.bytewidth)
    recorded = ({"cutouts": masked, "embeddings": embeddings}
                | "Manifest" >> manifest.RecordManifest(fingerprints, job.model, write))
    record_run(job, [trees, recorded])


def run(config: EmbedConfig, beam_args: list[str] | None = None, gpu=None) -> RunSummary:
    """Check, build and run the job. Locally it waits and reports; elsewhere it submits."""
    job = prepare(config)
    options = pipeline_options(beam_args or [], gpu)
    start = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    build(pipeline, job)
    result = pipeline.run()
    if options.view_as(StandardOptions).runner != LOCAL_RUNNER:
        return submitted(result, job)
    result.wait_until_finish()
    return summarize(result, job, time.monotonic() - start, STAGES)
