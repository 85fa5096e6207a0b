"""Each concept has one owner: the top-level modules import one another without a circle, the settings are the
flags by dest and read-only, and the flags that never change a run's numbers are one set for every script."""
import ast
import glob
import os

import pytest
import torch

import checkpoint
import distill
import settings
import train_teacher
from utils import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_graph(folder):
    """{module: the top-level modules of `folder` it imports, anywhere in its code (function-local too)}."""
    paths = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(folder, "*.py"))}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = sorted(found & set(paths) - {name})
    return graph


def find_circle(graph):
    """One import circle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in graph[node]:
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (circle := visit(dep)):
                return circle
        stack.pop()
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_no_import_circle_among_the_top_level_modules(tmp_path):
    assert find_circle(import_graph(ROOT)) is None, " -> ".join(find_circle(import_graph(ROOT)))
    # the walker sees a circle closed by a function-local import, as safety.py <-> utils.py once was
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import g\n")
    assert find_circle(import_graph(tmp_path)) == ["a", "b", "a"]


def test_settings_are_the_flags_by_dest_and_read_only(tmp_path):
    for folder in ("pool", "cifar"):
        os.makedirs(tmp_path / folder)
    (tmp_path / "t.pth").touch()
    argv = ["--data_imagenet", tmp_path / "pool", "--teacher_dir", tmp_path / "t.pth", "--selected_file",
            tmp_path / "sel", "--data_cifar", tmp_path / "cifar", "--output_dir", tmp_path / "out", "--robust",
            "--score_batch_size", "7", "--batch_size", "9"]
    args = distill.get_args_parser().parse_args(map(str, argv))
    s = settings.resolve_settings(args, torch.device("cpu"))
    for dest, value in vars(args).items():   # every flag, by its dest; resolved ones documented in settings.py
        if dest not in ("amp", "dataset", "resume", "num_select", "probe_blocks"):
            assert getattr(s, dest) == value and getattr(s.select, dest) == value, dest
    assert (s.robust, s.select.score_batch_size, s.batch_size, s.select.num_select) == (True, 7, 9, 600000)
    with pytest.raises(AttributeError, match="read-only"):
        s.lr_S = 1.0


@pytest.mark.parametrize("ignores", [checkpoint.RESUME_IGNORES, train_teacher.RESUME_IGNORES])
def test_what_never_changes_a_run_is_one_set_for_every_script(ignores):
    saved = {"dist_timeout": 300, "workers": 4, "device": "cuda", "lr": 1e-3}
    checkpoint.check_same_settings(saved, {**saved, "dist_timeout": 60, "workers": 0, "device": "cpu"}, ignores,
                                   "last.pth", "--output")    # no refusal
    with pytest.raises(InputError, match="--lr 0.001"):
        checkpoint.check_same_settings(saved, {**saved, "lr": 2e-3}, ignores, "last.pth", "--output")
    assert checkpoint.RUN_ONLY <= ignores

