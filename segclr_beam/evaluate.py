"""How well embeddings separate labelled classes: k-nearest-neighbour and linear-probe
classification of the nodes of an output tree, cross-validated by segment.

Nodes of one segment look alike (and their radius means share nodes), so a fold that trains
on some nodes of a segment and tests on others measures recognising the segment, not its
class. Folds are therefore made of whole segments (stratified by class where possible) and
are the same for every variant of a run (raw, 10 um and 25 um means) and for the baseline.
Scores are pooled over the folds' held-out nodes: balanced accuracy (the mean per-class
recall, so the many nodes of large classes do not hide the small ones) and each class's
recall. The trivial baseline scores a few hand features of each node's segment mask in its
cutout window (`mask_features`) with the same folds, so a network is worth what it adds to
them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems

from segclr_beam.aggregate import radius_means
from segclr_beam.cutouts import DEFAULT_CUTOUT_SIZE, block_of, window_of, windows_box
from segclr_beam.outputs import INFO_NAME
from segclr_beam.reader import EmbeddingReader
from segclr_beam.records import Point, variant_name
from segclr_beam.shards import join, read_json
from segclr_beam.volume import Volume, open_volume

DEFAULT_K = 5
DEFAULT_FOLDS = 5
MASK_FEATURES = ("voxel_fraction", "extent_x_nm", "extent_y_nm", "extent_z_nm",
                 "spread_0_nm", "spread_1_nm", "spread_2_nm")
MASK = "mask"  # the baseline's variants are named "mask/raw", "mask/agg10um", ...
# Baseline windows are read per block of nodes of this edge: a read of (128 + cutout)^3 ids.
_BLOCK = 128


class EvaluationError(ValueError):
    """Labels or an output tree cannot be evaluated; the message names the input."""


@dataclasses.dataclass(frozen=True)
class Nodes:
    """The nodes of one variant, sorted by (segment, node): features and positions."""

    segment_ids: np.ndarray  # uint64 [N]
    node_ids: np.ndarray     # int64 [N]
    voxels: np.ndarray       # int64 [N, 3]
    features: np.ndarray     # float [N, D]

    def __len__(self) -> int:
        return len(self.node_ids)


# Inputs ----------------------------------------------------------------------------------

def load_labels(path: str) -> dict[int, str]:
    """Segment id -> class from JSON ({id: class}, or the synthetic dataset's classes.json
    with a "classes" object) or CSV with a header naming `segment_id` and `class`."""
    try:
        with FileSystems.open(path) as f:
            text = f.read().decode("utf-8-sig")
    except OSError as e:
        raise EvaluationError(f"labels {path}: cannot read: {e}") from None
    if path.lower().endswith(".csv"):
        rows = csv.DictReader(io.StringIO(text))
        if not {"segment_id", "class"} <= set(rows.fieldnames or ()):
            raise EvaluationError(f"labels {path}:1: need columns segment_id and class, found "
                                  f"{', '.join(rows.fieldnames or ()) or 'none'}")
        items = [(row["segment_id"], row["class"], f"{path}:{rows.line_num}") for row in rows]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvaluationError(f"labels {path}: not JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("classes"), dict):
            data = data["classes"]
        if not isinstance(data, dict):
            raise EvaluationError(f"labels {path}: expected a JSON object of segment id: class")
        items = [(k, v, f"{path}: segment {k!r}") for k, v in data.items()]
    labels = {}
    for segment, name, where in items:
        try:
            segment_id = int(segment)
        except (TypeError, ValueError):
            raise EvaluationError(f"{where}: segment id must be an integer, got {segment!r}") \
                from None
        if not isinstance(name, str) or not name:
            raise EvaluationError(f"{where}: class must be a non-empty string, got {name!r}")
        labels[segment_id] = name
    if not labels:
        raise EvaluationError(f"labels {path}: no labels")
    return labels


def variant_trees(output_dir: str) -> dict[str, str]:
    """{variant name: tree path} of the embedding trees below a run's output root, the raw
    embeddings first, then by radius."""
    found = FileSystems.match([join(output_dir, "*", INFO_NAME)])[0].metadata_list
    trees = {}
    for m in found:
        info = read_json(m.path)
        if info.get("format") == "segclr-beam embeddings":
            trees[info["variant"]] = (info["aggregation_radius_nm"] or 0.0,
                                      m.path.rsplit("/", 1)[0])
    if not trees:
        raise EvaluationError(f"{output_dir}: no embedding tree (*/{INFO_NAME}) below it; is it "
                              "an embedding run's output root?")
    return {name: path for name, (_, path) in sorted(trees.items(), key=lambda t: t[1][0])}


def read_nodes(tree: str, segment_ids: Iterable[int]) -> Nodes:
    """The nodes of those of `segment_ids` a tree holds (reader.EmbeddingReader, each shard
    read once), sorted by (segment, node)."""
    reader = EmbeddingReader(tree)
    segments = list(reader.read_segments(segment_ids))
    if not segments:
        raise EvaluationError(f"{tree}: holds none of the {len(set(segment_ids))} labelled "
                              "segments")
    ids = np.concatenate([np.full(len(s), s.segment_id, np.uint64) for s in segments])
    nodes = np.concatenate([s.node_ids for s in segments])
    voxels = reader.coordinates.to_voxels(np.concatenate([s.xyz for s in segments]))
    features = np.concatenate([s.embeddings for s in segments])
    order = np.lexsort((nodes, ids))
    return Nodes(ids[order], nodes[order], voxels[order], features[order])


# The trivial baseline ----------------------------------------------------------------------

def window_mask_features(mask: np.ndarray, resolution: Sequence[float]) -> np.ndarray:
    """MASK_FEATURES of one boolean window [x, y, z]: the share of voxels that are the
    segment's, the extent of those voxels per axis (nm) and the square roots of the
    eigenvalues of their positions' covariance (nm, largest first)."""
    resolution = np.asarray(resolution, dtype=np.float64)
    where = np.argwhere(mask)
    if not len(where):
        return np.zeros(len(MASK_FEATURES))
    extent = (where.max(axis=0) - where.min(axis=0) + 1) * resolution
    positions = where * resolution
    spread = np.sqrt(np.clip(np.linalg.eigvalsh(np.cov(positions.T, bias=True)
                                                if len(where) > 1 else np.zeros((3, 3))),
                             0, None))[::-1]
    return np.r_[len(where) / mask.size, extent, spread]


