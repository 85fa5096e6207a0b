"""Teacher files as researchers have them load under weights_only=True, in select_data.py and
DFND_DeiT-train.py: DeiT main.py checkpoints, timm train.py checkpoints (written by timm's own
CheckpointSaver), the official DeiT release layout, plain state dicts and safetensors files.
A pickled argparse.Namespace is the one extra global allowed; every other global is refused."""
import argparse
import copy
import os
import pathlib

import pytest
import timm
import torch

import fixtures as fx
import models
from utils import InputError

TEACHER = "deit_tiny_patch4_32_teacher"


def _teacher_and_ema(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(TEACHER, num_classes=10)
    with torch.no_grad():
        model.head.weight.mul_(40)   # confident teacher: a selection to make
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    return model, ema


def _deit_args():
    # the kind of Namespace DeiT's main.py pickles: strings, numbers, lists, None, bools
    return argparse.Namespace(model=TEACHER, batch_size=128, epochs=300, lr=5e-4, opt="adamw", sched="cosine",
                              data_path="/datasets/cifar", output_dir="out", input_size=32, model_ema=True,
                              resume="", seed=0, dist_url="env://", mixup=0.8, repeated_aug=True,
                              decay_epochs=30, opt_betas=None, smoothing=0.1, color_jitter=0.3)


def write_deit_main(path, model, ema):
    """As DeiT's main.py saves checkpoint.pth (utils.save_on_master -> torch.save)."""
    from timm.scheduler import create_scheduler_v2
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()    # optimizer state with tensors, as after training
    sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=300)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                "epoch": 299, "model_ema": ema.state_dict(), "scaler": torch.amp.GradScaler("cpu").state_dict(),
                "args": _deit_args()}, path)


def write_timm_train(folder, model, ema):
    """With timm's own CheckpointSaver, as timm's train.py does; returns model_best.pth.tar."""
    from timm.utils import CheckpointSaver, ModelEmaV3
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model_ema = ModelEmaV3(model)
    model_ema.module.load_state_dict(ema.state_dict())
    args = argparse.Namespace(model=TEACHER, num_classes=10, epochs=2, lr=0.1, device="cpu", amp=False,
                              model_ema=True, eval_metric="top1", img_size=None, mean=None, std=None)
    saver = CheckpointSaver(model, opt, args=args, model_ema=model_ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder), decreasing=False, max_history=2)
    saver.save_checkpoint(0, metric=55.0)
    saver.save_checkpoint(1, metric=61.5)
    return os.path.join(folder, "model_best.pth.tar")


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher_files")
    model, ema = _teacher_and_ema()
    files = {}
    files["deit_main"] = tmp / "deit" / "checkpoint.pth"
    files["deit_main"].parent.mkdir()
    write_deit_main(files["deit_main"], model, ema)
    (tmp / "timm").mkdir()
    files["timm_train"] = pathlib.Path(write_timm_train(tmp / "timm", model, ema))
    files["deit_release"] = tmp / "deit_tiny_patch4_32-0123abcd.pth"
    torch.save({"model": model.state_dict()}, files["deit_release"])
    files["plain"] = tmp / "plain.pth"
    torch.save(model.state_dict(), files["plain"])
    from safetensors.torch import save_file
    files["safetensors"] = tmp / "teacher.safetensors"
    save_file(model.state_dict(), str(files["safetensors"]))
    fx.write_blob_pool(tmp / "pool", n=24)
    fx.write_cifar(tmp / "cifar", n_train=2, n_test=20)
    return tmp, files, model.state_dict(), ema.state_dict()


