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
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

import data
import engine
import models
import pool
import select_data
from attention_probe import FEATURE_BLOCKS
from data import DATASETS, LARGE_INPUT
from losses import NoiseAdaptation
from utils import (InputError, amp_dtype, atomic_torch_save, atomic_write_text, check_writable,
                   init_distributed, on_rank0, rank_world, resolve_device, run_lock, safe_torch_load,
                   system_parser)

# the noise-adaptation constants (teacher test accuracies) the published scripts hard-code, per --dataset;
# used when neither --teacher_acc nor the teacher file gives one
PUBLISHED_TEACHER_ACC = {"cifar10": 0.9665, "cifar100": 0.7630, "imagenet": 0.8118}
DEFAULT_DATASET = "cifar10"      # the published --dataset default
MAX_FORMULA_EPOCHS = 10000       # the published formula beyond this (a selection under ~16,000 images) is refused


def get_args_parser():
    parser = argparse.ArgumentParser(description="Attention Probe: probe distillation of a ViT student",
                                     allow_abbrev=False, parents=[system_parser()])
    parser.add_argument("--dataset", default=None, choices=list(DATASETS),
                        help=f"the teacher's task; its test set measures the student (default {DEFAULT_DATASET}; "
                        "with --eval_only the student checkpoint's)")
    parser.add_argument("--data_cifar", help="original dataset root (test set; train set for --pos_num): "
                        "CIFAR pickles, IDX files, or an ImageFolder tree with train/ and val/")
    select_data.add_selection_args(parser)
    parser.add_argument("--selection_file", default=None, help="train on a precomputed selection.pt "
                        "({'indices', 'pred'}; e.g. demo.py's oracle/energy references, or a run's "
                        "output_dir/selection.pt) instead of selecting; --selected_file is then optional")
    g = parser.add_argument_group("distillation (stage 2)")
    g.add_argument("--output_dir", "--output-dir", help="run folder: student/, log.txt, args.json")
    g.add_argument("--student", default=None, help="student model (default: the tiny DeiT at the teacher's size)")
    g.add_argument("--lr_S", type=float, default=7.5e-4, help="student AdamW learning rate (default 7.5e-4)")
    g.add_argument("--weight_decay", "--weight-decay", type=float, default=0.025)
    g.add_argument("--batch_size", "--batch-size", type=int, default=256, help="global batch (default 256, as the paper)")
    g.add_argument("--epochs", type=int, default=None,
                   help="default: the published formula int(320000 / num_select * 512) (640000 for 224 px)")
    g.add_argument("--schedule", type=int, nargs="*", default=[200, 300], help="lr ×0.1 at these epochs")
    g.add_argument("--cos", action="store_true", help="cosine learning rate instead of --schedule")
    g.add_argument("--robust", action="store_true", help="class-weighted KD (the selection's class weights)")
    g.add_argument("--attnprobe_dist", action="store_true", help="add probe distillation (PD) to the loss")
    g.add_argument("--patchattn", type=float, default=0.8, help="weight of PD (default 0.8, as published)")
    g.add_argument("--pd_teacher_blocks", type=int, nargs="+", default=None, help="default 3 7 11")
    g.add_argument("--pd_student_blocks", type=int, nargs="+", default=None, help="default 3 7 11")
    g.add_argument("--teacher_acc", type=float, default=None, help="noise-adaptation diagonal (default: the "
                   "teacher file's accuracy, else the published constant of --dataset: "
                   + ", ".join(f"{k} {v}" for k, v in PUBLISHED_TEACHER_ACC.items()) + "; other datasets need it)")
    g.add_argument("--pos_num", type=int, default=0, help="add the first K labeled train images per class "
                   "(published: 50 Tiny-ImageNet, 129 ImageNet); the run is then NOT data-free")
    g.add_argument("--holdout", type=float, default=0.0,
                   help="share of the selected images held out (not trained on) to report the test accuracy at "
                   "the best student-teacher agreement, chosen without test labels (default 0: none, as published)")
    g.add_argument("--eval_every", type=int, default=1, help="test every N epochs (and at the last)")
    g.add_argument("--crop_padding", type=int, default=None,
                   help="random-crop padding (default 4 at 32 and 224 px, as published; img_size // 8 at other sizes)")
    g.add_argument("--resume", default="auto", help="'auto' (default: output_dir/student/last.pth if present), "
                   "a last.pth path, or 'no'")
    g.add_argument("--eval_only", "--eval", default=None, metavar="CKPT", help="only evaluate this student checkpoint")
    g.add_argument("--cuda_graphs", action="store_true", help="with --compile: mode='reduce-overhead'")
    g.add_argument("--log_every", type=int, default=50, help="steps between progress-bar loss reads")
    return parser


# ---- what the published code did -------------------------------------------------------