def mask_features(segmentation: Volume, segment_ids: np.ndarray, voxels: np.ndarray,
                  cutout_size: int = DEFAULT_CUTOUT_SIZE) -> np.ndarray:
    """MASK_FEATURES [N, 7] of each node's segment in its cutout window (the window the
    network sees), read one block of nodes at a time."""
    points = [Point(int(s), k, *map(int, xyz)) for k, (s, xyz) in
              enumerate(zip(segment_ids.tolist(), np.asarray(voxels).tolist()))]
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault(block_of(p, _BLOCK), []).append(p)
    features = np.zeros((len(points), len(MASK_FEATURES)))
    for group in groups.values():
        box = windows_box(group, cutout_size)
        labels = segmentation.read(box)
        for p in group:
            window = window_of(p, cutout_size)
            features[p.node_id] = window_mask_features(
                labels[window.slices(box.start)] == p.segment_id, segmentation.resolution)
    return features


def aggregated(nodes: Nodes, radius_nm: float | None, resolution: Sequence[float]) -> Nodes:
    """`nodes` with each node's features the mean over its segment's nodes within the radius
    (segclr_beam.aggregate, as the embedding means are made); None leaves them."""
    if radius_nm is None:
        return nodes
    means = np.empty_like(nodes.features, dtype=np.float32)
    bounds = np.flatnonzero(np.diff(nodes.segment_ids)) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(nodes)]):
        positions = nodes.voxels[a:b] * np.asarray(resolution, dtype=np.float64)
        means[a:b] = radius_means(positions, nodes.features[a:b].astype(np.float32),
                                  [radius_nm])[radius_nm]
    return dataclasses.replace(nodes, features=means)


