"""Supervised training of a teacher ViT, for researchers without the published teacher files.

    python train_teacher.py --dataset cifar10 --data data/cifar --model deit_base_patch4_32_teacher \
        --epochs 200 --output teachers/cifar10.pth
    python train_teacher.py --dataset fashionmnist --data /usr/share/datasets/fashion-mnist \
        --model deit_tiny_patch4_28_teacher --epochs 10 --output teachers/fmnist.pth

Trains with AdamW, cosine learning rate after a linear warm-up, per-image random crop + flip on
the device, label smoothing; evaluates top-1/top-5 on the test split every epoch. Saves
{'model': state_dict, 'acc1', 'acc5', 'mean', 'std', 'arch', 'nb_classes'}, the published
teacher format (DFND_DeiT-train.py and select_data.py read 'acc1' for noise adaptation and
'mean'/'std' for normalisation). Beside it, every epoch: <stem>.last.pth (resume point),
one JSON line in <stem>.log.txt (DeiT's keys) and <stem>.args.json. Rerunning the same
command continues from <stem>.last.pth; changed settings are refused.
"""
import json
import os
import time

import torch

import torch.nn.functional as F

import data
import engine
import flags
import models
from checkpoint import (RUN_ONLY, check_same_settings, commit_epoch, load_resume, move_aside, own_record, restore_rng,
                        resume_path, rng_state, save_checkpoint, trim_log, unwrap)
from safety import (atomic_torch_save, atomic_write_text, check_writable, cli_main, init_distributed, on_rank0,
                    remove_temp_files)
from utils import InputError, amp_dtype, provenance, resolve_device, say


