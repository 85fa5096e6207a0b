"""Stage 2: probe distillation of a ViT student on the selected wild images (the logic of DFND_DeiT-train.py).

    python DFND_DeiT-train.py --dataset cifar100 --data_cifar /data/cifar100 --data_imagenet /data/imagenet/train \
        --num_select 650000 --teacher_dir teacher_cifar100.pth --selected_file selected/cifar100 \
        --output_dir output/cifar100 --nb_classes 100 --lr_S 8.5e-4 --attnprobe_sel --attnprobe_dist
    torchrun --nproc_per_node 4 DFND_DeiT-train.py ...    # DistributedDataParallel, --batch_size is global

The run: resolve the flags once (settings.Settings), load the teacher and the test set, select (stage 1:
select_data.run_selection, or --selection_file), build the student, its noise-adaptation layer and
their optimizers, then epoch after epoch train on the selected images with loss = KD + NA + patchattn · PD
(distill_step), test on the original test set and commit the epoch. The run folder (checkpoint.RunFolder)
gets student/{checkpoint.pth (best test acc1), final.pth, last.pth (resume point)}, log.txt (one JSON
line per epoch), args.json, summary.json, selection.pt, and with --pos_num labelset_index_dict.pth.
Rerunning the same command resumes from last.pth.
"""
import json
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

import data
import engine
import flags
import models
import published
import select_data
from attention_probe import FEATURE_BLOCKS, WithFeatures
from checkpoint import RunFolder, own_record
from data import DATASETS
from losses import TERMS, NoiseAdaptation
from safety import atomic_torch_save, check_writable, cli_main, init_distributed, on_rank0, run_lock
from selection import labelled_class_mass, robust_kd_weights
from settings import PLAN_RECORDS, check_student, plan_run, resolve_settings
from utils import git_sha, rank_world, resolve_device, say


