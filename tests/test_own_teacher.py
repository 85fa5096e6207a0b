"""A researcher's own teacher and pool: what the teacher file says is used, values that cannot be meant are
refused before any work, every command ends under torchrun as documented, the run scripts work from the
caller's folder, and each run folder records the images it trained on."""
import argparse
import json
import os
import subprocess
from types import SimpleNamespace

import pytest
import timm
import torch

import distill
import engine
import fixtures as fx
import models
import pool
import published
import scoring
import select_data
import settings
import utils
from utils import InputError

D = "DFND_DeiT-train.py"
S = "select_data.py"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return fx.small_world(tmp_path_factory.mktemp("own"), pool=12, n_test=8, acc1=90.0)


def flags(w, **over):
    out = {"--data_imagenet": w.pool, "--teacher": fx.MICRO, "--teacher_dir": w.teacher, "--data_cifar": w.cifar,
           "--workers": 0, "--batch_size": 4, "--num_select": 8}
    out.update(over)
    return [str(a) for k, v in out.items() if v is not None for a in ((k,) if v is True else (k, v))]


# ---- 1. the published epoch formula on a small pool; the 224-px batch ------------------------

def test_published_formula_on_a_small_selection_is_refused_before_any_work(world, tmp_path, capsys):
    rc = fx.run_script_inprocess(D, *flags(world, **{"--selected_file": tmp_path / "sel",
                                                      "--output_dir": tmp_path / "out"}))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: the published epoch formula int(320000 / num_select * 512) gives 20,479,999 "
                             "epochs for 8 selected images") and err[0].endswith("pass --epochs N")
    assert not os.listdir(tmp_path / "sel") and os.listdir(tmp_path / "out") == [".lock"]   # nothing scored
    # the formula stays the published one where it means something
    assert settings.epoch_plan(None, 650000, 32)[:2] == (251, 1)
    assert settings.epoch_plan(None, 16384, 32)[0] == 9999
    with pytest.raises(InputError, match="3,276,799 epochs for 100 selected"):   # the 224-px case
        settings.epoch_plan(None, 100, 224)


def test_a_rank_without_images_is_refused():
    s = SimpleNamespace(data_cifar="d", holdout=0.4, pos_num=0, teacher_acc=0.9, dataset="cifar10", epochs=5,
                        crop_padding=None, student=None)
    teacher = SimpleNamespace(num_classes=10, img_size=32)
    assert settings.plan_run(s, teacher, 2, 10, None, 1).epochs == 5
    with pytest.raises(InputError, match="cannot give each of 2 processes a batch"):
        settings.plan_run(s, teacher, 2, 10, None, 2)   # 1 of 2 held out: one image for two ranks


def test_224px_batches_are_clamped_to_a_small_training_set_as_at_32px():
    """150 decoded images and --batch_size 256: one step of 150 per epoch (it was 0 steps), as the
    in-memory 32-px path already did."""
    images = torch.zeros(150, 3, 4, 4, dtype=torch.uint8)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(150, dtype=torch.long))
    decoded = engine.LoaderBatches(dataset, batch_size=256, shuffle=True, drop_last=True, workers=0)
    in_memory = engine.TensorBatches(images, batch_size=256, shuffle=True, drop_last=True)
    assert len(decoded) == len(in_memory) == 1
    assert [len(b.images) for b in decoded.epoch(0)] == [150]


# ---- 2. what the teacher file says -------------------------------------------------------------

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616]


def _timm_file(folder, mean=CIFAR_MEAN, std=CIFAR_STD):
    """A teacher written by timm's own CheckpointSaver, as timm's train.py does (args.mean/std set)."""
    from timm.utils import CheckpointSaver
    fx.register_test_models()
    torch.manual_seed(0)
    model = timm.create_model(fx.MICRO, num_classes=10)
    args = argparse.Namespace(model=fx.MICRO, num_classes=10, eval_metric="top1", mean=mean, std=std)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                            checkpoint_dir=str(folder), recovery_dir=str(folder), decreasing=False)
    saver.save_checkpoint(0, metric=61.5)
    return os.path.join(folder, "model_best.pth.tar")