def get_args_parser():
    parser = flags.Parser(description="Train a teacher ViT", parents=[flags.system_parser()])
    parser.add_argument("--dataset", required=True, choices=list(data.DATASETS))
    parser.add_argument("--data", "--data-path", "--data_path", type=flags.path, required=True,
                        help="dataset root (CIFAR pickles, IDX files or ImageFolder tree)")
    parser.add_argument("--model", type=flags.model_name, default="deit_base_patch4_32_teacher",
                        help="registered model name")
    parser.add_argument("--nb_classes", "--num-classes", "--num_classes", type=flags.positive_int, default=None,
                        help="default: the dataset's class count (at least that many)")
    parser.add_argument("--output", type=flags.path, required=True,
                        help="teacher checkpoint file to write (.pth; not a folder)")
    parser.add_argument("--epochs", type=flags.positive_int, default=100, help="default 100")
    parser.add_argument("--batch_size", "--batch-size", type=flags.positive_int, default=256,
                        help="global batch (default 256)")
    parser.add_argument("--lr", type=flags.positive_float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    parser.add_argument("--weight_decay", "--weight-decay", type=flags.nonneg_float, default=0.05,
                        help="AdamW weight decay (default 0.05)")
    parser.add_argument("--warmup_epochs", "--warmup-epochs", type=flags.nonneg_int, default=1,
                        help="linear warm-up epochs (default 1)")
    parser.add_argument("--label_smoothing", "--smoothing", type=flags.below_one, default=0.1,
                        help="cross-entropy label smoothing (default 0.1)")
    parser.add_argument("--crop_padding", type=flags.nonneg_int, default=None,
                        help="default 4 at 32 and 224 px (the published RandomCrop), img_size // 8 at other sizes")
    parser.add_argument("--mean", type=flags.finite_float, nargs="+", default=None,
                        help="normalisation mean, one value or one per channel (default ImageNet's)")
    parser.add_argument("--std", type=flags.positive_float, nargs="+", default=None,
                        help="normalisation std (as --mean)")
    parser.add_argument("--log_every", type=flags.positive_int, default=50,
                        help="steps between progress-bar loss reads")
    parser.add_argument("--resume", type=flags.resume_point, default="auto",
                        help="'auto' (default: continue from <output stem>.last.pth "
                        "when present), a last.pth path, or 'no' (start over; an old log is kept as .1.txt)")
    return parser


def warmup_cosine(epoch, base_lr, epochs, warmup):
    if epoch < warmup:
        return base_lr * (epoch + 1) / (warmup + 1)
    return engine.lr_at(epoch - warmup, base_lr, max(1, epochs - warmup), cosine=True)


RESUME_IGNORES = RUN_ONLY | {"output"}   # the file names move with --output


def output_paths(output):
    """<stem>.pth (final teacher), <stem>.last.pth (resume point), <stem>.log.txt (one JSON line per epoch)."""
    stem = os.path.splitext(output)[0]
    return {"last": stem + ".last.pth", "log": stem + ".log.txt", "args": stem + ".args.json"}


def _resume_state(flag, flags, last_path):
    """The checkpoint to continue from (or None), refused when it would change the run (`flags`: vars(args))."""
    path = resume_path(flag, last_path)
    ckpt = load_resume(path, ("model", "optimizer", "epoch", "args"), "train_teacher.py")
    if ckpt is not None:
        check_same_settings(ckpt["args"], flags, RESUME_IGNORES, path, "--output", why={
            "epochs": " (the warm-up + cosine schedule depends on --epochs: a longer run would change the learning "
                      "rates of the epochs already trained)"})
    return path, ckpt


def _prepare_files(flags, paths, resume, done, resumed_record):
    """Rank 0, before the first epoch: the log of a resumed run trimmed to its checkpoint, or a fresh
    start's previous log kept aside; temp files of a save a kill cut off removed; args written."""
    if resume:
        trim_log(paths["log"], done, resumed_record)
        print(f"resumed from {resume} after epoch {done}" + (" (already finished)" if done >= flags["epochs"] - 1
                                                             else ""))
    elif os.path.exists(paths["log"]) and os.path.getsize(paths["log"]):
        print(f"fresh start: the previous log is kept as {move_aside([paths['log']])[0]}")
    remove_temp_files(os.path.dirname(os.path.abspath(flags["output"])),
                      [os.path.basename(p) for p in (flags["output"], *paths.values())])
    atomic_write_text(paths["args"], json.dumps({**flags, "provenance": provenance()}, indent=1, sort_keys=True))


def train_teacher(args, on_epoch=None):
    """Train and save the teacher; returns the final test metrics.

    on_epoch: optional callable given each epoch's record dict (rank 0), e.g. for a progress line.
    """
    if not os.path.isdir(args.data):
        raise InputError(f"--data {args.data}: no such folder")
    if os.path.isdir(args.output):
        raise InputError(f"--output {args.output} is a folder: name the teacher file to write in it "
                         f"(e.g. {os.path.join(args.output, 'teacher.pth')})")
    device = resolve_device(args.device)
    rank, world = init_distributed(device, args.dist_timeout)
    amp = amp_dtype(args.amp, device)
    check_writable(os.path.dirname(os.path.abspath(args.output)), "--output")
    paths = output_paths(args.output)
    resume, ckpt = _resume_state(args.resume, vars(args), paths["last"])
    probe = models.create(args.model, 2, flag="--model")
    in_chans, img_size = models.input_spec(probe)
    train = data.load_labelled(args.dataset, args.data, "train", img_size, in_chans)
    test = data.load_labelled(args.dataset, args.data, "val", img_size, in_chans)
    if args.nb_classes is not None and args.nb_classes < len(train.classes):   # a label beyond the head
        raise InputError(f"--nb_classes {args.nb_classes} is fewer than the {len(train.classes)} classes of the "
                         f"train split at {args.data}")
    num_classes = args.nb_classes or data.DATASETS[args.dataset] or train.num_classes
    mean, std = data.resolve_mean_std(args.mean, args.std, in_chans)
    padding = data.crop_padding(args.crop_padding, img_size)
    train_batches = engine.make_batches(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                        seed=args.seed, workers=args.workers, device=device)
    test_batches = engine.make_batches(test, batch_size=1024, shuffle=False, drop_last=False,
                                       workers=args.workers, device=device)
    torch.manual_seed(args.seed)
    model = models.create(args.model, num_classes).to(device)
    optimizer = engine.adamw(model.parameters(), args.lr, args.weight_decay, device)
    done, stats, resumed_record = -1, {}, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        done, stats = ckpt["epoch"], ckpt.get("stats", {})
        resumed_record = own_record(ckpt, resume, paths["last"])
        if "rng" in ckpt:
            restore_rng(ckpt["rng"])
        del ckpt
    train_model = engine.distribute(model, device)
    if args.compile:
        train_model = engine.compiled(train_model)

    augment, plain = engine.Augment(mean, std, padding), engine.Augment(mean, std, 0, train=False)
    n_parameters = sum(p.numel() for p in model.parameters())
    say(f"teacher {args.model}: {len(train)} train / {len(test)} test images, {num_classes} classes, "
        f"{len(train_batches)} steps/epoch on {device}; normalisation mean {list(mean)} std {list(std)}")
    on_rank0(_prepare_files, vars(args), paths, resume, done, resumed_record)
    for epoch in range(done + 1, args.epochs):
        lr = warmup_cosine(epoch, args.lr, args.epochs, args.warmup_epochs)
        engine.set_lr(optimizer, lr)
        t0 = time.time()
        epoch_run = engine.TrainEpoch(train_batches, augment, epoch, device, args.seed, args.log_every, "teacher",
                                      modules=(model,))
        for batch in epoch_run:
            with engine.autocast(device, amp):
                loss = F.cross_entropy(train_model(batch.images).float(), batch.labels,
                                       label_smoothing=args.label_smoothing)
            epoch_run.step({"loss": loss, "ce": loss}, [optimizer])
        metrics = epoch_run.metrics()
        stats = engine.evaluate(model, test_batches, plain, device, amp)
        # DeiT's log keys, then ours
        record = {"train_lr": lr, "train_loss": metrics["loss"], "test_loss": stats["loss"],
                  "test_acc1": stats["acc1"], "test_acc5": stats["acc5"], "epoch": epoch,
                  "n_parameters": n_parameters, "img_per_s": metrics["img_per_s"], "epoch_seconds": time.time() - t0}
        commit_epoch(paths["log"], record, lambda: save_checkpoint(
            paths["last"], model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(), epoch=epoch,
            stats=stats, args=vars(args), rng=rng_state(), record=record))
        if rank == 0:
            print(json.dumps(record))
            if on_epoch is not None:
                on_epoch(record)
    on_rank0(atomic_torch_save, {"model": unwrap(model).state_dict(), "acc1": stats["acc1"],
                                 "acc5": stats["acc5"], "mean": list(mean), "std": list(std), "arch": args.model,
                                 "nb_classes": num_classes, "dataset": args.dataset, "epochs": args.epochs,
                                 "provenance": provenance()}, args.output)
    say(f"saved {args.output}: test acc1 {stats['acc1']:.2f}, acc5 {stats['acc5']:.2f}")
    return stats


@cli_main
def main(args):
    return train_teacher(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
