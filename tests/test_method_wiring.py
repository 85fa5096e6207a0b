"""The method's formulas and wiring, each against a value computed by hand or by an independent path:
the published score (weights, the probe's sign, top-k), class weights, robust KD, top-1/top-5, and what a
short stage-2 run actually used (augmentation padding, noise-adaptation diagonal, distillation blocks,
the optimizers' learning rates per epoch, the holdout split), observed while it runs."""
import json
import math
import os
import pickle

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import attention_probe
import data
import distill
import engine
import fixtures as fx
import losses
import published
import reference

N_POOL = 16
pytestmark = pytest.mark.usefixtures("one_thread")


def write_png_pool(folder, n=N_POOL, seed=0):
    """n distinct 32x32 PNG images (lossless, so the pixels a run trains on can be matched) -> ids, sorted."""
    ids = []
    for i in range(n):
        rel = f"d{i % 2}/img_{i:03d}.png"
        fx.write_bytes(os.path.join(folder, rel), fx.encode(fx.smooth_rgb(32, 32, seed * 1000 + i), "PNG"))
        ids.append(rel)
    return sorted(ids)


def image_rows(folder, ids):
    """{bytes of the (3, 32, 32) uint8 image: id}, decoded with PIL alone."""
    return {np.ascontiguousarray(np.asarray(Image.open(os.path.join(folder, i)).convert("RGB")).transpose(2, 0, 1))
            .tobytes(): i for i in ids}


def published_order(folder, k):
    """The published rule on stored score files, with the re-enactment's own weights: the k lowest of
    attnlier · (value_blk3 + value_blk7) + outlier · value_out, best first."""
    s = {key: torch.load(os.path.join(folder, f"{key}.pth"), weights_only=True).double()
         for key in ("value_out", "value_blk3", "value_blk7")}
    return reference.published_selection(s["value_blk3"], s["value_blk7"], s["value_out"], k).tolist()


# ---- stage 1: the score, the order, the class weights ------------------------------------------

# probabilities of the 6 selected images, best first: soft totals per class [3, 1.5, 1.5]
SELECTED_PROBS = [[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.75, 0.25, 0.0],
                  [0.25, 0.25, 0.5]]
SELECTED_PRED = [0, 0, 0, 1, 1, 2]     # hard counts [3, 2, 1] for published caches without probabilities