def get_args_parser():
    parser = flags.Parser(description="Attention Probe: probe distillation of a ViT student",
                          parents=[flags.system_parser()])
    parser.add_argument("--dataset", default=None, choices=list(DATASETS),
                        help=f"the teacher's task; its test set measures the student (default {published.DATASET}; "
                        "with --eval_only the student checkpoint's)")
    parser.add_argument("--data_cifar", type=flags.path,
                        help="original dataset root (test set; train set for --pos_num): "
                        "CIFAR pickles, IDX files, or an ImageFolder tree with train/ and val/")
    select_data.add_selection_args(parser)
    parser.add_argument("--selection_file", type=flags.path, default=None, help="train on a precomputed selection.pt "
                        "({'indices', 'pred'}; e.g. demo.py's oracle/energy references, or a run's "
                        "output_dir/selection.pt) instead of selecting; --selected_file is then optional")
    g = parser.add_argument_group("distillation (stage 2)")
    g.add_argument("--output_dir", "--output-dir", type=flags.path, help="run folder: student/, log.txt, args.json")
    g.add_argument("--student", type=flags.model_name, default=None,
                   help="student model (default: the tiny DeiT at the teacher's size)")
    g.add_argument("--lr_S", type=flags.positive_float, default=published.LR_S,
                   help=f"student AdamW learning rate (default {published.LR_S})")
    g.add_argument("--weight_decay", "--weight-decay", type=flags.nonneg_float, default=published.WEIGHT_DECAY,
                   help=f"student AdamW weight decay (default {published.WEIGHT_DECAY})")
    g.add_argument("--batch_size", "--batch-size", type=flags.positive_int, default=published.BATCH_SIZE,
                   help=f"global batch (default {published.BATCH_SIZE}, as the paper)")
    g.add_argument("--epochs", type=flags.positive_int, default=None,
                   help="default: the published formula int(320000 / num_select "
                   "* 512) (640000 for 224 px)")
    g.add_argument("--schedule", type=flags.nonneg_int, nargs="*", action=flags.Increasing,
                   default=list(published.SCHEDULE), help="lr ×0.1 from each of these epochs on, increasing (default "
                   + " ".join(map(str, published.SCHEDULE)) + "; none: a constant lr)")
    g.add_argument("--cos", action="store_true", help="cosine learning rate instead of --schedule")
    g.add_argument("--robust", action="store_true", help="class-weighted KD (the selection's class weights)")
    g.add_argument("--attnprobe_dist", action="store_true", help="add probe distillation (PD) to the loss")
    g.add_argument("--patchattn", type=flags.positive_float, default=published.PATCHATTN,
                   help=f"weight of PD (default {published.PATCHATTN}, as published)")
    g.add_argument("--pd_loss", default="cls_gram", choices=list(TERMS["pd"]),
                   help="the PD variant of losses.TERMS (default cls_gram, the published one)")
    blocks = " ".join(map(str, FEATURE_BLOCKS))
    for who in ("teacher", "student"):
        g.add_argument(f"--pd_{who}_blocks", type=flags.nonneg_int, nargs="+", action=flags.Increasing, default=None,
                       help=f"the {who}'s PD blocks, increasing, paired in order with the other's (default {blocks})")
    g.add_argument("--teacher_acc", type=flags.accuracy, default=None, help="noise-adaptation diagonal (default: the "
                   "teacher file's accuracy, else the published constant of --dataset: "
                   + ", ".join(f"{k} {v}" for k, v in published.TEACHER_ACC.items()) + "; other datasets need it)")
    g.add_argument("--pos_num", type=flags.nonneg_int, default=0,
                   help="add the first K labelled train images per class "
                   "(published: 50 Tiny-ImageNet, 129 ImageNet); the run is then NOT data-free")
    g.add_argument("--holdout", type=flags.below_half, default=0.0,
                   help="share of the selected images held out (not trained on) to report the test accuracy at "
                   "the best student-teacher agreement, chosen without test labels (default 0: none, as published)")
    g.add_argument("--eval_every", type=flags.positive_int, default=1, help="test every N epochs (and at the last)")
    g.add_argument("--crop_padding", type=flags.nonneg_int, default=None,
                   help="random-crop padding (default 4 at 32 and 224 px, as published; img_size // 8 at other sizes)")
    g.add_argument("--resume", type=flags.resume_point, default="auto",
                   help="'auto' (default: output_dir/student/last.pth if present), "
                   "a last.pth path, or 'no'")
    g.add_argument("--eval_only", "--eval", type=flags.path, default=None, metavar="CKPT",
                   help="only evaluate this student checkpoint")
    g.add_argument("--cuda_graphs", action="store_true", help="with --compile: mode='reduce-overhead'")
    g.add_argument("--log_every", type=flags.positive_int, default=50, help="steps between progress-bar loss reads")
    for flag in ("--patchattn", "--pd_loss", "--pd_teacher_blocks", "--pd_student_blocks"):
        parser.needs(flag, "--attnprobe_dist", "it sets probe distillation")
    parser.needs("--cuda_graphs", "--compile", "CUDA graphs are a torch.compile mode")
    parser.excludes("--cos", "--schedule", "the cosine lr has no milestones")
    parser.unused_with("--selection_file", SELECTION_FILE_IGNORES, "the file decides the images: no scoring, no rule")
    parser.only_with("--eval_only", EVAL_ONLY_USES, "it tests the checkpoint only")
    parser.records(PLAN_RECORDS)
    return parser


# --selection_file makes the flags that score and choose unused; --eval_only reads only EVAL_ONLY_USES: a flag
# they would ignore is refused beside them
SELECTION_FILE_IGNORES = ("--attnprobe_sel", "--random", "--rule", "--attnlier", "--outlier", "--per_class",
                          "--store_signals", "--flip_signal", "--force", "--score_batch_size", "--chunk_size",
                          "--no_report")
EVAL_ONLY_USES = {"--dataset", "--data_cifar", "--student", "--nb_classes", "--img_size", "--mean", "--std",
                  "--device", "--workers", "--amp", "--dist_timeout"}


# ---- the method ----------------------------------------------------------------------------------

