"""Sharded files: how every output is split into files, encoded, and put in place.

A writer keys records by shard, groups them, and writes each shard's file once into a
run-unique temporary directory below the output root (`TEMP_PREFIX`); one finalize step then
moves every file into place, removes shard files an earlier run with other settings left,
and writes the marker files (info.json, manifest.json) last, so a directory with its marker is
complete. Finalize is idempotent, so a retried finalize finishes the job. Encodings have fixed
bytes (Avro with a fixed sync marker, TFRecord framing), so the same records give the same
files. Paths go through Beam's FileSystems: local or gs://.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
import uuid
from typing import Any, BinaryIO, Callable, Collection, Iterable, Iterator, Mapping

import apache_beam as beam
import fastavro
import google_crc32c
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

SHARDING = ("md5 of the segment id as bytewidth little-endian bytes, digest read as a "
            "little-endian integer, modulo num_shards")
TEMP_PREFIX = ".segclr-temp-"  # run-unique temporary directories below an output root


# Shard rule ----------------------------------------------------------------------------------

def segment_hash(segment_id: int, bytewidth: int) -> int:
    """MD5 of the segment id as `bytewidth` little-endian bytes, read as a little-endian int."""
    segment_id = int(segment_id)
    if segment_id < 0:
        raise ValueError(f"segment id {segment_id} is negative")
    try:
        key = segment_id.to_bytes(bytewidth, "little")
    except OverflowError:
        raise ValueError(f"segment id {segment_id} does not fit in bytewidth={bytewidth} bytes "
                         f"(it needs {(segment_id.bit_length() + 7) // 8})") from None
    return int.from_bytes(hashlib.md5(key).digest(), "little")


def shard_of(segment_id: int, num_shards: int, bytewidth: int) -> int:
    """The shard of a segment, as in the public h01 and MICrONS releases (`SHARDING`)."""
    return segment_hash(segment_id, bytewidth) % num_shards


def check_sharding(num_shards: int, bytewidth: int) -> None:
    """Raise ValueError unless num_shards and bytewidth are positive integers."""
    for name, value in (("num_shards", num_shards), ("bytewidth", bytewidth)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


# Encodings -----------------------------------------------------------------------------------

def encode_avro(schema: dict, records: Iterable[dict], name: str) -> bytes:
    """Avro records (deflate) with a sync marker fixed by `name`: equal records, equal bytes."""
    out = io.BytesIO()
    fastavro.writer(out, schema, records, codec="deflate",
                    sync_marker=hashlib.md5(name.encode()).digest())
    return out.getvalue()


def read_avro(source: bytes | BinaryIO) -> Iterator[dict]:
    """The records of an Avro file, given as bytes or an open binary stream."""
    return fastavro.reader(io.BytesIO(source) if isinstance(source, bytes) else source)


def avro_fields(stream: BinaryIO) -> list[str]:
    """The field names of an Avro file's schema."""
    return [field["name"] for field in fastavro.reader(stream).writer_schema["fields"]]


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC-32C of the length, the data, masked CRC-32C of it."""
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


# Files ---------------------------------------------------------------------------------------

def join(root: str, *names: str) -> str:
    """`names` below `root` (a local path or URL, with or without a trailing slash)."""
    return FileSystems.join(root.rstrip("/"), *names)


def list_names(directory: str, *patterns: str) -> set[str]:
    """Names of the files directly in `directory` that match any of the glob patterns."""
    results = FileSystems.match([join(directory, p) for p in patterns])
    return {m.path.rstrip("/").rsplit("/", 1)[-1] for r in results for m in r.metadata_list}


def delete_tree(directory: str) -> None:
    """Delete a directory and everything below it, locally or on an object store."""
    if FileSystems.get_scheme(directory) in (None, "file"):
        if FileSystems.exists(directory):
            FileSystems.delete([directory])
    else:  # Object stores delete everything under a prefix given with a trailing slash.
        FileSystems.delete([directory + "/"])


def read_json(path: str) -> Any:
    """The JSON document in the file at `path`. Raises OSError (FileNotFoundError for a missing
    file, which object stores report with their own error types) or json's ValueError, so that
    callers can name the file in their own words."""
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read()
    except OSError:
        raise
    except Exception:
        if not FileSystems.exists(path):
            raise FileNotFoundError(f"{path}: no such file") from None
        raise
    return json.loads(data)


def write_file(path: str, data: bytes, mime_type: str = "application/octet-stream") -> None:
    with FileSystems.create(path, mime_type=mime_type,
                            compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)


@dataclasses.dataclass(frozen=True)
class Staging:
    """Shard files of directories below `root`, written to the run-unique `temp` first and
    moved into place together by `finalize`. Directories are named relative to `root`
    ("" is `root` itself)."""

    root: str
    temp: str

    @classmethod
    def below(cls, root: str) -> "Staging":
        """A staging area for `root` with a new run-unique temporary directory."""
        root = root.rstrip("/")
        return cls(root, join(root, TEMP_PREFIX + uuid.uuid4().hex))

    def temp_path(self, directory: str, name: str) -> str:
        return join(self.temp, directory, name) if directory else join(self.temp, name)

    def final_path(self, directory: str, name: str) -> str:
        return join(self.root, directory, name) if directory else join(self.root, name)

    def finalize(self, files: Mapping[str, Collection[str]], markers: Mapping[str, bytes] = {},
                 stale: Collection[str] = ()) -> list[str]:
        """Put the staged files in place; returns the marker paths.

        `files` are the names written to the temporary directory, per directory (shards no
        record went to included). Files in a directory that match a `stale` pattern and are
        not listed are deleted. `markers` (path relative to `root`: bytes) are removed first
        and written last. Safe to retry: a file already moved is not moved again.
        """
        for marker in markers:
            if FileSystems.exists(join(self.root, marker)):
                FileSystems.delete([join(self.root, marker)])
        for directory in sorted(files):
            names = set(files[directory])
            self._move(directory, sorted(names))
            if stale:
                target = self.final_path(directory, "")
                old = list_names(target, *stale) - names
                if old:
                    FileSystems.delete([join(target, n) for n in sorted(old)])
        for marker, data in markers.items():
            write_file(join(self.root, marker), data, mime_type="application/json")
        delete_tree(self.temp)
        return [join(self.root, marker) for marker in markers]

    def _move(self, directory: str, names: list[str]) -> None:
        temp, target = self.temp_path(directory, ""), self.final_path(directory, "")
        if not FileSystems.exists(target):
            FileSystems.mkdirs(target)
        in_temp, in_target = list_names(temp, "*"), list_names(target, "*")
        missing = [n for n in names if n not in in_temp and n not in in_target]
        if missing:
            raise RuntimeError(f"{target}: files vanished before finalize: {missing[:5]}")
        pending = [n for n in names if n in in_temp]
        if pending:
            FileSystems.rename([join(temp, n) for n in pending],
                               [join(target, n) for n in pending])


class WriteShards(beam.PTransform):
    """records -> one file per shard, then a single finalize over what the shards wrote.

    `keys(record)` gives the shard keys of a record (one per file it belongs in); `write`
    (a DoFn or a function of (key, records)) writes one shard's file into the staging
    directory and returns a light description of it; `finalize(descriptions)` puts every
    file in place (see `Staging.finalize`) and returns the transform's output. Only records
    and descriptions are shuffled. `side_inputs` are passed to `finalize` after the
    descriptions.
    """

    def __init__(self, keys: Callable[[Any], Iterable[Any]], write: beam.DoFn | Callable,
                 finalize: Callable[..., Any], *side_inputs):
        super().__init__()
        self._keys, self._write, self._finalize = keys, write, finalize
        self._side_inputs = side_inputs

    def expand(self, records):
        keys = self._keys
        write = (beam.ParDo(self._write) if isinstance(self._write, beam.DoFn)
                 else beam.MapTuple(self._write))
        return (records
                | "KeyByShard" >> beam.FlatMap(lambda r: ((k, r) for k in keys(r)))
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShards" >> write
                | "AllShards" >> beam.combiners.ToList()
                | "Finalize" >> beam.Map(self._finalize, *self._side_inputs))