# Every flag of the published DFND_DeiT-train.py / DFND_DeiT-imagenet.py: (its published default, why ours
# differs in meaning or default, whether that changes the numbers of a published command).
PUBLISHED_FLAGS = {
    "dataset": ("cifar10", "also `tinyimagenet` (the published parser rejected it), `fashionmnist`, `folder`; "
                "`--eval_only` takes the student checkpoint's", "no"),
    "data_cifar": ("a path on the authors' machine", "", ""),
    "data_imagenet": ("a path on the authors' machine", "also several folders or `.tar` shards", "no"),
    "teacher": ("deit_base_patch4_32_teacher", "the model the teacher file names (DeiT `args.model`, timm `arch`) "
                "when it names one", "no: the published files name none, or the same"),
    "teacher_dir": ("a path on the authors' machine", "DeiT, timm, release, plain and safetensors files; "
                    "also `hf-hub:org/name` and timm pretrained tags, loaded by timm", "no"),
    "nb_classes": ("10", "read from the teacher's head; a wrong value failed to load in both", "no"),
    "num_select": ("600000", "the run scripts pass 650000 (CIFAR), 800000, 1000000; with `--selection_file` its size",
                   ""),
    "selected_file": ("a path on the authors' machine", "created when missing; may be read-only when it holds "
                      "complete scores; not needed with `--selection_file`", "no"),
    "output_dir": ("a path on the authors' machine", "created when missing", "no"),
    "attnprobe_sel": ("off; on selected WITHOUT the probe (inverted)",
                      "on adds the probe to the score: the published inversion is a defect", "yes: the selection"),
    "random": ("off; drew from range(1281167) whatever the pool", "draws from the real pool (a defect fixed)",
               "yes, with `--random` on a pool of another size"),
    "attnlier": ("0.05", "", ""),
    "outlier": ("0.9", "", ""),
    "attnprobe_dist": ("off", "", ""),
    "patchattn": ("0.8", "", ""),
    "robust": ("off", "class weights: see \"Class weights\" below", "see below"),
    "lr_S": ("0.00075", "training.sh passes 8.5e-4 for CIFAR-100", ""),
    "epochs": ("800, ignored: E - 1 epochs, E = int(320000 / num_select * 512)",
               f"unset: the published E - 1 epochs, refused above {MAX_FORMULA_EPOCHS:,} (a small selection: pass "
               "--epochs); N: N epochs", "only when given"),
    "schedule": ("200 300", "", ""),
    "cos": ("off", "", ""),
    "pos_num": ("129 (only in the published 224-px script)",
                "one script for both sizes: adding labelled images is opt-in; the 224-px run scripts pass 50 / 129",
                "no"),
}
_UNSET_MEANS = {"data_cifar": "required", "data_imagenet": "required", "teacher_dir": "required",
                "selected_file": "required", "output_dir": "required", "nb_classes": "from the teacher file",
                "epochs": "the published formula", "dataset": DEFAULT_DATASET,
                "teacher": models.DEFAULT_TEACHER, "num_select": str(select_data.PUBLISHED_NUM_SELECT)}