def hand_scores(seed=3):
    """Scores where the probe decides the order: 0.9 · value_out spreads over 0.09, each 0.05 · value_blk
    over 0.04. Image 5 is unreadable (value_out +inf, pred -1); image 7 has a NaN score (pred 1)."""
    rng = np.random.default_rng(seed)
    s = {"value_out": rng.uniform(0.0, 0.1, N_POOL), "value_blk3": rng.uniform(0.2, 1.0, N_POOL),
         "value_blk7": rng.uniform(0.2, 1.0, N_POOL)}
    s["value_out"][5] = np.inf
    s["value_out"][7] = np.nan
    return {k: torch.tensor(v) for k, v in s.items()}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A pool, a 3-class teacher and score files in the published format (no fingerprint: reused because
    their length matches the pool), with probabilities (sel_probs) and without (sel_preds)."""
    tmp = tmp_path_factory.mktemp("stored")
    ids = write_png_pool(tmp / "pool")
    fx.write_teacher(tmp / "teacher.pth", name=fx.MICRO, num_classes=3)
    s = hand_scores()
    value = 0.05 * (s["value_blk3"] + s["value_blk7"]) + 0.9 * s["value_out"]
    best = torch.argsort(value)[:6].tolist()
    probs = np.tile(np.float16([0.0, 0.0, 1.0]), (N_POOL, 1))     # every other image: class 2 only
    pred = torch.ones(N_POOL, dtype=torch.long)
    probs[best] = np.float16(SELECTED_PROBS)
    pred[best] = torch.tensor(SELECTED_PRED)
    pred[5] = -1
    for name in ("sel_probs", "sel_preds"):
        os.makedirs(tmp / name)
        for key, v in s.items():
            torch.save(v.float(), tmp / name / f"{key}.pth")
        torch.save(pred, tmp / name / "pred_out.pth")
    np.save(tmp / "sel_probs" / "probs_out.npy", probs)
    return tmp, ids, s, best


def select(tmp, folder, *flags):
    argv = ["--data_imagenet", tmp / "pool", "--teacher", fx.MICRO, "--teacher_dir", tmp / "teacher.pth",
            "--selected_file", tmp / folder, "--workers", 0, "--device", "cpu", *flags]
    assert fx.run_script_inprocess("select_data.py", *argv) == 0
    chosen = torch.load(tmp / folder / "selection.pt", weights_only=True)["indices"].tolist()
    names = (tmp / folder / "selected.txt").read_text().split()
    return chosen, names, torch.load(tmp / folder / "class_weights.pth", weights_only=True)


def test_these_scores_let_the_probe_and_the_weights_decide(stored):
    """Guard: a probe subtracted or left out, one block only, or the weights swapped choose other images."""
    _, _, s, best = stored
    out, b3, b7 = s["value_out"], s["value_blk3"], s["value_blk7"]
    for wrong in (0.9 * out - 0.05 * (b3 + b7), out, 0.05 * out + 0.9 * (b3 + b7), 0.9 * out + 0.05 * b3,
                  0.9 * out + 0.05 * b7, 0.9 * out + 0.5 * (b3 + b7)):
        assert torch.argsort(wrong)[:6].tolist() != best


def test_published_score_chooses_the_lowest_weighted_sum(stored):
    tmp, ids, s, best = stored
    chosen, names, weights = select(tmp, "sel_probs", "--num_select", 6, "--attnprobe_sel")
    assert chosen == best == published_order(tmp / "sel_probs", 6)
    assert names == [ids[i] for i in best]
    # 1 / soft totals [3, 1.5, 1.5] = [1/3, 2/3, 2/3], rescaled to sum to 3 classes
    assert weights.tolist() == pytest.approx([0.6, 1.2, 1.2], rel=1e-6)


def test_confidence_alone_without_the_probe_flag(stored):
    tmp, _, s, _ = stored
    chosen, _, _ = select(tmp, "sel_probs", "--num_select", 6)
    assert chosen == torch.argsort(s["value_out"])[:6].tolist()
    assert chosen != torch.argsort(0.05 * (s["value_blk3"] + s["value_blk7"]) + 0.9 * s["value_out"])[:6].tolist()


def test_class_weights_from_hard_counts_without_probabilities(stored):
    tmp, _, _, best = stored
    chosen, _, weights = select(tmp, "sel_preds", "--num_select", 6, "--attnprobe_sel")
    assert chosen == best
    # counts [3, 2, 1] -> 1/counts = [1/3, 1/2, 1], rescaled to sum to 3: [6/11, 9/11, 18/11]
    assert weights.tolist() == pytest.approx([6 / 11, 9 / 11, 18 / 11], rel=1e-6)


def test_random_selection_is_seeded_and_never_takes_unreadable_images(stored):
    tmp, _, _, _ = stored
    a, _, _ = select(tmp, "sel_probs", "--num_select", 14, "--random", "--seed", 1)
    assert sorted(a) == [i for i in range(N_POOL) if i not in (5, 7)]   # all 14 usable images, never 5 or 7
    b, _, _ = select(tmp, "sel_probs", "--num_select", 8, "--random", "--seed", 1)
    c, _, _ = select(tmp, "sel_probs", "--num_select", 8, "--random", "--seed", 2)
    d, _, _ = select(tmp, "sel_probs", "--num_select", 8, "--random", "--seed", 1)
    assert b == d and b != c and len(set(b)) == 8 and not {5, 7} & set(b + c)


# ---- losses and evaluation, by hand --------------------------------------------------------------

def kl_by_hand(t_row, s_row, T):
    q = [math.exp(v / T) for v in t_row]
    p = [math.exp(v / T) for v in s_row]
    q, p = [v / sum(q) for v in q], [v / sum(p) for v in p]
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))


class _Fixed(torch.nn.Module):
    """A teacher or student module: returns (logits, features), whatever the images."""

    def __init__(self, logits, feats):
        super().__init__()
        self.logits, self.feats = logits, feats

    def forward(self, x):
        return self.logits + 0 * x.sum(), self.feats


def test_distill_step_robust_kd_weights_by_teacher_class():
    # every student disagrees with its teacher: the weight must be the teacher-predicted class's
    t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.5], [0.0, 0.0, 4.0], [1.0, 0.0, 0.2]])
    s = torch.tensor([[0.0, 2.0, 0.0], [1.5, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 2.5]])
    w = torch.tensor([0.5, 1.0, 3.0])     # per-sample weights sum to 5, not to the batch size 4
    ft = torch.tensor([3.0, 4.0]).view(1, 1, 2, 1)     # token-normalised [0.6, 0.8]: CLS row 0.48
    fs = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)     # [1, 0]: CLS row 0 -> PD = 0.48²
    noise = lambda s_logits, t_logits: torch.tensor(0.3)    # noqa: E731  (NA by hand: its own test)
    x = torch.zeros(4, 3, 2, 2)
    got = distill.distill_step(x, _Fixed(t, ft), _Fixed(s, fs), noise, losses.LossConfig(patchattn=0.8),
                               class_weights=w)
    teacher_class = [0, 1, 2, 0]
    kd = 16 * sum(w[c].item() * kl_by_hand(t[i].tolist(), s[i].tolist(), 4.0)
                  for i, c in enumerate(teacher_class)) / 4
    assert got["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert got["pd"].item() == pytest.approx(0.48 ** 2, rel=1e-5)
    assert got["loss"].item() == pytest.approx(kd + 0.3 + 0.8 * 0.48 ** 2, rel=1e-5)
    plain = distill.distill_step(x, _Fixed(t, ft), _Fixed(s, fs), noise, losses.LossConfig(patchattn=0.0))
    kd_plain = 16 * sum(kl_by_hand(t[i].tolist(), s[i].tolist(), 4.0) for i in range(4)) / 4
    assert plain["kd"].item() == pytest.approx(kd_plain, rel=1e-5)
    assert plain["loss"].item() == pytest.approx(kd_plain + 0.3, rel=1e-5)   # no PD without patchattn


def test_noise_adaptation_loss_by_hand():
    na = losses.NoiseAdaptation(3, 0.7)
    s = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, 5.0], [0.0, 3.0, 0.0]])     # teacher classes 2 and 1
    # theta = 0: Q = 0.7 on the diagonal, 0.15 elsewhere; loss = mean of -log (softmax(s) @ Q)[teacher class]
    expected = 0.0
    for row, c in zip(s.tolist(), (2, 1)):
        e = [math.exp(v) for v in row]
        p = [v / sum(e) for v in e]
        expected -= math.log(sum(p[j] * (0.7 if j == c else 0.15) for j in range(3))) / 2
    assert na(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_evaluate_counts_top1_and_top5_on_fixed_logits():
    """Six images, seven classes; the label is the 1st, 2nd, 5th, 6th, 1st and 7th most likely class."""
    logits = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]]).repeat(6, 1)
    labels = torch.tensor([0, 1, 4, 5, 0, 6])
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous()

    class Table(torch.nn.Module):          # image i (pixel value i) -> logits[i]
        def forward(self, x):
            return logits[(x[:, 0, 0, 0] * 255).round().long()]
    batches = engine.TensorBatches(images, labels, batch_size=4, shuffle=False, drop_last=False)
    got = engine.evaluate(Table(), batches, engine.Augment((0.0,) * 3, (1.0,) * 3, 0, train=False),
                          torch.device("cpu"))
    assert got["acc1"] == pytest.approx(100 * 2 / 6) and got["acc5"] == pytest.approx(100 * 4 / 6)
    lse = math.log(sum(math.exp(v) for v in range(1, 8)))
    assert got["loss"] == pytest.approx(sum(lse - (7 - int(c)) for c in labels) / 6, rel=1e-6)
    assert got["n"] == 6


# ---- stage 2, observed while it runs -------------------------------------------------------------

class Spy:
    """Records what a stage-2 run passes to the augmentation, the noise layer, the probe forward, the
    optimizers, robust KD and evaluation, by wrapping the public functions it calls."""

    def __init__(self, mp):
        self.crops, self.na_diag, self.feature_blocks, self.steps, self.robust, self.evals = [], [], [], [], [], []
        self.epochs_asked = []
        crop, na, pf, rk, ev = (data.random_crop_flip, losses.NoiseAdaptation.forward, attention_probe.probe_forward,
                                losses.robust_kdloss, engine.evaluate)

        def crop_spy(x, padding, *a, **k):
            self.crops.append((x.detach().cpu().clone(), padding))
            return crop(x, padding, *a, **k)

        def na_spy(module, *a, **k):
            self.na_diag.append(module.transition().detach().diagonal().clone())
            return na(module, *a, **k)

        def pf_spy(model, images, *a, **k):
            blocks = k.get("feature_blocks", a[2] if len(a) > 2 else ())
            if len(blocks):
                self.feature_blocks.append((model.training, tuple(blocks)))
            return pf(model, images, *a, **k)

        def rk_spy(y, teacher_scores, weights, *a, **k):
            self.robust.append((teacher_scores.detach().clone(), weights.detach().clone()))
            return rk(y, teacher_scores, weights, *a, **k)

        def ev_spy(model, batches, *a, **k):
            got = [(b.images.cpu().clone(), b.labels.cpu().clone()) for b in batches.epoch(0)]
            self.evals.append((torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])))
            return ev(model, batches, *a, **k)

        step = torch.optim.Adam.step

        def step_spy(opt, *a, **k):
            g = opt.param_groups[0]
            self.steps.append((type(opt).__name__, g["lr"], g["weight_decay"]))
            return step(opt, *a, **k)

        def epochs_spy(num_select, img_size):
            self.epochs_asked.append((num_select, img_size))
            return 4     # the published loop then trains epochs e = 1, 2, 3 of E = 4

        mp.setattr(data, "random_crop_flip", crop_spy)
        mp.setattr(losses.NoiseAdaptation, "forward", na_spy)
        mp.setattr(attention_probe, "probe_forward", pf_spy)
        mp.setattr(losses, "robust_kdloss", rk_spy)
        mp.setattr(engine, "evaluate", ev_spy)
        mp.setattr(torch.optim.Adam, "step", step_spy)
        if "step" in vars(torch.optim.AdamW):
            mp.setattr(torch.optim.AdamW, "step", step_spy)
        mp.setattr(published, "epochs", epochs_spy)


def run_stage2(tmp, teacher, sel, out, *flags):
    """distill.main in this process, on tmp's pool, CIFAR-10 files and teacher file, spied -> (Spy, summary)."""
    argv = ["--dataset", "cifar10", "--data_cifar", tmp / "cifar", "--data_imagenet", tmp / "pool",
            "--teacher", fx.MICRO, "--teacher_dir", tmp / teacher, "--student", fx.MICRO, "--selected_file",
            tmp / sel, "--output_dir", tmp / out, "--workers", 0, "--device", "cpu", "--amp", "off", *flags]
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        torch.set_num_threads(1)    # module fixtures run before the one_thread fixture
        spy = Spy(mp)
        try:
            return spy, distill.main(distill.get_args_parser().parse_args([str(a) for a in argv]))
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    """A published-style run (no --epochs: the published loop, its E shortened to 4) of 12 selected images,
    3 held out, batch 3, robust KD and probe distillation, teacher file with acc1 55.0 (percent)."""
    tmp = tmp_path_factory.mktemp("stage2")
    ids = write_png_pool(tmp / "pool", seed=1)
    fx.write_cifar(tmp / "cifar", "cifar10", n_train=2, n_test=20)
    fx.register_test_models()
    torch.manual_seed(5)    # a seed whose teacher predicts three classes on this pool
    teacher = timm.create_model(fx.MICRO, num_classes=10)
    with torch.no_grad():
        teacher.head.weight.mul_(40)    # input-dependent predictions: several classes among the selection
    torch.save({"model": teacher.state_dict(), "acc1": 55.0}, tmp / "teacher.pth")
    spy, final = run_stage2(tmp, "teacher.pth", "sel", "out", "--num_select", 12, "--lr_S", 1e-3,
                            "--schedule", 2, 3, "--batch_size", 3, "--holdout", 0.25, "--attnprobe_sel",
                            "--attnprobe_dist", "--robust")
    log = [json.loads(line) for line in open(tmp / "out" / "log.txt")]
    return tmp, ids, spy, final, log


