"""Beam pipeline options: the local runner by default, Dataflow with GPU workers on request.

Locally the job runs one worker process per core (Beam's `--direct_num_workers`, with
`--direct_running_mode=multi_processing`), and each worker's TensorFlow gets an equal share
of the cores, so that workers x threads match the machine.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from typing import Sequence

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.options.pipeline_options import _BeamArgumentParser

LOCAL_RUNNER = "FnApiRunner"  # in-process; plain DirectRunner would first download Prism
# Runners that run the job on this machine: the driver waits for them and reports the run.
LOCAL_RUNNERS = (LOCAL_RUNNER, "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner",
                 "PrismRunner")
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

    def flags(self, accelerator: bool = True) -> list[str]:
        """Dataflow flags for these workers; without `accelerator`, the same image and machine
        type but no GPU (for jobs that never run the model)."""
        if not self.image:
            raise ValueError("container_image: Dataflow GPU workers need the image built from "
                             "docker/Dockerfile (--container_image)")
        if self.count < 1:
            raise ValueError(f"gpu_count: must be >= 1, got {self.count}")
        flags = [f"--sdk_container_image={self.image}", "--experiments=use_runner_v2"]
        if not accelerator:
            return flags
        flags += [
            f"--dataflow_service_options=worker_accelerator=type:{self.accelerator};"
            f"count:{self.count};install-nvidia-driver",
            f"--worker_machine_type={self.machine_type}",
        ]
        if self.one_process_per_vm:
            flags.append("--experiments=no_use_multiple_sdk_containers")
        return flags


def is_local(options: PipelineOptions) -> bool:
    """Whether `options` run the job on this machine (so the driver waits for it)."""
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    return name is None or name.split(".")[-1] in LOCAL_RUNNERS


def check_beam_args(beam_args: Sequence[str], also: Sequence[str] = ()) -> None:
    """Raise ValueError naming the first flag that no Beam pipeline option knows (with the
    closest of Beam's flags and `also`, a command's own, as a hint).

    Beam itself only logs such flags and goes on with defaults, so a mistyped flag of a
    command (which passes the flags it does not know to Beam) would be silently ignored.
    """
    parser = _BeamArgumentParser(allow_abbrev=False, add_help=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # as PipelineOptions.get_all_options collects them
    _, unknown = parser.parse_known_args(list(beam_args))
    if unknown:
        known = [o for action in parser._actions for o in action.option_strings] + list(also)
        name = unknown[0].split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unrecognized argument {unknown[0]}{hint}: neither an option of "
                         "this command nor a Beam pipeline option")


def pipeline_options(beam_args: Sequence[str], gpu: DataflowGpu | None = None,
                     accelerator: bool = True) -> PipelineOptions:
    """Options from pass-through Beam flags; the local runner, one worker process per core,
    unless a runner is named. Flags Beam does not know are refused (`check_beam_args`).
    With `gpu` but not `accelerator` the Dataflow workers get the image but no GPU."""
    args = list(beam_args)
    check_beam_args(args)
    options = PipelineOptions(args)
    runner = options.view_as(StandardOptions).runner
    if gpu is not None:
        if runner not in (None, "DataflowRunner"):
            raise ValueError(f"gpu options are for DataflowRunner, not runner {runner!r}")
        args = ["--runner=DataflowRunner", *args, *gpu.flags(accelerator)]
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
