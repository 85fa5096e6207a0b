"""The run conventions DeiT and timm users expect: `--config RUN/args.json` reruns a run (command-line flags win),
every record names the code that wrote it (git, torch, timm), a resume restores the CUDA random state, and the
curves picture is no part of an epoch's commit."""
import json
import shutil

import pytest
import torch

import fixtures as fx
import utils

D, S, T = "DFND_DeiT-train.py", "select_data.py", "train_teacher.py"
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return fx.write_run_inputs(tmp_path_factory.mktemp("conventions"))


def distill_argv(world, out, *extra):
    return fx.small_distill_argv(world, out, "--no_report", *extra)


def run(script, *argv):
    return fx.run_script_inprocess(script, *map(str, argv))


def log(path):
    """A JSON-lines log without its wall times."""
    return [{k: v for k, v in json.loads(line).items() if "seconds" not in k and "per_s" not in k}
            for line in path.read_text().splitlines()]


def args_json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def first_run(world):
    """A distillation of 2 epochs, run from the command line."""
    out = world / "first"
    assert run(D, *distill_argv(world, out, "--epochs", 2, "--seed", 3)) == 0
    return out


# ---- provenance -------------------------------------------------------------------------------------

def test_records_name_their_code_and_a_resume_after_a_commit_continues(world, first_run, tmp_path, capsys):
    """args.json, every checkpoint and selection.pt record the git commit (and whether the checkout differed from
    it), torch and timm; a resume of a run whose records name another commit continues it."""
    want = utils.provenance()
    assert want["git"] and isinstance(want["git_dirty"], bool)   # the tests run in a git checkout
    assert want["torch"] == torch.__version__ and want["timm"]
    assert args_json(first_run / "args.json")["provenance"] == want
    for name in ("student/last.pth", "student/final.pth", "student/checkpoint.pth", "selection.pt"):
        assert torch.load(first_run / name, weights_only=True)["provenance"] == want, name
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    older = {**want, "git": "0" * 40, "git_dirty": True, "torch": "2.0.0"}
    last = torch.load(out / "student" / "last.pth", weights_only=True)
    torch.save({**last, "provenance": older}, out / "student" / "last.pth")
    (out / "args.json").write_text(json.dumps({**args_json(out / "args.json"), "provenance": older}))
    capsys.readouterr()
    assert run(D, *distill_argv(world, out, "--epochs", 3, "--seed", 3)) == 0
    assert f"resumed from {out / 'student' / 'last.pth'} after epoch 1" in capsys.readouterr().out
    assert [r["epoch"] for r in log(out / "log.txt")] == [0, 1, 2]
    assert torch.load(out / "student" / "last.pth", weights_only=True)["provenance"] == want
    assert args_json(out / "args.json")["provenance"] == want


# ---- --config ----------------------------------------------------------------------------------------

def test_config_replays_a_distill_run_and_the_command_line_wins(world, first_run, tmp_path, capsys):
    """--config RUN/args.json, with another --output_dir, is the same run: the same settings and log numbers
    (the resolved values args.json records, e.g. the teacher's name, mean and the selection size, replay as
    flags); a flag given beside it wins over its value."""
    assert run(D, "--config", first_run / "args.json", "--output_dir", tmp_path / "again") == 0
    assert log(tmp_path / "again" / "log.txt") == log(first_run / "log.txt")
    old, new = args_json(first_run / "args.json"), args_json(tmp_path / "again" / "args.json")
    differ = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    assert differ <= {"output_dir", "config", "provenance"} and new["config"] == str(first_run / "args.json")
    # the command line wins: --epochs and --lr_S replace the config's
    assert run(D, "--config", first_run / "args.json", "--output_dir", tmp_path / "other", "--epochs", 1,
               "--lr_S", 0.002) == 0
    records = log(tmp_path / "other" / "log.txt")
    assert [r["epoch"] for r in records] == [0] and records[0]["train_lr"] == 0.002
    assert args_json(tmp_path / "other" / "args.json")["seed"] == 3   # and the rest is the config's
    # --eval_only beside it: the config's flags that --eval_only does not read are dropped, not refused
    capsys.readouterr()
    assert run(D, "--config", first_run / "args.json", "--eval_only", first_run / "student" / "final.pth") == 0
    tested = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tested["acc1"] == log(first_run / "log.txt")[-1]["test_acc1"]


