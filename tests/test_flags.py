"""Every flag's domain and combinations (tests/flag_table.py): each bad value is refused with one `error:` line
naming the flag, exit 2, before anything is written; each accepted value's effect is pinned by a named test;
a flag without a row fails here. Plus the behaviours the table points to that no older test covered."""
import ast
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import distill
import fixtures as fx
import flags
import scoring
from flag_table import D, EFFECTS, OUTSIDE, PARSERS, REFUSED, S, T, declared_effects, typed_refusals
from selection import select_indices

fx.register_test_models()
pytestmark = pytest.mark.usefixtures("one_thread_module")
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("flags")
    w = SimpleNamespace(base=base, cifar=base / "cifar", pool=base / "pool", pool_b=base / "pool_b")
    fx.write_cifar(w.cifar, n_train=4, n_test=16)
    fx.write_pool(w.pool, 40, size=32)
    fx.write_pool(w.pool_b, 40, size=32, seed=1)
    w.teacher = fx.write_teacher(base / "micro.pth", name=fx.MICRO)
    for name, pool in (("scored", w.pool), ("scored_b", w.pool_b)):
        assert fx.run_flags(S, fx.select_flags(w, base / name, **{"--data_imagenet": pool, "--no_report": True})) == 0
    w.sel_a, w.sel_b = base / "scored" / "selection.pt", base / "scored_b" / "selection.pt"
    return w


def row_flags(row_argv, w, d):
    """The row's argv, placeholders filled -> {flag: value(s) or True}."""
    fill = dict(tmp=d, afile=fx.write_bytes(d / "afile", b"x"), pool=w.pool, pool_b=w.pool_b, cifar=w.cifar,
                teacher=w.teacher, sel_a=w.sel_a, sel_b=w.sel_b,
                seed_json=fx.write_bytes(d / "seed.json", b'{"seed": -1}'),
                alien_json=fx.write_bytes(d / "alien.json", b'{"from_elsewhere": 1}'))
    out, flag = {}, None
    for token in row_argv:
        if token.startswith("--"):
            flag = token
            out[flag] = True
        else:
            value = token.format(**{k: os.fspath(v) for k, v in fill.items()})
            out[flag] = [value] if out[flag] is True else out[flag] + [value]
    return out


def teacher_flags(w, d):
    return {"--dataset": "cifar10", "--data": w.cifar, "--model": fx.MICRO, "--output": d / "teacher" / "t.pth",
            "--epochs": 1, "--batch_size": 4, "--workers": 0, "--device": "cpu"}


def base_command(script, row, w, d):
    if script == T:
        return teacher_flags(w, d)
    if script == D and "--eval_only" in row:   # it takes no training flags
        return {"--data_cifar": w.cifar, "--workers": 0}
    return fx.select_flags(w, d / "sel") if script == S else fx.distill_flags(w, d)


CASES = [(script, row) for row in REFUSED for script in row.scripts]


@pytest.mark.parametrize("script,row", CASES, ids=[f"{s}:{' '.join(r.argv)}" for s, r in CASES])
def test_refused_before_anything_is_written(script, row, world, tmp_path, capsys):
    over = row_flags(row.argv, world, tmp_path)
    command = {**base_command(script, over, world, tmp_path), **over}
    before = fx.snapshot(world.base, tmp_path)
    capsys.readouterr()
    rc = fx.run_flags(script, command)
    out, err = capsys.readouterr()
    lines = fx.error_lines(err)
    assert rc == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert row.argv[0] in lines[0] and row.says in lines[0], lines[0]
    assert "Traceback" not in out + err
    fx.assert_nothing_written(before, fx.snapshot(world.base, tmp_path),
                              [tmp_path / "sel", tmp_path / "out", tmp_path / "teacher"])


def test_every_flag_has_a_row_and_every_effect_a_test():
    """A flag gained by a parser without a row here fails; so does an effect naming a test that does not exist."""
    for script, make in PARSERS.items():
        options = {flags.long_option(a) for a in make()._actions} - {None}
        covered = {r.argv[0] for r in REFUSED if script in r.scripts} | {e.flag for e in EFFECTS if script in e.scripts}
        assert options - covered == set(), f"{script}: flags without a row in tests/flag_table.py"
        assert covered - options == set(), f"{script}: rows for flags it does not have"
    defined = {}
    for e in EFFECTS:
        path, name = e.test.split("::")
        if path not in defined:
            tree = ast.parse(open(os.path.join(os.path.dirname(TESTS), path)).read())
            defined[path] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name.split("[")[0] in defined[path], e.test


