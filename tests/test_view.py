"""The viewer: its state, the shared state of a run on GCS, and the served viewer in a real
headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from segclr_beam import annotations, cli, view
from segclr_beam.job import RUN_FILE


def sources(value) -> list[str]:
    """Every data source URL in a Neuroglancer JSON state."""
    if isinstance(value, list):
        return [s for v in value for s in sources(v)]
    if not isinstance(value, dict):
        return []
    return [v if k == "url" else s for k, v in value.items()
            for s in ([v] if k == "url" else sources(v))]


def test_state_of_a_local_run(small_run, synthetic_dataset):
    state = view.state(view.Run.open(small_run), lambda url, name: url).to_json()
    layers = {layer["name"]: layer for layer in state["layers"]}
    assert [layers[n]["type"] for n in ("em", "segmentation", "embeddings")] == \
        ["image", "segmentation", "annotation"]
    out = f"file://{small_run}/"
    assert sources(layers["em"]) == [f"precomputed://file://{synthetic_dataset.em}/"]
    assert sources(layers["segmentation"]) == [
        f"precomputed://file://{synthetic_dataset.segmentation}/",
        f"precomputed://{out}skeletons/"]
    assert sources(layers["embeddings"]) == [f"precomputed://{out}annotations/"]
    assert len(sources(state)) == 4
    assert layers["embeddings"]["linkedSegmentationLayer"] == {"segment": "segmentation"}
    assert "prop_pca_rgb()" in layers["embeddings"]["shader"]
    assert state["position"] == [64, 64, 48]


def test_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(view.ViewError, match="no run.json"):
        view.Run.open(str(tmp_path))


@pytest.fixture(scope="module")
def cloud_run(gcs, small_run) -> str:
    """The files of the small run that a state is made of, on the bucket, its run.json naming
    volumes on the bucket (a state names its sources; it reads no voxels)."""
    out = f"gs://{gcs.bucket}/view/run"
    for name in ("annotations/info", "skeletons/info"):
        with FileSystems.create(f"{out}/{name}") as f:
            f.write((Path(small_run) / name).read_bytes())
    record = json.loads((Path(small_run) / RUN_FILE).read_text())
    for volume in ("em", "segmentation"):
        record["volumes"][volume]["kvstore"] = f"gs://{gcs.bucket}/view/{volume}/"
    with FileSystems.create(f"{out}/{RUN_FILE}") as f:
        f.write(json.dumps(record).encode())
    return out


def test_shared_state_names_only_gs_sources(cloud_run, capsys):
    cli.main(["view", "--state-only", cloud_run])
    state = json.loads(capsys.readouterr().out)
    found = sources(state)
    assert len(found) == 4 and all(s.startswith("precomputed://gs://segclr-test/") for s in found)
    assert f"precomputed://{cloud_run}/annotations" in found
    assert f"precomputed://{cloud_run}/skeletons" in found


def test_shared_state_refuses_local_sources(cloud_run, small_run):
    with pytest.raises(view.ViewError, match="output: .* is not on gs://"):
        view.shared_state(small_run)
    record = json.loads((Path(small_run) / RUN_FILE).read_text())  # names local volumes
    with FileSystems.create(f"{cloud_run}-local/{RUN_FILE}") as f:
        f.write(json.dumps(record).encode())
    with FileSystems.create(f"{cloud_run}-local/annotations/info") as f:
        f.write(b"{}")
    with pytest.raises(view.ViewError, match="em: file://.* is not on gs://"):
        view.shared_state(f"{cloud_run}-local")
    with pytest.raises(SystemExit, match="segclr-beam view: em: file://"):
        cli.main(["view", "--state-only", f"{cloud_run}-local"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SIZE = (800, 600)


class Browser:
    """Headless Chromium showing a URL, software WebGL; restartable."""

    def __init__(self, url: str, profile: Path):
        self.url, self.profile, self.process = url, profile, None

    def start(self) -> None:
        self.stop()
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--use-angle=swiftshader",
             "--enable-unsafe-swiftshader", "--no-first-run", f"--user-data-dir={self.profile}",
             f"--window-size={SIZE[0]},{SIZE[1]}", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None


def _screenshot(viewer, browser: Browser, tries: int = 3, wait: float = 60) -> np.ndarray:
    """RGB pixels of a screenshot, taken by the client once every visible chunk is loaded.

    Headless Chromium now and then starts without ever drawing the page; a browser that has
    not answered within `wait` seconds is replaced (the request stays pending for the next).
    """
    result, statistics = [], []
    thread = threading.Thread(target=lambda: result.append(viewer.screenshot(
        size=list(SIZE), statistics_callback=statistics.append)), daemon=True)
    thread.start()
    for _ in range(tries):
        thread.join(wait)
        if result:
            return result[0].screenshot.image_pixels[..., :3].astype(np.int64)
        browser.start()
    raise AssertionError(f"no screenshot from {tries} browsers in {wait} s each "
                         f"({len(statistics)} loading reports)")


@pytest.mark.skipif(CHROMIUM is None, reason="needs the chromium package (apt-get install "
                    "chromium); .ci/run installs it")
def test_viewer_in_headless_chromium(small_run, tmp_path):
    served = view.serve(small_run)
    browser = Browser(served.url, tmp_path / "profile")
    browser.start()
    try:
        shown = _screenshot(served.viewer, browser)
        with served.viewer.txn() as s:
            s.layers["embeddings"].visible = False
        without = _screenshot(served.viewer, browser)
    finally:
        browser.stop()
        served.stop()
    Image.fromarray(shown.astype(np.uint8)).save(tmp_path / "viewer.png")
    # EM: most of the picture is grey and textured, not a blank or an error page.
    grey = (np.ptp(without, axis=-1) < 8) & (without.max(axis=-1) > 16)
    assert grey.mean() > 0.4, f"{grey.mean():.0%} grey pixels ({tmp_path / 'viewer.png'})"
    assert without[grey][:, 0].std() > 15 and len(np.unique(without[grey][:, 0])) > 64
    # Points: the pixels the annotation layer changes, in many colours.
    points = (shown != without).any(axis=-1)
    colours = np.unique(shown[points], axis=0)
    assert points.sum() > 2000, f"{points.sum()} pixels of points"
    assert len(colours) > 100 and (np.ptp(colours, axis=-1) > 40).sum() > 50


@pytest.mark.parametrize("spec, url", [
    ({"driver": "zarr", "kvstore": "gs://b/v/"}, "gs://b/v/"),
    ({"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": "b", "path": "v"}}, "gs://b/v/"),
    ({"driver": "n5", "kvstore": {"driver": "file", "path": "/d/v/"}, "path": "s0"},
     "file:///d/v/s0/"),
])
def test_volume_locations(spec, url):
    assert view.location(spec, "em") == url
    assert view.scheme(spec, "em") == spec["driver"]
    with pytest.raises(view.ViewError, match="em: Neuroglancer has no source"):
        view.scheme({"driver": "tiff"}, "em")
