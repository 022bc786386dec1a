"""Reprocessing: the embeddings of a new segmentation version, re-embedding only what changed.

A segment's nodes and embeddings depend only on its own voxels (plus the EM, the model and the
run's parameters), so the segments of a new version are classified against the previous run's
manifest by their voxel fingerprints:

    unchanged  the same voxels as a previous segment, under the same id or a new one (relabelled)
    changed    an id of the previous run that now has other voxels
    new        an id the previous run did not have
    stale      a previous segment that is not carried over (removed, or its id reused)

Only changed and new segments are skeletonized, cut out and embedded; a cutout whose digest
equals that of a stale segment's node reuses its embedding instead of running the model.
Unchanged segments' nodes and raw embeddings are carried over from the previous manifest under
their new ids; radius means and every output tree are then written in full by the same stages
as a full run, so the new tree equals a full run on the new version. The previous run is only
read.

Two Beam jobs: the fingerprint pass and classification (small results staged under the new
output root), then the reprocessing itself, which needs the list of segments to skeletonize
when it is built. An explicit list of changed ids (e.g. CAVE's get_delta_roots: new roots are
changed, expired roots removed) replaces the first job; every other previous segment is then
taken as unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Collection, Iterable, Iterator, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import StandardOptions

from segclr_beam import cutouts, inference, pipeline
from segclr_beam.config import ConfigError, EmbedConfig
from segclr_beam.manifest import (NODES, SEGMENTS, Fingerprints, Manifest, ManifestError,
                                  NodeRecord, ReadTable, SegmentRecord, WriteManifest,
                                  cutout_digest, cutout_key, describe_run, differences,
                                  fingerprint_box, read_table_file)
from segclr_beam.outputs import delete_tree
from segclr_beam.points import as_long, as_uint64
from segclr_beam.runner import LOCAL_RUNNER, DataflowGpu, pipeline_options

STAGING = ".reprocess"  # under the new output root while reprocessing; removed at the end
_CHANGES, _TO_EMBED = "changes", "embed.txt"
_STALE, _REUSED = "stale", "reused"
_LOG = logging.getLogger(__name__)


class Change(NamedTuple):
    """The fate of one segment: `old_id` in the previous run, `new_id` in the new version.

    fingerprint and voxels are the new version's (the previous run's for stale segments).
    """

    status: str  # unchanged, changed, new or stale
    old_id: int | None
    new_id: int | None
    fingerprint: bytes
    voxels: int


CHANGES_SCHEMA = {
    "type": "record", "name": "Change", "namespace": "segclr_beam.reprocess",
    "fields": [{"name": "status", "type": "string"},
               {"name": "old_id", "type": ["null", "long"]},
               {"name": "new_id", "type": ["null", "long"]},
               {"name": "fingerprint", "type": "bytes"},
               {"name": "voxels", "type": "long"}],
}


def _change_to_avro(change: Change) -> dict:
    ids = {name: None if value is None else as_long(value)
           for name, value in (("old_id", change.old_id), ("new_id", change.new_id))}
    return {**change._asdict(), **ids}


def _change_from_avro(row: dict) -> Change:
    old_id, new_id = (None if row[name] is None else as_uint64(row[name])
                      for name in ("old_id", "new_id"))
    return Change(row["status"], old_id, new_id, row["fingerprint"], row["voxels"])


# Classification: per-key work as plain functions, Beam transforms as thin wrappers -----------

def match_fingerprint(fingerprint: bytes, previous: list[SegmentRecord],
                      current: list[SegmentRecord]) -> Change:
    """The previous and current segments with one fingerprint -> unchanged, stale or new.

    "new" is provisional: `settle` turns it into "changed" when the id existed before.
    """
    if len(previous) > 1 or len(current) > 1:
        ids = [r.segment_id for r in (*previous, *current)]
        raise ValueError(f"segments {ids} share the voxel fingerprint {fingerprint.hex()}; "
                         "distinct segments cannot have the same voxels")
    if previous and current:
        return Change("unchanged", previous[0].segment_id, current[0].segment_id, fingerprint,
                      current[0].voxels)
    if previous:
        return Change("stale", previous[0].segment_id, None, fingerprint, previous[0].voxels)
    return Change("new", None, current[0].segment_id, fingerprint, current[0].voxels)


def carry_or_stale(record: SegmentRecord, changed: Collection[int],
                   removed: Collection[int]) -> Change:
    """A previous segment when changed ids are given: stale if listed, else unchanged."""
    if record.segment_id in changed or record.segment_id in removed:
        return Change("stale", record.segment_id, None, record.fingerprint, record.voxels)
    return Change("unchanged", record.segment_id, record.segment_id, record.fingerprint,
                  record.voxels)


def _sides(change: Change) -> Iterator[tuple[int, tuple[str, Change]]]:
    """A change keyed by each id it involves, tagged with the side the id belongs to."""
    if change.new_id is not None:
        yield change.new_id, ("current", change)
    if change.old_id is not None:
        yield change.old_id, ("previous", change)


def settle(sides: Iterable[tuple[str, Change]]) -> list[Change]:
    """The final changes involving one segment id: a provisionally new segment whose id the
    previous run had is changed; each change is emitted once (from its current side, or as
    stale from its previous side)."""
    sides = list(sides)
    existed = any(side == "previous" for side, _ in sides)
    settled = []
    for side, change in sides:
        if side == "current":
            settled.append(change._replace(status="changed") if change.status == "new"
                           and existed else change)
        elif change.status == "stale":
            settled.append(change)
    return settled


class _Settle(beam.DoFn):
    """(segment id, tagged changes) -> final changes, counted per class."""

    def __init__(self):
        self._counters = {name: beam.metrics.Metrics.counter("segclr", f"segments_{name}")
                          for name in ("unchanged", "relabelled", "changed", "new", "removed")}

    def process(self, element):
        _, sides = element
        sides = list(sides)
        settled = settle(sides)
        for change in settled:
            if change.status == "unchanged":
                relabelled = change.old_id != change.new_id
                self._counters["relabelled" if relabelled else "unchanged"].inc()
            elif change.status == "stale":
                if not any(side == "current" for side, _ in sides):
                    self._counters["removed"].inc()
            else:
                self._counters[change.status].inc()
        yield from settled


class _SettleIds(beam.PTransform):
    def expand(self, provisional):
        return (provisional
                | "ById" >> beam.FlatMap(_sides)
                | "GroupById" >> beam.GroupByKey()
                | "Settle" >> beam.ParDo(_Settle()))


class ClassifyByFingerprint(beam.PTransform):
    """{"previous": SegmentRecord, "current": SegmentRecord} -> Change of every segment."""

    def expand(self, inputs):
        keyed = {side: inputs[side] | f"ByFingerprint[{side}]" >> beam.Map(
                     lambda r: (r.fingerprint, r)) for side in ("previous", "current")}
        return (keyed
                | "JoinFingerprints" >> beam.CoGroupByKey()
                | "Match" >> beam.MapTuple(lambda fingerprint, found: match_fingerprint(
                    fingerprint, found["previous"], found["current"]))
                | "SettleIds" >> _SettleIds())


class ClassifyByIds(beam.PTransform):
    """{"previous": SegmentRecord, "current": SegmentRecord of the changed ids} -> Change.

    `changed` are the new version's changed and new ids; `removed` previous ids that are gone.
    Every other previous segment is taken as unchanged, under its own id.
    """

    def __init__(self, changed: Collection[int], removed: Collection[int]):
        super().__init__()
        self._changed, self._removed = frozenset(changed), frozenset(removed)

    def expand(self, inputs):
        previous = inputs["previous"] | "CarryOrStale" >> beam.Map(
            carry_or_stale, self._changed, self._removed)
        current = inputs["current"] | "Listed" >> beam.Map(
            lambda r: Change("new", None, r.segment_id, r.fingerprint, r.voxels))
        return (previous, current) | "Flatten" >> beam.Flatten() | "SettleIds" >> _SettleIds()


# Carrying over and reusing -------------------------------------------------------------------

class _SplitPrevious(beam.DoFn):
    """(shard, {"file": previous node file, "fates": (old id, new id or None)}) -> the nodes of
    carried segments under their new ids; tagged "stale": (cutout digest, embedding) of the
    nodes of stale segments, the cache for node-level reuse."""

    def __init__(self):
        self._carried = beam.metrics.Metrics.counter("segclr", "nodes_carried")
        self._cached = beam.metrics.Metrics.counter("segclr", "nodes_cached")

    def process(self, element):
        _, grouped = element
        fates = dict(grouped["fates"])
        for path, file in grouped["file"]:
            for node in read_table_file(path, file):
                old_id = node.point.segment_id
                if old_id not in fates:
                    raise ManifestError(f"{path}: nodes of segment {old_id}, which the "
                                        "segments table of the same manifest does not hold")
                new_id = fates[old_id]
                if new_id is None:
                    self._cached.inc()
                    yield beam.pvalue.TaggedOutput(_STALE, (node.cutout_digest, node.embedding))
                else:
                    self._carried.inc()
                    yield node._replace(point=node.point._replace(segment_id=new_id))


class _Reuse(beam.DoFn):
    """(Point, cutout) -> NodeRecord tagged "reused" if the cache holds the cutout's digest,
    else ((Point, digest), cutout) for the model."""

    def __init__(self, key: bytes):
        self._key = key
        self._reused = beam.metrics.Metrics.counter("segclr", "embeddings_reused")

    def process(self, element, cache):
        point, cutout = element
        digest = cutout_digest(cutout, self._key)
        for embedding in cache[digest]:  # equal digests: equal embeddings; any one will do
            self._reused.inc()
            yield beam.pvalue.TaggedOutput(_REUSED, NodeRecord(point, digest, embedding))
            return
        yield (point, digest), cutout


class EmbedChanged(beam.PTransform):
    """(Point, cutout) -> NodeRecord: embeddings reused from `cache` ((digest, embedding)) or
    from the model. The cache is a multimap side input, which runners read whole while small
    and look up key by key once large, so only digests of new cutouts are ever looked up."""

    def __init__(self, model_dir: str, batch_size: int, model: dict, cache: beam.PCollection):
        super().__init__()
        self._embed = inference.Embed(model_dir, batch_size)
        self._key = cutout_key(model)
        self._cache = cache

    def expand(self, masked):
        looked_up = masked | "Reuse" >> beam.ParDo(
            _Reuse(self._key), beam.pvalue.AsMultiMap(self._cache)).with_outputs(
                _REUSED, main="misses")
        embedded = (looked_up.misses
                    | "Model" >> self._embed
                    | "Nodes" >> beam.MapTuple(lambda key, e: NodeRecord(key[0], key[1], e)))
        return (looked_up[_REUSED], embedded) | "Flatten" >> beam.Flatten()


def _fate(change: Change, previous: Manifest) -> Iterator[tuple[int, tuple[int, int | None]]]:
    """(previous shard, (old id, new id if carried else None)) of a previous segment."""
    if change.old_id is not None:
        carried = change.new_id if change.status == "unchanged" else None
        yield previous.shard_of(change.old_id), (change.old_id, carried)


def _current_segment(change: Change) -> Iterator[SegmentRecord]:
    if change.new_id is not None:
        yield SegmentRecord(change.new_id, change.fingerprint, change.voxels)


def build(p: beam.Pipeline, job: pipeline.Job, previous: Manifest, changes: beam.PCollection,
          to_embed: Collection[int], description: dict, staging: str) -> None:
    """Add the reprocessing stages to `p`: carry over, re-embed `to_embed`, write everything,
    remove `staging`, and record the run last."""
    config = job.config
    files = [(f.shard, (previous.file_path(f), f)) for f in previous.files(NODES)]
    split = ({"file": p | "PreviousNodeFiles" >> beam.Create(files),
              "fates": changes | "Fates" >> beam.FlatMap(_fate, previous)}
             | "ByPreviousShard" >> beam.CoGroupByKey()
             | "SplitPrevious" >> beam.ParDo(_SplitPrevious()).with_outputs(_STALE, main="carried"))
    nodes = [split.carried]
    if to_embed:
        masked = (pipeline.make_points(p, job, to_embed)
                  | "Cutouts" >> cutouts.MakeCutouts(job.em, job.segmentation, config.block_size,
                                                     config.cutout_size))
        nodes.append(masked | "Embed" >> EmbedChanged(job.model_dir, config.batch_size,
                                                      job.model, split[_STALE]))
    nodes = nodes | "AllNodes" >> beam.Flatten()
    embeddings = (nodes
                  | "Embeddings" >> beam.Map(lambda r: (r.point, r.embedding))
                  | "Progress" >> beam.ParDo(pipeline.Progress("embeddings")))
    trees = pipeline.write_results(job, nodes | "NodePoints" >> beam.Map(lambda r: r.point),
                                   embeddings)
    segments = changes | "CurrentSegments" >> beam.FlatMap(_current_segment)
    recorded = ({SEGMENTS: segments, NODES: nodes}
                | "Manifest" >> WriteManifest(config.output, description, config.num_shards,
                                              config.bytewidth))
    cleaned = ((trees, recorded)
               | "Written" >> beam.Flatten()
               | "AllOutputs" >> beam.combiners.ToList()
               | "RemoveStaging" >> beam.Map(lambda _, path: delete_tree(path), staging))
    pipeline.record_run(job, [cleaned])


# The job -------------------------------------------------------------------------------------

@dataclasses.dataclass
class ReprocessSummary:
    """What a reprocessing run did. `run` sums the counters and wall time of both jobs (on a
    remote runner: of the first; the second has only been submitted)."""

    run: pipeline.RunSummary
    changes: dict[str, int]  # segments per class; empty after --full or while still running
    segments_embedded: int | None  # segments sent to skeletonization (None: full recompute)
    full: bool


def _classes(counters: dict[str, int]) -> dict[str, int]:
    """Segments per class, from the classification's counters."""
    return {name: counters.get(f"segments_{name}", 0)
            for name in ("unchanged", "relabelled", "changed", "new", "removed")}


