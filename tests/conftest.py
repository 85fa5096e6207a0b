import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the pipeline at the root; the demo, study and benchmark scripts import as modules too
sys.path[:0] = [ROOT] + [os.path.join(ROOT, d) for d in ("demo", "study", "benchmark")]


def _torch_on_one_thread():
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (use with pytest.mark.usefixtures): two spinning OpenMP
    threads on shared cores run several times slower than one."""
    yield from _torch_on_one_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """The same for a whole module, its module fixtures included: in-process results then match the
    child processes' (fixtures.CHILD_ENV runs them on one thread) to the bit."""
    yield from _torch_on_one_thread()
