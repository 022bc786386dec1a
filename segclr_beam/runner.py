"""Beam pipeline options: the local runner by default, Dataflow with GPU workers on request.

Locally the job runs one worker process per core (Beam's `--direct_num_workers`, with
`--direct_running_mode=multi_processing`), and each worker's TensorFlow gets an equal share
of the cores, so that workers x threads match the machine.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Sequence

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

LOCAL_RUNNER = "FnApiRunner"  # in-process; plain DirectRunner would first download Prism
# TensorFlow's intra-op thread count, read by the worker processes, which inherit it.
THREADS_VARIABLE = "TF_NUM_INTRAOP_THREADS"
_threads_set: str | None = None  # the value this module last set, told apart from a user's


def available_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class DataflowGpu:
    """What a Dataflow job needs to put one SegCLR model on each worker GPU."""

    accelerator: str = "nvidia-l4"       # Dataflow accelerator type
    count: int = 1                       # GPUs per worker VM
    machine_type: str = "g2-standard-8"  # must be able to host `accelerator`
    image: str | None = None             # the worker image built from docker/Dockerfile
    one_process_per_vm: bool = True      # one SDK process per VM, so one model per GPU

    def flags(self) -> list[str]:
        if not self.image:
            raise ValueError("container_image: Dataflow GPU workers need the image built from "
                             "docker/Dockerfile (--container_image)")
        if self.count < 1:
            raise ValueError(f"gpu_count: must be >= 1, got {self.count}")
        flags = [
            f"--dataflow_service_options=worker_accelerator=type:{self.accelerator};"
            f"count:{self.count};install-nvidia-driver",
            f"--worker_machine_type={self.machine_type}",
            f"--sdk_container_image={self.image}",
            "--experiments=use_runner_v2",
        ]
        if self.one_process_per_vm:
            flags.append("--experiments=no_use_multiple_sdk_containers")
        return flags


def pipeline_options(beam_args: Sequence[str], gpu: DataflowGpu | None = None) -> PipelineOptions:
    """Options from pass-through Beam flags; the local runner, one worker process per core,
    unless a runner is named."""
    args = list(beam_args)
    options = PipelineOptions(args)
    runner = options.view_as(StandardOptions).runner
    if gpu is not None:
        if runner not in (None, "DataflowRunner"):
            raise ValueError(f"gpu options are for DataflowRunner, not runner {runner!r}")
        args = ["--runner=DataflowRunner", *args, *gpu.flags()]
    elif runner in (None, LOCAL_RUNNER):
        args = [f"--runner={LOCAL_RUNNER}", *args, *_local_workers(args, options)]
    return PipelineOptions(args, save_main_session=False)


def _local_workers(args: Sequence[str], options: PipelineOptions) -> list[str]:
    """Flags for one local worker process per core unless `args` choose otherwise."""
    direct = options.view_as(DirectOptions)
    flags = []
    workers = direct.direct_num_workers
    if not _given(args, "direct_num_workers") or workers == 0:  # Beam's 0: one per core
        workers = available_cores()
        flags.append(f"--direct_num_workers={workers}")
    mode = direct.direct_running_mode
    if not _given(args, "direct_running_mode") and workers > 1:
        mode = "multi_processing"
        flags.append(f"--direct_running_mode={mode}")
    _share_cores(max(1, available_cores() // workers) if mode == "multi_processing" else None)
    return flags


def _given(args: Sequence[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)


def _share_cores(threads: int | None) -> None:
    """TensorFlow threads per worker process (None: TensorFlow's default, all cores).

    Worker processes inherit the environment, so the variable reaches each worker's
    TensorFlow before it starts; a value the user set is left alone.
    """
    global _threads_set
    if os.environ.get(THREADS_VARIABLE) not in (None, _threads_set):
        return
    if threads is None:
        os.environ.pop(THREADS_VARIABLE, None)
        _threads_set = None
    else:
        _threads_set = os.environ[THREADS_VARIABLE] = str(threads)


class _WorkerLogFilter(logging.Filter):
    """Shows log entries that local SDK worker processes forward as one plain line each.

    The local runner relays them as protobuf text; only the project's own entries (progress)
    and Beam's errors are worth a line on a terminal.
    """

    _FIELD = r'{}: "((?:[^"\\]|\\.)*)"'

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Worker: "):
            return True
        location = re.search(self._FIELD.format("log_location"), text)
        own = location is not None and "segclr_beam" in location.group(1)
        if not own and record.levelno < logging.ERROR:
            return False
        message = re.search(self._FIELD.format("message"), text)
        if message is not None:
            record.msg = message.group(1).encode().decode("unicode_escape")
            record.args = ()
        return True


def configure_logging() -> None:
    """Progress of the project's stages on the terminal, Beam's own chatter only if it fails."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("segclr_beam").setLevel(logging.INFO)
    relay = logging.getLogger("apache_beam.runners.portability.local_job_service")
    relay.setLevel(logging.INFO)
    relay.addFilter(_WorkerLogFilter())
