"""Sample points: the light records that flow from skeletons to cutouts to outputs."""

from __future__ import annotations

from typing import NamedTuple


class Point(NamedTuple):
    """One skeleton sample point; x, y, z in voxels at the embedding resolution."""

    segment_id: int
    node_id: int
    x: int
    y: int
    z: int