def test_a_new_flag_needs_no_row_here(tmp_path):
    """A flag's effect row can stand on its test (@pins), and a value outside its type's domain is refused by a
    row made from the parser: adding a flag touches its module and one test file."""
    (tmp_path / "test_new.py").write_text('from flag_table import D, pins\n\n\n@pins(D, "--kd_scale", "2", '
                                          '"KD counts twice")\ndef test_kd_scale():\n    pass\n')
    (row,) = declared_effects(tmp_path)
    assert row == ((D,), "--kd_scale", "2", "tests/test_new.py::test_kd_scale", "KD counts twice")
    parser = flags.Parser()
    parser.add_argument("--kd_scale", type=flags.positive_float, default=1.0)
    parser.add_argument("--attnlier", type=flags.nonneg_float, default=0.05)   # has rows of its own
    assert typed_refusals({S: lambda: parser}) == [((S,), ["--kd_scale", "0"], flags.positive_float.domain)]
    for domain, value in OUTSIDE.items():   # each example is outside its domain
        kind = next(f for f in vars(flags).values() if getattr(f, "domain", None) == domain)
        with pytest.raises(Exception, match="must be"):
            kind(value)


def test_every_effect_value_is_accepted(tmp_path):
    """An effect row's value passes its script's parser (with the flags it needs)."""
    for e in EFFECTS:
        value = e.value.split()
        if e.flag == "--config":   # a file that must exist: an empty config
            value = [os.fspath(fx.write_bytes(tmp_path / "args.json", b"{}"))]
        for script in e.scripts:
            extra = {"--attnlier": ["--attnprobe_sel"], "--outlier": ["--attnprobe_sel"],
                     "--cuda_graphs": ["--compile"]}.get(e.flag, [])
            if e.flag in ("--patchattn", "--pd_loss", "--pd_teacher_blocks", "--pd_student_blocks"):
                extra = ["--attnprobe_dist"]
            required = ["--dataset", "cifar10", "--data", "d", "--output", "t.pth"] if script == T else []
            PARSERS[script]().parse_args([*required, e.flag, *value, *extra])


# ---- behaviours the table points to ------------------------------------------------------------------

def test_random_per_class_caps_each_class_at_random_and_fills_at_random():
    """--random --per_class N: at most N per predicted class drawn at random, then filled from the same random
    order; --random alone is the published uniform draw, unchanged."""
    pred = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    usable = torch.ones(100, dtype=torch.bool)
    usable[[3, 60]] = False
    value = torch.zeros(100)
    plain = select_indices(value, usable, 40, pred, None, random=True, seed=5)
    g = torch.Generator().manual_seed(5)
    candidates = usable.nonzero().squeeze(1)
    assert torch.equal(plain, candidates[torch.randperm(len(candidates), generator=g)[:40]])
    balanced = select_indices(value, usable, 24, pred, per_class=8, random=True, seed=5)
    assert len(balanced) == 24 and len(set(balanced.tolist())) == 24 and bool(usable[balanced].all())
    assert torch.bincount(pred[balanced], minlength=3).tolist() == [8, 8, 8]
    # the first 8 of each class in the random order, not the lowest-index ones
    order = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(5))]
    for c in range(3):
        assert set(balanced[pred[balanced] == c].tolist()) == set(order[pred[order] == c][:8].tolist())
    filled = select_indices(value, usable, 30, pred, per_class=8, random=True, seed=5)
    assert torch.bincount(pred[filled], minlength=3).tolist() != [8, 8, 8] and len(filled) == 30
    assert set(balanced.tolist()) <= set(filled.tolist())
    assert not torch.equal(balanced, select_indices(value, usable, 24, pred, per_class=8, random=True, seed=6))


def test_random_per_class_from_the_command_line_is_recorded_and_holds(world, tmp_path, capsys):
    sel = tmp_path / "sel"
    shutil.copytree(world.base / "scored", sel)
    assert fx.run_flags(S, fx.select_flags(world, sel, **{"--random": True, "--per_class": 1, "--num_select": 8,
                                                          "--no_report": True})) == 0
    record = torch.load(sel / "selection.pt", weights_only=True)
    pred = torch.load(sel / "pred_out.pth", weights_only=True)
    counts = torch.bincount(pred[record["indices"]], minlength=10)
    classes = int((torch.bincount(pred[pred >= 0], minlength=10) > 0).sum())
    # one per predicted class first: every class the pool has is in the selection
    assert int((counts > 0).sum()) == min(classes, 8)
    assert record["rule"] == "random, class-balanced (1 per class)"


