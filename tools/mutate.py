"""Mutation testing: put one deliberate bug at a time into a scratch copy of the repository and run
the tests named for it; a bug the tests do not notice (a survivor) is a wiring the suite does not pin.

    python tools/mutate.py                        # every mutation of tools/mutations.txt, 2 at a time
    python tools/mutate.py --only probe-sign lr-never-applied --jobs 1
    python tools/mutate.py --list                 # names only

Each mutation (tools/mutations.txt) names a file, a text in it (matched regardless of whitespace, so
re-wrapping or re-indenting the code keeps it: see loose_pattern), its replacement, and the pytest
arguments to run. Results: killed (the tests failed), survived (they passed), timeout (counted as killed),
not-applicable (the text is no longer in the file, or not exactly once: the code moved on; fix the entry).
The working tree is never touched: its tracked and untracked (not ignored) files are copied to a
temporary folder per job. Each distinct test command also runs once unmutated: a mutation whose tests
already fail there is reported as baseline-fails, not as killed. Exit status 0; 2 for a broken list.
"""
import argparse
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("file", "old", "new", "tests", "occurrence")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_list(path):
    """tools/mutations.txt -> [{'name', 'file', 'old', 'new', 'tests', 'occurrence'}].

    A mutation starts with a line `[name]`, then `key: value` lines (file, old, new, tests, optional
    occurrence = which match to replace when the text occurs more than once). In old/new, `\\n` is a
    newline. Lines starting with # and blank lines are ignored."""
    out, cur = [], None
    if not os.path.isfile(path):
        fail(f"--mutations {path}: no such file")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line.startswith("[") and line.rstrip().endswith("]"):
                cur = {"name": line.strip()[1:-1].strip(), "line": n}
                out.append(cur)
                continue
            key, sep, value = line.partition(":")
            key = key.strip()
            if cur is None or not sep or key not in KEYS:
                fail(f"{path}:{n}: expected '[name]' or one of {', '.join(KEYS)}: {line!r}")
            value = value[1:] if value.startswith(" ") else value
            cur[key] = value.replace("\\n", "\n") if key in ("old", "new") else value.strip()
    names = set()
    for m in out:
        missing = [k for k in ("file", "old", "new", "tests") if k not in m]
        if missing:
            fail(f"{path}:{m['line']}: mutation {m['name']} has no {', '.join(missing)}")
        if m["name"] in names:
            fail(f"{path}:{m['line']}: mutation name {m['name']} used twice")
        names.add(m["name"])
    return out


def copy_tree(dest):
    """Copy the working tree's tracked and untracked (not ignored) files to dest."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):      # deleted in the working tree but still in the index
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))


def loose_pattern(old):
    """A regex for `old` that ignores layout, so an entry survives re-wrapping and re-indenting.

    Whitespace at either end of `old` is dropped. Inside, a run of whitespace matches any run of whitespace,
    none included, except between two word characters, where at least one is needed (`return x` must not
    match `returnx`). Where `old` has no whitespace, the file may have some between two characters unless
    both are word characters (one name or number is never split): `f(a, b)` matches it wrapped after `f(`.
    The match is the span from the first to the last non-space character."""
    pattern, prev, gap = "", None, False
    for c in old.strip():
        if c.isspace():
            gap = True
            continue
        if prev is not None:
            word = (prev.isalnum() or prev == "_") and (c.isalnum() or c == "_")
            pattern += (r"\s+" if gap else "") if word else r"\s*"
        pattern += re.escape(c)
        prev, gap = c, False
    return re.compile(pattern)


def locate(text, m):
    """(start, end) of the text to replace, or None and a reason it is not applicable."""
    if not m["old"].strip():
        return None, "old text is empty"
    spans = [hit.span() for hit in loose_pattern(m["old"]).finditer(text)]
    count = len(spans)
    want = int(m.get("occurrence", 0) or 0)
    if count == 0:
        return None, "pattern not found"
    if want:
        if want > count:
            return None, f"occurrence {want} asked, pattern found {count} times"
        return spans[want - 1], None
    if count > 1:
        return None, f"pattern found {count} times (set occurrence)"
    return spans[0], None


def apply(text, m):
    """text with m's bug in it, or None and a reason it is not applicable. `new` loses its end whitespace
    as `old` does, so the file keeps its own indentation before the span and its layout after it."""
    span, why = locate(text, m)
    if span is None:
        return None, why
    return text[:span[0]] + m["new"].strip() + text[span[1]:], None


def run_tests(workdir, tests, timeout, python):
    """-> ('passed' | 'failed' | 'timeout', seconds, last lines of output)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(tests)]
    t0 = time.time()
    # own process group: a timeout ends the tests' child processes too
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "timeout", time.time() - t0, "\n".join((out or "").strip().splitlines()[-3:])
    status = "passed" if proc.returncode == 0 else "failed"
    if proc.returncode == 5:          # no tests collected: the named tests are gone
        status = "no-tests"
    tail = "\n".join(out.strip().splitlines()[-3:])
    return status, time.time() - t0, tail


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, like fail(): 'argument --jobs: 0: ...' -> '--jobs 0: ...'
        fail(re.sub(r"^argument (\S+): ", r"\1 ", message))


