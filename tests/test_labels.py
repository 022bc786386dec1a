"""Labels files: segment-level (evaluate's reader), node-level CSV, and errors that name the
line. Compartment labels read from a volume at a tree's nodes: tests/test_apply.py (it has
the tree)."""

from __future__ import annotations

import numpy as np
import pytest

from segclr_beam import labels
from segclr_beam.evaluate import Nodes


def test_labels_files(tmp_path):
    (tmp_path / "segments.json").write_text('{"classes": {"5": "axon", "7": "glia"}}')
    assert labels.read_labels(str(tmp_path / "segments.json")).by_segment == {5: "axon",
                                                                             7: "glia"}
    (tmp_path / "segments.csv").write_text("segment_id,class\n5,axon\n")
    assert labels.read_labels(str(tmp_path / "segments.csv")).by_segment == {5: "axon"}
    (tmp_path / "nodes.csv").write_text("segment_id,node_id,class\n5,0,axon\n5,1,spine\n")
    assert labels.read_labels(str(tmp_path / "nodes.csv")).by_node == {(5, 0): "axon",
                                                                      (5, 1): "spine"}
    (tmp_path / "xyz.csv").write_text("segment_id,x,y,z,class\n5,1,2,3,soma\n")
    assert labels.read_labels(str(tmp_path / "xyz.csv")).by_position == {(5, 1, 2, 3): "soma"}
    for text, message in [("segment,class\n1,a\n", r"bad.csv:1: need columns segment_id and"),
                          ("segment_id,node_id,class\n1,0,a\n1,0,b\n",
                           r"bad.csv:3: \(1, 0\) labelled both 'a' and 'b'"),
                          ("segment_id,node_id,class\nx,0,a\n", "bad.csv:2: not an integer"),
                          ("segment_id,node_id,class\n1,0,\n", "bad.csv:2: empty class")]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(ValueError, match=message):
            labels.read_labels(str(tmp_path / "bad.csv"))


def test_each_kind_labels_the_nodes_it_names():
    nodes = Nodes(np.array([5, 5, 7], np.uint64), np.array([0, 1, 0]),
                  np.array([[1, 2, 3], [4, 5, 6], [1, 2, 3]]), np.zeros((3, 2), np.float32))
    by_segment = labels.Labels("s", by_segment={7: "glia"})
    by_node = labels.Labels("n", by_node={(5, 1): "spine", (9, 0): "axon"})
    by_position = labels.Labels("p", by_position={(5, 1, 2, 3): "soma"})
    assert by_segment.of(nodes).tolist() == [None, None, "glia"]
    assert by_node.of(nodes).tolist() == [None, "spine", None]
    assert by_position.of(nodes).tolist() == ["soma", None, None]
    assert by_node.segment_ids() == {5, 9} and by_node.classes() == {"spine", "axon"}
