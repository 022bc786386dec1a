"""Runner options: local worker processes per core sharing the cores, Dataflow left alone."""

from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions
from apache_beam.testing.util import assert_that

from segclr_beam import runner
from segclr_beam.runner import THREADS_VARIABLE, available_cores, pipeline_options


def _local(options) -> tuple[str, int, str]:
    direct = options.view_as(DirectOptions)
    return (options.view_as(StandardOptions).runner, direct.direct_num_workers,
            direct.direct_running_mode)


@pytest.fixture
def cores(monkeypatch):
    """Pretend the machine has 4 cores; the variable as a fresh process would see it."""
    monkeypatch.setattr(runner, "available_cores", lambda: 4)
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    monkeypatch.setattr(runner, "_threads_set", None)
    return 4


def test_available_cores_are_this_process_s():
    assert available_cores() == len(os.sched_getaffinity(0))


def test_one_worker_process_per_core_by_default(cores):
    assert _local(pipeline_options([])) == ("FnApiRunner", 4, "multi_processing")
    assert os.environ[THREADS_VARIABLE] == "1"


def test_the_worker_count_is_beam_s_flag(cores):
    assert _local(pipeline_options(["--direct_num_workers=2"])) == (
        "FnApiRunner", 2, "multi_processing")
    assert os.environ[THREADS_VARIABLE] == "2"
    assert _local(pipeline_options(["--direct_num_workers", "3"]))[1:] == (3, "multi_processing")
    assert os.environ[THREADS_VARIABLE] == "1"  # 4 // 3
    assert _local(pipeline_options(["--direct_num_workers=1"])) == ("FnApiRunner", 1, "in_memory")
    assert THREADS_VARIABLE not in os.environ  # in-process: TensorFlow's default, every core
    assert _local(pipeline_options(["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
                  ) == ("FnApiRunner", 2, "multi_threading")
    assert THREADS_VARIABLE not in os.environ


def test_threads_the_user_set_are_kept(cores, monkeypatch):
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    pipeline_options([])
    assert os.environ[THREADS_VARIABLE] == "3"
    pipeline_options(["--direct_num_workers=1"])
    assert os.environ[THREADS_VARIABLE] == "3"


def test_remote_runners_get_no_local_flags(cores):
    options = pipeline_options(["--runner=DataflowRunner", "--project=p", "--region=r"])
    assert "direct_num_workers" not in options.get_all_options(drop_default=True)
    assert THREADS_VARIABLE not in os.environ


def test_worker_processes_get_their_share_of_the_cores(cores):
    driver, variable = os.getpid(), THREADS_VARIABLE

    def check(found):  # local functions travel to the workers by value
        pids = {pid for pid, _ in found}
        assert len(found) == 40 and driver not in pids, pids
        assert {threads for _, threads in found} == {"2"}

    with beam.Pipeline(options=pipeline_options(["--direct_num_workers=2"])) as p:
        found = p | beam.Create(range(40)) | beam.Reshuffle() | beam.Map(
            lambda _: (os.getpid(), os.environ.get(variable)))
        assert_that(found, check)


@pytest.mark.parametrize("runner_name, local", [
    (None, True), ("FnApiRunner", True), ("DirectRunner", True),
    ("BundleBasedDirectRunner", True), ("PrismRunner", True), ("DataflowRunner", False)])
def test_every_local_runner_is_waited_for(runner_name, local):
    from apache_beam.options.pipeline_options import PipelineOptions

    args = [] if runner_name is None else [f"--runner={runner_name}"]
    assert runner.is_local(PipelineOptions(args)) is local


def test_a_flag_no_one_knows_is_refused_with_a_hint():
    with pytest.raises(ValueError, match=r"unrecognized argument --radi-nm \(did you mean "
                                         r"--radii-nm\?\)"):
        runner.check_beam_args(["--radi-nm", "5000"], also=["--radii-nm"])
    with pytest.raises(ValueError, match="unrecognized argument --direct_num_worker=2"):
        pipeline_options(["--direct_num_worker=2"])
    runner.check_beam_args(["--runner=DataflowRunner", "--project=p", "--region", "r",
                            "--experiments=a", "--experiments=b", "--dry_run=True"])


def test_gpu_free_workers_keep_the_image():
    gpu = runner.DataflowGpu("nvidia-l4", 1, "g2-standard-8", "img:1")
    assert gpu.flags(accelerator=False) == ["--sdk_container_image=img:1",
                                            "--experiments=use_runner_v2"]
    assert any(f.startswith("--dataflow_service_options=worker_accelerator") for f in gpu.flags())
