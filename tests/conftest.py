import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the pipeline at the root; the demo, study and benchmark scripts import as modules too
sys.path[:0] = [ROOT] + [os.path.join(ROOT, d) for d in ("demo", "study", "benchmark")]


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (use with pytest.mark.usefixtures): two spinning OpenMP
    threads on shared cores run several times slower than one."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
