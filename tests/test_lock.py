"""The output lock: one holder at a time, stale locks of dead processes taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest

from segclr_beam.lock import LOCK_FILE, LockedError, OutputLock


def test_of_many_concurrent_runs_exactly_one_gets_the_lock(tmp_path):
    barrier = threading.Barrier(8)
    won, refused = [], []

    def start():
        barrier.wait()
        try:
            won.append(OutputLock.acquire(str(tmp_path / "out")))
        except LockedError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    holder = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    assert holder["run_id"] == won[0].run_id
    assert f"run {won[0].run_id}" in refused[0] and f"delete {tmp_path}/out/{LOCK_FILE}" in refused[0]
    won[0].release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    OutputLock.acquire(str(tmp_path / "out")).release()


def test_a_killed_run_s_lock_is_taken_over_another_host_s_is_not(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"run_id": "old", "host": socket.gethostname(),
                                "pid": int(dead), "started": 0}))
    lock = OutputLock.acquire(str(tmp_path))
    assert json.loads(path.read_text())["run_id"] == lock.run_id
    lock.release()
    path.write_text(json.dumps({"run_id": "elsewhere", "host": "another-host", "pid": 1,
                                "started": 0}))
    with pytest.raises(LockedError, match="run elsewhere .*on another-host.*if it is no longer "
                                          "running, delete"):
        OutputLock.acquire(str(tmp_path))
    lock.release()  # not this run's lock: left alone
    assert json.loads(path.read_text())["run_id"] == "elsewhere"


def test_lock_on_gcs(gcs):
    root = f"gs://{gcs.bucket}/locked/out"
    lock = OutputLock.acquire(root)
    with pytest.raises(LockedError, match=f"run {lock.run_id}"):
        OutputLock.acquire(root)
    lock.release()
    OutputLock.acquire(root).release()
