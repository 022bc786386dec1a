"""Reprocessing: the embeddings of a new segmentation version, re-embedding only what changed.

A segment's nodes and embeddings depend only on its own voxels (plus the EM, the model and the
run's parameters), so the segments of a new version are classified against the previous run's
manifest by their voxel fingerprints:

    unchanged  the same voxels as a previous segment, under the same id or a new one (relabelled)
    changed    an id of the previous run that now has other voxels
    new        an id the previous run did not have
    stale      a previous segment that is not carried over (removed, or its id reused)

Only changed and new segments are skeletonized, cut out and embedded; a cutout whose digest
equals that of a stale segment's node at the same position reuses its embedding instead of
running the model (see EmbedChanged).
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
from apache_beam.options.pipeline_options import PipelineOptions

from segclr_beam import inference, pipeline, shards
from segclr_beam.config import ConfigError, EmbedConfig
from segclr_beam.job import (REPROCESS_DIR, Job, RunSummary, conclude, counters, describe_run,
                             make_cutouts, make_points, owned, prepare, record_run, submitted,
                             summarize, write_results)
from segclr_beam.manifest import (NODES, SEGMENTS, Fingerprints, Manifest, ManifestError,
                                  NodeRecord, ReadTable, SegmentRecord, WriteManifest,
                                  cutout_digest, cutout_key, differences, fingerprint_box,
                                  read_table_file)
from segclr_beam.records import Point, as_long, as_uint64
from segclr_beam.runner import DataflowGpu, is_local, pipeline_options
from segclr_beam.shards import delete_tree, join

STAGING = REPROCESS_DIR  # under the new output root while reprocessing; removed at the end
# Top-level step names of the second job, in data-flow order, for the seconds per step.
STAGES = ("Classify", "SplitPrevious", "Points", "Embed", "WritePoints", "Aggregate", "Write",
          "Annotations", "Manifest", "Record")
_CHANGES, _TO_EMBED = "changes", "embed.txt"
_AVRO_NAME = "segclr_beam.reprocess"  # fixes the staged files' sync marker
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
    carried segments under their new ids; tagged "stale": ((x, y, z), (cutout digest,
    embedding)) of the nodes of stale segments, the cache for node-level reuse."""

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
                    yield beam.pvalue.TaggedOutput(
                        _STALE, (node.point[2:], (node.cutout_digest, node.embedding)))
                else:
                    self._carried.inc()
                    yield node._replace(point=node.point._replace(segment_id=new_id))


def _with_candidates(position, joined: dict) -> Iterator[tuple[Point, tuple]]:
    """(Point, the stale nodes' (digest, embedding) at its position) for each new point."""
    candidates = tuple(joined["stale"])
    for point in joined["point"]:
        yield point, candidates


class _Reuse(beam.DoFn):
    """((Point, candidates), cutout) -> NodeRecord tagged "reused" if a candidate has the
    cutout's digest, else ((Point, digest), cutout) for the model."""

    def __init__(self, key: bytes):
        self._key = key
        self._reused = beam.metrics.Metrics.counter("segclr", "embeddings_reused")

    def process(self, element):
        (point, candidates), cutout = element
        digest = cutout_digest(cutout, self._key)
        for found, embedding in candidates:  # equal digests: equal embeddings
            if found == digest:
                self._reused.inc()
                yield beam.pvalue.TaggedOutput(_REUSED, NodeRecord(point, digest, embedding))
                return
        yield (point, digest), cutout


class EmbedChanged(beam.PTransform):
    """Points of changed and new segments -> NodeRecord, the embedding reused from `cache`
    (stale nodes' ((x, y, z), (digest, embedding))) where the masked cutout is the same, else
    from the model.

    A cutout is centred on its node, so a cutout seen before was seen at the same position:
    the cache is joined to the points by position (CoGroupByKey of light records, which
    scales like the other shuffles), each point travels to the cutout stage with the stale
    nodes at its position, and there its cutout's digest decides between reuse and the model
    in one fused stage. Each cutout is cut once and never crosses a shuffle.
    """

    def __init__(self, job: Job, cache: beam.PCollection):
        super().__init__()
        config = job.config
        self._job = job
        self._embed = inference.Embed(job.model_dir, config.batch_size)
        self._key = cutout_key(job.model)
        self._cache = cache

    def expand(self, points):
        candidates = ({"point": points | "ByPosition" >> beam.Map(lambda p: (p[2:], p)),
                       "stale": self._cache}
                      | "JoinByPosition" >> beam.CoGroupByKey()
                      | "Candidates" >> beam.FlatMapTuple(_with_candidates))
        looked_up = (make_cutouts(self._job, candidates, keyed=True)
                     | "Reuse" >> beam.ParDo(_Reuse(self._key)).with_outputs(
                         _REUSED, main="misses"))
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