def test_timm_file_gives_model_mean_std_and_accuracy(tmp_path):
    path = _timm_file(tmp_path)
    teacher = models.load_teacher(None, None, path)       # no --teacher, --mean, --std
    assert teacher.name == fx.MICRO
    assert list(teacher.mean) == pytest.approx(CIFAR_MEAN) and list(teacher.std) == pytest.approx(CIFAR_STD)
    assert "args.mean" in teacher.norm_source and "ImageNet" not in teacher.norm_source
    assert teacher.accuracy == pytest.approx(0.615) and "metric" in teacher.accuracy_source
    assert teacher.notes == []
    # a flag still wins, and its disagreement with the file is reported with both values
    own = models.load_teacher(None, None, path, mean=[0.5, 0.5, 0.5])
    assert list(own.mean) == [0.5, 0.5, 0.5] and list(own.std) == pytest.approx(CIFAR_STD)
    assert own.notes == [f"--mean [0.5, 0.5, 0.5] differs from the teacher file's args.mean {CIFAR_MEAN}: using --mean"]


def test_deit_file_names_its_model_and_a_wrong_teacher_flag_says_so(tmp_path):
    fx.register_test_models()
    path = fx.write_teacher(tmp_path / "checkpoint.pth", name=fx.MICRO,
                            args=argparse.Namespace(model=fx.MICRO, nb_classes=10, epochs=300))
    assert models.load_teacher(None, None, path).name == fx.MICRO    # no --teacher needed
    with pytest.raises(InputError) as e:
        models.load_teacher(fx.TEACHER, None, path)                  # both 10 classes, other widths
    assert f"the teacher file names model {fx.MICRO}, --teacher is {fx.TEACHER}" in str(e.value)
    assert "check --nb_classes" not in str(e.value)
    # a file that names no model: the published default
    plain = fx.write_teacher(tmp_path / "plain.pth", name=published.TEACHER)
    assert models.load_teacher(None, None, plain).name == "deit_base_patch4_32_teacher"


def test_noise_adaptation_value_is_never_an_invented_published_constant(world):
    teacher = SimpleNamespace(accuracy=None, accuracy_source=None)
    with pytest.raises(InputError, match="--dataset folder has no published noise-adaptation constant.*pass "
                                         "--teacher_acc"):
        settings.resolve_teacher_acc(None, teacher, "folder")
    with pytest.raises(InputError, match="tinyimagenet has no published"):   # the published parser rejected it
        settings.resolve_teacher_acc(None, teacher, "tinyimagenet")
    assert settings.resolve_teacher_acc(None, teacher, "cifar100") == (0.7630, "the published constant for cifar100")
    from_file = models.load_teacher(fx.MICRO, None, world.teacher)
    assert settings.resolve_teacher_acc(None, from_file, "folder") == (0.9, "the teacher file ('acc1')")
    assert settings.resolve_teacher_acc(0.7, from_file, "folder") == (0.7, "--teacher_acc")


# ---- 6. the selection a run trained on; read-only scores; --selection_file alone ------------------

