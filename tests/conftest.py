"""Shared fixtures: a fake GCS on loopback and the synthetic dataset."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest

GCS_BUCKET = "segclr-test"


@dataclasses.dataclass
class FakeGcs:
    """A gcp-storage-emulator server that Beam, google-cloud-storage and TensorStore all reach."""

    url: str
    bucket: str

    def upload_dir(self, local: str | Path, prefix: str) -> str:
        """Copy a local directory tree to gs://bucket/prefix and return that URL."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="test", credentials=AnonymousCredentials())
        bucket = client.bucket(self.bucket)
        local = Path(local)
        for path in sorted(local.rglob("*")):
            if path.is_file():
                bucket.blob(f"{prefix}/{path.relative_to(local)}").upload_from_filename(str(path))
        return f"gs://{self.bucket}/{prefix}"


def _send_headers_like_gcs(download):
    """The emulator's media download plus two headers that real GCS sends.

    x-goog-generation: TensorStore tells object versions apart by it; without it, concurrent
    reads of one object fail with "Malformed StorageGeneration". Content-Encoding: an object
    stored gzip-compressed (as cloud-volume writes chunks) is served compressed with it to a
    client that accepts gzip, as TensorStore does; without it the client sees gzip bytes.
    """

    def handler(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):  # whole object or a byte range
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            if obj.get("contentEncoding"):
                response["Content-Encoding"] = obj["contentEncoding"]

    return handler


def _index_on_disk_only(write):
    """The emulator's index write, skipped for an in-memory store.

    After every change the emulator serializes its whole object index to JSON (so each
    request costs time in the number of objects stored), for a store on disk to read back
    when it restarts; an in-memory store never reads it.
    """

    def write_index(storage):
        if not storage._use_memory_fs:
            write(storage)

    return write_index


@pytest.fixture(scope="session")
def gcs() -> FakeGcs:
    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.server import create_server
    from gcp_storage_emulator.storage import Storage

    write_index = Storage._write_config_to_file
    Storage._write_config_to_file = _index_on_disk_only(write_index)

    download = emulator.objects.download
    patched = _send_headers_like_gcs(download)
    emulator.objects.download = patched  # the JSON API's "get ?alt=media" calls it by name
    for _, handlers in emulator.HANDLERS:
        for method, handler in handlers.items():
            if handler is download:
                handlers[method] = patched

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token", "GOOGLE_CLOUD_PROJECT": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # Beam looks for default credentials with retries and backoff (about 20 s) before it
    # connects anonymously, which is what the emulator wants: go anonymous at once.
    from apache_beam.internal.gcp import auth

    auth._Credentials._credentials_init, auth._Credentials._credentials = True, None
    try:
        yield FakeGcs(url, GCS_BUCKET)
    finally:
        server.stop()
        Storage._write_config_to_file = write_index
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def one_local_worker():
    """Jobs in tests run in-process: each local worker process would cost seconds of start-up
    (TensorFlow, the model) per job. tests/test_runner.py runs worker processes."""
    from segclr_beam import runner

    patch = pytest.MonkeyPatch()
    patch.setattr(runner, "available_cores", lambda: 1)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic dataset (192 x 192 x 128 voxels, seed 0, jpeg EM), written once."""
    from segclr_beam import synth

    root = tmp_path_factory.mktemp("synthetic") / "dataset"
    return synth.write_dataset(root, shape=(192, 192, 128), seed=0)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> str:
    """A SavedModel of a narrow SegCLR network on 33^3 cutouts (random weights)."""
    from segclr_beam import model

    path = str(tmp_path_factory.mktemp("models") / "small")
    arch = model.Architecture(widths=(4, 8, 8, 16), input_size=33, bottleneck_width=16,
                              embedding_dim=8)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model.export_saved_model(path, arch, seed=1)
    return path


@pytest.fixture(scope="session")
def small_config(synthetic_dataset, small_model):
    """The settings of the small run on part of the synthetic dataset: a function of the output
    path and any changed fields that returns its EmbedConfig."""
    from segclr_beam.config import EmbedConfig

    def config(output, **changes) -> EmbedConfig:
        return EmbedConfig(**{
            "em": synthetic_dataset.em, "segmentation": synthetic_dataset.segmentation,
            "model": small_model, "output": str(output), "bbox": (0, 0, 0, 128, 128, 96),
            "chunk_size": 64, "block_size": 64, "cutout_size": 33, "batch_size": 8,
            "num_shards": 16, "bytewidth": 8, **changes})

    return config


@pytest.fixture(scope="session")
def small_run(small_config, tmp_path_factory) -> str:
    """A finished small run, with skeletons: its output path. Tests read it, never change it."""
    from segclr_beam import pipeline

    out = tmp_path_factory.mktemp("small-run") / "out"
    pipeline.run(small_config(out, write_skeletons=True))
    return str(out)