def test_stage2_trains_the_published_selection_minus_the_holdout(stage2):
    tmp, ids, spy, _, _ = stage2
    selected = (tmp / "sel" / "selected.txt").read_text().split()
    order = published_order(tmp / "sel", 12)
    assert selected == [ids[i] for i in order]
    rows = image_rows(tmp / "pool", selected)
    assert len(rows) == 12
    steps_per_epoch = 3
    assert len(spy.crops) == 3 * steps_per_epoch
    trained = []
    for e in range(3):
        epoch_rows = [r.numpy().tobytes() for x, _ in spy.crops[e * 3:(e + 1) * 3] for r in x]
        assert len(epoch_rows) == 9 and len(set(epoch_rows)) == 9      # each training image once per epoch
        trained.append(set(epoch_rows))
    assert trained[0] == trained[1] == trained[2] and trained[0] <= set(rows)
    held = [(x, y) for x, y in spy.evals if x[0].numpy().tobytes() in rows]
    assert len(held) == 3                                           # the holdout, evaluated every epoch
    hold_images, hold_labels = held[0]
    hold_rows = {r.numpy().tobytes() for r in hold_images}
    assert len(hold_rows) == 3 and not hold_rows & trained[0] and hold_rows | trained[0] == set(rows)
    # the holdout is scored against the teacher's predicted class of each image
    pred = torch.load(tmp / "sel" / "pred_out.pth", weights_only=True)
    assert len({int(pred[ids.index(i)]) for i in selected}) >= 3      # labels of other images would differ
    assert hold_labels.tolist() == [int(pred[ids.index(rows[r.numpy().tobytes()])]) for r in hold_images]


