"""The compute thread: every caller's work runs on one and the same thread, results and errors
come back to the caller, and work submitted from the compute thread itself runs inline."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from inferd.compute import ComputeThread


def test_work_from_many_threads_runs_on_one_thread():
    compute = ComputeThread()
    with ThreadPoolExecutor(4) as pool:
        names = list(pool.map(lambda _: compute.run(lambda: threading.current_thread().name), range(16)))
    assert set(names) == {"inferd-compute"}
    assert compute.run(threading.get_ident) != threading.get_ident()


def test_results_errors_and_nested_calls():
    compute = ComputeThread()
    assert compute.run(pow, 2, 10) == 1024
    with pytest.raises(ZeroDivisionError):
        compute.run(lambda: 1 / 0)
    assert compute.run(lambda: compute.run(lambda: 7) + 1) == 8  # inline, no deadlock
    assert compute.run(lambda: 3) == 3  # still serving after an error


def test_torch_threads_are_set_where_the_work_runs():
    compute = ComputeThread()
    assert compute.run(torch.get_num_threads, num_threads=1) == 1
    assert compute.run(torch.get_num_threads, num_threads=2) == 2
