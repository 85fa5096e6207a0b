import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the pipeline at the root; the demo, study and benchmark scripts import as modules too
sys.path[:0] = [ROOT] + [os.path.join(ROOT, d) for d in ("demo", "study", "benchmark")]