# Every other difference found by reading the published scripts (DFND_DeiT-train.py, DFND_DeiT-imagenet.py,
# loss.py, utils.py, vision_transformer.py, training*.sh) line by line against ours:
# (what, published, ours, why, whether it changes the numbers of a published command).
PUBLISHED_BEHAVIOURS = [
    ("Files PIL cannot load (empty, not an image, cut inside the header, over PIL's pixel limit)",
     "the DataLoader raised: the run stopped", "skipped: scored +inf, never selected, listed with the reason in "
     "`skipped.txt`", "defect: one such file in a wild pool stopped the run", "only where the published run stopped"),
    ("Pool membership", "ImageFolder: images inside class folders, hidden files and folders included, images at "
     "the top ignored", "images at any depth, the top included; hidden files and folders skipped (in "
     "ImageFolder's order)", "pools without class folders (Flickr1M); caches and scores may live inside the pool",
     "only for pools with hidden or top-level images"),
    ("Reused score files", "any `value_out.pth`, `pred_out.pth`, `value_blk*.pth` in `--selected_file`, "
     "unchecked", "reused when their fingerprint (pool, teacher file hash, preprocessing, probe, decoding) "
     "matches; published files (no fingerprint) when their length equals the pool's; else an error",
     "scores of another pool or teacher were silently used", "no: refused instead"),
    ("Scoring pass", "two full fp32 passes, the qkv weight copied per image, batch 256",
     "one pass forming only head 0's CLS row; bf16 autocast on a GPU (`--amp off`: fp32), fp32 on the CPU; "
     "batch 512 (`--score_batch_size`)", "speed and memory", "bf16 rounding on a GPU only (tiny CPU check: "
     "confidence within 3 %, probe within 5e-3 of fp32, `tests/test_fast_paths.py`)"),
    ("Probe head geometry", "head count and width by `--dataset`: 12 heads of 64 for imagenet, 3 of 128 "
     "otherwise (wrong for a deit_small teacher's 6 heads)", "the teacher's own", "defect",
     "only for teachers the constants do not fit"),
    ("Ranking", "`value.topk(num_select, largest=False)` in fp32 on the GPU", "a stable sort in float64; ties "
     "by pool order", "deterministic", "only among equal scores"),
    ("Several GPUs", "nn.DataParallel: the probe hooks fired on every replica, scores misaligned with images; "
     "the (L, B, N, C) block features gathered along L", "DistributedDataParallel; the pool scored in strided "
     "shards gathered by index; each epoch's images split evenly over the processes: fewer images than processes "
     "left out (up to 64 px) or repeated (224 px)", "defect; speed", "only on more than one GPU"),
    ("Class weights (`--robust`)", "teacher softmax summed per class over one augmented, shuffled pass of the "
     "training set: the selection and, at 224 px, the `--pos_num` images", "the selection's softmax stored by "
     "the scoring pass (resized, not augmented), plus the `--pos_num` images' (Resize, CenterCrop, not "
     "augmented)", "weights for any selection without another teacher pass", "yes, slightly (no augmentation)"),
    ("Class weights file", "`class_weights.pth` in `--selected_file` reused when present, even for another "
     "selection", "computed for every selection; the file is written, never read", "defect: stale weights",
     "only where the published run reused stale weights"),
    ("Class weights without `probs_out.npy` (published score files)", "softmax sums (its own pass)",
     "inverse counts of the teacher-predicted classes (the selection's and the `--pos_num` images'); rescore "
     "with `--force` for softmax sums", "published score files hold no softmax", "yes, with `--robust` on "
     "published score files"),
    ("Noise-adaptation diagonal", "by `--dataset`: CIFAR-10 0.9665, CIFAR-100 0.7630, ImageNet 0.8118",
     "`--teacher_acc`, else the teacher file's accuracy (`acc1` of `train_teacher.py` files, timm's top-1 "
     "`metric`), else the published constant; other datasets (Tiny-ImageNet, `fashionmnist`, `folder`) need one "
     "of the first two", "the teacher's own accuracy when it is known; no constant is invented",
     "yes, for teacher files that record an accuracy (the published ones do not)"),
    ("`DFND_DeiT-train.py --dataset imagenet` (224 px in the 32-px script)", "ImageNet mean/std for every "
     "image, test images Resize(256) then CenterCrop(224), 320000 in the epoch formula, no labelled images",
     "one script for both sizes: every 224-px run as DFND_DeiT-imagenet.py (test images Resize(224) then "
     "CenterCrop(224), 640000; `--pos_num`, `--mean/--std` as given)", "the published run scripts ran 224 px "
     "through DFND_DeiT-imagenet.py", "yes, for that command"),
    ("Tiny-ImageNet", "`--dataset tinyimagenet` rejected: `training_tinyimagenet.sh` could not run", "runs: 200 "
     "classes, noise adaptation from `--teacher_acc` (`TEACHER_ACC`) or the teacher file, test images val Resize(224) then CenterCrop(224), probe geometry of the "
     "teacher, 640000 in the epoch formula", "the published run script's intent", "not comparable: it never ran"),
    ("Normalisation at 32 px", "wild images (scoring, training) ImageNet mean/std; CIFAR test images CIFAR "
     "mean/std", "one mean/std for every image: `--mean/--std`, else the teacher file's, else ImageNet's",
     "defect: the student was tested on images normalised unlike its training images", "yes: test accuracy"),
    ("Normalisation at 224 px", "CIFAR mean/std for every image (wild, labelled, test) with an ImageNet teacher",
     "the 224-px run scripts pass it (`--mean/--std`); a command without them: the teacher file's, else "
     "ImageNet's", "the published scripts compute the published computation; own teachers their own "
     "statistics", "only for commands without `--mean/--std`"),
    ("Labelled images (`--pos_num`)", "the first K per class in ImageFolder order; the list reused from "
     "`--selected_file/labelset_index_dict.pth` when present; a class with fewer than K images crashed",
     "the first K per class in the same order, computed each run and written to `--output_dir`; a short class "
     "gives what it has", "the list belongs to the run", "only where the published run crashed or reused "
     "another list"),
    ("Labelled class folders", "ImageFolder: names sorted as strings, label = position ('10' before '2'); hidden "
     "ones included", "all-integer names ('7', '007', '07_bee') give that integer as label; other names as "
     "ImageFolder; hidden files and folders skipped", "integer-named folders of converters and users", "only "
     "for integer-named folders that are not zero-padded, and hidden files"),
    ("Student initialisation", "the timm of 2021-22 (not pinned): `cls_token` trunc_normal(std 0.02)",
     "the installed timm (>= 1.0): `cls_token` N(0, 1e-6); the other weights drawn from the same "
     "distributions", "timm's own model, not a fork", "yes: another random start"),
    ("ViT implementation", "its own TeacherVisionTransformer on the timm of the time, attention as explicit "
     "softmax", "timm's VisionTransformer with fused attention", "no fork of the ViT", "float rounding only"),
    ("Training and test precision", "fp32", "bf16 autocast and fused AdamW on a GPU (`--amp off`: fp32); fp32 "
     "on the CPU", "speed", "rounding on a GPU"),
    ("Last partial batch", "kept (DataLoader `drop_last=False`)", "kept; dropped only with `--compile "
     "--cuda_graphs`, which needs one batch shape", "", "only with `--cuda_graphs`"),
    ("Randomness", "nothing seeded (torch, numpy, random): every run differs", "`--seed` seeds the shuffle, "
     "crops, flips, the class-weight perturbation and the holdout, per epoch and process", "reproducible runs "
     "and exact resumes", "other draws from the same distributions"),
    ("Where images are decoded and augmented", "every epoch, by torchvision transforms in 8 DataLoader workers",
     "wild images up to 64 px decoded once into a uint8 cache; wild crops and flips on the device; labelled "
     "224-px images by the published transforms on the CPU", "speed", "no: the same pixels and transforms"),
    ("Reported accuracy", "the best test accuracy over epochs, printed; `student/checkpoint.pth` is that "
     "student (chosen on the test set)", "the same checkpoint and number, plus the last epoch's accuracy "
     "(`summary.json`, `student/final.pth`: the one to report) and, with `--holdout`, one chosen without test "
     "labels", "model selection on the test set", "no: more numbers"),
    ("Run files", "`student/checkpoint.pth` = the DataParallel state dict (`module.` keys); printed lines",
     "`{'model', 'epoch', 'acc1', 'acc5', 'mean', 'std', 'student', 'args'}` without prefix; `log.txt` "
     "(JSON lines), `args.json`, `summary.json`, `student/last.pth`; a rerun resumes", "", "no"),
    ("Crashes of the published scripts", "`import resnet` (absent from the repository); output folders never "
     "created; the 32-px script compared a number with an AverageMeter for top-5 (TypeError at the "
     "first test); `--dataset mnist` had no test set", "none of these", "defects", "no"),
    ("Teacher files", "`torch.load` (runs pickled code), `['model']`", "`weights_only` loading; DeiT, timm, "
     "release, plain and safetensors files; EMA weights with `--teacher_ema`", "safety", "no"),
    ("Unknown flags", "ignored (`parse_known_args`): a mistyped flag ran with the default", "an error naming "
     "it; no abbreviations", "", "only where a typo was ignored"),
    ("Process settings", "4 CPU threads (`torch.set_num_threads(4)`, OMP/MKL variables); all warnings hidden",
     "PyTorch's default threads; warnings shown", "", "no"),
    ("Labelled data readers", "torchvision's CIFAR classes (MD5-checked pickles) and ImageFolder",
     "CIFAR pickles read directly, converter ImageFolder trees, MNIST IDX files", "", "no"),
    ("Other input sizes", "32 and 224 px, three channels", "one-channel teachers (28 px, `convert('L')`); crop "
     "padding img_size // 8 at sizes other than 32 and 224; CIFAR/MNIST images resized (antialiased bilinear) "
     "for a teacher of another size", "extension", "not comparable: no published path"),
]


