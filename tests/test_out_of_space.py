"""Out of disk and preempted (docs/failures.md): a full disk ends a run with one `error:` line naming the
file and exit 1, nothing half-written is left where a reader would take it for whole, and the same
command rerun after space is freed ends as a run that never failed; SIGTERM stops a run at a safe
point and the rerun continues to an uninterrupted run's log.

The disks fill up for real: small tmpfs mounts (root only; skipped elsewhere), filled at a chosen
moment of the run by a file that takes every free byte. One test (a log line cut off after its
checkpoint) makes the write itself fail, since a line of a few hundred bytes still fits in the last
page of a full tmpfs.
"""
import errno
import glob
import json
import os
import signal
import subprocess

import numpy as np
import pytest
import torch

import checkpoint
import fixtures as fx
import safety
import scoring

S, D, T = "select_data.py", "DFND_DeiT-train.py", "train_teacher.py"
TIMINGS = ("seconds", "img_per_s")
fx.register_test_models()
pytestmark = pytest.mark.usefixtures("one_thread_module")   # as the children: identical float results


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(name, size) -> a folder that is a tmpfs of `size` (e.g. '64k'), unmounted afterwards."""
    mounted = []

    def make(name, size):
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(path)
        return path
    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder):
    """Take every free byte of `folder`'s filesystem; free() gives them back."""
    filler = os.path.join(folder, ".filler")
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, safety.free_bytes(folder))
    finally:
        os.close(fd)
    assert safety.free_bytes(folder) == 0
    return lambda: os.unlink(filler)


def fill_when(monkeypatch, module, name, folder, when, after=True):
    """Wrap module.name: the first call for which when(*args) is true fills `folder`'s disk (after the
    call by default, else before it). Returns a function that frees the space again."""
    real = getattr(module, name)
    freed = []

    def wrapper(*a, **k):
        hit = not freed and when(*a, **k)
        if hit and not after:
            freed.append(fill(folder))
        out = real(*a, **k)
        if hit and after:
            freed.append(fill(folder))
        return out
    monkeypatch.setattr(module, name, wrapper)

    def free():
        assert freed, "the disk was never filled: the test proves nothing"
        freed[0]()
    return free


def leftovers(*folders):
    """Temp files of a save that did not finish."""
    return [p for f in folders for p in glob.glob(os.path.join(f, "**", ".tmp-*"), recursive=True)]


def run(script, flags, capsys):
    capsys.readouterr()
    code = fx.run_script_inprocess(script, *fx.argv(flags))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def same_log(got_path, want_path):
    got = [json.loads(line) for line in open(got_path)]
    want = [json.loads(line) for line in open(want_path)]
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            if not key.endswith(TIMINGS):
                assert g[key] == pytest.approx(w[key], abs=1e-6), (w["epoch"], key)


# ---- the image cache and the scores --------------------------------------------------------

