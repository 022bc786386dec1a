"""A run in Neuroglancer: its EM, segmentation, skeletons and embedding annotations.

`serve` starts a Neuroglancer viewer on this machine (the `neuroglancer` package bundles the
client) with local directories served over HTTP on the same address; `shared_state` is the
viewer state of a run on gs:// with gs:// sources only, to paste into any Neuroglancer.
Annotation points are coloured by the embedding's first three principal components; the 3-D
panel shows every node, the sections those near them. Selecting a segment (double-click)
shows it and its skeleton, and the annotation layer's "filter by segmentation" limits the
points to the selected segments.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable
from urllib.parse import urlparse

import neuroglancer
from apache_beam.io.filesystems import FileSystems
from neuroglancer.static_file_server import StaticFileServer

from segclr_beam import annotations
from segclr_beam.job import RUN_FILE
from segclr_beam.shards import join, read_json
from segclr_beam.volume import Box

# TensorStore drivers and the Neuroglancer data source schemes that read the same volumes.
SCHEMES = {"neuroglancer_precomputed": "precomputed", "zarr": "zarr", "zarr2": "zarr",
           "zarr3": "zarr3", "n5": "n5"}
SHADER = """void main() {
  setColor(prop_pca_rgb());
  setPointMarkerSize(6.0);
}
"""
VIEW_VOXELS = 2048  # the initial cross-section spans at most this many voxels
VIEW_PIXELS = 400


class ViewError(ValueError):
    """A run cannot be shown; the message names the path and what is missing."""


@dataclasses.dataclass(frozen=True)
class Run:
    """What a viewer needs from a finished run's run.json and its annotation layer."""

    output: str
    em: dict
    segmentation: dict
    resolution_nm: tuple[float, float, float]
    bbox: Box
    skeletons: bool

    @classmethod
    def open(cls, output: str) -> "Run":
        output = output.rstrip("/")
        path = join(output, RUN_FILE)
        if not FileSystems.exists(path):
            raise ViewError(f"{output}: no {RUN_FILE}, so not a finished run")
        record = read_json(path)
        layer = join(output, annotations.DIRECTORY, annotations.INFO_NAME)
        if not FileSystems.exists(layer):
            raise ViewError(f"{output}: no annotation layer ({layer} is missing)")
        volumes = record.get("volumes", {})
        missing = {"em", "segmentation", "resolution_nm", "bbox"} - set(volumes)
        if missing:
            raise ViewError(f"{path}: the run's volumes record lacks {sorted(missing)}")
        bbox = volumes["bbox"]
        skeletons = FileSystems.exists(join(output, "skeletons", "info"))
        return cls(output, volumes["em"], volumes["segmentation"],
                   tuple(volumes["resolution_nm"]), Box(bbox[:3], bbox[3:]), skeletons)


def location(spec: dict, name: str) -> str:
    """The directory URL (file:// or gs://, trailing slash) of a TensorStore volume spec."""
    kvstore = spec.get("kvstore")
    driver = kvstore.get("driver") if isinstance(kvstore, dict) else None
    if isinstance(kvstore, str):
        url = kvstore
    elif driver == "file":
        url = "file://" + kvstore.get("path", "")
    elif driver == "gcs":
        url = f"gs://{kvstore['bucket']}/" + kvstore.get("path", "").lstrip("/")
    else:
        raise ViewError(f"{name}: cannot show a volume stored as {kvstore!r}")
    url = url.rstrip("/") + "/" + spec.get("path", "").strip("/")
    return url.rstrip("/") + "/"


def scheme(spec: dict, name: str) -> str:
    """The Neuroglancer data source scheme of a TensorStore volume spec."""
    driver = spec.get("driver")
    if driver not in SCHEMES:
        raise ViewError(f"{name}: Neuroglancer has no source for the {driver!r} driver")
    return SCHEMES[driver]


def state(run: Run, locate: Callable[[str, str], str]) -> neuroglancer.ViewerState:
    """The viewer state of `run`; `locate(url, name)` gives the URL a browser reads a
    file:// or gs:// directory from."""
    output = run.output.rstrip("/") + "/"
    if "://" not in output:
        output = "file://" + os.path.abspath(output) + "/"
    s = neuroglancer.ViewerState()
    s.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm",
                                                scales=list(run.resolution_nm))
    s.position = [(a + b) / 2 for a, b in zip(run.bbox.start, run.bbox.stop)]
    s.cross_section_scale = min(max(run.bbox.shape[:2]), VIEW_VOXELS) / VIEW_PIXELS
    s.layout = "4panel"
    s.layers["em"] = neuroglancer.ImageLayer(
        source=f"{scheme(run.em, 'em')}://{locate(location(run.em, 'em'), 'em')}")
    sources = [f"{scheme(run.segmentation, 'segmentation')}://"
               f"{locate(location(run.segmentation, 'segmentation'), 'segmentation')}"]
    if run.skeletons:
        sources.append(f"precomputed://{locate(output + 'skeletons/', 'skeletons')}")
    s.layers["segmentation"] = neuroglancer.SegmentationLayer(source=sources,
                                                              ignore_null_visible_set=False)
    s.layers["embeddings"] = neuroglancer.AnnotationLayer(
        source=f"precomputed://{locate(output + annotations.DIRECTORY + '/', 'annotations')}",
        linked_segmentation_layer={annotations.RELATIONSHIP: "segmentation"},
        filter_by_segmentation=[], shader=SHADER)
    s.selected_layer.layer = "embeddings"
    return s


def _gs_only(url: str, name: str) -> str:
    if not url.startswith("gs://"):
        raise ViewError(f"{name}: {url} is not on gs://, so a shared state cannot name it; "
                        f"`segclr-beam view` without --state-only serves local files")
    return url.rstrip("/")


def shared_state(output: str) -> dict:
    """The Neuroglancer JSON state of a run on gs://, naming only gs:// sources."""
    _gs_only(output, "output")
    return state(Run.open(output), _gs_only).to_json()


@dataclasses.dataclass
class LocalViewer:
    """A Neuroglancer viewer of a run with the file servers of its local directories."""

    viewer: neuroglancer.Viewer
    url: str
    servers: list[StaticFileServer]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        neuroglancer.server.stop()


def serve(output: str, bind_address: str = "127.0.0.1", port: int = 0) -> LocalViewer:
    """Start a viewer of `output` on `bind_address`; gs:// sources are read by the browser
    itself, local directories through file servers on the same address."""
    run = Run.open(output)
    servers: dict[str, StaticFileServer] = {}

    def locate(url: str, name: str) -> str:
        if url.startswith("gs://"):
            return url.rstrip("/")
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise ViewError(f"{name}: cannot serve {url}")
        directory = os.path.abspath(parsed.path)
        if not os.path.isdir(directory):
            raise ViewError(f"{name}: {directory} is not a directory")
        if directory not in servers:
            servers[directory] = StaticFileServer(directory, bind_address=bind_address,
                                                  daemon=True)
        return servers[directory].url

    viewer_state = state(run, locate)
    neuroglancer.set_server_bind_address(bind_address, port)
    viewer = neuroglancer.Viewer()
    viewer.set_state(viewer_state)
    return LocalViewer(viewer, viewer.get_viewer_url(), list(servers.values()))