def defaults_table(parser=None):
    """Markdown: every published flag (its published default and ours, read from the parser), then every
    other difference from the published code, each with why and whether it changes the numbers."""
    parser = parser or get_args_parser()
    rows = ["| flag or behaviour | published | ours | why | changes numbers |", "|---|---|---|---|---|"]
    for flag, (published, why, numbers) in PUBLISHED_FLAGS.items():
        value = parser.get_default(flag)
        ours = (_UNSET_MEANS[flag] if value is None else "on" if value is True else "off" if value is False
                else " ".join(map(str, value)) if isinstance(value, list) else str(value))
        rows.append(f"| `--{flag}` | {published} | {ours} | {why} | {numbers} |")
    for row in PUBLISHED_BEHAVIOURS:
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


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


def published_epochs_numerator(img_size):
    """320000 in the published 32-px script's formula, 640000 in the 224-px one's."""
    return 320000 if img_size <= LARGE_INPUT else 640000


def published_epochs(num_select, img_size):
    """The published E: its loop `for e in range(1, E)` trains E - 1 epochs."""
    return int(published_epochs_numerator(img_size) / num_select * 512)


def epoch_plan(args, num_selected, img_size, saved=None):
    """-> (epochs to train, lr offset, where the count comes from). Epoch k (0-based) trains at
    engine.lr_at(k + offset, lr_S, epochs + offset).

    Without --epochs: the published loop, E - 1 epochs with the lr evaluated at e = 1 .. E - 1 over E
    (650,000 selected: 251 epochs, 199 at lr_S and 52 at 0.1 lr_S); refused above MAX_FORMULA_EPOCHS,
    which the formula gives for selections far smaller than it was made for. With --epochs N (the
    published code ignored it): N epochs, lr at 0 .. N - 1 over N. A resumed run keeps its offset."""
    if saved is not None and "lr_offset" in saved:
        offset = saved["lr_offset"]
    else:
        offset = 0 if args.epochs else 1
    if args.epochs:
        return args.epochs, offset, "--epochs"
    epochs = published_epochs(num_selected, img_size) - 1
    if epochs > MAX_FORMULA_EPOCHS:
        raise InputError(f"the published epoch formula int({published_epochs_numerator(img_size)} / num_select * 512) "
                         f"gives {epochs:,} epochs for {num_selected:,} selected images (it was made for hundreds of "
                         "thousands: 650,000 give 251); pass --epochs N")
    return epochs, offset, "the published formula"


def holdout_size(k, share):
    """Images of a k-image selection held out by --holdout `share` (none of a single image)."""
    return int(round(share * k)) if share > 0 and k >= 2 else 0


def check_trainable(args, num_selected, world):
    """Refuse a training set that gives a rank no image: 0 steps per epoch, epoch after epoch."""
    n_train = num_selected - holdout_size(num_selected, args.holdout)
    if args.pos_num == 0 and n_train < world:
        raise InputError(f"{n_train} training image(s) ({num_selected} selected, {num_selected - n_train} held out) "
                         f"cannot give each of {world} processes a batch: select more images (--num_select) or "
                         "run fewer processes")


def robust_class_weights(weights, seed):
    """The published `perturb`: w + U[0, 0.1) per class, drawn once at the start (here from --seed);
    the published training uses the perturbed copy."""
    g = torch.Generator().manual_seed(seed + 11)
    return weights + 0.1 * torch.rand(len(weights), generator=g, dtype=torch.float64).to(weights.dtype)


