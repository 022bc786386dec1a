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


@pytest.fixture(scope="session")
def gcs() -> FakeGcs:
    from gcp_storage_emulator.server import create_server

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
    try:
        yield FakeGcs(url, GCS_BUCKET)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic dataset (192 x 192 x 128 voxels, seed 0, jpeg EM), written once."""
    from segclr_beam import synth

    root = tmp_path_factory.mktemp("synthetic") / "dataset"
    return synth.write_dataset(root, shape=(192, 192, 128), seed=0)