def _same_path(a: str, b: str) -> bool:
    def norm(path):
        path = path.rstrip("/")
        return path if "://" in path else os.path.abspath(path)
    return norm(a) == norm(b)


def _read_ids(path: str) -> list[int]:
    with FileSystems.open(path) as f:
        return sorted(int(line) for line in f.read().decode().split())


def _counters(result) -> dict[str, int]:
    return {m.key.metric.name: m.committed for m in result.metrics().query()["counters"]
            if m.key.metric.namespace == "segclr"}


def _classify(job: pipeline.Job, previous: Manifest, staging: str, beam_args: list[str],
              gpu: DataflowGpu | None) -> tuple[list[int], dict[str, int]]:
    """The first job: fingerprints of the new version, classified and staged. Returns the ids
    to skeletonize (changed and new segments that are large enough) and the counters."""
    config = job.config
    p = beam.Pipeline(options=pipeline_options(beam_args, gpu))
    current = p | "Fingerprints" >> Fingerprints(
        job.segmentation, fingerprint_box(job.bbox, config.cutout_size), config.chunk_size)
    changes = ({"previous": p | "PreviousSegments" >> ReadTable(previous, SEGMENTS),
                "current": current}
               | "Classify" >> ClassifyByFingerprint())
    _ = (changes
         | "ToAvro" >> beam.Map(_change_to_avro)
         | "StageChanges" >> beam.io.WriteToAvro(FileSystems.join(staging, _CHANGES),
                                                 CHANGES_SCHEMA, file_name_suffix=".avro"))
    _ = (changes
         | "ToEmbed" >> beam.FlatMap(
             lambda c, least: [str(c.new_id)] if c.status in ("changed", "new")
             and c.voxels >= least else [], config.min_voxels)
         | "StageIds" >> beam.io.WriteToText(FileSystems.join(staging, _TO_EMBED),
                                             num_shards=1, shard_name_template=""))
    result = p.run()
    result.wait_until_finish()
    return _read_ids(FileSystems.join(staging, _TO_EMBED)), _counters(result)


