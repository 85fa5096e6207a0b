"""Resuming DFND_DeiT-train.py the way DeiT/timm users expect: a rerun that would change the run is
refused naming the flags; --epochs extends a step-schedule run but not a cosine one; --resume no
starts a fresh log and keeps the old run's files beside it."""
import json

import pytest
import torch

import fixtures as fx


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return fx.write_run_inputs(tmp_path_factory.mktemp("resume_rules"))


def argv(world, out, *extra):
    return fx.small_distill_argv(world, out, *extra)


def run(world, out, *extra):
    return fx.run_script_inprocess("DFND_DeiT-train.py", *map(str, argv(world, out, *extra)))


def log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_changed_settings_are_refused_naming_the_flags(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(world, out, "--epochs", 1) == 0
    args_before = (out / "args.json").read_text()
    capsys.readouterr()
    assert run(world, out, "--epochs", 1, "--patchattn", 0.1, "--cos", "--weight_decay", 0.5) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    for flag in ("--patchattn 0.8 (now 0.1)", "--cos False (now True)", "--weight_decay 0.025 (now 0.5)",
                 "--resume no"):
        assert flag in err[0]
    assert (out / "args.json").read_text() == args_before        # still describes the run
    # settings that cannot change the run: accepted, the finished run is only reported again
    assert run(world, out, "--epochs", 1, "--num_workers", 0, "--log_every", 7, "--eval_every", 3) == 0
    assert "resumed from" in capsys.readouterr().out


def test_epochs_extend_a_step_schedule_run_exactly(world, tmp_path, capsys):
    assert run(world, tmp_path / "short", "--epochs", 1) == 0
    assert run(world, tmp_path / "short", "--epochs", 3) == 0
    assert "extended from 1 to 3 epochs" in capsys.readouterr().out
    assert run(world, tmp_path / "straight", "--epochs", 3) == 0
    got, want = log(tmp_path / "short"), log(tmp_path / "straight")
    assert [r["epoch"] for r in got] == [0, 1, 2]
    for g, w in zip(got, want):
        for key in ("train_lr", "train_loss", "test_loss", "test_acc1"):
            assert g[key] == pytest.approx(w[key], abs=1e-6), key
    # ending before the epochs already trained is refused
    assert run(world, tmp_path / "short", "--epochs", 2) == 2
    assert "already trained 3 epochs" in capsys.readouterr().err


def test_epochs_cannot_extend_a_cosine_run(world, tmp_path, capsys):
    assert run(world, tmp_path / "cos", "--epochs", 1, "--cos") == 0
    capsys.readouterr()
    assert run(world, tmp_path / "cos", "--epochs", 2, "--cos") == 2
    err = capsys.readouterr().err
    assert "--cos run of 1 epochs" in err and "pass --epochs 1" in err and "--resume no" in err
    assert [r["epoch"] for r in log(tmp_path / "cos")] == [0]


def test_resume_no_starts_a_fresh_log_and_keeps_the_old_run(world, tmp_path):
    out = tmp_path / "out"
    assert run(world, out, "--epochs", 1) == 0
    first = torch.load(out / "student" / "final.pth", weights_only=True)["model"]
    assert run(world, out, "--epochs", 1, "--resume", "no", "--seed", 1) == 0
    assert [r["epoch"] for r in log(out)] == [0]
    old = [json.loads(line) for line in (out / "log.1.txt").read_text().splitlines()]
    assert [r["epoch"] for r in old] == [0]
    assert json.loads((out / "args.json").read_text())["seed"] == 1
    assert json.loads((out / "args.1.json").read_text())["seed"] == 0
    kept = torch.load(out / "student.1" / "final.pth", weights_only=True)["model"]
    assert all(torch.equal(kept[k], first[k]) for k in first)
    assert (out / "summary.json").exists() and (out / "summary.1.json").exists()