def test_stage2_uses_the_published_augmentation_noise_blocks_and_lr(stage2):
    tmp, _, spy, final, log = stage2
    assert {pad for _, pad in spy.crops} == {4}                          # RandomCrop(32, padding=4)
    assert len(spy.na_diag) == 9 and all(torch.allclose(d, torch.full((10,), 0.55)) for d in spy.na_diag)
    # teacher (eval) and student (train) features of blocks 3, 7, 11 (the published list), every step
    assert sorted(set(spy.feature_blocks)) == [(False, tuple(reference.FEATURE_BLOCKS)),
                                               (True, tuple(reference.FEATURE_BLOCKS))]
    assert len(spy.feature_blocks) == 18
    assert spy.epochs_asked and set(spy.epochs_asked) == {(12, 32)}
    # the published loop: epochs e = 1..E-1 with the lr evaluated at e; lr_S · 0.1 from e >= 2, again from 3
    student = [(lr, wd) for name, lr, wd in spy.steps if name == "AdamW"]
    noise = [lr for name, lr, _ in spy.steps if name == "Adam"]
    assert [lr for lr, _ in student] == pytest.approx([1e-3] * 3 + [1e-4] * 3 + [1e-5] * 3)
    assert {wd for _, wd in student} == {0.025} and noise == [1e-3] * 9
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert [r["train_lr"] for r in log] == pytest.approx([1e-3, 1e-4, 1e-5])
    for r in log:   # loss = KD + NA + 0.8 · PD, per step and so in the epoch means
        assert r["train_loss"] == pytest.approx(r["train_kd"] + r["train_na"] + 0.8 * r["train_pd"], rel=1e-5)
    assert final["epochs"] == 3 and final["final_acc1"] == log[-1]["test_acc1"]
    assert final["best_acc1"] == max(r["test_acc1"] for r in log)
    assert log[final["best_epoch"]]["test_acc1"] == final["best_acc1"]