def test_run_folder_records_its_selection_and_read_only_scores_are_used(world, tmp_path, capsys, monkeypatch):
    sel, out = tmp_path / "sel", tmp_path / "out"
    assert fx.run_script_inprocess(D, *flags(world, **{"--selected_file": sel, "--output_dir": out,
                                                       "--epochs": 1})) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "amp off (fp32)" in stdout and f"files in {out}" in stdout.strip().splitlines()[-1]
    record = torch.load(out / "selection.pt", weights_only=True)
    shifted = (record["indices"] + 1) % 12
    stage1 = torch.load(sel / "selection.pt", weights_only=True)
    assert torch.equal(record["indices"], stage1["indices"]) and record["ids"] == stage1["ids"]
    assert record["scores"] == json.load(open(sel / "scores_meta.json"))     # the score fingerprint
    # a resume trains on the recorded images only
    torch.save({**record, "indices": shifted, "ids": None}, out / "other.pt")   # other images
    os.replace(out / "other.pt", out / "selection.pt")
    assert fx.run_script_inprocess(D, *flags(world, **{"--selected_file": sel, "--output_dir": out,
                                                       "--epochs": 2})) == 2
    assert "this run trained on another selection than the one chosen now" in capsys.readouterr().err
    assert [json.loads(line)["epoch"] for line in open(out / "log.txt")] == [0]   # nothing trained
    # the way out it names: continue on the recorded images
    assert fx.run_script_inprocess(D, *flags(world, **{"--selection_file": out / "selection.pt", "--output_dir": out,
                                                       "--epochs": 2, "--num_select": None})) == 0, \
        capsys.readouterr().err
    assert "resumed from" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in open(out / "log.txt")] == [0, 1]
    # a folder of finished scores this process cannot write: used, nothing written there
    monkeypatch.setattr(scoring, "read_only", lambda folder: os.path.abspath(folder) == str(sel))
    before = fx.snapshot(sel)
    out2 = tmp_path / "out2"
    assert fx.run_script_inprocess(D, *flags(world, **{"--selected_file": sel, "--output_dir": out2,
                                                       "--epochs": 1, "--num_select": 6})) == 0, capsys.readouterr().err
    assert fx.snapshot(sel) == before
    assert len(torch.load(out2 / "selection.pt", weights_only=True)["indices"]) == 6
    # a read-only folder without this teacher's scores: one line
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(scoring, "read_only", lambda folder: True)
    capsys.readouterr()
    assert fx.run_script_inprocess(D, *flags(world, **{"--selected_file": empty, "--output_dir": tmp_path / "o3",
                                                       "--epochs": 1})) == 2
    assert capsys.readouterr().err.strip() == (f"error: --selected_file {empty} cannot be written and holds no "
                                               "complete scores of this pool and teacher: choose a writable "
                                               "--selected_file")
    monkeypatch.undo()
    # the record is a --selection_file: no --selected_file needed, a conflicting --num_select refused
    again = flags(world, **{"--selection_file": out / "selection.pt", "--output_dir": tmp_path / "o4",
                            "--epochs": 1, "--num_select": None})
    assert fx.run_script_inprocess(D, *again) == 0, capsys.readouterr().err
    assert torch.equal(torch.load(tmp_path / "o4" / "selection.pt", weights_only=True)["indices"], shifted)
    capsys.readouterr()
    assert fx.run_script_inprocess(D, *again, "--num_select", "5") == 2
    assert "--num_select 5 but --selection_file" in capsys.readouterr().err


# ---- 7. smaller ------------------------------------------------------------------------------------

def test_workers_default_fits_the_machine(monkeypatch):
    assert distill.get_args_parser().get_default("workers") == utils.default_workers() <= utils.cpu_cores()
    assert select_data.get_args_parser().get_default("workers") == utils.default_workers()
    monkeypatch.setattr(utils, "cpu_cores", lambda: 16)
    assert utils.default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert utils.default_workers() == 4      # shared by the processes torchrun starts on the machine


def test_brace_shard_lists_are_expanded(tmp_path, capsys):
    import tarfile
    fx.write_pool(tmp_path / "images", 6, size=32)
    names = sorted(os.listdir(tmp_path / "images"))
    for k in range(3):
        with tarfile.open(tmp_path / f"pool-{k:06d}.tar", "w") as tar:
            for name in names[2 * k:2 * k + 2]:
                tar.add(tmp_path / "images" / name, arcname=name)
    assert pool.expand_braces(str(tmp_path / "pool-{000000..000002}.tar")) == \
        [str(tmp_path / f"pool-{k:06d}.tar") for k in range(3)]
    args = select_data.get_args_parser().parse_args(["--data_imagenet", str(tmp_path / "pool-{000000..000002}.tar"),
                                                     "--teacher_dir", str(fx.write_teacher(tmp_path / "t.pth")),
                                                     "--selected_file", str(tmp_path / "sel")])
    assert len(select_data.list_pool(settings.resolve_select_settings(args, torch.device("cpu")))) == 6