def _reusing_job(manifest: Manifest, config: EmbedConfig) -> tuple[pipeline.Job, dict]:
    """The job for `config` and its manifest description, once it is clear that the previous
    run's embeddings are valid for it: every refusal comes before any work."""
    job = pipeline.prepare(config)
    description = describe_run(job, pipeline.skeleton_options(config))
    differing = differences(manifest.parameters, description["parameters"])
    if differing:
        raise ConfigError(f"cannot reuse the run at {manifest.root}: " + "; ".join(differing)
                          + ". Pass --full to embed every segment again")
    for name in ("points", "segments"):
        if getattr(config, name) is not None:
            raise ConfigError(f"{name}: reprocessing needs a run that skeletonized every "
                              f"segment of its box; {manifest.root} used {name}="
                              f"{getattr(config, name)}. Pass --full to embed again")
    manifest.check_files()
    return job, description


def _changes(p: beam.Pipeline, job: pipeline.Job, manifest: Manifest, staging: str,
             changed_ids: list[int] | None, removed_ids: Collection[int]) -> beam.PCollection:
    """The staged classification, or the classification by the given changed ids."""
    if changed_ids is None:
        return (p
                | "ReadChanges" >> beam.io.ReadFromAvro(
                    FileSystems.join(staging, _CHANGES + "*.avro"))
                | "FromAvro" >> beam.Map(_change_from_avro))
    current = p | "Fingerprints" >> Fingerprints(
        job.segmentation, fingerprint_box(job.bbox, job.config.cutout_size),
        job.config.chunk_size, segment_ids=changed_ids)
    return ({"previous": p | "PreviousSegments" >> ReadTable(manifest, SEGMENTS),
             "current": current}
            | "Classify" >> ClassifyByIds(changed_ids, set(map(int, removed_ids))))