def test_scores_missing_an_image_are_never_marked_complete(tmp_path):
    """A chunk that covers fewer images than the pool (what --chunk_size -5 once gave): no score file, no
    fingerprint, the chunks dropped so that the rerun scores afresh."""
    chunks = tmp_path / scoring.CHUNKS
    chunks.mkdir()
    part = {"index": torch.tensor([0, 1]), "ok": torch.ones(2, dtype=torch.bool), "value_out": torch.zeros(2),
            "pred_out": torch.zeros(2, dtype=torch.long), "value_blk3": torch.zeros(2), "reasons": {}}
    torch.save(part, chunks / "chunk_000000.pt")
    index = SimpleNamespace(ids=["a", "b", "c"])
    with pytest.raises(RuntimeError, match="covered 2 of 3"):
        scoring._assemble_scores(str(chunks), str(tmp_path), 1, 3, [3], index)
    assert sorted(os.listdir(tmp_path)) == []


def test_a_rerun_after_a_late_refusal_selects_as_a_fresh_run(world, tmp_path, capsys):
    """A refusal that needs the teacher (a probe head it lacks) leaves only the empty folder; the corrected
    command then runs and selects exactly what a run in a fresh folder selects."""
    flags_ = fx.select_flags(world, tmp_path / "sel", **{"--no_report": True})
    assert fx.run_flags(S, {**flags_, "--probe_head": 2}) == 2
    assert sorted(os.listdir(tmp_path / "sel")) in ([], [".lock"])
    assert fx.run_flags(S, flags_) == 0
    fresh = torch.load(world.sel_a, weights_only=True)
    assert torch.equal(torch.load(tmp_path / "sel" / "selection.pt", weights_only=True)["indices"], fresh["indices"])


def test_parser_refusal_is_one_line_from_a_real_process(tmp_path):
    """What a user sees: no usage block, one `error:` line naming the flag, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, fx.script_path(S), "--chunk_size", "-5"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env={**os.environ, **fx.CHILD_ENV})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: argument --chunk_size: must be an integer >= 1, got '-5'"]
    assert os.listdir(tmp_path) == []


def test_under_torchrun_only_rank_0_prints_a_parser_refusal(monkeypatch, capsys):
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            distill.get_args_parser().parse_args(["--holdout", "0.7"])
        assert e.value.code == 2
        assert len(fx.error_lines(capsys.readouterr().err)) == lines


def test_a_flag_at_its_default_is_not_refused_beside_the_flag_it_needs():
    """The default given explicitly changes nothing (the demo passes --patchattn 0.8 to every student)."""
    args = distill.get_args_parser().parse_args(["--patchattn", "0.8", "--schedule", "200", "300", "--cos"])
    assert args.patchattn == 0.8 and args.cos


@pytest.mark.parametrize("script", list(PARSERS))
def test_every_domain_is_declared_on_the_flag(script):
    """Numbers are typed by flags' domain functions: no bare int/float flag is left to accept anything."""
    for action in PARSERS[script]()._actions:
        assert action.type not in (int, float), flags.long_option(action)
    assert re.search("integer", flags.domain(PARSERS[script]().action("--workers")))


@pytest.mark.parametrize("script", list(PARSERS))
def test_compile_compiles_the_model_passes(script, world, tmp_path, monkeypatch, capsys):
    """--compile hands the passes that run every batch to torch.compile (recorded here, run eagerly)."""
    compiled = []

    def record(fn, **kw):
        compiled.append(getattr(fn, "__name__", type(fn).__name__))
        return fn
    monkeypatch.setattr(torch, "compile", record)
    if script == T:
        command = teacher_flags(world, tmp_path)
    else:
        command = fx.select_flags(world, tmp_path / "sel", **{"--no_report": True})
        if script == D:
            command = fx.distill_flags(world, tmp_path, **command)
    assert fx.run_flags(script, command) == 0 and compiled == []
    assert fx.run_flags(script, {**command, "--compile": True, "--resume": "no" if script != S else None,
                                 "--force": script != T or None}) == 0
    expected = {S: ["score_images"], D: ["score_images", "WithFeatures", "WithFeatures"],
                T: ["VisionTransformer"]}[script]
    assert sorted(compiled) == sorted(expected)


def test_store_signals_stores_every_signal_and_a_later_rule_does_not_rescore(world, tmp_path, capsys):
    import signals
    sel = tmp_path / "sel"
    shutil.copytree(world.base / "scored", sel)
    assert fx.run_flags(S, fx.select_flags(world, sel, **{"--store_signals": True, "--no_report": True})) == 0
    assert "scoring again to store them" in capsys.readouterr().out
    stored = {f"sig_{name}.pth" for name in signals.SIGNALS if name not in signals.FLIP_SIGNALS}
    assert stored <= set(os.listdir(sel))
    mtime = os.path.getmtime(sel / "value_out.pth")
    rule = {"--rule": "confidence+tok_norm_b2", "--no_report": True}
    assert fx.run_flags(S, fx.select_flags(world, sel, **rule)) == 0
    assert os.path.getmtime(sel / "value_out.pth") == mtime