def distill_step(images, teacher, student, noise, loss, class_weights=None):
    """The losses of one batch: KD + NA + patchattn · PD (the paper's loss), and their weighted sum.

    images: the augmented batch (B, C, H, W); teacher, student: WithFeatures modules -> (logits,
    (L, B, N, C) block features); noise: the NoiseAdaptation layer; loss: the LossConfig;
    class_weights: (C,) for robust KD, None for plain KD."""
    # --cuda_graphs: one step is one graph generation (the no-grad teacher would start one of its own)
    torch.compiler.cudagraph_mark_step_begin()
    with torch.no_grad():
        t_logits, t_feats = teacher(images)
    s_logits, s_feats = student(images)
    s_logits, t_logits = s_logits.float(), t_logits.float()
    weights = class_weights[t_logits.argmax(1)] if class_weights is not None else None   # its teacher class's
    kd = loss.kd(s_logits, t_logits, weights)
    na = noise(s_logits, t_logits)
    terms = {"kd": kd, "na": na}
    if loss.patchattn > 0:
        terms["pd"] = loss.pd(t_feats, s_feats)
    terms["loss"] = kd + na + loss.patchattn * terms.get("pd", 0.0)
    return terms


@dataclass
class Student:
    """The student, its noise-adaptation layer and their optimizers, and the modules distill_step calls
    (DistributedDataParallel under torchrun, compiled with --compile)."""
    model: torch.nn.Module       # the plain student: tested and saved
    noise: NoiseAdaptation
    optimizers: list             # [AdamW of the student, Adam of the noise layer]
    net: torch.nn.Module = None  # WithFeatures(model): (logits, PD features)
    noise_net: torch.nn.Module = None


class Loaders(NamedTuple):
    train: object                # engine batches of the training images
    test: object                 # the original test set
    holdout: object              # the held-out selected images (--holdout), or None
    augment: engine.Augment      # random crop + flip + normalisation
    plain: engine.Augment        # normalisation only


def train(s, plan, run, loaders, teacher_net, student, class_weights, device):
    """Epoch after epoch: its learning rate, a distill_step per batch, the test, the epoch committed."""
    n_parameters = sum(p.numel() for p in student.model.parameters())
    for epoch in range(run.state["epoch"] + 1, plan.epochs):
        lr = engine.lr_at(epoch + plan.lr_offset, s.lr_S, plan.epochs + plan.lr_offset, s.schedule, s.cos)
        engine.set_lr(student.optimizers[0], lr)
        t0 = time.time()
        epoch_run = engine.TrainEpoch(loaders.train, loaders.augment, epoch, device, s.seed, s.log_every, "distill",
                                      modules=(student.model, student.noise), phase="distillation",
                                      resumes=run.resumes)
        for batch in epoch_run:
            with engine.autocast(device, s.amp):
                terms = distill_step(batch.images, teacher_net, student.net, student.noise_net, s.loss, class_weights)
            epoch_run.step(terms, student.optimizers)
        # DeiT's log keys first (train_lr, train_loss, test_loss, test_acc1, test_acc5, epoch, n_parameters)
        record = {"train_lr": lr, **{f"train_{k}": v for k, v in epoch_run.metrics().items()}}
        if (epoch + 1) % s.eval_every == 0 or epoch == plan.epochs - 1:
            test = engine.evaluate(student.model, loaders.test, loaders.plain, device, s.amp)
            record.update(test_loss=test["loss"], test_acc1=test["acc1"], test_acc5=test["acc5"])
            if loaders.holdout is not None:
                record["holdout_agreement"] = engine.evaluate(student.model, loaders.holdout, loaders.plain, device,
                                                              s.amp)["acc1"]
            run.update_best(epoch, record)
        record.update(epoch=epoch, n_parameters=n_parameters, epoch_seconds=time.time() - t0)
        run.commit(epoch, record, student.model, student.noise, student.optimizers, last=epoch == plan.epochs - 1)
        say(json.dumps(record))


# ---- the run ---------------------------------------------------------------------------------------

@cli_main
def main(args):
    device = resolve_device(args.device)
    s = resolve_settings(args, device)
    init_distributed(device, args.dist_timeout)
    if s.eval_only:
        return evaluate_checkpoint(s, device)
    on_rank0(check_writable, s.output_dir)
    with run_lock(s.output_dir):
        return distill(s, device)


