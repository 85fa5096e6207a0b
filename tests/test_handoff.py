"""The hand-off between the stages: a Selection carries what distillation trains from (its class
weights included, also for --selection_file), and an error that only rank 0 finds ends every rank."""
import json
import os

import numpy as np
import pytest
import torch

import distill
import fixtures as fx
import models
import select_data
import settings

S, D = "select_data.py", "DFND_DeiT-train.py"
fx.register_test_models()


pytestmark = pytest.mark.usefixtures("one_thread_module")   # as the children: identical float results


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return fx.small_world(tmp_path_factory.mktemp("handoff"))


def test_run_selection_returns_what_it_writes(world, tmp_path):
    """The Selection handed to stage 2 is the one in selection.pt / selected.txt / class_weights.pth."""
    args = select_data.get_args_parser().parse_args(fx.argv(fx.select_flags(world, tmp_path / "sel",
                                                                            **{"--attnprobe_sel": True})))
    s = settings.resolve_select_settings(args, torch.device("cpu"))
    teacher = select_data.load_teacher(s, torch.device("cpu"))
    assert isinstance(teacher, models.Teacher) and teacher.num_classes == 10
    assert args.nb_classes is None                          # read from the file; args stay as parsed
    sel = select_data.run_selection(s, teacher)
    saved = torch.load(tmp_path / "sel" / "selection.pt", weights_only=True)
    assert torch.equal(sel.indices, saved["indices"]) and torch.equal(sel.pred, saved["pred"])
    assert sel.ids == (tmp_path / "sel" / "selected.txt").read_text().split("\n")[:-1] == saved["ids"]
    assert sel.rule == saved["rule"] == "attention probe"
    assert torch.equal(sel.class_weights, torch.load(tmp_path / "sel" / "class_weights.pth", weights_only=True))
    pred_out = torch.load(tmp_path / "sel" / "pred_out.pth", weights_only=True)
    assert torch.equal(sel.pred, pred_out[sel.indices])
    assert len(sel) == 8 and len(sel.pool_index) == 24
    # 32 px: the images come from the uint8 cache that was scored, in pool order
    assert sel.cache is not None and sel.source is sel.cache and list(sel.cache.ids) == sel.pool_index.ids


def test_selection_file_robust_uses_weights_of_that_selection(world, tmp_path, capsys):
    """--selection_file --robust: the class weights are those of the file's images, never the
    class_weights.pth of whatever selection was written into --selected_file before."""
    sel_dir = tmp_path / "sel"
    assert fx.run_flags(S, fx.select_flags(world, sel_dir)) == 0                  # selection X + its class_weights.pth
    stale = torch.load(sel_dir / "class_weights.pth", weights_only=True)
    chosen_x = torch.load(sel_dir / "selection.pt", weights_only=True)["indices"]
    # selection Y: the 8 images rule X ranked last, with the teacher's predictions
    value = torch.load(sel_dir / "value_out.pth", weights_only=True)
    pred = torch.load(sel_dir / "pred_out.pth", weights_only=True)
    chosen_y = torch.argsort(value, descending=True, stable=True)[:8]
    assert not set(chosen_x.tolist()) & set(chosen_y.tolist())
    torch.save({"indices": chosen_y, "pred": pred[chosen_y], "rule": "worst"}, tmp_path / "y.pt")
    probs = np.load(sel_dir / "probs_out.npy", mmap_mode="r")
    # 1 / (softmax summed per class over exactly these images), rescaled to sum to 10 classes
    inverse = 1 / torch.from_numpy(np.asarray(probs[np.sort(chosen_y.numpy())], dtype=np.float64)).sum(0)
    right = (inverse / inverse.sum() * 10).float()
    assert not torch.allclose(right, stale)       # the stale file would change the loss

    flags = fx.distill_flags(world, tmp_path, **{"--selected_file": sel_dir, "--selection_file": tmp_path / "y.pt",
                                                 "--robust": True, "--holdout": 0, "--output_dir": tmp_path / "o1"})
    # end to end: with the stale file, and without any class_weights.pth, the same training (the
    # published flow read class_weights.pth: the stale weights, or an error without the file)
    assert fx.run_flags(D, flags) == 0, capsys.readouterr().err
    os.unlink(sel_dir / "class_weights.pth")
    assert fx.run_flags(D, {**flags, "--output_dir": tmp_path / "o2"}) == 0, capsys.readouterr().err
    logs = [[json.loads(line) for line in open(tmp_path / o / "log.txt")] for o in ("o1", "o2")]
    assert logs[0][0]["train_kd"] == logs[1][0]["train_kd"] and logs[0][0]["train_loss"] == logs[1][0]["train_loss"]
    assert not (sel_dir / "class_weights.pth").exists()            # stage 2 writes nothing into stage 1's folder

    # the Selection itself: this file's images, weights from the stored softmax of exactly these
    args = distill.get_args_parser().parse_args(fx.argv(flags))
    teacher = models.load_teacher(fx.MICRO, 10, world.teacher)
    cpu = torch.device("cpu")
    got = select_data.load_selection(args.selection_file, settings.resolve_select_settings(args, cpu), teacher)
    assert torch.equal(got.indices, chosen_y) and torch.allclose(got.class_weights, right)
    assert got.ids == [got.pool_index.ids[i] for i in chosen_y.tolist()] and got.rule == "worst"

    # without score files for this pool and teacher: weights from the file's predicted classes
    fresh = {**flags, "--selected_file": tmp_path / "empty"}
    os.makedirs(tmp_path / "empty")
    got = select_data.load_selection(args.selection_file, settings.resolve_select_settings(
        distill.get_args_parser().parse_args(fx.argv(fresh)), cpu), teacher)
    inverse = 1 / torch.bincount(pred[chosen_y], minlength=10).double().clamp_min(1)   # hard counts
    assert torch.allclose(got.class_weights, (inverse / inverse.sum() * 10).float())