def pool_paths(folder):
    import pool
    return [os.path.join(folder, i) for i in pool.list_pool(folder).ids]


def micro_teacher(path):
    import timm
    model = timm.create_model(fx.MICRO, num_classes=10)
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    return model.eval()


def test_probe_blocks_and_head_are_the_ones_scored(world, tmp_path, capsys):
    sel = tmp_path / "sel"
    assert fx.run_flags(S, fx.select_flags(world, sel, **{"--probe_blocks": [1, 5], "--probe_head": 1,
                                                          "--no_report": True, "--attnprobe_sel": True})) == 0
    expected = fx.direct_scores(micro_teacher(world.teacher), pool_paths(world.pool), blocks=(1, 5), head=1)
    for key in ("value_blk1", "value_blk5"):
        assert torch.allclose(torch.load(sel / f"{key}.pth", weights_only=True), expected[key], atol=1e-4), key
    assert not (sel / "value_blk3.pth").exists()
    # and head 1's, not head 0's (this micro teacher's rows are near-uniform: compare the distances)
    got = torch.load(sel / "value_blk1.pth", weights_only=True)
    head0 = fx.direct_scores(micro_teacher(world.teacher), pool_paths(world.pool), blocks=(1,), head=0)["value_blk1"]
    assert (got - expected["value_blk1"]).abs().max() < (got - head0).abs().max()
    value = 0.05 * (expected["value_blk1"] + expected["value_blk5"]) + 0.9 * expected["value_out"]
    chosen = torch.load(sel / "selection.pt", weights_only=True)["indices"]
    assert chosen.tolist() == torch.argsort(value.double(), stable=True)[:8].tolist()


@pytest.mark.parametrize("attnlier,outlier", [(1.0, 0.0), (0.3, 2.0)])
def test_probe_weights_rank_the_pool(attnlier, outlier, world, tmp_path, capsys):
    """--attnlier and --outlier are the weights of value = attnlier · Σ_b value_blk{b} + outlier · value_out."""
    sel = tmp_path / "sel"
    shutil.copytree(world.base / "scored", sel)
    assert fx.run_flags(S, fx.select_flags(world, sel, **{"--attnprobe_sel": True, "--attnlier": attnlier,
                                                          "--outlier": outlier, "--no_report": True})) == 0
    s = {k: torch.load(sel / f"{k}.pth", weights_only=True).double() for k in ("value_out", "value_blk3", "value_blk7")}
    value = attnlier * (s["value_blk3"] + s["value_blk7"]) + outlier * s["value_out"]
    chosen = torch.load(sel / "selection.pt", weights_only=True)["indices"]
    assert chosen.tolist() == torch.argsort(value, stable=True)[:8].tolist()
    if outlier == 0:   # the probe alone: not the confidence's choice
        assert not torch.equal(chosen, torch.load(world.sel_a, weights_only=True)["indices"])


def test_no_cache_builds_no_cache_and_scores_the_same(world, tmp_path, capsys):
    """--no_cache decodes every image and writes no cache; the scores equal the cached run's at any
    --score_batch_size (or its old spelling --batch_size)."""
    for name, extra in (("a", {"--no_cache": True, "--score_batch_size": 7}), ("b", {"--batch_size": 3})):
        sel = tmp_path / name
        assert fx.run_flags(S, fx.select_flags(world, sel, **{"--no_report": True, **extra})) == 0
        assert not any(n.startswith("pool_cache") for n in os.listdir(sel)) or name == "b"
        for key in ("value_out", "value_blk3", "value_blk7", "pred_out"):
            got = torch.load(sel / f"{key}.pth", weights_only=True)
            want = torch.load(world.base / "scored" / f"{key}.pth", weights_only=True)
            assert torch.allclose(got.double(), want.double(), atol=1e-5), key
    assert any(n.startswith("pool_cache") for n in os.listdir(tmp_path / "b"))


def test_docs_hold_the_generated_flag_tables():
    """docs/usage.md's flag reference and docs/failures.md's refusals are the parsers and this table."""
    sys.path.insert(0, os.path.join(os.path.dirname(TESTS), "tools"))
    import flag_docs
    for path, (text, generated) in flag_docs.pages().items():
        assert text == generated, f"{path} is stale: run python tools/flag_docs.py"