@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A pool, a teacher and an uninterrupted scoring run to compare with."""
    base = tmp_path_factory.mktemp("scored")
    fx.write_pool(base / "pool", 40, size=32, broken=2)
    teacher = fx.write_teacher(base / "teacher.pth", fx.TEACHER)
    flags = select_flags(base, base / "ref")
    assert fx.run_script_inprocess(S, *fx.argv(flags)) == 0
    return base


def select_flags(base, sel, **over):
    return {"--data_imagenet": base / "pool", "--teacher": fx.TEACHER, "--teacher_dir": base / "teacher.pth",
            "--num_select": 12, "--selected_file": sel, "--attnprobe_sel": True, "--workers": 0,
            "--chunk_size": 8, "--score_batch_size": 8, **over}


def same_selection(sel, ref):
    assert (sel / "selected.txt").read_text() == (ref / "selected.txt").read_text()
    assert (sel / "skipped.txt").read_text() == (ref / "skipped.txt").read_text()
    for key in ("value_out", "value_blk3", "pred_out"):
        a, b = (torch.load(d / f"{key}.pth", weights_only=True) for d in (sel, ref))
        assert torch.allclose(a.double(), b.double(), atol=1e-6), key
    assert np.allclose(np.load(sel / "probs_out.npy"), np.load(ref / "probs_out.npy"), atol=1e-3)


def test_cache_without_room_is_refused_before_decoding(scored, small_disk, tmp_path, capsys):
    """Was: SIGBUS (exit 135, no message) on the first cache page the disk could not back. A real child
    process: a signal would show as its exit code."""
    disk = small_disk("disk", "64k")                   # the cache needs 40 x 32 x 32 x 3 = 122,880 bytes
    cache = disk / "cache"
    flags = select_flags(scored, tmp_path / "sel", **{"--cache_dir": cache})
    done = fx.run_script(S, *fx.argv(flags), timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    last = fx.error_lines(done.stderr)[-1]
    assert last.startswith(f"error: not enough space in {cache} for the image cache: needs 122,880 bytes "), last
    assert "bytes free; " in last and "--cache_dir" in last and "--no_cache" in last
    assert not os.listdir(disk)                       # no half cache left behind
    assert not (tmp_path / "sel" / "selection.pt").exists()
    # space freed: the same command finishes with the uninterrupted run's selection
    subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
    code, _, err = run(S, flags, capsys)
    assert code == 0, err
    same_selection(tmp_path / "sel", scored / "ref")


@pytest.mark.parametrize("moment", ["chunk", "score_files"])
def test_disk_full_while_scoring_resumes_to_the_same_selection(scored, small_disk, monkeypatch, capsys, moment):
    """The disk fills after two of five chunks, or just before the score files are written."""
    sel = small_disk("sel", "4m")
    flags = select_flags(scored, sel)
    # the scoring pass writes its chunks and score files through scoring.atomic_torch_save
    if moment == "chunk":
        free = fill_when(monkeypatch, scoring, "atomic_torch_save", sel,
                         lambda obj, path: os.path.basename(path) == "chunk_000001.pt")
        failed = sel / ".score_chunks" / "chunk_000002.pt"
    else:
        free = fill_when(monkeypatch, scoring, "atomic_torch_save", sel,
                         lambda obj, path: os.path.basename(path) == "value_out.pth", after=False)
        failed = sel / "value_out.pth"
    code, _, err = run(S, flags, capsys)
    monkeypatch.undo()
    assert code == 1
    assert fx.error_lines(err)[-1] == (f"error: cannot write {failed}: No space left on device; free space there "
                                       "and run the same command again to continue")
    assert not leftovers(sel) and not failed.exists()
    assert not (sel / "scores_meta.json").exists() and not (sel / "selection.pt").exists()
    chunks = sorted(glob.glob(str(sel / ".score_chunks" / "chunk_*.pt")))
    assert len(chunks) == (2 if moment == "chunk" else 5)
    for path in chunks:
        torch.load(path, weights_only=True)          # whole files only
    free()
    code, out, err = run(S, flags, capsys)
    assert code == 0, err
    assert f"resuming scoring: {len(chunks)} of 5 chunks already done" in out
    same_selection(sel, scored / "ref")


def test_score_arrays_without_room_are_refused_before_scoring(scored, small_disk, capsys):
    """probs_out.npy and prelogits_out.npy are written through memory maps: reserved before the first
    image is scored, else the first page the disk cannot back is a SIGBUS."""
    sel = small_disk("sel", "16k")
    code, _, err = run(S, select_flags(scored, sel, **{"--no_cache": True, "--store_signals": True}), capsys)
    assert code == 1
    assert fx.error_lines(err)[-1].startswith(f"error: not enough space in {sel} for ")
    assert "choose another --selected_file" in err
    assert not glob.glob(str(sel / ".score_chunks" / "chunk_*"))


# ---- checkpoints and logs -------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Uninterrupted 3-epoch runs of distillation and teacher training (tiny in-process models)."""
    base = tmp_path_factory.mktemp("trained")
    fx.write_pool(base / "pool", 30, size=32)
    fx.write_cifar(base / "cifar", n_train=8, n_test=16)
    fx.write_teacher(base / "teacher.pth", fx.MICRO)
    assert fx.run_script_inprocess(D, *fx.argv(distill_flags(base, base / "ref"))) == 0
    assert fx.run_script_inprocess(T, *fx.argv(teacher_flags(base, base / "ref_teacher" / "t.pth"))) == 0
    return base