def distill(s, device):
    """The run: the teacher and its selection, the student, then its epochs; -> the final numbers."""
    t_start = time.time()
    # everything that can fail on bad input happens before any long work
    teacher = select_data.load_teacher(s.select, device)
    if DATASETS[s.dataset] not in (None, teacher.num_classes):
        say(f"note: --dataset {s.dataset} has {DATASETS[s.dataset]} classes; the teacher has {teacher.num_classes}")
    test = data.load_labelled(s.dataset, s.data_cifar, "val", teacher.img_size, teacher.in_chans)
    # a selection file is read first: its size sets the epoch count
    selection = select_data.load_selection(s.selection_file, s.select, teacher) if s.selection_file else None
    run = RunFolder(s.output_dir)
    ckpt = run.load(s.resume)
    plan = plan_run(s, teacher, len(selection) if selection is not None else s.select.num_select, len(test.classes),
                    ckpt.get("args") if ckpt else None, rank_world()[1])
    torch.manual_seed(s.seed)
    student = models.create(plan.student, teacher.num_classes, flag="--student")
    check_student(student, plan.student, teacher, s.pd_blocks)
    run.args = plan.record(s, teacher)   # args.json, and the args of every checkpoint
    if ckpt is not None:
        run.check_resume(ckpt.get("args", {}), run.args, ckpt["state"]["epoch"], s.resume)
    say(f"git {git_sha() or '?'} | teacher {teacher.name} ({teacher.num_classes} classes) | student {plan.student} "
        f"| {rank_world()[1]} process(es) on {device} | amp {'bf16' if s.amp is not None else 'off (fp32)'} | "
        f"noise-adaptation acc {plan.teacher_acc:.4f} from {plan.teacher_acc_from}")
    say(f"normalisation of every image (wild, train, test): mean {list(teacher.mean)} std {list(teacher.std)} "
        f"from {teacher.norm_source}")
    if selection is not None:   # a rule select_data does not implement: the caller chose the images
        say(f"selection: {len(selection)} images from {s.selection_file}")
    else:
        selection = select_data.run_selection(s.select, teacher)
    loaders, labelled = make_loaders(s, plan, selection, teacher, test, device)
    student = make_student(s, plan, teacher, student, device, ckpt, run)
    on_rank0(run.prepare, s.resume, own_record(ckpt, s.resume, run.last))
    on_rank0(run.record_selection, selection, s.resume)
    class_weights = kd_class_weights(s, selection, teacher, labelled, device) if s.robust else None
    teacher_net, student = wrap(s, teacher, student, device)
    on_rank0(run.write_args)
    train(s, plan, run, loaders, teacher_net, student, class_weights, device)
    final = run.finish()
    say("final: " + final["text"])
    say(f"done in {time.time() - t_start:.1f}s; files in {s.output_dir}")
    return final


def make_loaders(s, plan, selection, teacher, test, device):
    """Batches of the training images (the selection, and with --pos_num the labelled images), of the test
    set and of the holdout, and the augmentation -> (Loaders, the labelled images unaugmented or None)."""
    img_size, in_chans = teacher.img_size, teacher.in_chans
    positives = labelled = None
    if s.pos_num > 0:
        positives, pos_index, labelled = data.labelled_positives(s.dataset, s.data_cifar, s.pos_num, img_size,
                                                                 in_chans, plan.padding, s.seed)
        # part of this run's training set: recorded in its folder, not in stage 1's
        on_rank0(atomic_torch_save, {"positive_index": pos_index},
                 os.path.join(s.output_dir, "labelset_index_dict.pth"))
        say(f"NOT DATA-FREE: adding {len(pos_index)} labelled train images ({s.pos_num} per class)")
    train_data, (hold_images, hold_pred) = data.training_set(selection, img_size, in_chans, s.holdout, s.seed,
                                                             s.workers, s.select.fast_decode, positives)
    # the published DataLoader kept the last partial batch; CUDA graphs need one batch shape
    train_batches = engine.make_batches(train_data, batch_size=s.batch_size, shuffle=True,
                                        drop_last=s.compile and s.cuda_graphs, seed=s.seed, workers=s.workers,
                                        device=device)
    test_batches = engine.make_batches(test, batch_size=1024, shuffle=False, drop_last=False, workers=s.workers,
                                       device=device)
    hold_batches = engine.TensorBatches(hold_images, hold_pred, batch_size=1024, shuffle=False, drop_last=False)
    n_train, world = len(train_data), rank_world()[1]
    batch = engine.rank_batch(n_train, s.batch_size, True)[0] * world
    say(f"training on {n_train} images ({len(hold_images)} held out) for {plan.epochs} epochs ({plan.epochs_from})"
        f", {len(train_batches)} steps/epoch at global batch {batch}"
        + (f" (--batch_size {s.batch_size} clamped to the training images)" if batch < s.batch_size else ""))
    augment = engine.Augment(teacher.mean, teacher.std, plan.padding)
    plain = engine.Augment(teacher.mean, teacher.std, 0, train=False)
    return Loaders(train_batches, test_batches, hold_batches if len(hold_images) else None, augment, plain), labelled