def test_stage2_robust_kd_uses_the_perturbed_selection_weights_by_teacher_class(stage2):
    tmp, _, spy, _, _ = stage2
    selection_weights = torch.load(tmp / "sel" / "class_weights.pth", weights_only=True)
    assert len(spy.robust) == 9
    used = {}
    for t_logits, w in spy.robust:
        for c, wi in zip(t_logits.argmax(1).tolist(), w.tolist()):
            assert used.setdefault(c, wi) == wi                      # one weight per teacher class
    for c, wi in used.items():
        # the published perturb: w + U[0, 0.1), drawn once
        assert 0 < wi - selection_weights[c].item() < 0.1


def test_stage2_evaluates_on_the_test_set(stage2):
    tmp, _, spy, _, log = stage2
    with open(tmp / "cifar" / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)
    images = torch.from_numpy(raw[b"data"]).view(-1, 3, 32, 32)
    labels = torch.tensor(raw[b"labels"])
    tests = [(x, y) for x, y in spy.evals if len(x) == 20]
    assert len(tests) == 3 and all(torch.equal(x, images) and torch.equal(y, labels) for x, y in tests)
    assert all(0 <= r["test_acc1"] <= r["test_acc5"] <= 100 for r in log)


@pytest.mark.parametrize("flags,acc", [((), 0.9665), (("--teacher_acc", 0.7), 0.7)])
def test_stage2_noise_diagonal_without_accuracy_in_the_teacher_file(stage2, flags, acc):
    """No acc1 in the file: the published CIFAR-10 constant 0.9665, unless --teacher_acc says otherwise."""
    tmp = stage2[0]
    if not (tmp / "teacher_no_acc.pth").exists():
        sd = torch.load(tmp / "teacher.pth", weights_only=True)["model"]
        torch.save({"model": sd}, tmp / "teacher_no_acc.pth")
    spy, _ = run_stage2(tmp, "teacher_no_acc.pth", "sel_no_acc", f"out_no_acc_{acc}", "--num_select", 12,
                        "--epochs", 1, "--batch_size", 12, *flags)
    assert len(spy.na_diag) == 1 and torch.allclose(spy.na_diag[0], torch.full((10,), acc))