KINDS = ["deit_main", "timm_train", "deit_release", "plain", "safetensors"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_teacher_file_kind_reads_the_trained_weights(teacher_files, kind):
    _, files, weights, _ = teacher_files
    sd, meta = models.read_checkpoint(files[kind])
    assert sd.keys() == weights.keys()
    assert all(torch.equal(sd[k], weights[k]) for k in weights)
    if kind == "deit_main":
        assert meta["epoch"] == 299 and meta["args"]["model"] == TEACHER
    if kind == "timm_train":
        assert meta["arch"] == TEACHER and meta["metric"] == 61.5 and meta["args"]["eval_metric"] == "top1"


@pytest.mark.parametrize("kind", ["deit_main", "timm_train"])
def test_ema_weights_are_chosen_with_the_flag(teacher_files, kind):
    _, files, weights, ema = teacher_files
    sd, _ = models.read_checkpoint(files[kind], ema=True)
    assert all(torch.equal(sd[k], ema[k]) for k in ema)
    assert not torch.equal(sd["head.weight"], weights["head.weight"])


@pytest.mark.parametrize("kind", ["deit_release", "plain", "safetensors"])
def test_ema_flag_on_a_file_without_ema_is_an_error(teacher_files, kind):
    _, files, _, _ = teacher_files
    with pytest.raises(InputError, match="EMA"):
        models.read_checkpoint(files[kind], ema=True)


def test_a_namespace_beside_another_global_is_still_refused(tmp_path):
    model, _ = _teacher_and_ema()
    path = tmp_path / "with_path.pth"
    torch.save({"model": model.state_dict(), "args": _deit_args(), "where": pathlib.PurePosixPath("/x")}, path)
    with pytest.raises(InputError, match="refused by weights_only loading.*PurePosixPath"):
        models.read_checkpoint(path)
    marker = tmp_path / "ran"
    fx.write_code_pickle(tmp_path / "evil.pth", marker)
    with pytest.raises(InputError, match="refused by weights_only loading"):
        models.read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def _select_argv(tmp, teacher, sel, *extra):
    return ["--data_imagenet", tmp / "pool", "--teacher", TEACHER, "--teacher_dir", teacher, "--num_select", 8,
            "--selected_file", sel, "--workers", 0, "--device", "cpu", *extra]


@pytest.mark.parametrize("kind", KINDS)
def test_select_data_runs_on_each_teacher_file(teacher_files, kind, capsys):
    tmp, files, _, _ = teacher_files
    sel = tmp / f"sel_{kind}"
    assert fx.run_script_inprocess("select_data.py", *_select_argv(tmp, files[kind], sel)) == 0, \
        capsys.readouterr().err
    assert len((sel / "selected.txt").read_text().split()) == 8
    if kind == "deit_main":   # same weights in every file: the same selection
        return
    ref = tmp / "sel_deit_main" / "selected.txt"
    if ref.exists():
        assert (sel / "selected.txt").read_text() == ref.read_text()


def test_select_data_with_ema_scores_the_ema_teacher(teacher_files, capsys):
    tmp, files, _, _ = teacher_files
    sel = tmp / "sel_ema"
    assert fx.run_script_inprocess("select_data.py", *_select_argv(tmp, files["deit_main"], sel,
                                                                     "--teacher_ema")) == 0
    # the same file without the flag is another teacher: its scores are not reused
    rc = fx.run_script_inprocess("select_data.py", *_select_argv(tmp, files["deit_main"], sel))
    assert rc == 2 and "another teacher checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_distillation_runs_on_each_teacher_file(teacher_files, kind, capsys):
    tmp, files, _, _ = teacher_files
    out = tmp / f"out_{kind}"
    argv = ["--dataset", "cifar10", "--data_cifar", tmp / "cifar", "--nb_classes", 10, "--epochs", 1,
            "--batch_size", 4, "--output_dir", out, "--seed", 0,
            *_select_argv(tmp, files[kind], tmp / f"dsel_{kind}")]
    assert fx.run_script_inprocess("DFND_DeiT-train.py", *map(str, argv)) == 0, capsys.readouterr().err
    assert (out / "student" / "last.pth").exists()
    # the same weights in every file: the same selection, whatever the file's layout
    first = tmp / "dsel_deit_main" / "selected.txt"
    if kind != "deit_main" and first.exists():
        assert (tmp / f"dsel_{kind}" / "selected.txt").read_text() == first.read_text()
    # the reported accuracy is the saved student's on the test set, recomputed here
    final = torch.load(out / "student" / "final.pth", weights_only=True)
    student = timm.create_model(final["student"], num_classes=10)
    student.load_state_dict(final["model"])
    acc1, acc5 = fx.hand_accuracy(student, tmp / "cifar", final["mean"], final["std"])
    assert (final["acc1"], final["acc5"]) == (pytest.approx(acc1), pytest.approx(acc5))


# ---- weights timm loads itself: hf-hub:org/name, from a hub cache laid out as huggingface_hub writes it

HUB_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=8, num_heads=2, num_classes=4)


def _hub_cache(root, repo="timm/tiny_vit_test.hub", rev="0123456789abcdef0123456789abcdef01234567"):
    """<root>/models--timm--tiny_vit_test.hub/{refs/main, snapshots/<rev>/{config.json, model.safetensors}}."""
    folder = root / ("models--" + repo.replace("/", "--"))
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **HUB_ARGS)
    timm.models.save_for_hf(model, folder / "snapshots" / rev, model_args=HUB_ARGS, safe_serialization=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    return model


def test_hf_hub_teacher_loads_through_timm_offline(tmp_path):
    made = _hub_cache(tmp_path / "hub")
    fx.write_blob_pool(tmp_path / "pool", 12)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    argv = ["--data_imagenet", tmp_path / "pool", "--teacher_dir", "hf-hub:timm/tiny_vit_test.hub",
            "--num_select", 4, "--selected_file", tmp_path / "sel", "--workers", 0, "--device", "cpu"]
    r = fx.run_script("select_data.py", *argv, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "4 classes, 3x32px" in r.stdout and "the model's pretrained config" in r.stdout
    # the scores are those of the very weights written into the cache, normalised as its config says
    import pool
    import scoring
    cfg = made.pretrained_cfg
    ds = pool.PoolDataset(pool.list_pool(str(tmp_path / "pool")), 32, 3)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    want = scoring.score_images(made.eval(), images, cfg["mean"], cfg["std"], [3, 7], 0)
    assert torch.equal(torch.load(tmp_path / "sel" / "value_out.pth", weights_only=True), want["value_out"])
    # nothing cached under that name: one error line naming the flag, exit 2
    r = fx.run_script("select_data.py", *[a if a != "hf-hub:timm/tiny_vit_test.hub" else "hf-hub:timm/absent"
                                          for a in argv], env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --teacher_dir hf-hub:timm/absent"), r.stderr
