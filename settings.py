"""The flags of both stages checked and resolved once, before any work: the Settings of stage 1
(select_data.py) and of stage 2 (DFND_DeiT-train.py), each the flags by dest with the resolved values
beside them, and the Plan that the teacher, the selection and a resumed checkpoint add. The functions of
the method take these values, never the parsed `args`.

    s = resolve_settings(args, device)            # s.select: the stage-1 settings
    plan = plan_run(s, teacher, selection_size, test_classes, saved_args, world)
"""
import os
from dataclasses import dataclass
from types import SimpleNamespace

import data
import models
import pool
import published
import scoring
from attention_probe import FEATURE_BLOCKS
from checkpoint import RunFolder
from losses import LossConfig
from safety import check_writable
from utils import InputError, amp_dtype


class Settings(SimpleNamespace):
    """One script's flags by dest, read-only, with the values resolved from them beside them (or in place
    of them: documented where they are set). A new flag is readable as s.<dest> with no line here."""

    def __setattr__(self, name, value):
        raise AttributeError(f"settings are read-only: {name} (resolve it in settings.py)")


# ---- stage 1 ---------------------------------------------------------------------------------------

def resolve_select_settings(args, device, selection_file=None):
    """Check the selection flags before any work (--selected_file is created) -> Settings.
    selection_file: DFND_DeiT-train.py's --selection_file, which makes --selected_file optional.
    Resolved: pool (--data_imagenet, brace ranges expanded: pool-{000000..000009}.tar), probe_blocks (a tuple,
    as selection records keep it), num_select (else the
    published default; num_select_given says which), amp (a dtype, None: fp32), teacher_spec
    (models.load_teacher's arguments)."""
    if not args.data_imagenet:
        raise InputError("--data_imagenet (the wild pool) is required")
    if not args.teacher_dir:
        raise InputError("--teacher_dir (the teacher checkpoint) is required")
    if not args.selected_file and not selection_file:
        raise InputError("--selected_file (folder for scores and the selection) is required")
    if args.selected_file and os.path.exists(args.selected_file) and not os.path.isdir(args.selected_file):
        raise InputError(f"--selected_file {args.selected_file} exists and is not a folder")
    paths = [p for arg in args.data_imagenet for p in pool.expand_braces(arg)]
    for path in paths:
        if not os.path.exists(path):
            raise InputError(f"--data_imagenet {path}: no such file or folder")
    if not os.path.isfile(args.teacher_dir) and not models.is_pretrained(args.teacher_dir):
        raise InputError(f"--teacher_dir {args.teacher_dir}: no such file (nor hf-hub:org/name or a timm "
                         "pretrained tag)")
    if args.selected_file and not scoring.read_only(args.selected_file):
        check_writable(args.selected_file, "--selected_file")   # creates it, nothing inside
    return Settings(**{
        **vars(args), "pool": paths, "probe_blocks": tuple(args.probe_blocks),
        "num_select": published.NUM_SELECT if args.num_select is None else args.num_select,
        "num_select_given": args.num_select is not None, "amp": amp_dtype(args.amp, device),
        "teacher_spec": dict(name=args.teacher, num_classes=args.nb_classes, path=args.teacher_dir, mean=args.mean,
                             std=args.std, img_size=args.img_size, ema=args.teacher_ema)})


# ---- stage 2 ---------------------------------------------------------------------------------------

