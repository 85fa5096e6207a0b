"""Failure behaviour (FAILURES.md): bad input, wild images, interruptions, untrusted files.

Most CLI runs happen in this process (fixtures.run_script_inprocess: argparse, the __main__ block
and cli_main exactly as `python script.py ...`), since a child process pays ~7 s of torch/timm
imports; real child processes are used where the process itself matters: signals, kills, and a
check that errors print no traceback.
"""
import fcntl
import glob
import json
import os
import shutil
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint
import distill
import fixtures as fx
import pool
import safety
import scoring
import select_data
import utils
from safety import RunLock

S, D = "select_data.py", "DFND_DeiT-train.py"
fx.register_test_models()


pytestmark = pytest.mark.usefixtures("one_thread_module")   # as the children: identical float results


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("robust")
    w = SimpleNamespace(base=base, cifar=base / "cifar", pool=base / "pool", pool_b=base / "pool_b",
                        scored=base / "scored")
    fx.write_cifar(w.cifar, n_train=2, n_test=16)
    fx.write_pool(w.pool, 40, size=32)
    fx.write_pool(w.pool_b, 40, size=32, seed=1)
    w.teacher = fx.write_teacher(base / "micro.pth", name=fx.MICRO)
    w.teacher2 = fx.write_teacher(base / "micro2.pth", name=fx.MICRO, seed=1)
    assert fx.run_flags(S, fx.select_flags(w, w.scored)) == 0
    return w


# ---- 1. bad input: one line, exit 2, nothing written ------------------------------------

def _junk_pool(d):
    for rel in ("notes.txt", "labels.csv", "sub/readme.md", ".DS_Store", "sub/.hidden.jpg", "model.pth"):
        fx.write_bytes(d / "junk" / rel, b"not an image")
    return d / "junk"


def _scored_copy(w, d, drop_meta=False, garbage=None):
    shutil.copytree(w.scored, d / "sel")
    if drop_meta:
        os.unlink(d / "sel" / "scores_meta.json")
    if garbage:
        fx.write_bytes(d / "sel" / garbage, b"\x80\x02garbage")
    return {}


def _evil(d, legacy=False):
    return fx.write_code_pickle(d / "evil.pth", d / "marker", legacy=legacy)


def _text(d, name="notes.pth"):
    return fx.write_bytes(d / name, b"hello, I am a text file\n")


def _corrupt_cifar(w, d):
    shutil.copytree(w.cifar, d / "cifar")
    fx.truncated_copy(w.cifar / "cifar-10-batches-py" / "test_batch", d / "cifar" / "cifar-10-batches-py" / "test_batch")
    return d / "cifar"