def default_crop_padding(img_size):
    # the published RandomCrop(size, padding=4) at 32 and 224 px; scaled at sizes it never ran
    return 4 if img_size in (32, 224) else max(1, img_size // 8)


def crop_padding(args, img_size):
    return args.crop_padding if args.crop_padding is not None else default_crop_padding(img_size)


def default_student(img_size):
    return {32: "deit_tiny_patch4_32", 28: "deit_tiny_patch4_28"}.get(img_size, "deit_tiny_patch16_224")


def resolve_teacher_acc(args, teacher, dataset):
    """-> (noise-adaptation diagonal, where it comes from): --teacher_acc, else the teacher file's accuracy,
    else the published constant of `dataset`; a dataset the published code has none for needs one of the first two."""
    if args.teacher_acc is not None:
        return args.teacher_acc, "--teacher_acc"
    if teacher.accuracy is not None:
        return teacher.accuracy, teacher.accuracy_source or "the teacher file"
    if dataset in PUBLISHED_TEACHER_ACC:
        return PUBLISHED_TEACHER_ACC[dataset], f"the published constant for {dataset}"
    raise InputError(f"--dataset {dataset} has no published noise-adaptation constant (only "
                     + ", ".join(PUBLISHED_TEACHER_ACC) + ") and the teacher file records no accuracy: pass "
                     "--teacher_acc, the teacher's top-1 test accuracy as a fraction (e.g. 0.91)")


@dataclass
class Settings:
    """What a run trains with, resolved once from the flags, the teacher file, the selection and a resumed
    checkpoint; `args` stays as the user gave it. record() is what args.json and the checkpoints keep."""
    teacher: models.Teacher
    dataset: str
    student: str
    num_selected: int         # --num_select, or the size of --selection_file
    epochs: int
    lr_offset: int
    epochs_from: str          # "the published formula" or "--epochs"
    teacher_acc: float
    teacher_acc_from: str
    padding: int              # random-crop padding

    def record(self, args):
        """vars(args) with every resolved value in place of its flag (the keys resumes compare)."""
        t = self.teacher
        return {**vars(args), "teacher": t.name, "nb_classes": t.num_classes, "mean": list(t.mean),
                "std": list(t.std), "dataset": self.dataset, "student": self.student, "num_select": self.num_selected,
                "epochs_resolved": self.epochs, "lr_offset": self.lr_offset, "teacher_acc_resolved": self.teacher_acc}


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
    n_hold = holdout_size(k, share)
    g = torch.Generator().manual_seed(seed + 7)
    perm = torch.randperm(k, generator=g)
    hold = perm[:n_hold].sort().values
    keep = torch.ones(k, dtype=torch.bool)
    keep[hold] = False
    return keep.nonzero().squeeze(1), hold


def labeled_positives(args, dataset, img_size, in_chans, padding):
    """The first --pos_num images per class of the labeled train set -> (lazy dataset, train indices,
    the same images unaugmented).

    Above 64 px each comes out as published: Resize(img_size) -> RandomCrop(img_size, padding) -> flip,
    drawn per image and epoch on the CPU (the images differ in shape before the crop); unaugmented:
    Resize(img_size) -> CenterCrop(img_size)."""
    train = data.load_labeled(dataset, args.data_cifar, "train", img_size, in_chans)
    labels = torch.as_tensor(train.targets)
    chosen = []
    for c in range(int(labels.max()) + 1):
        chosen += (labels == c).nonzero().squeeze(1)[:args.pos_num].tolist()
    chosen.sort()
    plain = torch.utils.data.Subset(train, chosen)
    if img_size > LARGE_INPUT:
        if isinstance(train, data.FolderDataset):
            plain = data.FolderDataset([train.samples[i] for i in chosen], train.classes, img_size, in_chans,
                                       train.num_classes, center_crop=True)
        return data.RandomCropImages(train, chosen, img_size, padding, seed=args.seed), chosen, plain
    return plain, chosen, plain


@torch.no_grad()
def labelled_class_mass(teacher, dataset, kind, device, amp=None, workers=0, batch_size=256):
    """The --pos_num images' part of the class weights (the published 224-px script counted them with the
    selection): the teacher's softmax summed per class (kind 'softmax') or its predicted classes counted
    ('counts', as for a selection without stored softmax). Images unaugmented, like the selection's
    scores. Under torchrun each rank takes a strided share and the sums are added up. -> (C,) float64"""
    rank, world = rank_world()
    mass = torch.zeros(teacher.num_classes, dtype=torch.float64, device=device)
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    for images, _ in torch.utils.data.DataLoader(share, batch_size=batch_size, num_workers=workers):
        x = data.normalize(images.to(device), teacher.mean, teacher.std)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = teacher.model(x).float()                                    # (B, C)
        if kind == "softmax":
            mass += logits.softmax(dim=1).sum(0).double()
        else:
            mass += torch.bincount(logits.argmax(1), minlength=teacher.num_classes).double()
    if world > 1:
        torch.distributed.all_reduce(mass)
    return mass.cpu()


def robust_weights(args, selection, teacher, labelled, device, amp):
    """The class weights --robust uses, before the published perturbation: the selection's, with the
    --pos_num images counted as well when there are any."""
    if labelled is None or not len(labelled):
        return selection.class_weights
    mass, kind = selection.class_mass
    extra = labelled_class_mass(teacher, labelled, kind, device, amp, args.workers)
    return select_data.weights_from_mass(mass + extra, kind)


class _ImagesOnly(torch.utils.data.Dataset):
    """(image, cropped) items of a PoolDataset or labeled set for the distillation loader; cropped = 1
    marks images their dataset already cropped and flipped, which the training step leaves alone."""

    def __init__(self, dataset, cropped=0):
        self.dataset, self.cropped = dataset, cropped

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], self.cropped


def training_images(args, selection, teacher, positives):
    """The student's training set: in memory (uint8 tensor) up to LARGE_INPUT px, else a decoding Dataset."""
    img_size, in_chans = teacher.img_size, teacher.in_chans
    train_pos, hold_pos = split_holdout(selection.indices, args.holdout, args.seed)
    train_idx = selection.indices[train_pos]
    hold_idx = selection.indices[hold_pos]
    source = selection.source
    holdout = (pool.load_selected_uint8(source, hold_idx, img_size, in_chans, args.workers,
                                        fast_decode=args.fast_decode), selection.pred[hold_pos].long())
    if img_size <= LARGE_INPUT:
        train = pool.load_selected_uint8(source, train_idx, img_size, in_chans, args.workers,
                                         fast_decode=args.fast_decode)
        if positives is not None and len(positives):
            train = torch.cat([train, torch.stack([positives[i][0] for i in range(len(positives))])])
        return train, holdout
    train = _ImagesOnly(pool.PoolDataset(selection.pool_index, img_size, in_chans, indices=train_idx.numpy(),
                                         fast_decode=args.fast_decode))
    if positives is not None:
        train = torch.utils.data.ConcatDataset([train, _ImagesOnly(positives, cropped=1)])
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
    """Test a student checkpoint; what a flag does not say (dataset, model and with it the image size,
    mean/std) comes from the checkpoint. Under torchrun every rank tests its share; rank 0 prints."""
    sd, meta = models.read_checkpoint(args.eval_only)
    saved = meta.get("args") or {}
    num_classes = args.nb_classes or models.num_classes_of(sd, args.eval_only)
    name = args.student or meta.get("student") or saved.get("student") or _default_student_fitting(sd, num_classes)
    student = models.create(name, num_classes)
    models.load_state_dict_strict(student, sd, source=args.eval_only)
    student.to(device)
    in_chans, img_size = models.input_spec(student)
    if args.img_size not in (None, img_size):
        raise InputError(f"--img_size {args.img_size} does not fit {name}, which takes {img_size}x{img_size}")
    dataset, dataset_from = ((args.dataset, "--dataset") if args.dataset else
                             (saved["dataset"], "the checkpoint") if saved.get("dataset") else
                             (DEFAULT_DATASET, "the default"))
    mean = args.mean or meta.get("mean") or saved.get("mean")
    std = args.std or meta.get("std") or saved.get("std")
    mean, std = data.resolve_mean_std(mean, std, in_chans)
    test = data.load_labeled(dataset, args.data_cifar, "val", img_size, in_chans)
    batches = engine.make_batches(test, batch_size=512, shuffle=False, drop_last=False, workers=args.workers,
                                  device=device)
    result = engine.evaluate(student, batches, engine.Augment(mean, std, 0, train=False), device,
                             amp_dtype(args.amp, device))
    if rank_world()[0] == 0:
        print(f"evaluating {name} ({img_size} px) on the {dataset} test set ({dataset_from}), mean {list(mean)} "
              f"std {list(std)}")
        print(json.dumps({"checkpoint": args.eval_only, "student": name, "dataset": dataset, **result}))
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
        return run_eval_only(args, device)
    student_dir = os.path.join(args.output_dir, "student")
    on_rank0(check_writable, args.output_dir)
    with run_lock(args.output_dir):
        return _run(args, device, rank, world, student_dir)


