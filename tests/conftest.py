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


# The slowest test takes under 30 s here; one still running after this long is hung. It then prints
# every thread's stack and ends the run, instead of waiting for CI's 90-minute limit in silence.
HUNG_TEST_S = 600


@pytest.fixture(autouse=True)
def _hung_test_ends_the_run(request):
    import faulthandler
    import threading
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def end_the_run():
        if capture is not None:
            capture.suspend_global_capture(in_=True)  # else the stacks go to the test's captured output
        print(f"\nerror: {request.node.nodeid} still running after {HUNG_TEST_S} s; every thread's stack:",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(1)

    timer = threading.Timer(HUNG_TEST_S, end_the_run)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