def _checked(convert, accepts, why):
    """An argparse type= that refuses a value `accepts` rejects, saying `why`."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"{text}: {why}")
        return value
    return parse


def _executable(text):
    """--python: absolute (the tests run in a scratch copy). A bare name is looked up on PATH as a shell would;
    abspath, not realpath: a venv's python is a symlink, and resolving it would leave the venv."""
    found = shutil.which(text) if os.sep not in text else None
    python = os.path.abspath(found or text)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise argparse.ArgumentTypeError(f"{text}: no such executable")
    return python


def parse_args(argv=None):
    """The command line, checked where each flag is declared."""
    p = _Parser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--mutations", default=os.path.join(ROOT, "tools", "mutations.txt"), help="the list")
    p.add_argument("--only", nargs="+", help="run these mutations (names)")
    p.add_argument("--jobs", type=_checked(int, lambda v: v >= 1, "needs at least 1"), default=2,
                   help="mutations run at once, each in its own copy (default 2)")
    p.add_argument("--timeout", type=_checked(float, lambda v: v > 0, "needs more than 0 seconds"), default=600,
                   help="seconds per test run (default 600)")
    p.add_argument("--python", type=_executable, default=sys.executable,
                   help="interpreter with the test dependencies (a path, or a name on PATH)")
    p.add_argument("--no_baseline", action="store_true", help="skip the unmutated runs of each test command")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--list", action="store_true", help="print the mutation names and exit")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    mutations = parse_list(args.mutations)
    if args.list:
        for m in mutations:
            print(f"{m['name']:32s} {m['file']}")
        return 0
    if args.only:
        unknown = sorted(set(args.only) - {m["name"] for m in mutations})
        if unknown:
            fail(f"--only: no mutation named {', '.join(unknown)}")
        mutations = [m for m in mutations if m["name"] in args.only]

    scratch = tempfile.mkdtemp(prefix="mutate-")
    workspaces = queue.Queue()
    try:
        for j in range(args.jobs):
            ws = os.path.join(scratch, f"ws{j}")
            copy_tree(ws)
            workspaces.put(ws)
        baseline = {}
        if not args.no_baseline:
            commands = sorted({m["tests"] for m in mutations})

            def base(tests):
                ws = workspaces.get()
                try:
                    baseline[tests] = run_tests(ws, tests, args.timeout, args.python)
                finally:
                    workspaces.put(ws)
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(base, commands))
            for tests, (status, secs, tail) in sorted(baseline.items()):
                mark = "" if status == "passed" else f"  <-- {status}\n      {tail}"
                print(f"baseline {status:8s} {secs:6.1f}s  {tests}{mark}", flush=True)

        def one(m):
            if m["tests"] in baseline and baseline[m["tests"]][0] != "passed":
                return {**m, "result": "baseline-fails", "why": baseline[m["tests"]][0], "seconds": 0.0}
            ws = workspaces.get()
            path = os.path.join(ws, m["file"])
            try:
                if not os.path.isfile(path):
                    return {**m, "result": "not-applicable", "why": "file not found", "seconds": 0.0}
                with open(path) as f:
                    original = f.read()
                mutated, why = apply(original, m)
                if mutated is None:
                    return {**m, "result": "not-applicable", "why": why, "seconds": 0.0}
                with open(path, "w") as f:
                    f.write(mutated)
                try:
                    status, secs, tail = run_tests(ws, m["tests"], args.timeout, args.python)
                finally:
                    with open(path, "w") as f:
                        f.write(original)
                result = {"failed": "killed", "passed": "survived", "timeout": "timeout",
                          "no-tests": "not-applicable"}[status]
                why = tail if status == "failed" else ("named tests not found" if status == "no-tests" else "")
                return {**m, "result": result, "why": why, "seconds": secs}
            finally:
                workspaces.put(ws)

        results = []
        with ThreadPoolExecutor(args.jobs) as pool:
            for r in pool.map(one, mutations):
                results.append(r)
                last = r["why"].strip().splitlines()[-1][:110] if r["why"].strip() else ""
                print(f"{r['result']:15s} {r['seconds']:6.1f}s  {r['name']:32s} {last}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    counts = {}
    for r in results:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    judged = killed + counts.get("survived", 0)
    print("\n" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if judged:
        print(f"kill rate: {killed}/{judged} = {100 * killed / judged:.1f} % (timeouts count as killed)")
    for r in results:
        if r["result"] in ("survived", "not-applicable", "baseline-fails"):
            print(f"  {r['result']}: {r['name']} ({r['file']}) {r['why'][:200]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"counts": counts, "kill_rate": killed / judged if judged else None, "results": results},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