def build(p: beam.Pipeline, job: Job, previous: Manifest, changes: beam.PCollection,
          to_embed: Collection[int], description: dict, staging: str,
          release: bool = True) -> None:
    """Add the reprocessing stages to `p`: carry over, re-embed `to_embed`, write everything,
    remove `staging`, and record the run last (releasing the output's lock with `release`)."""
    config = job.config
    files = [(f.shard, (previous.file_path(f), f)) for f in previous.files(NODES)]
    split = ({"file": p | "PreviousNodeFiles" >> beam.Create(files),
              "fates": changes | "Fates" >> beam.FlatMap(_fate, previous)}
             | "ByPreviousShard" >> beam.CoGroupByKey()
             | "SplitPrevious" >> beam.ParDo(_SplitPrevious()).with_outputs(_STALE, main="carried"))
    nodes = [split.carried]
    if to_embed:
        nodes.append(make_points(p, job, to_embed, checked=False)
                     | "Embed" >> EmbedChanged(job, split[_STALE]))
    nodes = nodes | "AllNodes" >> beam.Flatten()
    embeddings = nodes | "Embeddings" >> beam.Map(lambda r: (r.point, r.embedding))
    trees = write_results(job, nodes | "NodePoints" >> beam.Map(lambda r: r.point), embeddings)
    segments = changes | "CurrentSegments" >> beam.FlatMap(_current_segment)
    recorded = ({SEGMENTS: segments, NODES: nodes}
                | "Manifest" >> WriteManifest(config.output, description, config.num_shards,
                                              config.bytewidth))
    cleaned = ((trees, recorded)
               | "Written" >> beam.Flatten()
               | "AllOutputs" >> beam.combiners.ToList()
               | "RemoveStaging" >> beam.Map(lambda _, path: delete_tree(path), staging))
    record_run(job, [cleaned], release)


# The job -------------------------------------------------------------------------------------

@dataclasses.dataclass
class ReprocessSummary:
    """What a reprocessing run did. `run` sums the counters and wall time of both jobs (on a
    remote runner: of the first; the second has only been submitted)."""

    run: RunSummary
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


@dataclasses.dataclass(frozen=True)
class _StagedChanges:
    """The classification, staged as Avro shard files for the second job."""

    staging: shards.Staging  # below the reprocessing staging directory
    num_shards: int

    def keys(self, change: Change) -> list[int]:
        segment_id = change.new_id if change.new_id is not None else change.old_id
        return [shards.shard_of(segment_id, self.num_shards, 8)]

    def write(self, shard: int, changes: Iterable[Change]) -> str:
        order = sorted(changes, key=lambda c: (c.new_id or 0, c.old_id or 0))
        name = f"{shard}.avro"
        shards.write_file(self.staging.temp_path(_CHANGES, name), shards.encode_avro(
            CHANGES_SCHEMA, map(_change_to_avro, order), _AVRO_NAME))
        return name

    def finalize(self, names: list[str]) -> None:
        self.staging.finalize({_CHANGES: names})


def _read_changes(path: str) -> Iterator[Change]:
    with FileSystems.open(path) as f:
        yield from map(_change_from_avro, shards.read_avro(f.read()))


def _classify(job: Job, previous: Manifest, staging: str, options: PipelineOptions
              ) -> tuple[list[int], dict[str, int]]:
    """The first job: fingerprints of the new version, classified and staged. Returns the ids
    to skeletonize (changed and new segments that are large enough) and the counters."""
    p = classify_pipeline(job, previous, staging, options)
    result = p.run()
    result.wait_until_finish()
    return _read_ids(join(staging, _TO_EMBED)), counters(result)


