"""Shared test settings."""
import subprocess
import sys

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny models: a second intra-op thread only adds contention on a small shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def dead_pid():
    """The pid of a process that has exited: a writer killed mid-write."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
