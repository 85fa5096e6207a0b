"""Stage 2: probe distillation of a ViT student on the selected wild images (the logic of DFND_DeiT-train.py).

    python DFND_DeiT-train.py --dataset cifar100 --data_cifar /data/cifar100 --data_imagenet /data/imagenet/train \
        --num_select 650000 --teacher_dir teacher_cifar100.pth --selected_file selected/cifar100 \
        --output_dir output/cifar100 --nb_classes 100 --lr_S 8.5e-4 --attnprobe_sel --attnprobe_dist
    torchrun --nproc_per_node 4 DFND_DeiT-train.py ...    # DistributedDataParallel, --batch_size is global

Takes a Selection from stage 1 (select_data.run_selection: scores are computed when missing, else
reused; or --selection_file), then trains the student on it with KD + noise adaptation
(+ patchattn · probe distillation with --attnprobe_dist).
Writes output_dir/student/{checkpoint.pth (best test acc1), last.pth (resume point)},
output_dir/log.txt (one JSON line per epoch), output_dir/args.json, and with --pos_num
output_dir/labelset_index_dict.pth (the labeled train images added). Rerunning the same
command resumes from last.pth.
"""
import argparse
import json
import os
import subprocess
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import data
import engine
import models
import pool
import select_data
from attention_probe import FEATURE_BLOCKS
from data import DATASET_CLASSES
from losses import NoiseAdaptation
from utils import (InputError, amp_dtype, atomic_torch_save, atomic_write_text, barrier, check_writable,
                   init_distributed, on_rank0, resolve_device, run_lock)

# published noise-adaptation constants (teacher accuracies), used when the teacher file has none
PUBLISHED_TEACHER_ACC = {"cifar10": 0.9665, "cifar100": 0.7630, "imagenet": 0.8118, "tinyimagenet": 0.8118}


