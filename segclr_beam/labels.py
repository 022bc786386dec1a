"""Labels for classifiers, joined to the nodes of an embedding tree.

Segment-level labels (segment id -> class) are read as `segclr-beam evaluate` reads them
(evaluate.load_labels: JSON {id: class}, a synthetic dataset's classes.json, or CSV
`segment_id,class`). Node-level labels come from a CSV with `segment_id,node_id,class` or
`segment_id,x,y,z,class` (x, y, z in voxels at the tree's resolution, as points tables), or
from a per-voxel compartment volume read at the nodes (the synthetic dataset's
`compartments`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Iterable, Mapping

import numpy as np
from apache_beam.io.filesystems import FileSystems

from segclr_beam.evaluate import EvaluationError, Nodes, load_labels, read_nodes
from segclr_beam.reader import EmbeddingReader
from segclr_beam.synth import COMPARTMENTS
from segclr_beam.volume import Box, Volume

# uint8 codes of a compartment volume, the synthetic dataset's (0: background, no label).
COMPARTMENT_CODES = {code: name for code, name in enumerate(COMPARTMENTS, start=1)}
_READ_BLOCK = 64  # edge of the boxes a compartment volume is read in, voxels
_NODE_COLUMNS = {"node": ("segment_id", "node_id", "class"),
                 "position": ("segment_id", "x", "y", "z", "class")}


@dataclasses.dataclass(frozen=True)
class Labels:
    """Classes by segment, by (segment, node) or by (segment, x, y, z); one kind is set."""

    source: str
    by_segment: Mapping[int, str] = dataclasses.field(default_factory=dict)
    by_node: Mapping[tuple[int, int], str] = dataclasses.field(default_factory=dict)
    by_position: Mapping[tuple[int, int, int, int], str] = dataclasses.field(
        default_factory=dict)

    def segment_ids(self) -> set[int]:
        """The segments with at least one label."""
        keys = self.by_segment or self.by_node or self.by_position
        return {int(k if isinstance(k, int) else k[0]) for k in keys}

    def classes(self) -> set[str]:
        return set((self.by_segment or self.by_node or self.by_position).values())

    def of(self, nodes: Nodes) -> np.ndarray:
        """The class of each node (object array), None where unlabelled."""
        segments = nodes.segment_ids.tolist()
        if self.by_segment:
            found = [self.by_segment.get(s) for s in segments]
        elif self.by_node:
            found = [self.by_node.get(k) for k in zip(segments, nodes.node_ids.tolist())]
        else:
            found = [self.by_position.get((s, *p)) for s, p in
                     zip(segments, nodes.voxels.tolist())]
        return np.array(found, dtype=object)


def read_labels(path: str) -> Labels:
    """Labels from a CSV or JSON file (local or gs://); errors name the file and the line."""
    if not path.lower().endswith(".csv"):
        return Labels(path, by_segment=load_labels(path))
    try:
        with FileSystems.open(path) as f:
            text = f.read().decode("utf-8-sig")
    except OSError as e:
        raise EvaluationError(f"labels {path}: cannot read: {e}") from None
    rows = csv.DictReader(io.StringIO(text))
    columns = set(rows.fieldnames or ())
    kind = next((k for k, need in _NODE_COLUMNS.items() if set(need) <= columns), None)
    if kind is None:
        return Labels(path, by_segment=load_labels(path))
    table: dict = {}
    for row in rows:
        where = f"{path}:{rows.line_num}"
        try:
            key = tuple(int(row[c]) for c in _NODE_COLUMNS[kind][:-1])
        except (TypeError, ValueError):
            raise EvaluationError(f"{where}: not an integer in {row}") from None
        if not row["class"]:
            raise EvaluationError(f"{where}: empty class")
        if table.setdefault(key, row["class"]) != row["class"]:
            raise EvaluationError(f"{where}: {key} labelled both {table[key]!r} and "
                                  f"{row['class']!r}")
    if not table:
        raise EvaluationError(f"labels {path}: no rows")
    return Labels(path, **{f"by_{kind}": table})


def compartment_labels(volume: Volume, tree: str,
                       codes: Mapping[int, str] = COMPARTMENT_CODES) -> Labels:
    """Node labels read from a per-voxel compartment volume at every node of a tree.

    A node is read at the voxel of the volume holding its centre (the volume may be finer
    than the tree, as the synthetic volumes are under the demo's coarser scale); each box of
    64^3 voxels holding nodes is read once. Nodes on background (0) or another code stay
    unlabelled.
    """
    reader = EmbeddingReader(tree)
    if reader.coordinates is None:
        raise EvaluationError(f"{tree}: node positions need the tree's coordinate system")
    keys, xyz = [], []
    for segment in reader:
        keys += [(segment.segment_id, n) for n in segment.node_ids.tolist()]
        xyz.append(reader.coordinates.to_voxels(segment.xyz))
    if not keys:
        raise EvaluationError(f"{tree} holds no nodes")
    scale = np.asarray(reader.coordinates.resolution_nm) / np.asarray(volume.resolution)
    xyz = np.floor((np.concatenate(xyz) + 0.5) * scale).astype(np.int64)
    values = np.zeros(len(xyz), np.int64)
    blocks = xyz // _READ_BLOCK
    order = np.lexsort(blocks.T[::-1])
    bounds = np.flatnonzero((np.diff(blocks[order], axis=0) != 0).any(axis=1)) + 1
    for run in np.split(order, bounds):
        start = blocks[run[0]] * _READ_BLOCK
        data = volume.read(Box(tuple(start.tolist()), tuple((start + _READ_BLOCK).tolist())))
        local = xyz[run] - start
        values[run] = data[local[:, 0], local[:, 1], local[:, 2]]
    labelled = {key: codes[v] for key, v in zip(keys, values.tolist()) if v in codes}
    if not labelled:
        raise EvaluationError(f"compartment volume {volume.name}: no node of {tree} lies on a "
                              f"labelled voxel (codes {dict(codes)})")
    return Labels(f"compartments {volume.name}", by_node=labelled)


def labelled_nodes(tree: str, labels: Labels, classes: Iterable[str] | None = None
                   ) -> tuple[Nodes, np.ndarray]:
    """The labelled nodes of a tree (evaluate.read_nodes: sorted by segment and node) and
    their classes, optionally only those of `classes`; raise if there are none."""
    nodes = read_nodes(tree, labels.segment_ids())
    names = labels.of(nodes)
    keep = np.array([n is not None for n in names], bool)
    if classes is not None:
        keep &= np.isin(names, list(classes))
    if not keep.any():
        raise EvaluationError(f"no node of {tree} has a label in {labels.source}"
                              + ("" if classes is None else f" among {sorted(classes)}"))
    index = np.flatnonzero(keep)
    taken = Nodes(nodes.segment_ids[index], nodes.node_ids[index], nodes.voxels[index],
                  nodes.features[index])
    return taken, names[index]