@pytest.mark.parametrize("case", ["num_select", "locked"])
@pytest.mark.parametrize("script", [S, D])
def test_error_found_on_rank0_ends_every_rank(script, case, tmp_path):
    """2-process gloo run, errors only rank 0 can find: --num_select above the usable pool (known
    after scoring) and a run folder locked by another run (rank 0 holds the lock). Both ranks print
    exit 2, rank 0 prints the one `error:` line; none waits at a barrier or dies of a lost peer."""
    ids = fx.write_pool(tmp_path / "pool", 15, size=32, broken=5)
    teacher = fx.write_teacher(tmp_path / "t.pth")      # a registered name: the children build it
    fx.write_cifar(tmp_path / "cifar", n_train=2, n_test=8)
    flags = {"--data_imagenet": tmp_path / "pool", "--teacher": fx.TEACHER, "--teacher_dir": teacher,
             "--num_select": 12 if case == "num_select" else 8, "--selected_file": tmp_path / "sel",
             "--workers": 0, "--device": "cpu"}
    if script == D:
        flags.update({"--data_cifar": tmp_path / "cifar", "--output_dir": tmp_path / "out", "--epochs": 1,
                      "--batch_size": 8})
    release = fx.hold_lock(tmp_path / ("sel" if script == S else "out")) if case == "locked" else (lambda: None)
    try:
        codes, errs = fx.run_ranks(script, fx.argv(flags), tmp_path)
    finally:
        release()
    last = [[line for line in errs[0].splitlines() if line.strip()][-1]]
    assert codes == [2, 2], errs
    assert "error:" not in errs[1], errs[1]           # one line for the run, from rank 0
    assert all("Traceback" not in e for e in errs)
    assert not (tmp_path / "sel" / "selection.pt").exists()
    if case == "locked":
        folder, flag = (tmp_path / "sel", "--selected_file") if script == S else (tmp_path / "out", "--output_dir")
        assert last[0] == f"error: {folder} is in use by another run (pid 424242); wait for it or choose another {flag}"
        assert not (tmp_path / "sel" / "value_out.pth").exists()            # nothing scored
        return
    assert last[0].startswith("error: --num_select 12 is larger than the usable pool (10 images"), last[0]
    assert len(ids["broken"]) == 5
    if script == D:
        assert sorted(os.listdir(tmp_path / "out")) == [".lock"]   # no student/, log or args
