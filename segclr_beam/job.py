"""A job: a checked configuration with its volumes and model, and the pieces every composition
of stages shares (pipeline.py embeds everything, reprocess.py what changed).

`prepare` checks everything that can fail before any work (configuration, volumes, model,
output path). `make_points`, `write_results` and `record_run` add the stages both
compositions have in common; `summarize` reports a finished local run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
from typing import Any, Collection, Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from segclr_beam import (aggregate, annotations, cutouts, inference, model, outputs, points,
                         skeleton)
from segclr_beam.config import ConfigError, EmbedConfig
from segclr_beam.lock import LockedError, OutputLock
from segclr_beam.manifest import MANIFEST_DIR, fingerprint_box
from segclr_beam.records import output_variants, variant_name
from segclr_beam.shards import TEMP_PREFIX, delete_tree, join
from segclr_beam.volume import AbsentChunksError, Box, Volume, VolumeError, open_volumes

POINTS_FILE = "points.avro"
RUN_FILE = "run.json"
RAW = variant_name(None)
REPROCESS_DIR = ".reprocess"  # reprocessing's staging directory below the new output root
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    """A validated configuration with its volumes opened and its model resolved."""

    config: EmbedConfig
    em: Volume
    segmentation: Volume
    bbox: Box
    model_dir: str         # an exported SavedModel
    model: dict            # its identity record
    claim: OutputClaim     # the output's, held from prepare to the end of the run

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

# What a run puts below its output root (glob patterns); an incomplete run's leftovers, or with
# --overwrite a previous run, are removed before a run starts.
RUN_ENTRIES = (RUN_FILE, "points*.avro", RAW, "agg*um", MANIFEST_DIR, "skeletons", "model",
               annotations.DIRECTORY, TEMP_PREFIX + "*", REPROCESS_DIR, ".segclr-write-probe")


def run_entries(root: str, entries: Collection[str] = RUN_ENTRIES) -> list[str]:
    """The paths of `entries` (glob patterns) that exist below `root` (directories as
    themselves)."""
    if FileSystems.get_scheme(root) in (None, "file"):
        return sorted(path for pattern in entries
                      for path in glob.glob(os.path.join(glob.escape(root), pattern)))
    found = set()
    for pattern in entries:  # object stores: files, and the files under "directories"
        for result in FileSystems.match([join(root, pattern), join(root, pattern, "**")]):
            found.update(m.path for m in result.metadata_list)
    return sorted(found)


def remove_run(root: str, keep: str | None = None,
               entries: Collection[str] = RUN_ENTRIES) -> list[str]:
    """Delete everything a run puts below `root` (`entries`, the embedding job's by default)
    but the entry holding `keep` (an input that lives there, e.g. a model exported by an
    earlier run); returns what was deleted."""
    found = [p for p in run_entries(root, entries) if keep is None
             or not (keep.rstrip("/") + "/").startswith(p.rstrip("/") + "/")]
    for path in found:
        if os.path.isdir(path) and FileSystems.get_scheme(root) in (None, "file"):
            delete_tree(path)
        elif FileSystems.exists(path):
            FileSystems.delete([path])
    return found


def check_output(root: str, marker: str, what: str, overwrite: bool,
                 entries: Collection[str] = RUN_ENTRIES, keep: str | None = None) -> None:
    """Refuse to replace a complete previous `what` (its `marker` file exists) unless
    `overwrite`; remove what an earlier one left below `root` (`entries`; a killed or failed
    one, or with `overwrite` any) but `keep`; prove `root` is writable. Called with the
    output's lock held, so nothing else writes there."""
    if FileSystems.exists(join(root, marker)) and not overwrite:
        raise ConfigError(f"output: {root} holds a previous {what} ({join(root, marker)}); "
                          "choose another path or pass --overwrite")
    removed = remove_run(root, keep=keep, entries=entries)
    if removed:
        _LOG.warning("removed %d entries of an earlier %s at %s before starting: %s",
                     len(removed), what if overwrite else f"incomplete {what}", root,
                     ", ".join(p.rsplit("/", 1)[-1] for p in removed[:8]))
    check_writable(root)


@dataclasses.dataclass
class OutputClaim:
    """An output root one run holds: its lock, and what the run puts there (`entries`, glob
    patterns, but the entry holding `keep`), removed if the run fails."""

    root: str
    lock: OutputLock
    entries: Collection[str] = RUN_ENTRIES
    keep: str | None = None

    @classmethod
    def acquire(cls, root: str, marker: str, what: str, overwrite: bool,
                entries: Collection[str] = RUN_ENTRIES, keep: str | None = None) -> OutputClaim:
        """Take the lock of `root`, then `check_output` under it; a refusal releases it."""
        try:
            lock = OutputLock.acquire(root)
        except LockedError as e:
            raise ConfigError(str(e)) from None
        except Exception as e:  # the filesystem's own error types vary by scheme
            raise ConfigError(f"output: cannot write to {root}: {e}") from None
        try:
            check_output(root, marker, what, overwrite, entries, keep)
        except BaseException:
            lock.release()
            raise
        return cls(root, lock, tuple(entries), keep)

    def finish(self) -> None:
        """Release the output (the run is complete, or wrote nothing)."""
        self.lock.release()

    def discard(self) -> None:
        """Remove what the run wrote and release the output (the run failed)."""
        if remove_run(self.root, keep=self.keep, entries=self.entries):
            _LOG.warning("removed the incomplete outputs of this run at %s", self.root)
        self.finish()


def check_writable(root: str) -> None:
    """Prove `root` is writable by writing and deleting a probe file, before any work."""
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


def _check_box(config: EmbedConfig, em: Volume, segmentation: Volume) -> Box:
    """The box to embed: `bbox`, inside both volumes; by default the volumes' voxels, which
    must then be the same (else the default would quietly cut the segmentation)."""
    if config.bbox is None:
        if em.bounds != segmentation.bounds:
            both = em.bounds.intersect(segmentation.bounds)
            raise ConfigError(
                f"bbox: the EM's voxels {em.bounds} and the segmentation's {segmentation.bounds} "
                f"differ, so the whole volume is not one box; give --bbox (their overlap is "
                f"{','.join(map(str, (*both.start, *both.stop)))})")
        return em.bounds
    bbox = Box(config.bbox[:3], config.bbox[3:])
    both = em.bounds.intersect(segmentation.bounds)
    if bbox.intersect(both).is_empty():
        raise ConfigError(f"bbox: {bbox} lies outside the volumes' common voxels {both}")
    for volume in (em, segmentation):
        if config.points is None and bbox != bbox.intersect(volume.bounds):
            raise ConfigError(f"bbox: {bbox} leaves the {volume.name}'s voxels {volume.bounds}")
    return bbox


def prepare(config: EmbedConfig) -> Job:
    """Validate `config` against storage before any work; errors name the field.

    Claims the output (`OutputClaim`: its lock): the returned job's `claim` holds it until
    it is finished or discarded.
    """
    config.validate()
    try:
        em, segmentation = open_volumes(config.em, config.segmentation, config.resolution)
    except VolumeError as e:
        raise ConfigError(f"volumes: {e}") from None
    bbox = _check_box(config, em, segmentation)
    claim = OutputClaim.acquire(config.output, RUN_FILE, "run", config.overwrite,
                                keep=config.model)
    try:
        model_dir = _resolve_model(config)
        try:
            identity = inference.check_model(model_dir)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        if identity["architecture"]["input_size"] != config.cutout_size:
            raise ConfigError(f"cutout_size: {config.cutout_size}, but the model at {model_dir} "
                              f"takes {identity['architecture']['input_size']}^3 cutouts")
    except BaseException:
        claim.finish()
        raise
    return Job(config, em, segmentation, bbox, model_dir, identity, claim)


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

def points_source(job: Job) -> str:
    """Where a job's points come from, as error messages name it."""
    if job.config.points:
        return f"points {job.config.points}"
    return f"the skeletons of segmentation {job.config.segmentation} in box {job.bbox}"


def make_points(pipeline: beam.Pipeline, job: Job, segment_ids: Collection[int] | None,
                checked: bool = True) -> beam.PCollection:
    """The sample points ("Points") of `segment_ids`, or of every segment if None; `checked`
    ("CheckPoints"): refused unless there are points, of every listed segment, with ids that
    fit the shard hash (points.CheckPoints)."""
    config = job.config
    if config.points:
        found = pipeline | "Points" >> points.ReadPoints(
            config.points, segment_ids, job.em.resolution, config.spacing_nm)
    else:
        found = pipeline | "Points" >> skeleton.SkeletonizeSegments(
            job.segmentation, job.bbox, skeleton_options(config), segment_ids=segment_ids,
            skeleton_dir=join(config.output, "skeletons") if config.write_skeletons else None,
            max_absent_chunks=config.max_absent_chunks)
    if not checked:
        return found
    return found | "CheckPoints" >> points.CheckPoints(points_source(job), segment_ids,
                                                       config.bytewidth)


def make_cutouts(job: Job, sample_points: beam.PCollection, keyed: bool = False):
    """The masked cutouts of the points (cutouts.MakeCutouts with the job's settings)."""
    config = job.config
    return sample_points | "Cutouts" >> cutouts.MakeCutouts(
        job.em, job.segmentation, config.block_size, config.cutout_size, keyed=keyed,
        skip_absent=config.skip_absent, max_absent_chunks=config.max_absent_chunks)


def write_results(job: Job, sample_points: beam.PCollection,
                  embeddings: beam.PCollection) -> beam.PCollection:
    """The points table, the radius means, every output tree and the annotation layer of the
    raw embeddings ("Annotations"); returns the written paths (complete once every file is in
    place)."""
    config = job.config
    written = sample_points | "WritePoints" >> points.WritePoints(join(config.output,
                                                                      POINTS_FILE))
    aggregated = embeddings | "Aggregate" >> aggregate.AggregateEmbeddings(
        job.em.resolution, config.radii_nm)
    coordinates = (outputs.CoordinateSystem.voxels(job.em.resolution)
                   if config.coordinates == "voxels" else
                   outputs.CoordinateSystem.nanometres(job.em.resolution, config.offset_nm))
    trees = {RAW: embeddings, **aggregated} | "Write" >> outputs.WriteEmbeddings(
        config.output, job.variants, coordinates=coordinates, num_shards=config.num_shards,
        bytewidth=config.bytewidth, embedding_dim=job.embedding_dim, formats=config.formats,
        tfrecord_shards=config.tfrecord_shards, volumes=job.provenance(), model=job.model)
    layer = annotations.Layer(tuple(job.em.resolution), job.bbox, job.embedding_dim,
                              config.num_shards)
    nodes = embeddings | "Annotations" >> annotations.WriteAnnotations(config.output, layer)
    return (written, trees, nodes) | "Results" >> beam.Flatten()


def _run_record(job: Job) -> dict:
    config = {k: v for k, v in json.loads(job.config.to_json()).items() if k != "overwrite"}
    return {"config": config, "model": job.model, "volumes": job.provenance()}


def _write_json(path: str, record: dict) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(record, indent=2, sort_keys=True).encode())