def get_args_parser():
    parser = argparse.ArgumentParser(description="Attention Probe: probe distillation of a ViT student")
    parser.add_argument("--dataset", default="cifar10", choices=sorted(DATASET_CLASSES) + ["folder"],
                        help="the teacher's task; its test set measures the student")
    parser.add_argument("--data_cifar", help="original dataset root (test set; train set for --pos_num): "
                        "CIFAR pickles, IDX files, or an ImageFolder tree with train/ and val/")
    select_data.add_selection_args(parser)
    parser.add_argument("--selection_file", default=None, help="train on a precomputed selection.pt "
                        "({'indices', 'pred'}; e.g. demo.py's oracle/energy references) instead of selecting")
    g = parser.add_argument_group("distillation (stage 2)")
    g.add_argument("--output_dir", help="run folder: student/, log.txt, args.json")
    g.add_argument("--student", default=None, help="student model (default: the tiny DeiT at the teacher's size)")
    g.add_argument("--lr_S", type=float, default=7.5e-4, help="student AdamW learning rate (default 7.5e-4)")
    g.add_argument("--weight_decay", type=float, default=0.025)
    g.add_argument("--batch_size", type=int, default=256, help="global batch (default 256, as the paper)")
    g.add_argument("--epochs", type=int, default=None,
                   help="default: the published formula int(320000 / num_select * 512) (640000 for 224 px)")
    g.add_argument("--schedule", type=int, nargs="*", default=[200, 300], help="lr ×0.1 at these epochs")
    g.add_argument("--cos", action="store_true", help="cosine learning rate instead of --schedule")
    g.add_argument("--robust", action="store_true", help="class-weighted KD (the selection's class weights)")
    g.add_argument("--attnprobe_dist", action="store_true", help="add probe distillation (PD) to the loss")
    g.add_argument("--patchattn", type=float, default=1.0, help="weight of PD (default 1.0)")
    g.add_argument("--pd_teacher_blocks", type=int, nargs="+", default=None, help="default 3 7 11")
    g.add_argument("--pd_student_blocks", type=int, nargs="+", default=None, help="default 3 7 11")
    g.add_argument("--teacher_acc", type=float, default=None, help="noise-adaptation diagonal (default: the "
                   "teacher file's accuracy, else the published constant of --dataset)")
    g.add_argument("--pos_num", type=int, default=0, help="add the first K labeled train images per class "
                   "(published: 50 Tiny-ImageNet, 129 ImageNet); the run is then NOT data-free")
    g.add_argument("--holdout", type=float, default=0.01,
                   help="share of the selected images held out to track student-teacher agreement (default 0.01)")
    g.add_argument("--eval_every", type=int, default=1, help="test every N epochs (and at the last)")
    g.add_argument("--crop_padding", type=int, default=None, help="random-crop padding (default img_size // 8)")
    g.add_argument("--resume", default="auto", help="'auto' (default: output_dir/student/last.pth if present), "
                   "a last.pth path, or 'no'")
    g.add_argument("--eval_only", default=None, metavar="CKPT", help="only evaluate this student checkpoint")
    g = parser.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--workers", type=int, default=8, help="image decoding processes (default 8)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"], help="autocast (auto: bf16 on CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile student and teacher steps")
    g.add_argument("--cuda_graphs", action="store_true", help="with --compile: mode='reduce-overhead'")
    g.add_argument("--log_every", type=int, default=50, help="steps between progress-bar loss reads")
    return parser


# ---- checks -----------------------------------------------------------------------------

def check_args(args):
    if args.eval_only:
        if not args.data_cifar:
            raise InputError("--eval_only needs --data_cifar (the test set)")
        if not os.path.isdir(args.data_cifar):
            raise InputError(f"--data_cifar {args.data_cifar}: no such folder")
        if not os.path.isfile(args.eval_only):
            raise InputError(f"--eval_only {args.eval_only}: no such file")
        return
    if not args.data_cifar:
        raise InputError("--data_cifar (the original dataset root, for the test set) is required")
    if not os.path.isdir(args.data_cifar):
        raise InputError(f"--data_cifar {args.data_cifar}: no such folder")
    if not args.output_dir:
        raise InputError("--output_dir is required")
    if args.epochs is not None and args.epochs <= 0:
        raise InputError(f"--epochs must be positive, got {args.epochs}")
    if not 0 <= args.holdout < 0.5:
        raise InputError(f"--holdout must be in [0, 0.5), got {args.holdout}")
    if args.batch_size <= 0:
        raise InputError(f"--batch_size must be positive, got {args.batch_size}")
    if args.resume not in ("auto", "no") and not os.path.isfile(args.resume):
        raise InputError(f"--resume {args.resume}: no such file")
    select_data.check_selection_args(args)   # last: it creates --selected_file


def published_epochs(num_select, img_size):
    return int((320000 if img_size <= 64 else 640000) / num_select * 512)


def default_student(img_size):
    return {32: "deit_tiny_patch4_32", 28: "deit_tiny_patch4_28"}.get(img_size, "deit_tiny_patch16_224")


def resolve_teacher_acc(args, teacher):
    if args.teacher_acc is not None:
        return args.teacher_acc, "--teacher_acc"
    if teacher.accuracy is not None:
        return teacher.accuracy, "the teacher checkpoint"
    return PUBLISHED_TEACHER_ACC.get(args.dataset, 0.8118), f"the published constant for {args.dataset}"


def feature_block_pairs(args, teacher, student):
    t_blocks = args.pd_teacher_blocks or list(FEATURE_BLOCKS)
    s_blocks = args.pd_student_blocks or list(FEATURE_BLOCKS)
    if len(t_blocks) != len(s_blocks):
        raise InputError("--pd_teacher_blocks and --pd_student_blocks must name as many blocks")
    for name, model, blocks in (("teacher", teacher, t_blocks), ("student", student, s_blocks)):
        if max(blocks) >= len(model.blocks):
            raise InputError(f"the {name} has {len(model.blocks)} blocks: probe distillation of block "
                             f"{max(blocks)} is impossible (set --pd_{name}_blocks)")
    tokens = [m.patch_embed.num_patches + m.num_prefix_tokens for m in (teacher, student)]
    if tokens[0] != tokens[1]:
        raise InputError(f"teacher and student differ in token count ({tokens[0]} vs {tokens[1]}): "
                         "probe distillation needs the same patch grid")
    return t_blocks, s_blocks


# ---- data -------------------------------------------------------------------------------

def split_holdout(indices, share, seed):
    """Deterministic split of the selection -> (train indices, holdout positions into `indices`)."""
    k = len(indices)
    n_hold = int(round(share * k)) if share > 0 and k >= 2 else 0
    g = torch.Generator().manual_seed(seed + 7)
    perm = torch.randperm(k, generator=g)
    hold = perm[:n_hold].sort().values
    keep = torch.ones(k, dtype=torch.bool)
    keep[hold] = False
    return keep.nonzero().squeeze(1), hold


def labeled_positives(args, img_size, in_chans):
    """The first --pos_num images per class of the labeled train set -> (lazy Subset, train indices)."""
    train = data.load_labeled(args.dataset, args.data_cifar, "train", img_size, in_chans)
    labels = torch.as_tensor(train.targets)
    chosen = []
    for c in range(int(labels.max()) + 1):
        chosen += (labels == c).nonzero().squeeze(1)[:args.pos_num].tolist()
    chosen.sort()
    return torch.utils.data.Subset(train, chosen), chosen


class _ImagesOnly(torch.utils.data.Dataset):
    """(image, 0) items of a PoolDataset or labeled subset, for the distillation loader."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], 0


def training_images(args, selection, teacher, positives):
    """The student's training set: in memory (uint8 tensor) up to 64 px, else a decoding Dataset."""
    img_size, in_chans = teacher.img_size, teacher.in_chans
    train_pos, hold_pos = split_holdout(selection.indices, args.holdout, args.seed)
    train_idx = selection.indices[train_pos]
    hold_idx = selection.indices[hold_pos]
    source = selection.source
    holdout = (pool.load_selected_uint8(source, hold_idx, img_size, in_chans, args.workers),
               selection.pred[hold_pos].long())
    if img_size <= 64:
        train = pool.load_selected_uint8(source, train_idx, img_size, in_chans, args.workers)
        if positives is not None and len(positives):
            train = torch.cat([train, torch.stack([positives[i][0] for i in range(len(positives))])])
        return train, holdout
    train = _ImagesOnly(pool.PoolDataset(selection.pool_index, img_size, in_chans, indices=train_idx.numpy()))
    if positives is not None:
        train = torch.utils.data.ConcatDataset([train, _ImagesOnly(positives)])
    return train, holdout


# ---- run --------------------------------------------------------------------------------

def _default_student_fitting(state_dict, num_classes):
    """The default student (32, 28 or 224 px) whose patch embedding and positions fit the checkpoint."""
    keys = ("pos_embed", "patch_embed.proj.weight")
    for size in (32, 28, 224):
        name = default_student(size)
        own = models.create(name, num_classes).state_dict()
        if all(k in state_dict and state_dict[k].shape == own[k].shape for k in keys):
            return name
    raise InputError("cannot tell which student this checkpoint holds: pass --student")


def run_eval_only(args, device):
    num_classes = args.nb_classes or models.infer_num_classes(args.eval_only)
    sd, meta = models.read_checkpoint(args.eval_only)
    name = args.student or meta.get("student") or _default_student_fitting(sd, num_classes)
    student = models.create(name, num_classes)
    models.load_state_dict_strict(student, sd, source=args.eval_only)
    student.to(device)
    in_chans, img_size = models.input_spec(student)
    # our checkpoints carry the normalisation they were trained with
    mean, std = data.resolve_mean_std(args.mean or meta.get("mean"), args.std or meta.get("std"), in_chans)
    test = data.load_labeled(args.dataset, args.data_cifar, "val", img_size, in_chans)
    batches = engine.make_batches(test, batch_size=512, shuffle=False, drop_last=False, workers=args.workers,
                                  device=device)
    result = engine.evaluate(student, batches, engine.Augment(mean, std, 0, train=False), device,
                             amp_dtype(args.amp, device))
    print(json.dumps({"checkpoint": args.eval_only, "student": name, **result}))
    return result


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(args):
    check_args(args)
    device = resolve_device(args.device)
    rank, world = init_distributed(device)
    if args.eval_only:
        return run_eval_only(args, device) if rank == 0 else None
    student_dir = os.path.join(args.output_dir, "student")
    on_rank0(check_writable, args.output_dir)
    with run_lock(args.output_dir):
        return _run(args, device, rank, world, student_dir)


def _run(args, device, rank, world, student_dir):
    say = print if rank == 0 else (lambda *a, **k: None)
    amp = amp_dtype(args.amp, device)
    # everything that can fail on bad input happens before any long work
    teacher = models.load_teacher(args.teacher, args.nb_classes, args.teacher_dir, device,
                                  mean=args.mean, std=args.std, img_size=args.img_size)
    in_chans, img_size, mean, std = teacher.in_chans, teacher.img_size, teacher.mean, teacher.std
    # resolved: saved in args.json and the checkpoints
    args.nb_classes, args.mean, args.std = teacher.num_classes, list(mean), list(std)
    if args.dataset in DATASET_CLASSES and DATASET_CLASSES[args.dataset] != args.nb_classes:
        say(f"note: --dataset {args.dataset} has {DATASET_CLASSES[args.dataset]} classes; "
            f"the teacher has {args.nb_classes}")
    test = data.load_labeled(args.dataset, args.data_cifar, "val", img_size, in_chans)
    if len(test.classes) > args.nb_classes:
        raise InputError(f"the test set at {args.data_cifar} has {len(test.classes)} classes but the teacher "
                         f"has {args.nb_classes}")
    args.student = args.student or default_student(img_size)
    student = models.create(args.student, args.nb_classes)
    if models.input_spec(student) != (in_chans, img_size):
        raise InputError(f"--student {args.student} takes {models.input_spec(student)} (channels, size) "
                         f"but the teacher takes {(in_chans, img_size)}")
    t_blocks, s_blocks = feature_block_pairs(args, teacher.model, student) if args.attnprobe_dist else ((), ())
    teacher_acc, acc_source = resolve_teacher_acc(args, teacher)
    resume = _find_resume(args, student_dir)
    ckpt = engine.load_resume(resume) if resume else None
    if ckpt is not None:
        missing = [k for k in ("model", "noise", "optimizer", "optimizer_noise", "state") if k not in ckpt]
        if missing:
            raise InputError(f"--resume {resume} is not a last.pth of this script (no {', '.join(missing)})")
        _check_same_run(ckpt.get("args", {}), args, resume)
    say(f"git {git_sha() or '?'} | teacher {args.teacher} ({args.nb_classes} classes) | student {args.student} "
        f"| {world} process(es) on {device} | amp {amp} | noise-adaptation acc {teacher_acc:.4f} from {acc_source}")

    if args.selection_file:   # a rule select_data does not implement: the caller chose the images
        selection = select_data.load_selection(args.selection_file, args, teacher)
        say(f"selection: {len(selection)} images from {args.selection_file}")
    else:
        selection = select_data.run_selection(args, teacher, device)
    positives = None
    if args.pos_num > 0:
        positives, pos_index = labeled_positives(args, img_size, in_chans)
        if rank == 0:   # part of this run's training set: recorded in its folder, not in stage 1's
            atomic_torch_save({"positive_index": pos_index},
                              os.path.join(args.output_dir, "labelset_index_dict.pth"))
        say(f"NOT DATA-FREE: adding {len(pos_index)} labeled train images ({args.pos_num} per class)")
    train_data, (hold_images, hold_pred) = training_images(args, selection, teacher, positives)
    epochs = args.epochs or published_epochs(args.num_select, img_size)
    args.epochs_resolved = epochs
    on_gpu = device.type == "cuda"
    train_batches = engine.make_batches(train_data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                        seed=args.seed, workers=args.workers, device=device)
    test_batches = engine.make_batches(test, batch_size=1024, shuffle=False, drop_last=False,
                                       workers=args.workers, device=device)
    hold_batches = engine.TensorBatches(hold_images, hold_pred, batch_size=1024, shuffle=False, drop_last=False)
    n_train = len(train_data)
    say(f"training on {n_train} images ({len(hold_images)} held out) for {epochs} epochs, "
        f"{len(train_batches)} steps/epoch at global batch {args.batch_size}")

    # models and optimizers
    torch.manual_seed(args.seed)
    student = models.create(args.student, args.nb_classes).to(device)
    noise = NoiseAdaptation(args.nb_classes, teacher_acc).to(device)
    opt_s = torch.optim.AdamW(student.parameters(), lr=args.lr_S, weight_decay=args.weight_decay,
                              **({"fused": True} if on_gpu else {}))
    opt_n = torch.optim.Adam(noise.parameters(), lr=1e-3)
    state = {"epoch": -1, "best_acc1": -1.0, "best_epoch": -1, "best_agree": -1.0, "acc1_at_best_agree": None,
             "best_agree_epoch": -1}
    if ckpt is not None:
        student.load_state_dict(ckpt["model"])
        noise.load_state_dict(ckpt["noise"])
        opt_s.load_state_dict(ckpt["optimizer"])
        opt_n.load_state_dict(ckpt["optimizer_noise"])
        state.update(ckpt["state"])
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"]["torch"])
        say(f"resumed from {resume} after epoch {state['epoch']}")
        if rank == 0:
            _trim_log(os.path.join(args.output_dir, "log.txt"), state["epoch"])
        del ckpt
    if rank == 0 and os.path.isdir(student_dir):  # temp files of a killed save (we hold the lock)
        for name in os.listdir(student_dir):
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(student_dir, name))
    class_weights = selection.class_weights.to(device) if args.robust else None
    train_module = engine.StudentWithFeatures(student, noise, s_blocks)
    teacher_module = engine.TeacherWithFeatures(teacher.model, t_blocks)
    if world > 1:
        train_module = DistributedDataParallel(train_module, device_ids=[device.index] if on_gpu else None)
    if args.compile:
        mode = "reduce-overhead" if args.cuda_graphs else None
        train_module = torch.compile(train_module, mode=mode)
        teacher_module = torch.compile(teacher_module, mode=mode)
    patchattn = args.patchattn if args.attnprobe_dist else 0.0

    def loss_fn(images, _labels):
        return engine.distill_losses(teacher_module, train_module, images, class_weights, patchattn)

    padding = args.crop_padding if args.crop_padding is not None else img_size // 8
    augment = engine.Augment(mean, std, padding)
    plain = engine.Augment(mean, std, 0, train=False)
    log_path = os.path.join(args.output_dir, "log.txt")
    if rank == 0:
        atomic_write_text(os.path.join(args.output_dir, "args.json"), json.dumps(vars(args), indent=1, sort_keys=True))

    for epoch in range(state["epoch"] + 1, epochs):
        lr = engine.lr_at(epoch, args.lr_S, epochs, args.schedule, args.cos)
        engine.set_lr(opt_s, lr)
        t0 = time.time()
        metrics = engine.train_one_epoch(loss_fn, train_batches, [opt_s, opt_n], augment, epoch, device,
                                         args.seed, amp, args.log_every, "distill", modules=(student, noise))
        record = {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in metrics.items()}}
        if (epoch + 1) % args.eval_every == 0 or epoch == epochs - 1:
            test_stats = engine.evaluate(student, test_batches, plain, device, amp)
            record.update(test_acc1=test_stats["acc1"], test_acc5=test_stats["acc5"])
            if len(hold_images):
                record["holdout_agreement"] = engine.evaluate(student, hold_batches, plain, device, amp)["acc1"]
            _update_best(state, epoch, record)
        record["epoch_seconds"] = time.time() - t0
        state["epoch"] = epoch
        if rank == 0:
            engine.log_line(log_path, record)
            _save(student_dir, student, noise, opt_s, opt_n, state, args, epoch, record)
            say(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))
        barrier()
    final = _final_summary(args, state, log_path)
    if rank == 0:
        engine.log_line(log_path, {"final": final})
        say("final: " + final["text"])
    return final


