"""tools/mutations.txt follows the code: every deliberate bug still applies where it names (its text stands
in its file once, regardless of layout, or at its `occurrence`), the mutated file still compiles, and the
tests it runs exist. A rewritten line that silently retired an entry (tools/mutate.py reports it only as
not-applicable) fails here. Also the matching rules of tools/mutate.py themselves."""
import os
import shlex
import subprocess
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
        mutated, why = mutate.apply(f.read(), m)
    assert mutated is not None, f"{m['name']} ({m['file']}): {why}; mend its old text in tools/mutations.txt"
    assert m["old"] != m["new"], m["name"]
    if path.endswith(".py"):     # a bug that does not even compile would be 'killed' for the wrong reason
        compile(mutated, path, "exec")
    for arg in shlex.split(m["tests"]):
        if arg.startswith("tests/"):
            assert os.path.exists(os.path.join(ROOT, arg.split("::")[0])), f"{m['name']}: no {arg}"


def test_the_list_is_not_empty_and_names_are_unique():
    names = [m["name"] for m in MUTATIONS]
    assert names and len(set(names)) == len(names)


def entry(old, new, occurrence=None):
    m = {"name": "t", "file": "x.py", "old": old, "new": new, "tests": "tests/x.py"}
    return {**m, "occurrence": occurrence} if occurrence else m


SWAP = entry("combined(arrays, s.attnprobe, s.attnlier)", "combined(arrays, s.attnlier, s.attnprobe)")


@pytest.mark.parametrize("body", [
    "    value = combined(arrays, s.attnprobe, s.attnlier)\n",
    "    value = combined(\n        arrays, s.attnprobe, s.attnlier\n    )\n",      # wrapped after its (
    "    value = combined(arrays,\n                     s.attnprobe, s.attnlier)\n",  # wrapped after a comma
    "    value = combined( arrays ,s.attnprobe,s.attnlier )\n",
], ids=["as-written", "wrapped-after-paren", "wrapped-after-comma", "spaced"])
@pytest.mark.parametrize("indent", ["", "    "], ids=["flat", "reindented"])
def test_an_entry_still_applies_after_its_line_is_rewrapped_or_reindented(body, indent):
    lines = ("def f(arrays, s):\n" + body + "    return value").split("\n")
    text = ("class C:\n" if indent else "") + "".join(indent + line + "\n" for line in lines)
    (start, end), why = mutate.locate(text, SWAP)
    assert why is None
    assert text[start] == "c" and text[end - 1] == ")"     # the span is the call, nothing around it
    mutated, _ = mutate.apply(text, SWAP)
    assert mutated == text[:start] + SWAP["new"] + text[end:]
    assert mutated.startswith(text[:text.index("value =")]) and mutated.endswith(f")\n{indent}    return value\n")
    compile(mutated, "x.py", "exec")


def test_a_real_entry_survives_its_call_rewrapped_over_two_lines():
    m = next(m for m in MUTATIONS if m["name"] == "score-weights-swapped")
    with open(os.path.join(ROOT, m["file"])) as f:
        text = f.read()
    assert m["old"] in text
    wrapped = text.replace(m["old"], m["old"].replace("(", "(\n        ", 1))
    mutated, why = mutate.apply(wrapped, m)
    assert mutated == wrapped.replace(m["old"].replace("(", "(\n        ", 1), m["new"]), why


def test_a_multiline_entry_keeps_the_files_indentation_before_it():
    m = entry("        for b in blocks:\n            value += w",
              "        for b in blocks[:1]:\n            value += w")
    text = "def f():\n        for b in blocks:\n            value += w\n"
    mutated, why = mutate.apply(text, m)
    assert mutated == "def f():\n        for b in blocks[:1]:\n            value += w\n", why


def test_names_are_not_joined_or_split():
    assert mutate.locate("return x", entry("returnx", "y"))[0] is None
    assert mutate.locate("returnx", entry("return x", "y"))[0] is None
    assert mutate.locate("lr_S * 2", entry("lr_ S*2", "y"))[0] is None
    assert mutate.locate("a = lr_S*2", entry("lr_S * 2", "y"))[0] == (4, 10)


def test_a_text_found_twice_needs_its_occurrence():
    text = "a = f(x)\nb = f(\n    x)\nc = f(y)\n"
    assert mutate.locate(text, entry("f(x)", "g(x)")) == (None, "pattern found 2 times (set occurrence)")
    assert mutate.locate(text, entry("f(x)", "g(x)", "3")) == (None, "occurrence 3 asked, pattern found 2 times")
    assert mutate.locate(text, entry("f(z)", "g(z)")) == (None, "pattern not found")
    span, _ = mutate.locate(text, entry("f(x)", "g(x)", "2"))
    assert text[span[0]:span[1]] == "f(\n    x)"
    assert mutate.apply(text, entry("f(x)", "g(x)", "2"))[0] == "a = f(x)\nb = g(x)\nc = f(y)\n"


def test_the_replacement_replaces_exactly_the_matched_span():
    text = "x = 1  +  2  # sum\n"
    span, _ = mutate.locate(text, entry("1 + 2", "1 - 2"))
    assert span == (4, 11)
    assert mutate.apply(text, entry("1 + 2", "1 - 2"))[0] == "x = 1 - 2  # sum\n"


@pytest.mark.parametrize("flags, flag", [
    (["--jobs", "0"], "--jobs"), (["--jobs", "-1"], "--jobs"),
    (["--timeout", "0"], "--timeout"), (["--timeout", "-5"], "--timeout"),
    (["--python", "no/such/python"], "--python"),
])
def test_bad_flags_are_refused_in_one_line(flags, flag):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "mutate.py"), "--list", *flags],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} "), r.stderr


def test_a_relative_python_becomes_absolute_but_stays_the_venvs(tmp_path, monkeypatch):
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    monkeypatch.chdir(tmp_path)
    assert mutate.parse_args(["--python", "venv/bin/python"]).python == str(venv_python)   # the link, not its target


def test_a_run_with_a_relative_python_works_from_another_folder(tmp_path):
    """The tests run in a scratch copy of the tree: a relative --python must not be looked up there."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / "list.txt").write_text(
        "[empty-list-passes]\nfile: tests/test_mutation_list.py\n"
        "old: assert names and len(set(names)) == len(names)\nnew: assert not names\noccurrence: 1\n"
        "tests: tests/test_mutation_list.py -k names_are_unique\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "mutate.py"), "--mutations", "list.txt",
                        "--python", "bin/python", "--no_baseline", "--jobs", "1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("killed ") and "killed 1" in r.stdout, r.stdout
