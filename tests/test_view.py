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
def cloud_run(gcs, small_run, synthetic_dataset) -> str:
    """The small run and its volumes copied to the bucket, its run.json naming the copies."""
    em = gcs.upload_dir(synthetic_dataset.em, "view/em")
    segmentation = gcs.upload_dir(synthetic_dataset.segmentation, "view/segmentation")
    out = gcs.upload_dir(small_run, "view/run")
    record = json.loads((Path(small_run) / RUN_FILE).read_text())
    record["volumes"]["em"]["kvstore"] = em + "/"
    record["volumes"]["segmentation"]["kvstore"] = segmentation + "/"
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


def _screenshot(viewer, timeout: float = 120) -> np.ndarray:
    """RGB pixels of a screenshot, taken by the client once every visible chunk is loaded."""
    result = []
    thread = threading.Thread(target=lambda: result.append(viewer.screenshot(size=list(SIZE))),
                              daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, f"no screenshot within {timeout} s: the viewer did not load"
    return result[0].screenshot.image_pixels[..., :3].astype(np.int64)


@pytest.mark.skipif(CHROMIUM is None, reason="needs the chromium package (apt-get install "
                    "chromium); .ci/run installs it")
def test_viewer_in_headless_chromium(small_run, tmp_path):
    served = view.serve(small_run)
    browser = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--use-angle=swiftshader",
         "--enable-unsafe-swiftshader", "--no-first-run", f"--user-data-dir={tmp_path}",
         f"--window-size={SIZE[0]},{SIZE[1]}", served.url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        shown = _screenshot(served.viewer)
        with served.viewer.txn() as s:
            s.layers["embeddings"].visible = False
        without = _screenshot(served.viewer)
    finally:
        browser.terminate()
        browser.wait(30)
        served.stop()
    from PIL import Image

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
