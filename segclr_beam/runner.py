"""Beam pipeline options: the local runner by default, Dataflow with GPU workers on request."""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Sequence

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

LOCAL_RUNNER = "FnApiRunner"  # in-process; plain DirectRunner would first download Prism


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
    """Options from pass-through Beam flags; the local in-process runner unless one is named."""
    args = list(beam_args)
    options = PipelineOptions(args)
    runner = options.view_as(StandardOptions).runner
    if gpu is not None:
        if runner not in (None, "DataflowRunner"):
            raise ValueError(f"gpu options are for DataflowRunner, not runner {runner!r}")
        args = ["--runner=DataflowRunner", *args, *gpu.flags()]
    elif runner is None:
        args = [f"--runner={LOCAL_RUNNER}", *args]
    return PipelineOptions(args, save_main_session=False)


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