def _write_record(_, job: Job, release: bool) -> str:
    """run.json: what produced the outputs. Written last, so its presence marks a whole run;
    with `release`, the output's lock goes with it (a run the driver does not wait for)."""
    path = join(job.config.output, RUN_FILE)
    _write_json(path, _run_record(job))
    if release:
        job.claim.finish()
    return path


def record_run(job: Job, written: list[beam.PCollection], release: bool) -> None:
    """Write run.json ("Record") once every PCollection in `written` is complete; with
    `release` the step also releases the output's lock."""
    _ = (written
         | "Done" >> beam.Flatten()
         | "AllWritten" >> beam.combiners.ToList()
         | "Record" >> beam.Map(_write_record, job, release))


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

    def totals(self) -> dict[str, Any]:
        """What was made, from the counters: the summary run.json records."""
        c = self.counters
        return {
            "segments": c.get("segments_with_points", 0), "points": c.get("points_written", 0),
            "cutouts": c.get("cutouts_emitted", 0), "embeddings": c.get("embeddings", 0),
            "points_segment_absent": c.get("cutouts_segment_absent", 0),
            "absent_chunks": {"em": c.get("absent_chunks_em", 0),
                              "segmentation_skeletons": c.get("absent_chunks_segmentation", 0),
                              "segmentation_cutouts": c.get("absent_chunks_segmentation_cutouts",
                                                            0)},
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "wall_seconds": round(self.wall_seconds, 3),
            "trees": dict(self.outputs),
        }

    def report(self) -> str:
        """The summary as lines for a terminal."""
        t = self.totals()
        chunks = t["absent_chunks"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in t["seconds"].items())
        lines = [f"segments: {t['segments']}, points: {t['points']}, cutouts: {t['cutouts']}, "
                 f"embeddings: {t['embeddings']}",
                 f"points skipped, segment absent from the cutout: {t['points_segment_absent']}",
                 f"absent storage chunks: EM {chunks['em']} (cutout reads), segmentation "
                 f"{chunks['segmentation_skeletons']} (skeletons), "
                 f"{chunks['segmentation_cutouts']} (cutout reads)",
                 f"seconds per stage: {stages}; wall {t['wall_seconds']:.1f} s"]
        return "\n".join(lines + [f"{name}: {path}" for name, path in t["trees"].items()])


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


