"""DFND_DeiT-train.py end to end on generated CIFAR-format data: select -> distill -> checkpoints, log, resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(tmp, *extra, launcher=(sys.executable,)):
    return [*launcher, os.path.join(ROOT, "DFND_DeiT-train.py"), "--dataset", "cifar10",
            "--data_cifar", str(tmp / "cifar"), "--data_imagenet", str(tmp / "pool"), "--num_select", "32",
            "--teacher", "deit_tiny_patch4_32_teacher", "--teacher_dir", str(tmp / "teacher.pth"),
            "--selected_file", str(tmp / "sel"), "--nb_classes", "10", "--batch_size", "8", "--workers", "0",
            "--holdout", "0.125", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return fx.write_run_inputs(tmp_path_factory.mktemp("distill"), pool=48, n_train=10, n_test=40)


def read_log(path):
    return [json.loads(line) for line in open(path)]


def test_end_to_end_losses_fall(world):
    out = world / "out_e2e"
    proc = subprocess.run(train_cmd(world, "--output_dir", str(out), "--epochs", "4", "--lr_S", "2e-3",
                                    "--attnprobe_sel", "--attnprobe_dist"), capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 28 images at batch 8: the last partial batch is kept, as the published DataLoader kept it
    assert "training on 28 images (4 held out) for 4 epochs (--epochs), 4 steps/epoch at global batch 8" in proc.stdout
    log = read_log(out / "log.txt")
    epochs = [r for r in log if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]
    for r in epochs:
        # DeiT's keys, then ours
        for key in ("train_lr", "train_loss", "test_loss", "test_acc1", "test_acc5", "n_parameters",
                    "train_kd", "train_na", "train_pd", "train_img_per_s", "train_seconds", "holdout_agreement"):
            assert np.isfinite(r[key]), key
    # the student learns to imitate the teacher on its own selection
    assert epochs[-1]["train_kd"] < epochs[0]["train_kd"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert all(set(r) >= {"epoch", "train_lr"} for r in log)        # per-epoch lines only
    summary = json.load(open(out / "summary.json"))
    assert "chosen without test labels" in summary["text"] and summary["final_acc1"] == epochs[-1]["test_acc1"]
    assert (out / "student" / "checkpoint.pth").exists() and (out / "student" / "last.pth").exists()
    from PIL import Image
    with Image.open(out / "curves.png") as im:   # redrawn after each epoch: losses, accuracy, lr, img/s
        assert im.width == 4 * 4.2 * 100
    assert (world / "sel" / "report" / "report.md").exists() and "report: " in proc.stdout
    final = torch.load(out / "student" / "final.pth", weights_only=True)   # the weights to report
    assert final["epoch"] == 3 and final["acc1"] == summary["final_acc1"]
    assert json.load(open(out / "args.json"))["attnprobe_dist"] is True
    last = torch.load(out / "student" / "last.pth", weights_only=True)
    assert last["epoch"] == 3 and {"model", "noise", "optimizer", "optimizer_noise", "rng"} <= set(last)
    # rerunning a finished run resumes at its end: nothing retrained, the summary is printed again
    again = subprocess.run(train_cmd(world, "--output_dir", str(out), "--epochs", "4", "--lr_S", "2e-3",
                                     "--attnprobe_sel", "--attnprobe_dist"), capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "resumed from" in again.stdout
    assert len([r for r in read_log(out / "log.txt") if "epoch" in r]) == 4


def test_eval_only_reads_dataparallel_checkpoint(world, tmp_path):
    student = timm.create_model("deit_tiny_patch4_32", num_classes=10)
    torch.save({"state_dict": {"module." + k: v for k, v in student.state_dict().items()}}, tmp_path / "dp.pth")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "DFND_DeiT-train.py"), "--dataset", "cifar10",
                           "--data_cifar", str(world / "cifar"), "--eval_only", str(tmp_path / "dp.pth"),
                           "--workers", "0"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == 40 and result["student"] == "deit_tiny_patch4_32"
    acc1, acc5 = fx.hand_accuracy(student, world / "cifar", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (result["acc1"], result["acc5"]) == (pytest.approx(acc1), pytest.approx(acc5))


def test_published_readme_command(world):
    """The published CIFAR-10 command, paths pointed at generated data (epochs capped to stay short)."""
    proc = subprocess.run([sys.executable, "DFND_DeiT-train.py", "--dataset", "cifar10",
                           "--data_cifar", str(world / "cifar"), "--data_imagenet", str(world / "pool"),
                           "--num_select", "16", "--teacher_dir", str(world / "teacher.pth"),
                           "--teacher", "deit_tiny_patch4_32_teacher", "--selected_file", str(world / "sel_pub"),
                           "--output_dir", str(world / "out_pub"), "--nb_classes", "10", "--lr_S", "7.5e-4",
                           "--attnprobe_sel", "--attnprobe_dist", "--epochs", "1", "--workers", "0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("class_weights.pth", "pred_out.pth", "value_blk3.pth", "value_blk7.pth", "value_out.pth"):
        assert (world / "sel_pub" / name).exists()
    assert_published_run(world / "pool", world / "sel_pub", world / "out_pub", 16, [7.5e-4])
    assert (world / "out_pub" / "student" / "checkpoint.pth").exists()


def assert_published_run(pool_dir, sel, out, num_select, lrs):
    """What a published command must produce: the num_select images of lowest
    0.05 · (value_blk3 + value_blk7) + 0.9 · value_out (the re-enactment's rule on the stored scores),
    best first, and one log line per epoch at the scheduled lr."""
    import reference
    scores = {k: torch.load(sel / f"{k}.pth", weights_only=True).double()
              for k in ("value_out", "value_blk3", "value_blk7")}
    order = reference.published_selection(scores["value_blk3"], scores["value_blk7"], scores["value_out"],
                                          num_select).tolist()
    ids = sorted(os.path.relpath(os.path.join(d, f), pool_dir).replace(os.sep, "/")
                 for d, _, files in os.walk(pool_dir) for f in files)
    assert (sel / "selected.txt").read_text().split() == [ids[i] for i in order]
    epochs = [r for r in read_log(out / "log.txt") if "epoch" in r]
    assert [r["epoch"] for r in epochs] == list(range(len(lrs)))
    assert [r["train_lr"] for r in epochs] == pytest.approx(lrs)


def test_torchrun_two_processes_select_the_same_images(world):
    """2-process gloo run: the pool is scored in strided shards and gathered in pool order."""
    single = world / "sel"   # scored by the 1-process runs above with the same teacher and pool
    if not (single / "value_out.pth").exists():
        pytest.skip("needs the 1-process run of test_end_to_end_losses_fall")
    launcher = fx.torchrun_launcher(2)
    out = world / "out_ddp"
    proc = subprocess.run(train_cmd(world, "--output_dir", str(out), "--epochs", "1", "--attnprobe_sel",
                                    "--attnprobe_dist", launcher=launcher), capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # train_cmd points both runs at the same --selected_file: rescore into a fresh folder to compare
    sel2 = world / "sel_ddp"
    proc = subprocess.run([*launcher, os.path.join(ROOT, "select_data.py"), "--data_imagenet", str(world / "pool"),
                           "--teacher", "deit_tiny_patch4_32_teacher", "--teacher_dir", str(world / "teacher.pth"),
                           "--num_select", "32", "--selected_file", str(sel2), "--attnprobe_sel", "--workers", "0",
                           "--chunk_size", "20"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("value_out", "value_blk3", "value_blk7", "pred_out"):
        a = torch.load(single / f"{key}.pth", weights_only=True)
        b = torch.load(sel2 / f"{key}.pth", weights_only=True)
        assert torch.allclose(a.float(), b.float(), atol=1e-5), key
    assert (single / "selected.txt").read_text() == (sel2 / "selected.txt").read_text()
    assert (out / "student" / "last.pth").exists()
    # rank 0 alone draws the report (both ranks' stdout is here)
    assert proc.stdout.count("report: ") == 1 and (sel2 / "report" / "contact_sheet.png").exists()


def test_training_sh_runs_with_generated_data(world):
    env = {**os.environ, "PYTHON": sys.executable, "DATASETS": "cifar10", "root_wild": str(world / "pool"), "root_cifar10": str(world / "cifar"),
           "teacher_cifar10": str(world / "teacher.pth"), "selected_cifar10": str(world / "sel_sh"),
           "output_student_cifar10": str(world / "out_sh"), "NUM_SELECT": "16",
           "EXTRA": "--teacher deit_tiny_patch4_32_teacher --epochs 1 --batch_size 8 --workers 0"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "training.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_published_run(world / "pool", world / "sel_sh", world / "out_sh", 16, [7.5e-4])
    assert (world / "out_sh" / "student" / "last.pth").exists()


def make_tinyimagenet(root, wnids=("n01", "n02", "n03"), per_class=4, val_per_class=2, seed=0):
    """The raw Tiny-ImageNet layout: train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    lines = []
    for c, wnid in enumerate(wnids):
        os.makedirs(root / "train" / wnid / "images", exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
                root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
        for i in range(val_per_class):
            name = f"val_{c}_{i}.JPEG"
            os.makedirs(root / "val" / "images", exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "val" / "images" / name)
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))