def classify_pipeline(job: Job, previous: Manifest, staging: str,
                      options: PipelineOptions) -> beam.Pipeline:
    """The first job's pipeline: fingerprint, classify, stage the changes and the ids."""
    config = job.config
    p = beam.Pipeline(options=options)
    current = p | "Fingerprints" >> Fingerprints(
        job.segmentation, fingerprint_box(job.bbox, config.cutout_size), config.chunk_size)
    changes = ({"previous": p | "PreviousSegments" >> ReadTable(previous, SEGMENTS),
                "current": current}
               | "Classify" >> ClassifyByFingerprint())
    staged = _StagedChanges(shards.Staging.below(staging), config.num_shards)
    _ = changes | "StageChanges" >> shards.WriteShards(staged.keys, staged.write,
                                                      staged.finalize)
    _ = (changes
         | "ToEmbed" >> beam.FlatMap(
             lambda c, least: [str(c.new_id)] if c.status in ("changed", "new")
             and c.voxels >= least else [], config.min_voxels)
         | "StageIds" >> beam.io.WriteToText(join(staging, _TO_EMBED),
                                             num_shards=1, shard_name_template=""))
    return p


def _reusing_job(manifest: Manifest, config: EmbedConfig) -> tuple[Job, dict]:
    """The job for `config` and its manifest description, once it is clear that the previous
    run's embeddings are valid for it: every refusal comes before any work."""
    job = prepare(config)
    try:
        description = describe_run(job)
        differing = differences(manifest.parameters, description["parameters"])
        if differing:
            raise ConfigError(f"cannot reuse the run at {manifest.root}: "
                              + "; ".join(differing) + ". Pass --full to embed every segment again")
        for name in ("points", "segments"):
            if getattr(config, name) is not None:
                raise ConfigError(f"{name}: reprocessing needs a run that skeletonized every "
                                  f"segment of its box; {manifest.root} used {name}="
                                  f"{getattr(config, name)}. Pass --full to embed again")
        manifest.check_files()
    except BaseException:
        job.claim.finish()  # nothing written yet: only the lock is released
        raise
    return job, description


def _changes(p: beam.Pipeline, job: Job, manifest: Manifest, staging: str,
             changed_ids: list[int] | None, removed_ids: Collection[int]) -> beam.PCollection:
    """The staged classification, or the classification by the given changed ids."""
    if changed_ids is None:
        files = sorted(join(staging, _CHANGES, name)
                       for name in shards.list_names(join(staging, _CHANGES), "*.avro"))
        return (p
                | "Classify" >> beam.Create(files)
                | "SpreadChanges" >> beam.Reshuffle()
                | "ReadChanges" >> beam.FlatMap(_read_changes))
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
    beam_args = list(beam_args or [])
    options = pipeline_options(beam_args, gpu)
    # The fingerprint pass runs no model: the same workers without GPUs.
    first_options = pipeline_options(beam_args, gpu, accelerator=False)
    local = is_local(options)
    job, description = _reusing_job(manifest, config)
    with owned(job):
        staging = join(config.output, STAGING)
        classified: dict[str, int] = {}
        if changed_ids is None:
            to_embed, classified = _classify(job, manifest, staging, first_options)
        else:
            changed_ids = to_embed = sorted(set(map(int, changed_ids)))
        p = beam.Pipeline(options=options)
        changes = _changes(p, job, manifest, staging, changed_ids, removed_ids)
        build(p, job, manifest, changes, to_embed, description, staging, release=not local)
        result = p.run()
        if not local:  # submitted; it records itself
            summary = submitted(result, job)
            summary.counters.update(classified)
            classes = _classes(classified) if changed_ids is None else {}  # else: still running
            return ReprocessSummary(summary, classes, len(to_embed), False)
        result.wait_until_finish()
        summary = summarize(result, job, time.monotonic() - start, STAGES)
        for name, value in classified.items():
            summary.counters[name] = summary.counters.get(name, 0) + value
        conclude(job, summary)
    classes = _classes(summary.counters)
    _LOG.info("reprocessed %s from %s: %s segments; %d re-embedded", config.output,
              manifest.root, classes, len(to_embed))
    return ReprocessSummary(summary, classes, len(to_embed), False)