# name -> (script, setup(w, d) -> flag overrides, substrings the error must contain)
BAD_INPUT = {
    "select-pool_missing": (S, lambda w, d: {"--data_imagenet": d / "nope"}, ["--data_imagenet", "nope"]),
    "select-pool_empty": (S, lambda w, d: (d / "empty").mkdir() or {"--data_imagenet": d / "empty"},
                          ["empty"]),
    "select-pool_without_images": (S, lambda w, d: {"--data_imagenet": _junk_pool(d)}, ["no image files", "junk"]),
    "select-num_select_zero": (S, lambda w, d: {"--num_select": 0}, ["--num_select"]),
    "select-num_select_negative": (S, lambda w, d: {"--num_select": -3}, ["--num_select"]),
    "select-num_select_above_pool": (S, lambda w, d: {"--num_select": 41}, ["--num_select 41", "larger than the pool"]),
    "select-nb_classes_mismatch": (S, lambda w, d: {"--nb_classes": 7}, ["--nb_classes", "10 classes"]),
    "select-teacher_name_mismatch": (S, lambda w, d: {"--teacher": fx.TEACHER}, ["does not fit", "micro.pth"]),
    "select-teacher_name_unknown": (S, lambda w, d: {"--teacher": "no_such_vit"}, ["no_such_vit"]),
    "select-teacher_missing": (S, lambda w, d: {"--teacher_dir": d / "none.pth"}, ["--teacher_dir", "none.pth"]),
    "select-teacher_truncated": (S, lambda w, d: {"--teacher_dir": fx.truncated_copy(w.teacher, d / "t.pth")},
                                 ["t.pth", "not a readable"]),
    "select-teacher_not_a_checkpoint": (S, lambda w, d: {"--teacher_dir": _text(d)}, ["notes.pth", "not a readable"]),
    "select-teacher_runs_code": (S, lambda w, d: {"--teacher_dir": _evil(d)}, ["evil.pth", "refused"]),
    "select-teacher_runs_code_legacy_pickle": (S, lambda w, d: {"--teacher_dir": _evil(d, legacy=True)},
                                               ["evil.pth", "refused"]),
    "select-scores_of_another_pool": (S, lambda w, d: _scored_copy(w, d) or {"--data_imagenet": w.pool_b},
                                      ["another pool", "--force"]),
    "select-scores_of_another_teacher": (S, lambda w, d: _scored_copy(w, d) or {"--teacher_dir": w.teacher2},
                                         ["teacher checkpoint", "--force"]),
    "select-score_file_damaged": (S, lambda w, d: _scored_copy(w, d, drop_meta=True, garbage="value_out.pth"),
                                  ["value_out.pth", "not a readable score file"]),
    "select-selected_file_under_a_file": (S, lambda w, d: {"--selected_file": fx.write_bytes(d / "afile", b"x") / "s"},
                                          ["--selected_file", "cannot be written"]),
    "select-selected_file_in_use": (S, lambda w, d: {"cleanup": fx.hold_lock(d / "sel")}, ["in use", "pid 424242"]),
    "train-data_missing": (D, lambda w, d: {"--data_cifar": d / "nope"}, ["--data_cifar", "nope"]),
    "train-data_empty": (D, lambda w, d: (d / "empty").mkdir() or {"--data_cifar": d / "empty"}, ["empty"]),
    "train-data_corrupt": (D, lambda w, d: {"--data_cifar": _corrupt_cifar(w, d)}, ["test_batch"]),
    "train-pool_missing": (D, lambda w, d: {"--data_imagenet": d / "nope"}, ["--data_imagenet", "nope"]),
    "train-pool_without_images": (D, lambda w, d: {"--data_imagenet": _junk_pool(d)}, ["no image files"]),
    "train-num_select_zero": (D, lambda w, d: {"--num_select": 0}, ["--num_select"]),
    "train-num_select_above_pool": (D, lambda w, d: {"--num_select": 41}, ["--num_select 41"]),
    "train-nb_classes_mismatch": (D, lambda w, d: {"--nb_classes": 7}, ["--nb_classes"]),
    "train-teacher_name_mismatch": (D, lambda w, d: {"--teacher": "deit_small_patch4_32_teacher"}, ["does not fit"]),
    "train-student_mismatch": (D, lambda w, d: {"--student": "deit_tiny_patch4_28"}, ["--student deit_tiny_patch4_28"]),
    "train-teacher_truncated": (D, lambda w, d: {"--teacher_dir": fx.truncated_copy(w.teacher, d / "t.pth")},
                                ["not a readable"]),
    "train-teacher_runs_code": (D, lambda w, d: {"--teacher_dir": _evil(d)}, ["evil.pth", "refused"]),
    "train-scores_of_another_pool": (D, lambda w, d: _scored_copy(w, d) or {"--data_imagenet": w.pool_b},
                                     ["another pool"]),
    "train-output_dir_under_a_file": (D, lambda w, d: {"--output_dir": fx.write_bytes(d / "afile", b"x") / "o"},
                                      ["--output_dir", "cannot be written"]),
    "train-output_dir_in_use": (D, lambda w, d: {"cleanup": fx.hold_lock(d / "out")}, ["in use", "--output_dir"]),
    "train-resume_runs_code": (D, lambda w, d: {"--resume": _evil(d)}, ["evil.pth", "refused"]),
    "train-resume_not_a_checkpoint": (D, lambda w, d: {"--resume": _text(d)}, ["notes.pth", "not a readable"]),
    "train-resume_foreign_checkpoint": (D, lambda w, d: {"--resume": w.teacher}, ["not a last.pth"]),
    "train-resume_missing": (D, lambda w, d: {"--resume": d / "none.pth"}, ["--resume", "none.pth"]),
    "train-eval_only_runs_code": (D, lambda w, d: {"--eval_only": _evil(d)}, ["evil.pth", "refused"]),
    "train-eval_only_missing": (D, lambda w, d: {"--eval_only": d / "none.pth"}, ["--eval_only", "none.pth"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input(case, world, tmp_path, capsys):
    script, setup, expect = BAD_INPUT[case]
    d = tmp_path
    over = setup(world, d)
    cleanup = over.pop("cleanup", None)
    if "--eval_only" in over:   # it takes no training flags (they are refused beside it)
        flags = {"--data_cifar": world.cifar, "--workers": 0}
    else:
        flags = fx.select_flags(world, d / "sel") if script == S else fx.distill_flags(world, d)
    flags.update(over)
    before = fx.snapshot(world.base, d)
    capsys.readouterr()
    try:
        rc = fx.run_flags(script, flags)
    finally:
        if cleanup:
            cleanup()
    out, err = capsys.readouterr()
    lines = fx.error_lines(err)
    assert rc == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    for s in expect:
        assert s in lines[0], (s, lines[0])
    assert not (d / "marker").exists(), "a checkpoint ran code while loading"
    fx.assert_nothing_written(before, fx.snapshot(world.base, d), [d / "sel", d / "out"])


def test_bad_input_real_processes_print_one_line(world, tmp_path):
    """The same errors from real child processes: exit 2, one 'error:' line, no traceback."""
    teacher = fx.write_teacher(tmp_path / "tiny.pth")  # children only know the registered models
    evil = _evil(tmp_path)
    afile = fx.write_bytes(tmp_path / "afile", b"x")
    sel_flags = {"--data_imagenet": world.pool, "--teacher": fx.TEACHER, "--teacher_dir": evil, "--num_select": 8,
                 "--selected_file": tmp_path / "sel", "--workers": 0}
    train_flags = {**sel_flags, "--teacher_dir": teacher, "--data_cifar": world.cifar,
                   "--output_dir": afile / "out", "--selected_file": tmp_path / "sel2"}
    before = fx.snapshot(world.base, tmp_path)
    procs = [fx.start_script(S, *fx.argv(sel_flags)), fx.start_script(D, *fx.argv(train_flags))]
    results = [p.communicate(timeout=180) + (p.returncode,) for p in procs]
    for (out, err, rc), expect in zip(results, (["evil.pth", "refused"], ["--output_dir", "cannot be written"])):
        lines = fx.error_lines(err.decode())
        assert rc == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "Traceback" not in (out + err).decode()
        assert all(s in lines[0] for s in expect), lines[0]
    assert not (tmp_path / "marker").exists()
    fx.assert_nothing_written(before, fx.snapshot(world.base, tmp_path), [tmp_path / "sel", tmp_path / "sel2"])


@pytest.mark.parametrize("script", [S, D])
def test_num_select_above_usable_pool_writes_no_selection(script, world, tmp_path, capsys):
    """Known only after scoring: the valid score files stay (reused next time), nothing else is written."""
    ids = fx.write_pool(tmp_path / "pool", 15, size=32, broken=5)
    sel, out_dir = tmp_path / "sel", tmp_path / "out"
    flags = fx.select_flags(world, sel, **{"--data_imagenet": tmp_path / "pool", "--num_select": 12})
    if script == D:
        flags = fx.distill_flags(world, tmp_path, **flags)
    rc = fx.run_flags(script, flags)
    out, err = capsys.readouterr()
    lines = fx.error_lines(err)
    assert rc == 2, err
    assert "Traceback" not in out + err
    assert lines[-1].startswith("error: --num_select 12 is larger than the usable pool (10 images"), lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert sum(line.startswith("warning: skipped ") for line in lines) == 5   # the 5 broken files
    for name in ("value_out.pth", "pred_out.pth", "scores_meta.json", "skipped.txt"):
        assert (sel / name).exists(), name
    for name in ("selection.pt", "selected.txt", "class_weights.pth"):
        assert not (sel / name).exists(), name
    assert sorted(i for i, _ in pool.read_skipped(sel / "skipped.txt")) == sorted(ids["broken"])
    if script == D:
        assert sorted(os.listdir(out_dir)) == [".lock"]     # no student/, log.txt or args.json
        return
    # a fitting --num_select reuses the scores
    mtime = os.path.getmtime(sel / "value_out.pth")
    assert fx.run_flags(S, {**flags, "--num_select": 10}) == 0
    assert os.path.getmtime(sel / "value_out.pth") == mtime
    chosen = (sel / "selected.txt").read_text().split("\n")[:-1]
    assert sorted(chosen) == sorted(ids["good"])


# ---- 2. wild images ---------------------------------------------------------------------

def test_wild_pool_of_1000_scores_and_skips_exactly_the_broken(tmp_path, capsys):
    """Acceptance: 1,000 images, 5 % odd or broken: broken ones skipped (warned, listed, never
    selected), odd-but-valid ones (grey, palette, RGBA, CMYK, 16-bit, big, ...) scored."""
    ids = fx.write_pool(tmp_path / "pool", 1000, size=40, odd=25, broken=25)
    teacher = fx.write_teacher(tmp_path / "t.pth", name=fx.MICRO)
    sel = tmp_path / "sel"
    flags = {"--data_imagenet": tmp_path / "pool", "--teacher": fx.MICRO, "--teacher_dir": teacher,
             "--num_select": 970, "--selected_file": sel, "--attnprobe_sel": True, "--workers": 0,
             "--chunk_size": 256, "--score_batch_size": 128}
    capsys.readouterr()
    assert fx.run_flags(S, flags) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    skipped = dict(pool.read_skipped(sel / "skipped.txt"))
    assert sorted(skipped) == sorted(ids["broken"])
    assert any("decompression bomb" in r for r in skipped.values())
    # one warning line per skipped image up to the cap, then one summary line
    warned = [line for line in err.splitlines() if line.startswith("warning: skipped ")]
    assert len(warned) == scoring.WARN_SKIPPED_MAX
    assert all(line.split()[2].rstrip(":") in skipped for line in warned)
    summary = [line for line in err.splitlines() if "unreadable image(s) skipped" in line]
    assert len(summary) == 1 and "25 unreadable" in summary[0] and "5 more not shown" in summary[0]
    assert str(sel / "skipped.txt") in summary[0]
    # scores: finite for every decodable image, +inf / -1 for the broken ones
    index = pool.list_pool(tmp_path / "pool")
    pos = {name: i for i, name in enumerate(index.ids)}
    value = torch.load(sel / "value_out.pth", weights_only=True)
    pred = torch.load(sel / "pred_out.pth", weights_only=True)
    bad = torch.tensor([pos[i] for i in ids["broken"]])
    ok = torch.tensor([pos[i] for i in ids["good"] + ids["odd"]])
    assert len(value) == 1000 and torch.isinf(value[bad]).all() and (pred[bad] == -1).all()
    assert torch.isfinite(value[ok]).all() and (pred[ok] >= 0).all()
    for key in ("value_blk3", "value_blk7"):
        assert torch.isfinite(torch.load(sel / f"{key}.pth", weights_only=True)[ok]).all()
    chosen = (sel / "selected.txt").read_text().split("\n")[:-1]
    assert len(chosen) == 970 and not set(chosen) & set(ids["broken"])
    assert torch.load(sel / "selection.pt", weights_only=True)["ids"] == chosen


def test_wild_images_decoded_on_the_fly_and_pixel_limit(tmp_path, capsys, monkeypatch):
    """Same skips with and without the uint8 cache; an image over pool.MAX_PIXELS is skipped."""
    ids = fx.write_pool(tmp_path / "pool", 30, size=40, odd=14, broken=9)
    fx.write_bytes(tmp_path / "pool" / "large" / "legal_but_big.jpg",
                   fx.encode(fx.smooth_rgb(1500, 1500, 5), "JPEG", quality=80))
    monkeypatch.setattr(pool, "MAX_PIXELS", 1600 * 1200)   # the odd 1600x1200 JPEG still passes
    teacher = fx.write_teacher(tmp_path / "t.pth", name=fx.MICRO)
    base = {"--data_imagenet": tmp_path / "pool", "--teacher": fx.MICRO, "--teacher_dir": teacher,
            "--num_select": 5, "--workers": 0, "--chunk_size": 16}
    capsys.readouterr()
    assert fx.run_flags(S, {**base, "--selected_file": tmp_path / "direct", "--no_cache": True}) == 0
    err = capsys.readouterr().err
    assert fx.run_flags(S, {**base, "--selected_file": tmp_path / "cached"}) == 0
    want = sorted(ids["broken"] + ["large/legal_but_big.jpg"])
    for sel in ("direct", "cached"):
        skipped = dict(pool.read_skipped(tmp_path / sel / "skipped.txt"))
        assert sorted(skipped) == want
        assert "decompression bomb" in skipped["large/legal_but_big.jpg"]
    warned = [line for line in err.splitlines() if line.startswith("warning: skipped ")]
    assert len(warned) == 10
    assert [line for line in err.splitlines() if "unreadable image(s) skipped" in line][0].startswith(
        "warning: 10 unreadable image(s) skipped, never selected; list in ")
    for key in ("value_out", "value_blk3", "value_blk7", "pred_out"):
        a, b = (torch.load(tmp_path / sel / f"{key}.pth", weights_only=True) for sel in ("direct", "cached"))
        assert torch.allclose(a, b, atol=1e-6), key


# ---- 3. interruptions -------------------------------------------------------------------

def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


def _signal_self_when(module, name, monkeypatch, sig, when):
    """Wrap module.name so that, once when(*args) is true after a call, this process gets `sig`:
    a real signal through the handlers cli_main installed, at a known point of the run."""
    real = getattr(module, name)
    fired = []

    def wrapper(*a, **k):
        out = real(*a, **k)
        if not fired and when(*a, **k):
            fired.append(True)
            os.kill(os.getpid(), sig)
        return out
    monkeypatch.setattr(module, name, wrapper)
    return fired


def test_scoring_sigterm_then_sigkill_resumes_to_identical_scores(tmp_path, capsys, monkeypatch):
    fx.write_pool(tmp_path / "pool", 120, size=32, broken=4)
    teacher = fx.write_teacher(tmp_path / "teacher.pth")

    def flags(sel):
        return {"--data_imagenet": tmp_path / "pool", "--teacher": fx.TEACHER, "--teacher_dir": teacher,
                "--num_select": 50, "--selected_file": sel, "--attnprobe_sel": True, "--workers": 0,
                "--chunk_size": 6, "--score_batch_size": 6}
    assert fx.run_flags(S, flags(tmp_path / "ref")) == 0          # uninterrupted reference
    sel = tmp_path / "sel"
    chunks = sel / ".score_chunks"

    def done():
        return len(glob.glob(os.path.join(chunks, "chunk_*.pt")))

    # SIGTERM after the second chunk: a clean stop (exit 130, one message), finished chunks kept
    fired = _signal_self_when(scoring, "atomic_torch_save", monkeypatch, signal.SIGTERM,
                              lambda obj, path: os.path.basename(path) == "chunk_000001.pt")
    capsys.readouterr()
    assert fx.run_flags(S, flags(sel)) == 130 and fired
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert fx.error_lines(err)[-1] == "interrupted: finished work is saved; run the same command again to continue"
    assert done() == 2 and not (sel / "value_out.pth").exists()
    # SIGKILL of a real child process: at most the chunk in progress is lost
    with open(tmp_path / "o2", "w") as o, open(tmp_path / "e2", "w") as e:
        p = fx.start_script(S, *fx.argv(flags(sel)), stdout=o, stderr=e)
        fx.wait_for(lambda: done() >= 4, timeout=120, proc=p)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    assert "resuming scoring: 2 of 20 chunks already done" in _read(tmp_path / "o2")
    k = done()
    assert 4 <= k < 20
    for f in glob.glob(os.path.join(chunks, "chunk_*.pt")):
        torch.load(f, weights_only=True)                   # complete files only
    # the rerun scores only what is left and equals the uninterrupted run
    assert fx.run_flags(S, flags(sel)) == 0
    assert f"resuming scoring: {k} of 20 chunks already done" in capsys.readouterr().out
    assert not chunks.exists()
    for key in ("value_out", "value_blk3", "value_blk7", "pred_out"):
        a, b = (torch.load(d / f"{key}.pth", weights_only=True) for d in (sel, tmp_path / "ref"))
        assert torch.allclose(a, b, atol=1e-6) if a.is_floating_point() else torch.equal(a, b), key
    assert np.allclose(np.load(sel / "probs_out.npy"), np.load(tmp_path / "ref" / "probs_out.npy"), atol=1e-3)
    for name in ("skipped.txt", "selected.txt"):
        assert _read(sel / name) == _read(tmp_path / "ref" / name)


def test_scoring_cut_off_while_writing_score_files_is_resumed_not_trusted(world, tmp_path, capsys):
    """Score files without a fingerprint next to unfinished chunks are a killed run's, not a
    published cache: scoring resumes instead of reusing them."""
    sel = tmp_path / "sel"
    shutil.copytree(world.scored, sel)
    fingerprint = json.loads((sel / "scores_meta.json").read_text())
    os.unlink(sel / "scores_meta.json")
    os.makedirs(sel / ".score_chunks")
    assert scoring.scores_ready(str(sel), fingerprint, force=False) is False
    os.rmdir(sel / ".score_chunks")
    assert scoring.scores_ready(str(sel), fingerprint, force=False) is True  # published layout
    assert "without a fingerprint" in capsys.readouterr().out


def _epochs(log_path):
    recs = [json.loads(line) for line in open(log_path)]
    summary = os.path.join(os.path.dirname(log_path), "summary.json")
    return recs, json.load(open(summary)) if os.path.exists(summary) else None


def test_training_sigkill_then_sigint_resumes_identically(tmp_path, capsys, monkeypatch):
    fx.write_pool(tmp_path / "pool", 28, size=32, broken=3)
    fx.write_cifar(tmp_path / "cifar", n_train=2, n_test=16)
    teacher = fx.write_teacher(tmp_path / "teacher.pth")
    epochs = 3

    def flags(out):
        return {"--data_cifar": tmp_path / "cifar", "--data_imagenet": tmp_path / "pool", "--teacher": fx.TEACHER,
                "--teacher_dir": teacher, "--num_select": 16, "--selected_file": tmp_path / "sel",
                "--attnprobe_sel": True, "--attnprobe_dist": True, "--robust": True, "--output_dir": out,
                "--epochs": epochs, "--batch_size": 8, "--workers": 0}
    assert fx.run_flags(D, flags(tmp_path / "ref")) == 0             # uninterrupted reference (scores the pool once)
    out = tmp_path / "run"
    last = out / "student" / "last.pth"
    # SIGKILL of a real child once the first epoch's last.pth exists
    with open(tmp_path / "o1", "w") as o, open(tmp_path / "e1", "w") as e:
        p = fx.start_script(D, *fx.argv(flags(out)), stdout=o, stderr=e)
        fx.wait_for(last.exists, timeout=120, proc=p)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    k = checkpoint.load_resume(last)["epoch"]
    assert k < epochs - 1, "the child finished before it could be killed"
    # SIGINT in the middle of the next epoch (after its first step): exit 130, last.pth untouched
    fired = _signal_self_when(distill, "distill_step", monkeypatch, signal.SIGINT, lambda *a, **kw: True)
    before = fx.snapshot(out / "student")
    capsys.readouterr()
    assert fx.run_flags(D, flags(out)) == 130 and fired
    monkeypatch.undo()
    o, err = capsys.readouterr()
    assert f"resumed from {last} after epoch {k}" in o
    assert "Traceback" not in o + err and fx.error_lines(err)[-1].startswith("interrupted: "), err
    assert fx.snapshot(out / "student") == before
    # the last rerun finishes; every number equals the uninterrupted run's
    assert fx.run_flags(D, flags(out)) == 0
    assert f"resumed from {last} after epoch {k}" in capsys.readouterr().out
    got, got_final = _epochs(out / "log.txt")
    ref, ref_final = _epochs(tmp_path / "ref" / "log.txt")
    assert [r["epoch"] for r in got] == list(range(epochs)) and got_final is not None
    for a, b in zip(got, ref):
        for key in b:
            if key.endswith(("seconds", "img_per_s")):
                continue
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["epoch"], key)
    assert got_final["final_acc1"] == ref_final["final_acc1"]
    a, b = checkpoint.load_resume(last)["model"], checkpoint.load_resume(tmp_path / "ref" / "student" / "last.pth")["model"]
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in b)
    assert not [n for n in os.listdir(out / "student") if n.startswith(".tmp-")]


def test_run_lock_refuses_a_second_run_and_nests_in_one(tmp_path):
    """Another holder (another process, or another open of the file) is refused; the same process
    may lock a folder twice (--selected_file equal to --output_dir)."""
    with RunLock(tmp_path, "--selected_file"):
        with RunLock(tmp_path):             # nested: no self-refusal
            pass
        other = open(tmp_path / ".lock", "a+")
        with pytest.raises(BlockingIOError):       # still held after the nested exit
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.close()
    release = fx.hold_lock(tmp_path)
    with pytest.raises(utils.InputError, match=r"in use by another run \(pid 424242.*--selected_file"):
        RunLock(tmp_path, "--selected_file").__enter__()
    release()
    with RunLock(tmp_path):                 # free again
        pass


def test_atomic_save_interrupted_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    safety.atomic_torch_save({"epoch": 1}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask   # not mkstemp's 0600: caches are shared

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        safety.atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pth"]


# ---- 4. untrusted files: also rows of BAD_INPUT (teacher, --resume, --eval_only) ---------

def test_code_pickles_never_run(tmp_path):
    import models
    for legacy in (False, True):
        evil = fx.write_code_pickle(tmp_path / f"evil{legacy}.pth", tmp_path / "marker", legacy=legacy)
        with pytest.raises(utils.InputError, match="refused"):
            models.read_checkpoint(evil)
        with pytest.raises(utils.InputError, match="refused"):
            checkpoint.load_resume(evil)
        with pytest.raises(utils.InputError):
            scoring.load_score_file(evil)
    assert not (tmp_path / "marker").exists()