def resolve_settings(args, device):
    """Check the flags before any work (--output_dir is not created here, --selected_file is) -> Settings.
    Resolved: flags (vars(args) as given: args.json and the resume checks start from it), select (the
    stage-1 Settings; None with --eval_only), dataset (else the published default; with --eval_only None:
    the checkpoint's), resume (the last.pth to resume from, or None), amp (a dtype, None: fp32), loss
    (losses.LossConfig), pd_blocks ((teacher blocks, student blocks) of PD; ((), ()) without --attnprobe_dist)."""
    if not args.data_cifar:
        raise InputError("--data_cifar (the original dataset root, for the test set) is required"
                         if not args.eval_only else "--eval_only needs --data_cifar (the test set)")
    if not os.path.isdir(args.data_cifar):
        raise InputError(f"--data_cifar {args.data_cifar}: no such folder")
    if args.eval_only and not os.path.isfile(args.eval_only):
        raise InputError(f"--eval_only {args.eval_only}: no such file")
    if not args.eval_only:
        if not args.output_dir:
            raise InputError("--output_dir is required")
    resume = None if args.eval_only else RunFolder(args.output_dir).resume_point(args.resume)
    pd_blocks = ((tuple(args.pd_teacher_blocks or FEATURE_BLOCKS), tuple(args.pd_student_blocks or FEATURE_BLOCKS))
                 if args.attnprobe_dist else ((), ()))
    return Settings(**{
        **vars(args), "flags": dict(vars(args)),
        "select": None if args.eval_only else resolve_select_settings(args, device, args.selection_file),
        "dataset": args.dataset or (None if args.eval_only else published.DATASET), "resume": resume,
        "amp": amp_dtype(args.amp, device), "loss": LossConfig.from_flags(args), "pd_blocks": pd_blocks})


# what args.json holds beyond the flags: Plan.record's resolved values (--config skips them)
PLAN_RECORDS = ("epochs_resolved", "lr_offset", "teacher_acc_resolved")


@dataclass(frozen=True)
class Plan:
    """What the teacher, the selection and a resumed checkpoint decide beyond the flags."""
    student: str
    selection_size: int       # the images selected (--num_select, or the size of --selection_file)
    epochs: int
    # the published loop numbers its epochs from 1: epoch k (0-based here) trains at the lr of epoch
    # k + lr_offset of epochs + lr_offset (1 for the published formula, 0 with --epochs)
    lr_offset: int
    epochs_from: str          # "the published formula" or "--epochs"
    teacher_acc: float        # the noise-adaptation diagonal
    teacher_acc_from: str
    padding: int              # random-crop padding

    def record(self, s, teacher):
        """args.json and the checkpoints' args: the flags with every resolved value in place (what resumes
        compare); epochs_resolved, lr_offset, teacher_acc_resolved are this plan's."""
        return {**s.flags, "teacher": teacher.name, "nb_classes": teacher.num_classes, "mean": list(teacher.mean),
                "std": list(teacher.std), "dataset": s.dataset, "student": self.student,
                "num_select": self.selection_size, "epochs_resolved": self.epochs, "lr_offset": self.lr_offset,
                "teacher_acc_resolved": self.teacher_acc}


def plan_run(s, teacher, selection_size, test_classes, saved, world):
    """-> Plan; refuses what cannot run. saved: a resumed checkpoint's args (its lr offset is kept)."""
    if test_classes > teacher.num_classes:
        raise InputError(f"the test set at {s.data_cifar} has {test_classes} classes but the teacher "
                         f"has {teacher.num_classes}")
    n_train = selection_size - data.holdout_size(selection_size, s.holdout)
    if s.pos_num == 0 and n_train < world:   # a rank without an image: 0 steps per epoch, epoch after epoch
        raise InputError(f"{n_train} training image(s) ({selection_size} selected, {selection_size - n_train} held out) "
                         f"cannot give each of {world} processes a batch: select more images (--num_select) or "
                         "run fewer processes")
    acc, acc_from = resolve_teacher_acc(s.teacher_acc, teacher, s.dataset)
    epochs, offset, epochs_from = epoch_plan(s.epochs, selection_size, teacher.img_size, saved)
    padding = data.crop_padding(s.crop_padding, teacher.img_size)
    return Plan(s.student or models.default_student(teacher.img_size), selection_size, epochs, offset, epochs_from,
                acc, acc_from, padding)