def test_224px_pipeline_with_pos_num(tmp_path):
    """Tiny-ImageNet layout -> converters -> training_tinyimagenet.sh: a 224-px student through the decoding loader."""
    make_tinyimagenet(tmp_path / "tiny")
    for script in ("process_tinyimagenet.py", "process_move_file.py"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--root", str(tmp_path / "tiny")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    fx.write_blob_pool(tmp_path / "pool", n=10, size=80)
    torch.manual_seed(0)
    torch.save({"model": timm.create_model("deit_tiny_patch16_224", num_classes=3).state_dict()},
               tmp_path / "teacher.pth")
    # the published run script, started from the data's folder with relative paths, as a user types them;
    # its default selected/ and output/ land there, not in the clone. No published noise-adaptation
    # constant exists for Tiny-ImageNet and this teacher file records no accuracy: TEACHER_ACC gives it.
    env = {**os.environ, "PYTHON": sys.executable, "root_wild": "pool", "root_data": "tiny",
           "teacher_file": "teacher.pth", "TEACHER": "deit_tiny_patch16_224", "TEACHER_ACC": "0.5",
           "NB_CLASSES": "3", "NUM_SELECT": "6", "POS_NUM": "2",
           "EXTRA": "--epochs 1 --batch_size 4 --workers 0 --robust"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "training_tinyimagenet.sh")], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NOT DATA-FREE" in proc.stdout and "noise-adaptation acc 0.5000 from --teacher_acc" in proc.stdout
    out, sel = tmp_path / "output" / "tinyimagenet", tmp_path / "selected" / "tinyimagenet"
    assert not os.path.exists(os.path.join(ROOT, "output")) and not os.path.exists(os.path.join(ROOT, "selected"))
    # the published normalisation of DFND_DeiT-imagenet.py (CIFAR's), for scoring and training alike
    cifar = ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
    assert tuple(json.load(open(out / "args.json"))[k] for k in ("mean", "std")) == cifar
    assert tuple(json.load(open(sel / "scores_meta.json"))[k] for k in ("mean", "std")) == cifar
    fx.assert_report_is_the_selection(sel, num_classes=3)   # decoded from the pool files at 224 px
    assert "robust KD class weights (selection's and the labelled images'" in proc.stdout
    # the labelled images are part of this run: recorded in its folder; stage 1's folder is not written
    assert torch.load(out / "labelset_index_dict.pth", weights_only=True)["positive_index"] == [0, 1, 4, 5, 8, 9]
    assert (sel / "value_out.pth").exists() and not (sel / "labelset_index_dict.pth").exists()
    assert_published_run(tmp_path / "pool", sel, out, 6, [7.5e-4])
    epochs = [r for r in read_log(out / "log.txt") if "epoch" in r]
    assert len(epochs) == 1 and np.isfinite(epochs[0]["train_loss"])