def distill_flags(base, out):
    return {"--data_cifar": base / "cifar", "--data_imagenet": base / "pool", "--teacher": fx.MICRO,
            "--teacher_dir": base / "teacher.pth", "--student": fx.MICRO, "--num_select": 16,
            "--selected_file": base / "sel", "--attnprobe_sel": True, "--attnprobe_dist": True,
            "--output_dir": out, "--epochs": 3, "--batch_size": 8, "--workers": 0}


def teacher_flags(base, output):
    return {"--dataset": "cifar10", "--data": base / "cifar", "--model": fx.MICRO, "--output": output,
            "--epochs": 3, "--batch_size": 8, "--workers": 0, "--device": "cpu", "--warmup_epochs": 1}


CASES = {  # script, flags, log, resume point, reference log
    "distill": (D, lambda b, d: distill_flags(b, d), "log.txt", "student/last.pth", "ref/log.txt"),
    "teacher": (T, lambda b, d: teacher_flags(b, d / "t.pth"), "t.log.txt", "t.last.pth",
                "ref_teacher/t.log.txt"),
}


@pytest.mark.parametrize("case", CASES)
def test_disk_full_at_a_checkpoint_resumes_to_the_same_log(trained, small_disk, monkeypatch, capsys, case):
    """The disk fills after epoch 0 is logged: epoch 1's checkpoint cannot be written. One error line,
    exit 1, the log holds no epoch that no checkpoint backs, and the rerun ends with the reference log."""
    script, flags_of, log, last, ref_log = CASES[case]
    out = small_disk("out", "16m")
    flags = flags_of(trained, out)
    free = fill_when(monkeypatch, checkpoint, "append_line", out, lambda path, line: json.loads(line)["epoch"] == 0)
    code, _, err = run(script, flags, capsys)
    monkeypatch.undo()
    assert code == 1
    line = fx.error_lines(err)[-1]
    assert line.startswith(f"error: cannot write {out}/") and line.endswith(
        ".pth: No space left on device; free space there and run the same command again to continue"), line
    assert [json.loads(r)["epoch"] for r in open(out / log)] == [0]
    assert checkpoint.load_resume(out / last)["epoch"] == 0
    assert not leftovers(out)
    free()
    code, o, err = run(script, flags, capsys)
    assert code == 0, err
    assert f"resumed from {out / last} after epoch 0" in o
    same_log(out / log, trained / ref_log)


class _Killed(BaseException):
    """A SIGKILL's effect, deterministic: the process stops where it stands, no handler runs."""


@pytest.mark.parametrize("case", CASES)
def test_killed_before_the_first_log_line_resumes_to_the_same_log(trained, tmp_path, monkeypatch, capsys, case):
    """Killed between epoch 0's checkpoint and its log line, before log.txt exists at all: the rerun
    resumes after epoch 0 and writes that epoch's line from the checkpoint (it once went missing)."""
    script, flags_of, log, last, ref_log = CASES[case]
    out = tmp_path / "out"
    flags = flags_of(trained, out)

    def killed(path, line):
        raise _Killed
    monkeypatch.setattr(checkpoint, "append_line", killed)
    with pytest.raises(_Killed):
        fx.run_script_inprocess(script, *fx.argv(flags))
    monkeypatch.undo()
    assert not os.path.exists(out / log) and checkpoint.load_resume(out / last)["epoch"] == 0
    code, o, err = run(script, flags, capsys)
    assert code == 0, err
    assert f"resumed from {out / last} after epoch 0" in o
    same_log(out / log, trained / ref_log)