def conclude(job: Job, summary: RunSummary) -> None:
    """End a local run: fail it if, over all workers, more chunks were absent than
    tolerated; else add the summary to run.json and release the output."""
    limit = job.config.max_absent_chunks
    for name, count in summary.totals()["absent_chunks"].items():
        if count > limit:
            volume = job.em if name == "em" else job.segmentation
            raise AbsentChunksError(f"{volume.name} {volume.spec.get('kvstore', '')}: {count} "
                                    f"storage chunks inside the box are absent, more than the "
                                    f"{limit} tolerated (--max-absent-chunks)")
    path = join(job.config.output, RUN_FILE)
    _write_json(path, {**_run_record(job), "summary": summary.totals()})
    job.claim.finish()


@contextlib.contextmanager
def owned(job: Job) -> Iterator[None]:
    """While the job runs from here: if anything fails, what it wrote is removed and the
    output released, so a failed run leaves nothing behind."""
    try:
        yield
    except BaseException:
        job.claim.discard()
        raise


def submitted(result, job: Job) -> RunSummary:
    """The summary of a job handed to a remote runner: nothing counted yet."""
    return RunSummary(result, {}, {}, 0.0, job.trees, job.model)


# The project's errors about its inputs, as they appear in a failed Beam job's message.
_INPUT_ERRORS = ("PointsError", "SegmentAbsentError", "PointOutsideError", "AbsentChunksError",
                 "NothingToWriteError", "ManifestError", "VolumeError", "ConfigError")


def root_cause(error: BaseException) -> str:
    """The innermost message of a failed job that names an input, once.

    A stage's error reaches the driver wrapped (and, from worker processes, as the text of
    the worker's traceback); this finds the project's own error in it.
    """
    seen = error
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    for candidate in (seen, error):
        if type(candidate).__name__ in _INPUT_ERRORS:
            return str(candidate).split(" [while running")[0].strip()
    text = f"{error}\n{seen}"
    found = re.findall(r"(?:^|\s)(?:\w+\.)*(" + "|".join(_INPUT_ERRORS) + r"): (.+)", text)
    if found:
        return found[-1][1].split(" [while running")[0].strip()
    return f"{type(seen).__name__}: {str(seen).strip().splitlines()[-1] if str(seen).strip() else ''}"