def resolve_settings(args, teacher, dataset, test_classes, world, num_selected, saved):
    """Everything a run needs that a flag may leave unset -> Settings; refuses what cannot run."""
    img_size = teacher.img_size
    if test_classes > teacher.num_classes:
        raise InputError(f"the test set at {args.data_cifar} has {test_classes} classes but the teacher "
                         f"has {teacher.num_classes}")
    student = args.student or default_student(img_size)
    teacher_acc, acc_from = resolve_teacher_acc(args, teacher, dataset)
    epochs, lr_offset, epochs_from = epoch_plan(args, num_selected, img_size, saved)
    check_trainable(args, num_selected, world)
    return Settings(teacher, dataset, student, num_selected, epochs, lr_offset, epochs_from, teacher_acc, acc_from,
                    crop_padding(args, img_size))


def _run(args, device, rank, world, student_dir):
    say = print if rank == 0 else (lambda *a, **k: None)
    amp = amp_dtype(args.amp, device)
    t_start = time.time()
    # everything that can fail on bad input happens before any long work
    teacher = models.teacher_from_args(args, device)
    in_chans, img_size, mean, std = teacher.in_chans, teacher.img_size, teacher.mean, teacher.std
    for note in teacher.notes:
        say(f"note: {note}")
    dataset = args.dataset or DEFAULT_DATASET
    if DATASETS[dataset] not in (None, teacher.num_classes):
        say(f"note: --dataset {dataset} has {DATASETS[dataset]} classes; the teacher has {teacher.num_classes}")
    test = data.load_labeled(dataset, args.data_cifar, "val", img_size, in_chans)
    # a selection file is read first: its size sets the epoch count
    selection = select_data.load_selection(args.selection_file, args, teacher) if args.selection_file else None
    num_selected = len(selection) if selection is not None else select_data.num_select(args)
    resume = engine.resume_path(args.resume, os.path.join(student_dir, "last.pth"))
    ckpt = engine.load_resume(resume) if resume else None
    if ckpt is not None:
        missing = [k for k in ("model", "noise", "optimizer", "optimizer_noise", "state") if k not in ckpt]
        if missing:
            raise InputError(f"--resume {resume} is not a last.pth of this script (no {', '.join(missing)})")
    settings = resolve_settings(args, teacher, dataset, len(test.classes), world, num_selected,
                                ckpt.get("args") if ckpt else None)
    epochs, lr_offset = settings.epochs, settings.lr_offset
    student = models.create(settings.student, teacher.num_classes)
    if models.input_spec(student) != (in_chans, img_size):
        raise InputError(f"--student {settings.student} takes {models.input_spec(student)} (channels, size) "
                         f"but the teacher takes {(in_chans, img_size)}")
    t_blocks, s_blocks = feature_block_pairs(args, teacher.model, student) if args.attnprobe_dist else ((), ())
    run_args = settings.record(args)   # args.json, and the args of every checkpoint
    if ckpt is not None:
        _check_resume(ckpt.get("args", {}), run_args, ckpt["state"]["epoch"], resume)
    say(f"git {git_sha() or '?'} | teacher {teacher.name} ({teacher.num_classes} classes) | student {settings.student} "
        f"| {world} process(es) on {device} | amp {'bf16' if amp is not None else 'off (fp32)'} | noise-adaptation "
        f"acc {settings.teacher_acc:.4f} from {settings.teacher_acc_from}")
    say(f"normalisation of every image (wild, train, test): mean {list(mean)} std {list(std)} from {teacher.norm_source}")

    if selection is not None:   # a rule select_data does not implement: the caller chose the images
        say(f"selection: {len(selection)} images from {args.selection_file}")
    else:
        selection = select_data.run_selection(args, teacher, device)
    positives = labelled = None
    if args.pos_num > 0:
        positives, pos_index, labelled = labeled_positives(args, settings.dataset, img_size, in_chans,
                                                           settings.padding)
        # part of this run's training set: recorded in its folder, not in stage 1's
        on_rank0(atomic_torch_save, {"positive_index": pos_index},
                 os.path.join(args.output_dir, "labelset_index_dict.pth"))
        say(f"NOT DATA-FREE: adding {len(pos_index)} labeled train images ({args.pos_num} per class)")
    train_data, (hold_images, hold_pred) = training_images(args, selection, teacher, positives)
    on_gpu = device.type == "cuda"
    # the published DataLoader kept the last partial batch; CUDA graphs need one batch shape
    train_batches = engine.make_batches(train_data, batch_size=args.batch_size, shuffle=True,
                                        drop_last=args.compile and args.cuda_graphs, seed=args.seed,
                                        workers=args.workers, device=device)
    test_batches = engine.make_batches(test, batch_size=1024, shuffle=False, drop_last=False,
                                       workers=args.workers, device=device)
    hold_batches = engine.TensorBatches(hold_images, hold_pred, batch_size=1024, shuffle=False, drop_last=False)
    n_train = len(train_data)
    batch = engine.rank_batch(n_train, args.batch_size, True)[0] * world
    say(f"training on {n_train} images ({len(hold_images)} held out) for {epochs} epochs ({settings.epochs_from})"
        f", {len(train_batches)} steps/epoch at global batch {batch}"
        + (f" (--batch_size {args.batch_size} clamped to the training images)" if batch < args.batch_size else ""))

    # models and optimizers
    torch.manual_seed(args.seed)
    student = models.create(settings.student, teacher.num_classes).to(device)
    noise = NoiseAdaptation(teacher.num_classes, settings.teacher_acc).to(device)
    opt_s = torch.optim.AdamW(student.parameters(), lr=args.lr_S, weight_decay=args.weight_decay,
                              **({"fused": True} if on_gpu else {}))
    opt_n = torch.optim.Adam(noise.parameters(), lr=1e-3)
    state = {"epoch": -1, "best_acc1": -1.0, "best_epoch": -1, "best_agree": -1.0, "acc1_at_best_agree": None,
             "best_agree_epoch": -1}
    resumed_record = None
    if ckpt is not None:
        student.load_state_dict(ckpt["model"])
        noise.load_state_dict(ckpt["noise"])
        opt_s.load_state_dict(ckpt["optimizer"])
        opt_n.load_state_dict(ckpt["optimizer_noise"])
        state.update(ckpt["state"])
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"]["torch"])
        resumed_record = ckpt.get("record")
        say(f"resumed from {resume} after epoch {state['epoch']}"
            + (f"; extended from {ckpt['args']['epochs_resolved']} to {epochs} epochs (the learning rates of "
               "the epochs already trained are unchanged)" if ckpt["args"].get("epochs_resolved", epochs) < epochs
               else ""))
        del ckpt
    log_path = os.path.join(args.output_dir, "log.txt")
    on_rank0(_prepare_folder, args.output_dir, resume, state["epoch"], resumed_record)
    on_rank0(_record_selection, args.output_dir, selection, resume)
    class_weights = None
    if args.robust:
        weights = robust_weights(args, selection, teacher, labelled, device, amp)
        class_weights = robust_class_weights(weights.double(), args.seed).float()
        say("robust KD class weights (selection's" + (" and the labelled images'" if labelled is not None else "")
            + ", + U[0, 0.1) per class as published): "
            + " ".join(f"{w:.4f}" for w in class_weights[:20].tolist()) + (" ..." if len(class_weights) > 20 else ""))
        class_weights = class_weights.to(device)
    train_module = engine.StudentWithFeatures(student, noise, s_blocks)
    teacher_module = engine.TeacherWithFeatures(teacher.model, t_blocks)
    if world > 1:
        train_module = DistributedDataParallel(train_module, device_ids=[device.index] if on_gpu else None)
    if args.compile:
        mode = "reduce-overhead" if args.cuda_graphs else None
        # static shapes: the last, partial batch gets its own graph instead of turning all of them dynamic
        train_module = torch.compile(train_module, mode=mode, dynamic=False)
        teacher_module = torch.compile(teacher_module, mode=mode, dynamic=False)
    patchattn = args.patchattn if args.attnprobe_dist else 0.0

    def loss_fn(images, _labels):   # data-free: no labels
        return engine.distill_losses(teacher_module, train_module, images, class_weights, patchattn)

    augment = engine.Augment(mean, std, settings.padding)
    plain = engine.Augment(mean, std, 0, train=False)
    n_parameters = sum(p.numel() for p in student.parameters())
    on_rank0(atomic_write_text, os.path.join(args.output_dir, "args.json"),
             json.dumps(run_args, indent=1, sort_keys=True))

    for epoch in range(state["epoch"] + 1, epochs):
        lr = engine.lr_at(epoch + lr_offset, args.lr_S, epochs + lr_offset, args.schedule, args.cos)
        engine.set_lr(opt_s, lr)
        t0 = time.time()
        metrics = engine.train_one_epoch(loss_fn, train_batches, [opt_s, opt_n], augment, epoch, device,
                                         args.seed, amp, args.log_every, "distill", modules=(student, noise),
                                         crop_flags=True)
        # DeiT's log keys first (train_lr, train_loss, test_loss, test_acc1, test_acc5, epoch, n_parameters)
        record = {"train_lr": lr, **{f"train_{k}": v for k, v in metrics.items()}}
        if (epoch + 1) % args.eval_every == 0 or epoch == epochs - 1:
            test_stats = engine.evaluate(student, test_batches, plain, device, amp)
            record.update(test_loss=test_stats["loss"], test_acc1=test_stats["acc1"], test_acc5=test_stats["acc5"])
            if len(hold_images):
                record["holdout_agreement"] = engine.evaluate(student, hold_batches, plain, device, amp)["acc1"]
            _update_best(state, epoch, record)
        record.update(epoch=epoch, n_parameters=n_parameters, epoch_seconds=time.time() - t0)
        state["epoch"] = epoch
        engine.commit_epoch(log_path, record, lambda: _save(student_dir, student, noise, opt_s, opt_n, state, run_args,
                                                             epoch, record, last=epoch == epochs - 1))
        say(json.dumps(record))
    final = _final_summary(state)
    on_rank0(atomic_write_text, os.path.join(args.output_dir, "summary.json"), json.dumps(final, indent=1))
    say("final: " + final["text"])
    say(f"done in {time.time() - t_start:.1f}s; files in {args.output_dir}")
    return final