def make_student(s, plan, teacher, model, device, ckpt, run):
    """The student, its noise layer and their optimizers -> Student; a resumed run's states restored."""
    model = model.to(device)
    noise = NoiseAdaptation(teacher.num_classes, plan.teacher_acc).to(device)
    opt_s = engine.adamw(model.parameters(), s.lr_S, s.weight_decay, device)
    opt_n = torch.optim.Adam(noise.parameters(), lr=published.NOISE_LR)
    if ckpt is not None:
        run.restore(ckpt, model, noise, [opt_s, opt_n])
        old = ckpt["args"].get("epochs_resolved", plan.epochs)
        say(f"resumed from {s.resume} after epoch {run.state['epoch']}"
            + (f"; extended from {old} to {plan.epochs} epochs (the learning rates of the epochs already trained "
               "are unchanged)" if old < plan.epochs else ""))
    return Student(model, noise, [opt_s, opt_n])


def kd_class_weights(s, selection, teacher, labelled, device):
    """The class weights of robust KD, from the selection's class mass with the --pos_num images' added (as
    the published 224-px script counted them), perturbed as published."""
    mass, kind = selection.class_mass
    if labelled is not None and len(labelled):
        mass = mass + labelled_class_mass(teacher, labelled, kind, device, s.amp, s.workers)
    weights = robust_kd_weights(mass, kind, s.seed)
    say("robust KD class weights (selection's" + (" and the labelled images'" if labelled is not None else "")
        + ", + U[0, 0.1) per class as published): " + " ".join(f"{w:.4f}" for w in weights[:20].tolist())
        + (" ..." if len(weights) > 20 else ""))
    return weights.to(device)


def wrap(s, teacher, student, device):
    """The modules distill_step calls: the teacher and the student with their PD block features; under
    torchrun the student and the noise layer in DistributedDataParallel; compiled with --compile."""
    t_blocks, s_blocks = s.pd_blocks
    teacher_net = WithFeatures(teacher.model, t_blocks)
    student.net = engine.distribute(WithFeatures(student.model, s_blocks), device)
    student.noise_net = engine.distribute(student.noise, device)
    if s.compile:
        student.net = engine.compiled(student.net, s.cuda_graphs)
        teacher_net = engine.compiled(teacher_net, s.cuda_graphs)
    return teacher_net, student


# ---- --eval_only ---------------------------------------------------------------------------------

def evaluate_checkpoint(s, device):
    """Test a student checkpoint; what a flag does not say (dataset, model and with it the image size,
    mean/std) comes from the checkpoint. Under torchrun every rank tests its share; rank 0 prints."""
    student, name, meta = models.load_student(s.eval_only, s.student, s.nb_classes, s.img_size)
    saved = meta.get("args") or {}
    in_chans, img_size = models.input_spec(student)
    dataset, dataset_from = ((s.dataset, "--dataset") if s.dataset else
                             (saved["dataset"], "the checkpoint") if saved.get("dataset") else
                             (published.DATASET, "the default"))
    mean, std = data.resolve_mean_std(s.mean or meta.get("mean") or saved.get("mean"),
                                      s.std or meta.get("std") or saved.get("std"), in_chans)
    test = data.load_labelled(dataset, s.data_cifar, "val", img_size, in_chans)
    batches = engine.make_batches(test, batch_size=512, shuffle=False, drop_last=False, workers=s.workers,
                                  device=device)
    result = engine.evaluate(student.to(device), batches, engine.Augment(mean, std, 0, train=False), device, s.amp)
    say(f"evaluating {name} ({img_size} px) on the {dataset} test set ({dataset_from}), mean {list(mean)} "
        f"std {list(std)}")
    say(json.dumps({"checkpoint": s.eval_only, "student": name, "dataset": dataset, **result}))
    return result