def test_config_of_a_selecting_run_trains_on_a_selection_file_and_replays(world, first_run, tmp_path, capsys):
    """--selection_file beside a config of a run that selected: the config's selection flags, which the file
    makes unused, are dropped rather than refused; that run's own args.json then replays it."""
    sel_run = tmp_path / "from_file"
    assert run(D, "--config", first_run / "args.json", "--selection_file", first_run / "selection.pt",
               "--output_dir", sel_run, "--epochs", 1) == 0
    recorded = args_json(sel_run / "args.json")
    assert recorded["selection_file"] == str(first_run / "selection.pt") and recorded["attnprobe_sel"] is False
    assert recorded["attnprobe_dist"] is True   # not a selection flag: kept from the config
    kept = torch.load(first_run / "selection.pt", weights_only=True)["indices"]
    assert torch.equal(torch.load(sel_run / "selection.pt", weights_only=True)["indices"], kept)
    # a config from a --selection_file run replays it
    assert run(D, "--config", sel_run / "args.json", "--output_dir", tmp_path / "replayed") == 0
    assert log(tmp_path / "replayed" / "log.txt") == log(sel_run / "log.txt")


def test_config_of_a_distill_run_reruns_its_selection(world, first_run, tmp_path, capsys):
    """select_data.py --config RUN/args.json: the run's stage-1 flags (its training flags skipped) choose the
    same images."""
    sel = tmp_path / "sel"
    assert run(S, "--config", first_run / "args.json", "--selected_file", sel) == 0
    want = torch.load(first_run / "selection.pt", weights_only=True)["indices"]
    assert torch.equal(torch.load(sel / "selection.pt", weights_only=True)["indices"], want)


def test_config_replays_a_teacher_run(world, tmp_path, capsys):
    argv = ["--dataset", "cifar10", "--data", world / "cifar", "--model", "deit_tiny_patch4_32_teacher",
            "--epochs", 1, "--batch_size", 4, "--workers", 0, "--device", "cpu", "--lr", 0.002]
    assert run(T, *argv, "--output", tmp_path / "a" / "t.pth") == 0
    assert run(T, "--config", tmp_path / "a" / "t.args.json", "--output", tmp_path / "b" / "t.pth") == 0
    assert log(tmp_path / "b" / "t.log.txt") == log(tmp_path / "a" / "t.log.txt")
    assert args_json(tmp_path / "b" / "t.args.json")["lr"] == 0.002
    # every record names the code that wrote it
    want = utils.provenance()
    assert args_json(tmp_path / "b" / "t.args.json")["provenance"] == want
    for name in ("t.pth", "t.last.pth"):
        assert torch.load(tmp_path / "b" / name, weights_only=True)["provenance"] == want, name


@pytest.mark.parametrize("content,says", [
    ("{\"lr_S\": -1}", "--config {path}: argument --lr_S: must be a number > 0, got '-1'"),
    ("{\"schedule\": [5, 3]}", "--config {path}: schedule: values must increase"),
    ("{\"cos\": \"yes\"}", "--config {path}: cos is a switch: true or false"),
    ("{\"lr_S\": [1, 2]}", "--config {path}: lr_S takes one value"),
    ("{\"from_elsewhere\": 1}", "--config {path}: 'from_elsewhere' is not a flag of"),
    ("[1, 2]", "--config {path} must hold a JSON object"),
    ("{\"lr\"", "--config {path}: not a readable JSON file"),
    ("{\"patchattn\": 0.5}", "--patchattn 0.5 (from --config {path}) has no effect without --attnprobe_dist"),
    ("{\"cos\": true, \"schedule\": [5]}", "--cos (from --config {path}) and --schedule 5 (from --config {path}) "
                                           "exclude each other"),
])
def test_a_config_is_checked_as_the_flags_are(content, says, tmp_path, capsys):
    """A value its flag would refuse, a key that no script of ours writes, a file that is no JSON object: one
    error line naming --config and the file, exit 2, nothing written."""
    path = fx.write_bytes(tmp_path / "args.json", content.encode())
    rc = run(D, "--config", path, "--output_dir", tmp_path / "out")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [err[0]] and err[0].startswith("error: " + says.format(path=path)), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.json"]