# settings that cannot change what a resumed run computes (--cuda_graphs can: it drops each epoch's last
# partial batch); --epochs is checked on its own. teacher_acc_resolved: the noise layer's value comes from the
# checkpoint; selected_file, selection_file: the images themselves are checked against output_dir/selection.pt
RESUME_IGNORES = {"workers", "log_every", "eval_every", "device", "compile", "resume", "output_dir",
                  "eval_only", "epochs", "epochs_resolved", "lr_offset", "teacher_acc_resolved", "selected_file",
                  "selection_file"}


def _check_resume(saved, run_args, done_epoch, path):
    """Refuse a resume whose settings would change the run; --epochs may extend a step-schedule run."""
    engine.check_same_settings(saved, argparse.Namespace(**run_args), RESUME_IGNORES, path, "--output_dir")
    old = saved.get("epochs_resolved")
    new = run_args["epochs_resolved"]
    if old is None or old == new:
        return
    if new <= done_epoch:
        raise InputError(f"{path} has already trained {done_epoch + 1} epochs; --epochs {new} would end before "
                         "them: pass a larger --epochs, or --resume no to start over")
    if run_args["cos"]:
        raise InputError(f"{path} is a --cos run of {old} epochs: its learning rate at every epoch depends on the "
                         f"epoch count, so {new} epochs would change the epochs already trained; pass --epochs {old} "
                         "to finish it, or --resume no to start a new run")