def test_force_keeps_a_matching_image_cache(tmp_path, monkeypatch):
    fx.write_pool(tmp_path / "pool", 4, size=32)
    index = pool.list_pool(tmp_path / "pool")
    pool.build_cache(index, tmp_path / "cache", 32, 3, workers=0, progress=False)
    calls = []
    monkeypatch.setattr(pool, "decode_image", lambda *a, **k: calls.append(1))
    pool.build_cache(index, tmp_path / "cache", 32, 3, workers=0, progress=False, force=True)
    assert not calls     # the rescore of --force does not decode the pool again


# ---- 3, 4. torchrun ------------------------------------------------------------------------------

def _torchrun(*argv, timeout=300):
    return subprocess.run([*fx.torchrun_launcher(2), *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, cwd=fx.ROOT,
                          env={**os.environ, **fx.CHILD_ENV})


def test_under_torchrun_a_refusal_is_one_line_and_torchrun_reports_exit_code_2(world, tmp_path):
    proc = _torchrun(fx.script_path(D), *flags(world, **{"--teacher": fx.TEACHER, "--teacher_dir": tmp_path / "t.pth",
                                                         "--selected_file": tmp_path / "sel",
                                                         "--output_dir": tmp_path / "out"}))
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "interrupted:"))]
    assert ours == [f"error: --teacher_dir {tmp_path / 't.pth'}: no such file (nor hf-hub:org/name or a timm "
                    "pretrained tag)"], proc.stderr[-3000:]
    # torchrun's own ending, as docs/failures.md describes it
    assert proc.returncode == 1 and "exitcode  : 2" in proc.stderr


def test_eval_only_takes_the_checkpoint_settings_and_runs_under_torchrun(world, tmp_path):
    """A student saved with dataset/mean/std in its args is tested with them when no flag says otherwise;
    under torchrun each rank tests its share and rank 0 prints the whole test set's result."""
    torch.manual_seed(0)
    student = timm.create_model(fx.STUDENT, num_classes=10)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    torch.save({"model": student.state_dict(), "student": fx.STUDENT,
                "args": {"dataset": "cifar10", "mean": mean, "std": std, "student": fx.STUDENT}},
               tmp_path / "final.pth")
    base = ["--data_cifar", world.cifar, "--eval_only", tmp_path / "final.pth", "--workers", 0]
    single = fx.run_script(D, *base)
    assert single.returncode == 0, single.stderr[-2000:]
    one = json.loads(single.stdout.strip().splitlines()[-1])
    assert f"mean {mean} std {std}" in single.stdout and one["dataset"] == "cifar10" and one["n"] == 8
    imagenet_norm = json.loads(fx.run_script(D, *base, "--mean", *map(str, (0.485, 0.456, 0.406)), "--std",
                                             *map(str, (0.229, 0.224, 0.225))).stdout.strip().splitlines()[-1])
    assert imagenet_norm["loss"] != pytest.approx(one["loss"])   # the saved normalisation made the difference
    both = _torchrun(fx.script_path(D), *base)
    assert both.returncode == 0, both.stderr[-3000:]
    lines = [json.loads(line) for line in both.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["n"] == 8
    assert lines[0]["acc1"] == pytest.approx(one["acc1"]) and lines[0]["loss"] == pytest.approx(one["loss"], rel=1e-4)


# ---- 5. run scripts ------------------------------------------------------------------------------

def test_gitignore_covers_what_runs_write_by_default():
    for path in ("selected/cifar10/value_out.pth", "output/cifar10/log.txt", "teachers/t.pth", "runs/mine/log.txt"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=fx.ROOT)
        assert proc.returncode == 0, path