def test_command_line_flags_win_over_the_config_in_the_rules(tmp_path):
    """A config value that a command-line flag excludes or makes unused yields to it; what the config records
    besides the flags (resolved values, versions, its own --config) is skipped."""
    import distill
    path = fx.write_bytes(tmp_path / "args.json", json.dumps({
        "schedule": [5], "attnprobe_sel": True, "attnprobe_dist": True, "patchattn": 0.5, "lr_S": 0.002,
        "epochs_resolved": 9, "lr_offset": 1, "teacher_acc_resolved": 0.9, "provenance": {"git": "x"},
        "config": "elsewhere.json"}).encode())
    parser = distill.get_args_parser()
    args = parser.parse_args(["--config", str(path), "--cos", "--lr_S", "0.003"])
    assert args.cos and args.schedule == parser.get_default("schedule") and args.lr_S == 0.003
    assert args.attnprobe_dist and args.patchattn == 0.5 and args.config == str(path)
    args = parser.parse_args(["--config", str(path), "--eval_only", "ckpt.pth"])   # it tests a checkpoint only
    assert not args.attnprobe_sel and not args.attnprobe_dist and args.lr_S == parser.get_default("lr_S")
    # both on the command line: refused as without a config
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", str(path), "--cos", "--schedule", "4"])


# ---- the CUDA random state ------------------------------------------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices as far as the restore can tell; set_rng_state_all recorded."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", calls.append)
    return calls


def test_resume_restores_the_cuda_random_state_where_it_can(fake_cuda, monkeypatch, tmp_path, capsys):
    import checkpoint
    cpu = torch.get_rng_state()
    cuda = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    checkpoint.restore_rng({"torch": cpu, "cuda": cuda})
    assert len(fake_cuda) == 1 and fake_cuda[0] is cuda
    checkpoint.restore_rng({"torch": cpu, "cuda": cuda[:1]})     # saved where one device was seen
    assert len(fake_cuda) == 1 and "not restored" in capsys.readouterr().err
    checkpoint.restore_rng({"torch": cpu})                         # saved without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checkpoint.restore_rng({"torch": cpu, "cuda": cuda})           # resumed without CUDA
    assert len(fake_cuda) == 1 and torch.equal(torch.get_rng_state(), cpu)
    # DFND_DeiT-train.py's run folder restores them with the rest of last.pth
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    stub = type("Stub", (), {"load_state_dict": lambda self, sd: None})()
    ckpt = {"model": {}, "noise": {}, "optimizer": {}, "optimizer_noise": {}, "state": {"epoch": 0},
            "rng": {"torch": cpu, "cuda": cuda}}
    checkpoint.RunFolder(str(tmp_path)).restore(ckpt, stub, stub, [stub, stub])
    assert len(fake_cuda) == 2 and fake_cuda[1] is cuda


def test_teacher_resume_restores_the_saved_random_states(world, tmp_path, monkeypatch, capsys):
    import train_teacher
    out = tmp_path / "t.pth"
    argv = ["--dataset", "cifar10", "--data", str(world / "cifar"), "--model", "deit_tiny_patch4_32_teacher",
            "--epochs", "1", "--batch_size", "4", "--workers", "0", "--device", "cpu", "--output", str(out)]
    assert train_teacher.train_teacher(train_teacher.get_args_parser().parse_args(argv))
    last = tmp_path / "t.last.pth"
    saved = torch.load(last, weights_only=True)
    cuda = [torch.zeros(16, dtype=torch.uint8)]
    torch.save({**saved, "rng": {**saved["rng"], "cuda": cuda}}, last)
    restored = []
    monkeypatch.setattr(train_teacher, "restore_rng", restored.append)
    train_teacher.train_teacher(train_teacher.get_args_parser().parse_args(argv))   # finished: restores, trains no more
    assert len(restored) == 1 and torch.equal(restored[0]["cuda"][0], cuda[0])
    assert torch.equal(restored[0]["torch"], saved["rng"]["torch"])


# ---- curves.png ------------------------------------------------------------------------------------

def test_a_failing_picture_is_no_part_of_the_commit(world, tmp_path, monkeypatch, capsys):
    """curves.png is drawn after each epoch's commit: when drawing fails, the run ends as usual with every
    checkpoint and log line, and says so once."""
    import plots
    out = tmp_path / "out"
    drawn = []

    def broken(log_path, *a, **k):
        lines = open(log_path).read().splitlines()
        last = torch.load(out / "student" / "last.pth", weights_only=True)
        drawn.append((len(lines), last["epoch"]))   # the commit is done when the picture starts
        raise RuntimeError("no display")
    monkeypatch.setattr(plots, "curves", broken)
    assert run(D, *distill_argv(world, out, "--epochs", 2)) == 0
    assert drawn == [(1, 0), (2, 1)]
    assert [r["epoch"] for r in log(out / "log.txt")] == [0, 1]
    assert {p.name for p in (out / "student").iterdir()} >= {"last.pth", "final.pth", "checkpoint.pth"}
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    assert capsys.readouterr().err.count("not drawn (RuntimeError: no display)") == 1
    assert not (out / "curves.png").exists()