def reprocess(previous: str, overrides: dict, *, full: bool = False,
              changed_ids: Collection[int] | None = None,
              removed_ids: Collection[int] = (), beam_args: list[str] | None = None,
              gpu: DataflowGpu | None = None) -> ReprocessSummary:
    """Embed a new segmentation version into a new output tree, reusing the run at `previous`.

    `overrides` are EmbedConfig fields replacing the previous run's (None values are ignored);
    they must name the new `segmentation` and a new `output`. Fields that change embeddings
    (model, EM, box, skeleton and cutout parameters) refuse with ConfigError unless `full`,
    which embeds everything again; output fields (radii, sharding, coordinates, formats) may
    change. `changed_ids` (changed and new ids of the new version) and `removed_ids` replace
    the fingerprint pass. A missing or corrupt previous manifest raises ManifestError.
    """
    start = time.monotonic()
    manifest = Manifest.open(previous)
    config = EmbedConfig.from_dict(manifest.config, source=manifest.path).updated(overrides)
    config = config.validate()
    if _same_path(config.output, previous):
        raise ConfigError(f"output: {config.output} is the previous run; reprocessing writes a "
                          "new output tree and never modifies the previous one")
    if full:
        return ReprocessSummary(pipeline.run(config, beam_args, gpu), {}, None, True)
    if config.write_skeletons:
        _LOG.warning("skeletons are not written when reprocessing (only changed segments are "
                     "skeletonized); use --full to write them")
        config = dataclasses.replace(config, write_skeletons=False)
    job, description = _reusing_job(manifest, config)

    beam_args = list(beam_args or [])
    staging = FileSystems.join(config.output.rstrip("/"), STAGING)
    delete_tree(staging)
    counters: dict[str, int] = {}
    if changed_ids is None:
        to_embed, counters = _classify(job, manifest, staging, beam_args, gpu)
    else:
        changed_ids = to_embed = sorted(set(map(int, changed_ids)))
    options = pipeline_options(beam_args, gpu)
    p = beam.Pipeline(options=options)
    changes = _changes(p, job, manifest, staging, changed_ids, removed_ids)
    build(p, job, manifest, changes, to_embed, description, staging)
    result = p.run()
    if options.view_as(StandardOptions).runner != LOCAL_RUNNER:  # submitted; it records itself
        summary = pipeline.RunSummary(result, counters, {}, 0.0, job.trees, job.model)
        classes = _classes(counters) if changed_ids is None else {}  # else: still running
        return ReprocessSummary(summary, classes, len(to_embed), False)
    result.wait_until_finish()
    summary = pipeline.summarize(result, job, time.monotonic() - start)
    for name, value in counters.items():
        summary.counters[name] = summary.counters.get(name, 0) + value
    classes = _classes(summary.counters)
    _LOG.info("reprocessed %s from %s: %s segments; %d re-embedded", config.output,
              manifest.root, classes, len(to_embed))
    return ReprocessSummary(summary, classes, len(to_embed), False)