# Cross-validation by segment ---------------------------------------------------------------

def segment_folds(classes: np.ndarray, segment_ids: np.ndarray, folds: int,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) node indices of each fold; every segment's nodes in one test fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    segments = len(np.unique(segment_ids))
    if not 2 <= folds <= segments:
        raise EvaluationError(f"folds: need 2 <= folds <= labelled segments ({segments}), "
                              f"got {folds}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(classes)), classes, segment_ids))


def _classifier(kind: str, k: int, train_size: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "knn":
        return make_pipeline(StandardScaler(), KNeighborsClassifier(min(k, train_size)))
    return make_pipeline(StandardScaler(),
                         LogisticRegression(class_weight="balanced", max_iter=2000))


def score(features: np.ndarray, classes: np.ndarray,
          folds: Sequence[tuple[np.ndarray, np.ndarray]], k: int = DEFAULT_K) -> dict:
    """k-NN and linear-probe scores of out-of-fold predictions: balanced accuracy and recall
    per class, for each of "knn" and "linear"."""
    names = sorted(set(classes.tolist()))
    result = {}
    for kind in ("knn", "linear"):
        predicted = np.empty(len(classes), dtype=classes.dtype)
        for train, test in folds:
            model = _classifier(kind, k, len(train)).fit(features[train], classes[train])
            predicted[test] = model.predict(features[test])
        recall = {c: float(np.mean(predicted[classes == c] == c)) for c in names}
        result[kind] = {"balanced_accuracy": float(np.mean(list(recall.values()))),
                        "recall": recall}
    return result


def evaluate(output_dir: str, labels: Mapping[int, str], *, k: int = DEFAULT_K,
             folds: int = DEFAULT_FOLDS, seed: int = 0, baseline: bool = False,
             segmentation: Any = None, cutout_size: int | None = None) -> dict:
    """Scores of every variant of the run at `output_dir` for the labelled segments.

    With `baseline`, also scores the mask features of each node's window (and their radius
    means) as variants "mask/raw", "mask/agg10um", ...; the segmentation and cutout size are
    the run's (run.json) unless given. Returns {"variants": {name: {"nodes", "segments",
    "knn", "linear"}}, "classes": {class: {"segments", "nodes"}}, ...}.
    """
    if not isinstance(k, int) or k < 1:
        raise EvaluationError(f"k: must be an integer >= 1, got {k!r}")
    trees = variant_trees(output_dir)
    raw = variant_name(None)
    if raw not in trees:
        raise EvaluationError(f"{output_dir}: has no {raw}/ tree, whose nodes every variant "
                              "and the baseline are scored on")
    reference = read_nodes(trees[raw], labels)
    missing = len(set(labels) - {int(s) for s in np.unique(reference.segment_ids)})
    named = np.array([labels[int(s)] for s in reference.segment_ids])
    known = np.ones(len(named), dtype=bool)
    left_out = {}
    for name in sorted(set(named[known].tolist())):
        count = len(np.unique(reference.segment_ids[named == name]))
        if count < 2:  # no fold could both train and test on it
            left_out[name] = count
            known &= named != name
    if len(set(named[known].tolist())) < 2:
        raise EvaluationError(f"{output_dir}: fewer than two classes have two or more "
                              f"labelled segments (left out: {left_out})")
    classes, segment_ids = named[known], reference.segment_ids[known]
    split = segment_folds(classes, segment_ids, folds, seed)
    variants = {name: read_nodes(path, labels) for name, path in trees.items()}
    if baseline:
        variants.update(_baseline(output_dir, trees, reference, segmentation, cutout_size))
    scores = {}
    for name, nodes in variants.items():
        if not (np.array_equal(nodes.segment_ids, reference.segment_ids)
                and np.array_equal(nodes.node_ids, reference.node_ids)):
            raise EvaluationError(f"{trees.get(name, name)}: its nodes are not those of "
                                  f"{trees[raw]}")
        scores[name] = {"nodes": int(known.sum()), "segments": len(np.unique(segment_ids)),
                        **score(nodes.features[known], classes, split, k)}
    per_class = {c: {"segments": len(np.unique(segment_ids[classes == c])),
                     "nodes": int(np.sum(classes == c))} for c in sorted(set(classes.tolist()))}
    return {"output": output_dir, "k": k, "folds": folds, "seed": seed,
            "cross_validation": "StratifiedGroupKFold by segment; scores of the held-out nodes",
            "classes": per_class,
            "labelled_segments_not_in_run": missing,
            "left_out_classes": left_out,
            "variants": scores}


def _baseline(output_dir: str, trees: Mapping[str, str], reference: Nodes, segmentation: Any,
              cutout_size: int | None) -> dict[str, Nodes]:
    """The mask-feature variants of the nodes of `reference` (see `evaluate`)."""
    from segclr_beam.job import RUN_FILE  # the job's record, and with it TensorFlow: only here

    record = join(output_dir, RUN_FILE)
    run = {}
    if FileSystems.exists(record):
        run = read_json(record)["config"]
    segmentation = segmentation if segmentation is not None else run.get("segmentation")
    cutout_size = cutout_size or run.get("cutout_size")
    if segmentation is None or cutout_size is None:
        raise EvaluationError(f"{output_dir}: the baseline needs the segmentation and cutout "
                              f"size, and the run has no {RUN_FILE} naming them; give them")
    info = EmbeddingReader(trees[variant_name(None)]).info
    resolution = info["coordinates"]["resolution_nm"]
    volume = open_volume(segmentation, "segmentation", resolution)
    features = mask_features(volume, reference.segment_ids, reference.voxels, int(cutout_size))
    nodes = dataclasses.replace(reference, features=features)
    found = {}
    for name, tree in trees.items():
        radius = EmbeddingReader(tree).info["aggregation_radius_nm"]
        found[f"{MASK}/{name}"] = aggregated(nodes, radius, resolution)
    return found


def format_table(result: dict) -> str:
    """The scores as a text table: one row per variant, balanced accuracy of k-NN and of the
    linear probe, then each one's recall per class."""
    names = list(result["classes"])
    recall_head = "".join(f"{n[:9]:>10}" for n in names)
    width = len(recall_head)
    lines = [f"k-NN (k={result['k']}) and linear probe, {result['folds']} folds by segment",
             f"{'':<29}{'balanced acc.':>15}  | {'k-NN recall':<{width}} | linear recall",
             f"{'variant':<16}{'nodes':>7}{'segs':>6}{'k-NN':>7}{'linear':>8}  |{recall_head} |"
             f"{recall_head}"]
    lines.append("-" * len(lines[-1]))
    for name, s in result["variants"].items():
        knn = "".join(f"{s['knn']['recall'][n]:10.3f}" for n in names)
        linear = "".join(f"{s['linear']['recall'][n]:10.3f}" for n in names)
        lines.append(f"{name:<16}{s['nodes']:>7}{s['segments']:>6}"
                     f"{s['knn']['balanced_accuracy']:7.3f}{s['linear']['balanced_accuracy']:8.3f}"
                     f"  |{knn} |{linear}")
    classes = ", ".join(f"{n} {c['segments']} segments / {c['nodes']} nodes"
                        for n, c in result["classes"].items())
    left_out = "".join(f"; left out: {n} ({c} segment)"
                       for n, c in result["left_out_classes"].items())
    lines.append(f"classes: {classes}; labelled segments not in the run: "
                 f"{result['labelled_segments_not_in_run']}{left_out}")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with FileSystems.create(path) as f:
        f.write((json.dumps(result, indent=2, sort_keys=True) + "\n").encode())