def test_a_checkpoint_of_another_folder_lends_no_log_line(tmp_path):
    """--resume of another run's last.pth: its saved line belongs to that run's log, never this one's."""
    ckpt = {"record": {"epoch": 0}}
    own, other = tmp_path / "own.pth", tmp_path / "other.pth"
    other.write_bytes(b"x")
    assert checkpoint.own_record(ckpt, other, own) is None       # this folder has no resume file yet
    own.write_bytes(b"x")
    assert checkpoint.own_record(ckpt, other, own) is None
    assert checkpoint.own_record(ckpt, own, own) == {"epoch": 0}
    assert checkpoint.own_record(ckpt, tmp_path / "." / "own.pth", own) == {"epoch": 0}
    assert checkpoint.own_record(None, own, own) is None


class _CutOffWrite:
    """A file whose next write stores half its bytes, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        self.f.write(text[:len(text) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_log_line_cut_off_after_its_checkpoint_is_restored_on_resume(trained, tmp_path, monkeypatch, capsys):
    """Epoch 1's checkpoint is saved but its log line fails half-way: the torn half is taken back
    (the log stays the epochs before), and the rerun restores the line from the checkpoint."""
    out = tmp_path / "out"
    flags = distill_flags(trained, out)
    cut = []

    def opener(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        if mode == "a" and not cut and os.path.exists(out / "student" / "last.pth") and \
                checkpoint.load_resume(out / "student" / "last.pth")["epoch"] == 1:
            cut.append(path)
            return _CutOffWrite(f)
        return f
    monkeypatch.setattr(safety, "open", opener, raising=False)
    code, _, err = run(D, flags, capsys)
    monkeypatch.undo()
    assert code == 1 and cut
    assert fx.error_lines(err)[-1].startswith(f"error: cannot write {out / 'log.txt'}: No space left on device")
    assert [json.loads(r)["epoch"] for r in open(out / "log.txt")] == [0]   # no torn line
    assert checkpoint.load_resume(out / "student" / "last.pth")["epoch"] == 1
    code, o, err = run(D, flags, capsys)
    assert code == 0, err
    assert f"after epoch 1" in o
    same_log(out / "log.txt", trained / "ref" / "log.txt")


def test_log_line_on_a_full_disk_is_taken_back(small_disk):
    """A real full disk under safety.append_line: a 4 KiB tmpfs whose one page the log already fills."""
    disk = small_disk("log", "4k")
    path = disk / "log.txt"
    first = {"epoch": 0, "pad": ""}
    first["pad"] = "x" * (4096 - len(json.dumps(first) + "\n"))
    safety.append_line(path, json.dumps(first))
    with pytest.raises(safety.OutOfSpace, match=f"cannot write {path}: No space left on device"):
        safety.append_line(path, json.dumps({"epoch": 1}))
    assert [json.loads(r) for r in open(path)] == [first]


# ---- preemption ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preempt(tmp_path_factory):
    """Data for real child processes (registered model names only) and uninterrupted reference runs."""
    base = tmp_path_factory.mktemp("preempt")
    fx.write_pool(base / "pool", 120, size=32)
    fx.write_cifar(base / "cifar", n_train=24, n_test=16)   # 120 train images: 15 steps an epoch
    fx.write_teacher(base / "teacher.pth", fx.TEACHER)
    return base


def child_flags(base, kind, out):
    if kind == "teacher":
        return {"--dataset": "cifar10", "--data": base / "cifar", "--model": fx.TEACHER, "--output": out / "t.pth",
                "--epochs": 3, "--batch_size": 8, "--workers": 0, "--device": "cpu", "--warmup_epochs": 1}
    return {"--data_cifar": base / "cifar", "--data_imagenet": base / "pool", "--teacher": fx.TEACHER,
            "--teacher_dir": base / "teacher.pth", "--num_select": 96, "--selected_file": base / "sel",
            "--attnprobe_sel": True, "--attnprobe_dist": True, "--robust": True, "--output_dir": out,
            "--epochs": 3, "--batch_size": 8, "--workers": 0, "--device": "cpu"}


@pytest.mark.parametrize("kind", ["distill", "teacher"])
def test_sigterm_mid_epoch_then_rerun_gives_the_uninterrupted_log(preempt, tmp_path, capsys, kind):
    """SIGTERM (what SLURM and Kubernetes send before SIGKILL) to a real child in the middle of epoch 1
    or later: exit 130 with one message, the last finished epoch kept; the rerun's log equals an
    uninterrupted run's, timings aside."""
    script = D if kind == "distill" else T
    log, last = ("log.txt", "student/last.pth") if kind == "distill" else ("t.log.txt", "t.last.pth")
    ref = tmp_path / "ref"   # in this process, one thread as the child: the same numbers, no 7 s start-up
    assert fx.run_script_inprocess(script, *fx.argv(child_flags(preempt, kind, ref))) == 0
    out = tmp_path / "run"
    with open(tmp_path / "o", "w") as o, open(tmp_path / "e", "w") as e:
        # the progress bar of epoch 1 on stderr: training is under way past epoch 0's save
        p = fx.start_script(script, *fx.argv(child_flags(preempt, kind, out)), stdout=o, stderr=e)
        fx.wait_for(lambda: f"{kind} 1:" in (tmp_path / "e").read_text(errors="replace"),
                    timeout=300, interval=0.01, proc=p)
        p.send_signal(signal.SIGTERM)
        code = p.wait(timeout=120)
    err = (tmp_path / "e").read_text()
    assert code == 130, err
    assert "Traceback" not in err
    assert fx.error_lines(err)[-1].endswith(
        "interrupted: finished work is saved; run the same command again to continue")
    saved = checkpoint.load_resume(out / last)["epoch"]
    assert saved < 2, "the run finished before SIGTERM: the test proves nothing"
    assert [json.loads(r)["epoch"] for r in open(out / log)] == list(range(saved + 1))
    code, o, err = run(script, child_flags(preempt, kind, out), capsys)
    assert code == 0, err
    assert f"after epoch {saved}" in o
    same_log(out / log, ref / log)