def epoch_plan(epochs_flag, selection_size, img_size, saved=None):
    """-> (epochs to train, lr offset, where the count comes from). Without --epochs: the published loop,
    E - 1 epochs with the lr evaluated at e = 1 .. E - 1 over E (650,000 selected: 251 epochs, 199 at lr_S and
    52 at 0.1 lr_S); refused above published.MAX_FORMULA_EPOCHS, which the formula gives for selections far
    smaller than it was made for. With --epochs N (the published code ignored it): N epochs, lr at 0 .. N - 1
    over N. A resumed run keeps its offset."""
    offset = saved["lr_offset"] if saved is not None and "lr_offset" in saved else (0 if epochs_flag else 1)
    if epochs_flag:
        return epochs_flag, offset, "--epochs"
    epochs = published.epochs(selection_size, img_size) - 1
    if epochs > published.MAX_FORMULA_EPOCHS:
        raise InputError(f"the published epoch formula int({published.epochs_numerator(img_size)} / num_select * 512) "
                         f"gives {epochs:,} epochs for {selection_size:,} selected images (it was made for hundreds of "
                         "thousands: 650,000 give 251); pass --epochs N")
    return epochs, offset, "the published formula"


def resolve_teacher_acc(flag, teacher, dataset):
    """-> (noise-adaptation diagonal, where it comes from): --teacher_acc, else the teacher file's accuracy,
    else the published constant of `dataset`; a dataset the published code has none for needs one of the first two."""
    if flag is not None:
        return flag, "--teacher_acc"
    if teacher.accuracy is not None:
        return teacher.accuracy, teacher.accuracy_source or "the teacher file"
    if dataset in published.TEACHER_ACC:
        return published.TEACHER_ACC[dataset], f"the published constant for {dataset}"
    raise InputError(f"--dataset {dataset} has no published noise-adaptation constant (only "
                     + ", ".join(published.TEACHER_ACC) + ") and the teacher file records no accuracy: pass "
                     "--teacher_acc, the teacher's top-1 test accuracy as a fraction (e.g. 0.91)")


def check_probe(s, teacher):
    """Refuse probe blocks or a probe head the teacher lacks, before any image is scored."""
    depth, heads = len(teacher.model.blocks), teacher.model.blocks[0].attn.num_heads
    if max(s.probe_blocks) >= depth:
        raise InputError(f"--probe_blocks {' '.join(map(str, s.probe_blocks))}: the teacher {teacher.name} has "
                         f"{depth} blocks (0 to {depth - 1})")
    if s.probe_head >= heads:
        raise InputError(f"--probe_head {s.probe_head}: the teacher {teacher.name} has {heads} heads (0 to {heads - 1})")


def check_student(student, name, teacher, pd_blocks):
    """Refuse a student that cannot learn from this teacher: another input, or PD blocks it lacks."""
    if models.input_spec(student) != (teacher.in_chans, teacher.img_size):
        raise InputError(f"--student {name} takes {models.input_spec(student)} (channels, size) "
                         f"but the teacher takes {(teacher.in_chans, teacher.img_size)}")
    t_blocks, s_blocks = pd_blocks
    if len(t_blocks) != len(s_blocks):
        raise InputError("--pd_teacher_blocks and --pd_student_blocks must name as many blocks")
    for who, model, blocks in (("teacher", teacher.model, t_blocks), ("student", student, s_blocks)):
        if blocks and max(blocks) >= len(model.blocks):
            raise InputError(f"the {who} has {len(model.blocks)} blocks: probe distillation of block "
                             f"{max(blocks)} is impossible (set --pd_{who}_blocks)")
    tokens = [m.patch_embed.num_patches + m.num_prefix_tokens for m in (teacher.model, student)]
    if t_blocks and tokens[0] != tokens[1]:
        raise InputError(f"teacher and student differ in token count ({tokens[0]} vs {tokens[1]}): "
                         "probe distillation needs the same patch grid")