def test_stage2_options_do_what_their_help_says(stage2):
    """Non-default stage-2 values, observed in the run: PD's weight and its block pairs in the order given,
    the crop padding, AdamW's weight decay, the cosine lr over --epochs, and tests every --eval_every epochs."""
    tmp = stage2[0]
    spy, final = run_stage2(tmp, "teacher.pth", "sel_options", "out_options", "--num_select", 12, "--epochs", 3,
                            "--batch_size", 6, "--lr_S", 2e-3, "--cos", "--weight_decay", 0.1, "--crop_padding", 2,
                            "--eval_every", 2, "--attnprobe_dist", "--patchattn", 0.5,
                            "--pd_teacher_blocks", 1, 5, 9, "--pd_student_blocks", 2, 6, 10)
    log = [json.loads(line) for line in (tmp / "out_options" / "log.txt").read_text().splitlines()]
    assert {pad for _, pad in spy.crops} == {2}
    assert sorted(set(spy.feature_blocks)) == [(False, (1, 5, 9)), (True, (2, 6, 10))]
    for r in log:   # loss = KD + NA + 0.5 · PD
        assert r["train_loss"] == pytest.approx(r["train_kd"] + r["train_na"] + 0.5 * r["train_pd"], rel=1e-5)
    student = [(lr, wd) for name, lr, wd in spy.steps if name == "AdamW"]
    cosine = [2e-3 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3) for _ in range(2)]
    assert [lr for lr, _ in student] == pytest.approx(cosine) and {wd for _, wd in student} == {0.1}
    # tested after epochs 1 (every 2nd) and 2 (the last), not after epoch 0
    assert len([x for x, _ in spy.evals if len(x) == 20]) == 2
    assert final["epochs"] == 3