# ---- torchrun ------------------------------------------------------------------------------

def test_disk_full_on_rank0_ends_every_rank(scored, small_disk, tmp_path):
    """2 gloo processes as torchrun starts them: rank 0 builds the cache, which has no room. Both ranks
    end with exit 1; none waits at a barrier or dies of a lost peer."""
    disk = small_disk("disk", "64k")
    flags = {**select_flags(scored, tmp_path / "sel", **{"--cache_dir": disk / "cache"}), "--device": "cpu"}
    codes, errs = fx.run_ranks(S, fx.argv(flags), tmp_path)
    assert codes == [1, 1], errs
    assert all("Traceback" not in e for e in errs)
    assert fx.error_lines(errs[0])[-1].startswith(f"error: not enough space in {disk / 'cache'} for the image cache")


def test_full_output_folder_at_start_is_out_of_space_not_bad_input(small_disk):
    disk = small_disk("full", "4k")
    fill(disk)
    with pytest.raises(safety.OutOfSpace, match=f"--output_dir {disk}/run: No space left on device; free space "
                                               "there or choose another --output_dir"):
        safety.check_writable(str(disk / "run"))


def test_sigterm_during_a_checkpoint_write_acts_after_it(tmp_path):
    """checkpoint.commit_epoch's guard: SIGTERM inside it is held until the checkpoint and the log line are
    both written, then stops the run as cli_main's handler does."""
    saved = signal.signal(signal.SIGTERM, safety._raise_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            def save():
                os.kill(os.getpid(), signal.SIGTERM)
                safety.atomic_torch_save({"epoch": 0}, tmp_path / "last.pth")
            checkpoint.commit_epoch(tmp_path / "log.txt", {"epoch": 0}, save)
        assert torch.load(tmp_path / "last.pth", weights_only=True) == {"epoch": 0}
        assert [json.loads(r) for r in open(tmp_path / "log.txt")] == [{"epoch": 0}]
        assert signal.getsignal(signal.SIGTERM) is safety._raise_interrupt
    finally:
        signal.signal(signal.SIGTERM, saved)
