"""train_teacher.py saves a resume point every epoch: a killed run continues where it stopped and ends
with the weights and log of an uninterrupted run; changed settings are refused; --resume no starts
a fresh log."""
import json
import signal

import pytest
import torch

import fixtures as fx

MODEL = "deit_tiny_patch4_32_teacher"


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_data")
    fx.write_cifar(root, n_train=16, n_test=40)
    return root


def argv(cifar, out, *extra, epochs=4):
    return ["--dataset", "cifar10", "--data", cifar, "--model", MODEL, "--output", out, "--epochs", epochs,
            "--batch_size", 16, "--workers", 0, "--device", "cpu", "--warmup_epochs", 1, "--log_every", 1, *extra]


def log_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_teacher_run_resumes_to_the_uninterrupted_result(cifar, tmp_path):
    ref = tmp_path / "ref" / "teacher.pth"
    done = fx.run_script("train_teacher.py", *argv(cifar, ref), timeout=300)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "cut" / "teacher.pth"
    log = tmp_path / "cut" / "teacher.log.txt"
    proc = fx.start_script("train_teacher.py", *argv(cifar, out))
    last = tmp_path / "cut" / "teacher.last.pth"
    fx.wait_for(lambda: last.exists() and torch.load(last, weights_only=True)["epoch"] >= 1,
                timeout=240, interval=0.05, proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it was killed: the test proves nothing"
    saved = torch.load(tmp_path / "cut" / "teacher.last.pth", weights_only=True)["epoch"]
    assert 1 <= saved < 3

    again = fx.run_script("train_teacher.py", *argv(cifar, out), timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {tmp_path / 'cut' / 'teacher.last.pth'} after epoch {saved}" in again.stdout
    got, want = log_records(log), log_records(tmp_path / "ref" / "teacher.log.txt")
    assert [r["epoch"] for r in got] == [0, 1, 2, 3]
    for g, w in zip(got, want):
        for key in ("train_lr", "train_loss", "test_loss", "test_acc1", "test_acc5", "n_parameters"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), key
    a, b = torch.load(out, weights_only=True), torch.load(ref, weights_only=True)
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6) for k in a["model"])
    assert a["acc1"] == pytest.approx(b["acc1"])

    # a finished run: rerunning does no more epochs
    third = fx.run_script("train_teacher.py", *argv(cifar, out), timeout=300)
    assert third.returncode == 0 and "already finished" in third.stdout
    assert len(log_records(log)) == 4


def test_changed_settings_are_refused_and_resume_no_starts_a_fresh_log(cifar, tmp_path, capsys):
    out = tmp_path / "t" / "teacher.pth"
    assert fx.run_script_inprocess("train_teacher.py", *argv(cifar, out, epochs=1)) == 0
    capsys.readouterr()
    rc = fx.run_script_inprocess("train_teacher.py", *argv(cifar, out, "--lr", "0.01", "--weight_decay", "0.1",
                                                           epochs=1))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:")
    assert "--lr" in err[0] and "--weight_decay" in err[0] and "--resume no" in err[0]
    # a longer cosine run would rewrite the learning rates already used: refused, saying why
    rc = fx.run_script_inprocess("train_teacher.py", *argv(cifar, out, epochs=2))
    assert rc == 2 and "--epochs" in capsys.readouterr().err
    # --resume no: a new run with its own log; the old log is kept beside it
    assert fx.run_script_inprocess("train_teacher.py", *argv(cifar, out, "--resume", "no", "--lr", "0.01",
                                                              epochs=1)) == 0
    assert [r["epoch"] for r in log_records(tmp_path / "t" / "teacher.log.txt")] == [0]
    assert [r["epoch"] for r in log_records(tmp_path / "t" / "teacher.log.1.txt")] == [0]
    assert (tmp_path / "t" / "teacher.curves.png").stat().st_size > 0   # beside its log
    assert json.loads((tmp_path / "t" / "teacher.args.json").read_text())["lr"] == 0.01