def script_flags(tmp_path, script, **env):
    """The flags a run script passes to DFND_DeiT-train.py, parsed by its own parser (a dry run:
    PYTHON is a stand-in that writes its arguments, one per line, and exits)."""
    import distill
    fake = tmp_path / "fake_python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    out = tmp_path / f"{script}.args"
    proc = subprocess.run(["bash", os.path.join(ROOT, script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(fake), "ARGS_OUT": str(out), **env})
    assert proc.returncode == 0, proc.stderr
    argv = out.read_text().splitlines()
    assert argv[0] == os.path.join(ROOT, "DFND_DeiT-train.py")   # this clone's, run from the caller's folder
    return distill.get_args_parser().parse_args(argv[1:])


def test_224px_scripts_pass_the_published_settings(tmp_path):
    imagenet = script_flags(tmp_path, "training_imagenet.sh")
    assert (imagenet.dataset, imagenet.num_select, imagenet.teacher, imagenet.pos_num, imagenet.lr_S,
            imagenet.nb_classes) == ("imagenet", 1000000, "deit_base_patch16_224", 129, 7.5e-4, 1000)
    tiny = script_flags(tmp_path, "training_tinyimagenet.sh")
    assert (tiny.dataset, tiny.num_select, tiny.teacher, tiny.pos_num, tiny.lr_S, tiny.nb_classes) == \
        ("tinyimagenet", 800000, "deit_small_patch16_224", 50, 7.5e-4, 200)
    assert os.path.basename(tiny.teacher_dir) == "tinyimagenet_deit_small_patch16_224.pth"
    for args in (imagenet, tiny):
        assert args.attnprobe_sel and args.attnprobe_dist and args.student == "deit_tiny_patch16_224"
        # DFND_DeiT-imagenet.py normalised every image with CIFAR's statistics
        assert args.mean == [0.4914, 0.4822, 0.4465] and args.std == [0.2023, 0.1994, 0.2010]
    # every default can still be overridden from the environment
    custom = script_flags(tmp_path, "training_tinyimagenet.sh", NUM_SELECT="7", TEACHER="t", LR_S="1e-3")
    assert (custom.num_select, custom.teacher, custom.lr_S) == (7, "t", 1e-3)


def test_robust_class_weights_count_the_labelled_images(world):
    """--robust with --pos_num: the labelled images count in the class weights with the selection, as
    DFND_DeiT-imagenet.py's get_class_weight summed the teacher's softmax over both (here unaugmented)."""
    from types import SimpleNamespace
    import data
    import distill
    import models
    teacher = models.load_teacher("deit_tiny_patch4_32_teacher", None, world / "teacher.pth")
    train = data.load_labelled("cifar10", world / "cifar", "train", 32, 3)
    labelled = torch.utils.data.Subset(train, list(range(0, 50, 5)))
    x = torch.stack([labelled[i][0] for i in range(len(labelled))]).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        logits = teacher.model(x)
    from selection import robust_kd_weights
    flags = SimpleNamespace(workers=0, amp=None, seed=3)
    cpu = torch.device("cpu")
    selection_mass = torch.linspace(1.0, 3.0, 10, dtype=torch.float64)
    for kind, extra in (("softmax", logits.softmax(1).sum(0).double()),
                        ("counts", torch.bincount(logits.argmax(1), minlength=10).double())):
        selection = SimpleNamespace(class_weights=None, class_mass=(selection_mass, kind))
        got = distill.kd_class_weights(flags, selection, teacher, labelled, cpu)
        inverse = 1 / (selection_mass + extra).clamp_min(1e-12 if kind == "softmax" else 1.0)
        noise = robust_kd_weights(torch.ones(10, dtype=torch.float64), "counts", 3) - 1   # the published perturb
        assert torch.allclose(got, (inverse / inverse.sum() * 10).float() + noise, rtol=1e-5), kind
        assert 0 <= noise.min() and noise.max() < 0.1
    # without labelled images: the selection's own mass
    got = distill.kd_class_weights(flags, SimpleNamespace(class_mass=(selection_mass, "softmax")), teacher, None, cpu)
    assert torch.equal(got, robust_kd_weights(selection_mass, "softmax", 3))


def test_images_their_dataset_cropped_get_no_second_crop():
    """224-px --pos_num images arrive cropped and flipped (data.RandomCropImages): the training step
    crops and flips only the wild images (cropped 0), never the marked ones (cropped 1)."""
    import distill
    import engine
    import data
    g = torch.Generator().manual_seed(0)
    wild = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    marked = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    ds = torch.utils.data.ConcatDataset([
        data.ImagesWithCropFlag(torch.utils.data.TensorDataset(wild)),
        data.ImagesWithCropFlag(torch.utils.data.TensorDataset(marked), cropped=1)])
    batches = engine.LoaderBatches(ds, batch_size=12, shuffle=False, drop_last=False, workers=0)
    seen = []

    class Spy(engine.Augment):
        def __call__(self, images, cropped=None):
            seen.append(cropped.clone())
            return super().__call__(images, cropped)

    augment = Spy((0.5,) * 3, (0.25,) * 3, padding=4)
    epoch_run = engine.TrainEpoch(batches, augment, 0, torch.device("cpu"))
    for batch in epoch_run:
        seen.append((batch.images.clone(), batch.labels))
        epoch_run.step({"loss": (batch.images.sum() * 0).requires_grad_()}, [])
    flags, (x, labels) = seen
    assert labels is None                                 # flags are no labels
    plain = data.normalize(torch.cat([wild, marked]), (0.5,) * 3, (0.25,) * 3)
    assert flags.tolist() == [0] * 6 + [1] * 6
    assert torch.equal(x[6:], plain[6:])                  # marked: untouched
    assert not torch.equal(x[:6], plain[:6])              # wild: cropped/flipped on the device