def _find_resume(args, student_dir):
    if args.resume == "no":
        return None
    if args.resume == "auto":
        last = os.path.join(student_dir, "last.pth")
        return last if os.path.exists(last) else None
    if not os.path.isfile(args.resume):
        raise InputError(f"--resume {args.resume}: no such file")
    return args.resume


def _trim_log(path, last_epoch):
    """Keep only the log lines of epochs <= last_epoch (the resume point); drop torn lines and old
    'final' lines, so the log holds each finished epoch once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] <= last_epoch:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(keep))


_SAME_RUN_KEYS = ("teacher", "student", "num_select", "attnprobe_sel", "random", "rule", "attnprobe_dist", "per_class",
                  "lr_S", "batch_size", "robust", "seed", "epochs")


def _check_same_run(saved, args, path):
    differs = [k for k in _SAME_RUN_KEYS if k in saved and saved[k] != getattr(args, k)]
    if differs:
        raise InputError(f"{path} belongs to a run with other settings ({', '.join(differs)}); "
                         "use another --output_dir or --resume no")


def _update_best(state, epoch, record):
    if record["test_acc1"] > state["best_acc1"]:
        state.update(best_acc1=record["test_acc1"], best_epoch=epoch, new_best=True)
    else:
        state["new_best"] = False
    agree = record.get("holdout_agreement")
    if agree is not None and agree > state["best_agree"]:
        state.update(best_agree=agree, best_agree_epoch=epoch, acc1_at_best_agree=record["test_acc1"])
    state["last_acc1"], state["last_acc5"] = record["test_acc1"], record["test_acc5"]


def _save(student_dir, student, noise, opt_s, opt_n, state, args, epoch, record):
    plain_args = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    student_sd = engine.unwrap(student).state_dict()
    if state.pop("new_best", False):
        engine.save_checkpoint(os.path.join(student_dir, "checkpoint.pth"), model=student_sd, epoch=epoch,
                               acc1=record["test_acc1"], acc5=record["test_acc5"], mean=args.mean, std=args.std,
                               student=args.student, args=plain_args)
    engine.save_checkpoint(os.path.join(student_dir, "last.pth"), model=student_sd, noise=noise.state_dict(),
                           optimizer=opt_s.state_dict(), optimizer_noise=opt_n.state_dict(), epoch=epoch,
                           state=dict(state), args=plain_args, rng=engine.rng_state())


def _final_summary(args, state, log_path):
    text = (f"final acc1 {state.get('last_acc1', float('nan')):.2f} (epoch {state['epoch']}) | "
            f"best acc1 {state['best_acc1']:.2f} at epoch {state['best_epoch']} (chosen on the test set)")
    if state["acc1_at_best_agree"] is not None:
        text += (f" | acc1 {state['acc1_at_best_agree']:.2f} at the best holdout agreement "
                 f"{state['best_agree']:.2f}% (epoch {state['best_agree_epoch']}, chosen without test labels)")
    return {"text": text, "final_acc1": state.get("last_acc1"), "final_acc5": state.get("last_acc5"),
            "best_acc1": state["best_acc1"], "best_epoch": state["best_epoch"],
            "acc1_at_best_agreement": state["acc1_at_best_agree"], "best_agreement_epoch": state["best_agree_epoch"]}
