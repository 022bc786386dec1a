"""The embedding job: every segment of the box, composed from the stages.

    points (skeletons, or a table) -> cutouts -> embeddings -> radius means -> output trees

`build` adds the stages to a Beam pipeline; `run` checks the configuration (job.prepare),
builds and runs the job and reports.
"""

from __future__ import annotations

import time

import apache_beam as beam

from segclr_beam import inference, manifest
from segclr_beam.config import EmbedConfig
from segclr_beam.job import (Job, RunSummary, conclude, describe_run, make_cutouts, make_points,
                             owned, prepare, record_run, submitted, summarize, write_results)
from segclr_beam.runner import is_local, pipeline_options

# Top-level step names, in data-flow order; the run summary reports time per step.
STAGES = ("Points", "CheckPoints", "Cutouts", "Embed", "WritePoints", "Aggregate", "Write",
          "Annotations", "Manifest", "Record")


def build(pipeline: beam.Pipeline, job: Job, release: bool = True) -> None:
    """Add the job's stages to `pipeline`; with `release` the last one releases the output's
    lock (for a run the driver does not wait for)."""
    config = job.config
    sample_points = make_points(pipeline, job, config.segments)
    masked = make_cutouts(job, sample_points)
    embeddings = masked | "Embed" >> inference.Embed(job.model_dir, config.batch_size)
    # The points file holds the embedded points: without those --skip-absent left out.
    embedded = embeddings | "EmbeddedPoints" >> beam.Keys()
    written = write_results(job, embedded, embeddings)
    fingerprints = manifest.Fingerprints(
        job.segmentation, manifest.fingerprint_box(job.bbox, config.cutout_size),
        config.chunk_size)
    write = manifest.WriteManifest(config.output, describe_run(job), config.num_shards,
                                   config.bytewidth)
    recorded = ({"cutouts": masked, "embeddings": embeddings}
                | "Manifest" >> manifest.RecordManifest(fingerprints, job.model, write))
    record_run(job, [written, recorded], release)


def run(config: EmbedConfig, beam_args: list[str] | None = None, gpu=None) -> RunSummary:
    """Check, build and run the job. Locally it waits and reports; elsewhere it submits.

    A local run that fails leaves nothing at the output (job.owned).
    """
    options = pipeline_options(beam_args or [], gpu)
    local = is_local(options)
    job = prepare(config)
    with owned(job):
        start = time.monotonic()
        pipeline = beam.Pipeline(options=options)
        build(pipeline, job, release=not local)
        result = pipeline.run()
        if not local:
            return submitted(result, job)
        result.wait_until_finish()
        summary = summarize(result, job, time.monotonic() - start, STAGES)
        conclude(job, summary)
    return summary
