"""tools/mutations.txt follows the code: every deliberate bug still applies where it names (its text stands
in its file exactly once, or at its `occurrence`), and the tests it runs exist. A re-wrapped line that
silently retired an entry (tools/mutate.py reports it only as not-applicable) fails here."""
import os
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import mutate  # noqa: E402

MUTATIONS = mutate.parse_list(os.path.join(ROOT, "tools", "mutations.txt"))


@pytest.mark.parametrize("m", MUTATIONS, ids=[m["name"] for m in MUTATIONS])
def test_each_mutation_still_applies(m):
    path = os.path.join(ROOT, m["file"])
    assert os.path.isfile(path), f"{m['name']}: {m['file']} is gone"
    with open(path) as f:
        start, why = mutate.locate(f.read(), m)
    assert start is not None, f"{m['name']} ({m['file']}): {why}; mend its old text in tools/mutations.txt"
    assert m["old"] != m["new"], m["name"]
    for arg in shlex.split(m["tests"]):
        if arg.startswith("tests/"):
            assert os.path.exists(os.path.join(ROOT, arg.split("::")[0])), f"{m['name']}: no {arg}"


def test_the_list_is_not_empty_and_names_are_unique():
    names = [m["name"] for m in MUTATIONS]
    assert len(names) >= 60 and len(set(names)) == len(names)