def _prepare_folder(output_dir, resume, resumed_epoch, resumed_record):
    """Rank 0, before the first epoch: the log of a resumed run trimmed to its checkpoint, or a fresh
    start's previous files kept aside; temp files of a save a kill cut off removed (we hold the lock)."""
    if resume:
        engine.trim_log(os.path.join(output_dir, "log.txt"), resumed_epoch, resumed_record)
    else:
        moved = _move_old_run(output_dir)
        if moved:
            print(f"fresh start: the previous run's files are kept as {', '.join(moved)}")
    engine.remove_temp_files(os.path.join(output_dir, "student"))


def _move_old_run(output_dir):
    """A fresh start keeps the previous run's log, summary, args, selection and student/ beside it, numbered."""
    paths = [os.path.join(output_dir, name)
             for name in ("log.txt", "summary.json", "args.json", "student", SELECTION_RECORD)]
    if not any(os.path.exists(p) for p in paths[:2] + paths[3:]):
        return []   # nothing of a run to keep (args.json alone is rewritten)
    return [os.path.basename(p) for p in engine.move_aside(paths)]


SELECTION_RECORD = "selection.pt"   # in --output_dir: the images this run trains on (a valid --selection_file)


def _record_selection(output_dir, selection, resuming):
    """Keep the selection in the run folder; a resumed run must train on the same images."""
    path = os.path.join(output_dir, SELECTION_RECORD)
    if resuming and os.path.exists(path):
        old = safe_torch_load(path, "selection record")
        if not torch.equal(torch.as_tensor(old["indices"]), selection.indices):
            raise InputError(f"{path}: this run trained on another selection than the one chosen now (the scores in "
                             "--selected_file changed?); pass --selection_file " + path
                             + " to continue on its images, or --resume no to start over")
        return
    atomic_torch_save(selection.record(), path)


def _update_best(state, epoch, record):
    if record["test_acc1"] > state["best_acc1"]:
        state.update(best_acc1=record["test_acc1"], best_epoch=epoch, new_best=True)
    else:
        state["new_best"] = False
    agree = record.get("holdout_agreement")
    if agree is not None and agree > state["best_agree"]:
        state.update(best_agree=agree, best_agree_epoch=epoch, acc1_at_best_agree=record["test_acc1"])
    state["last_acc1"], state["last_acc5"] = record["test_acc1"], record["test_acc5"]


def _save(student_dir, student, noise, opt_s, opt_n, state, run_args, epoch, record, last=False):
    plain_args = {k: v for k, v in run_args.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    student_sd = engine.unwrap(student).state_dict()
    student_file = dict(model=student_sd, epoch=epoch, acc1=record.get("test_acc1"), acc5=record.get("test_acc5"),
                        mean=run_args["mean"], std=run_args["std"], student=run_args["student"], args=plain_args)
    if state.pop("new_best", False):   # the published checkpoint: best test accuracy so far
        engine.save_checkpoint(os.path.join(student_dir, "checkpoint.pth"), **student_file)
    if last:                           # the weights to report: the last epoch's
        engine.save_checkpoint(os.path.join(student_dir, "final.pth"), **student_file)
    engine.save_checkpoint(os.path.join(student_dir, "last.pth"), model=student_sd, noise=noise.state_dict(),
                           optimizer=opt_s.state_dict(), optimizer_noise=opt_n.state_dict(), epoch=epoch,
                           state=dict(state), args=plain_args, rng=engine.rng_state(), record=record)


def _final_summary(state):
    text = (f"final acc1 {state.get('last_acc1', float('nan')):.2f} (epoch {state['epoch']}) | "
            f"best acc1 {state['best_acc1']:.2f} at epoch {state['best_epoch']} (chosen on the test set)")
    if state["acc1_at_best_agree"] is not None:
        text += (f" | acc1 {state['acc1_at_best_agree']:.2f} at the best holdout agreement "
                 f"{state['best_agree']:.2f}% (epoch {state['best_agree_epoch']}, chosen without test labels)")
    return {"text": text, "epochs": state["epoch"] + 1, "final_acc1": state.get("last_acc1"),
            "final_acc5": state.get("last_acc5"),
            "best_acc1": state["best_acc1"], "best_epoch": state["best_epoch"],
            "acc1_at_best_agreement": state["acc1_at_best_agree"], "best_agreement_epoch": state["best_agree_epoch"]}
