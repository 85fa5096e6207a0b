"""The training engine shared by probe distillation and teacher training.

Batches are uint8 images (B, C, H, W); augmentation (per-image random crop + flip) and
normalisation run on the training device, so the data path is a memory gather. Each epoch's
shuffle and augmentation are seeded by (seed, epoch, rank): resuming from `last.pth` at an
epoch boundary reproduces an uninterrupted run exactly on the CPU.
"""
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
from attention_probe import probe_forward
from losses import kdloss, patch_attention_probe_loss, robust_kdloss
from utils import (InputError, atomic_torch_save, atomic_write_text, on_rank0, rank_world, safe_torch_load,
                   signals_deferred, writing)

# ---- batches ----------------------------------------------------------------------------


def rank_batch(n, batch_size, shuffle):
    """-> (this rank's batch, its images per epoch) for n images and a global batch. Shuffled epochs
    give every rank n // world images; a batch larger than them is clamped to them (a small selection
    still trains every epoch)."""
    rank, world = rank_world()
    items = n // world if shuffle else math.ceil((n - rank) / world)
    return min(max(1, batch_size // world), max(1, items)), items


class TensorBatches:
    """Epochs over an in-memory uint8 image tensor (K, C, H, W) and optional labels (K,).

    The images may live on the GPU (a 650 k × 32×32 selection is 2 GB). Under torchrun every
    rank draws the same permutation and takes its strided part; `batch_size` is the global batch.
    """

    def __init__(self, images, labels=None, batch_size=256, shuffle=True, drop_last=True, seed=0):
        self.images, self.labels = images, labels
        rank, world = rank_world()
        self.rank, self.world = rank, world
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.per_rank, self.items = rank_batch(len(images), batch_size, shuffle)

    def __len__(self):
        n = self.items
        return n // self.per_rank if self.drop_last else math.ceil(n / self.per_rank)

    def epoch(self, epoch):
        n = len(self.images)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            order = torch.randperm(n, generator=g)[self.rank::self.world][:self.items]
        else:
            order = torch.arange(self.rank, n, self.world)
        order = order.to(self.images.device)
        for b in range(len(self)):
            idx = order[b * self.per_rank:(b + 1) * self.per_rank]
            yield self.images[idx], (None if self.labels is None else self.labels[idx])


class LoaderBatches:
    """Epochs over a Dataset of (uint8 (C,H,W), label) decoded by DataLoader workers (224-px data)."""

    def __init__(self, dataset, batch_size=256, shuffle=True, drop_last=True, seed=0, workers=8, pin=False):
        rank, world = rank_world()
        self.sampler = None
        if shuffle:
            self.sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        elif world > 1:   # each image once (DistributedSampler would pad with repeats, counted twice in a test)
            self.sampler = range(rank, len(dataset), world)
        per_rank, _ = rank_batch(len(dataset), batch_size, shuffle)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=per_rank, sampler=self.sampler, drop_last=drop_last,
            num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)

    def __len__(self):
        return len(self.loader)

    def epoch(self, epoch):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        data.set_epoch(self.loader.dataset, epoch)   # per-epoch draws of datasets that crop themselves
        for batch in self.loader:
            images, labels = batch[0], batch[1]
            yield images, (labels if torch.is_tensor(labels) else None)


def make_batches(dataset_or_images, labels=None, device=None, workers=0, **kw):
    """TensorBatches for in-memory data (a uint8 tensor or an ArrayDataset), LoaderBatches for the rest.

    In-memory data moves to `device` when it is a GPU, so batches are gathered there.
    """
    if isinstance(dataset_or_images, data.ArrayDataset):
        dataset_or_images, labels = dataset_or_images.images, dataset_or_images.labels
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if torch.is_tensor(dataset_or_images):
        if on_gpu:
            dataset_or_images = dataset_or_images.to(device)
            labels = labels.to(device) if labels is not None else None
        return TensorBatches(dataset_or_images, labels, **kw)
    return LoaderBatches(dataset_or_images, workers=workers, pin=on_gpu, **kw)


# ---- models used in training ------------------------------------------------------------

class StudentWithFeatures(torch.nn.Module):
    """Student forward that also returns block features and the noise-adaptation loss.

    One module, so DistributedDataParallel syncs the gradients of the student and the noise layer.
    """

    def __init__(self, student, noise=None, feature_blocks=()):
        super().__init__()
        self.student, self.noise, self.feature_blocks = student, noise, tuple(feature_blocks)

    def forward(self, x, teacher_logits=None):
        out = probe_forward(self.student, x, probe_blocks=(), feature_blocks=self.feature_blocks)
        na = self.noise(out.logits, teacher_logits) if self.noise is not None else out.logits.new_zeros(())
        return out.logits, out.features, na


class TeacherWithFeatures(torch.nn.Module):
    def __init__(self, teacher, feature_blocks=()):
        super().__init__()
        self.teacher, self.feature_blocks = teacher, tuple(feature_blocks)

    @torch.no_grad()
    def forward(self, x):
        out = probe_forward(self.teacher, x, probe_blocks=(), feature_blocks=self.feature_blocks)
        return out.logits, out.features


class Augment:
    """Per-image random crop (zero padding) + flip, then normalisation, on the batch's device."""

    def __init__(self, mean, std, padding, train=True):
        self.mean, self.std, self.padding, self.train = mean, std, padding, train
        self.generator, self.device = None, None

    def seed(self, seed, device):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, images, cropped=None):
        """cropped: optional (B,) bool, images their dataset already cropped and flipped (left as they are)."""
        if self.train:
            images = data.random_crop_flip(images, self.padding, self.generator, done=cropped)
        return data.normalize(images, self.mean, self.std)


def distill_losses(teacher, student_module, images, class_weights=None, patchattn=0.0, temperature=4.0):
    """KD (robust when class_weights is given) + noise adaptation + patchattn · probe distillation."""
    # with CUDA graphs (--compile --cuda_graphs) the no-grad teacher would otherwise start a new graph
    # generation of its own, and the student's call would free its outputs: one step is one generation
    torch.compiler.cudagraph_mark_step_begin()
    t_logits, t_feats = teacher(images)
    s_logits, s_feats, na = student_module(images, t_logits.float())
    s_logits, t_logits = s_logits.float(), t_logits.float()
    if class_weights is not None:
        kd = robust_kdloss(s_logits, t_logits, class_weights[t_logits.argmax(1)], temperature)
    else:
        kd = kdloss(s_logits, t_logits, temperature)
    losses = {"kd": kd, "na": na}
    if patchattn > 0:
        losses["pd"] = patch_attention_probe_loss(t_feats, s_feats)
    losses["loss"] = kd + na + patchattn * losses.get("pd", 0.0)
    return losses


def supervised_losses(model, images, labels, label_smoothing=0.0):
    logits = model(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    return {"loss": loss, "ce": loss}


# ---- one epoch --------------------------------------------------------------------------

def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_at(epoch, base_lr, epochs, schedule=(), cosine=False):
    """Per-epoch learning rate: ×0.1 at each milestone in `schedule`, or cosine to 0."""
    if cosine:
        return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    return base_lr * 0.1 ** sum(epoch >= m for m in schedule)


def train_one_epoch(loss_fn, batches, optimizers, augment, epoch, device, seed=0, amp_dtype=None,
                    log_every=50, desc="train", modules=(), crop_flags=False):
    """Run one epoch; loss_fn(images_float, labels) -> dict with 'loss'. Returns mean metrics.

    crop_flags: the batches' second item is not labels but (B,) flags, 1 for images their dataset already
    cropped and flipped (distillation's --pos_num images at 224 px), which `augment` leaves alone;
    loss_fn then gets labels None.

    Metric sums stay on the device and are read every `log_every` steps, so steps do not wait on the host.
    """
    rank, world = rank_world()
    for m in modules:
        m.train()
    augment.seed(seed * 1000003 + epoch * 1009 + rank, device)
    sums, count, seen, t0 = {}, 0, 0, time.time()
    bar = tqdm(total=len(batches), desc=f"{desc} {epoch}", disable=rank != 0, leave=False, dynamic_ncols=True)
    for step, (images, second) in enumerate(batches.epoch(epoch)):
        images = images.to(device, non_blocking=True)
        second = second.to(device, non_blocking=True) if second is not None else None
        cropped = second.bool() if crop_flags and second is not None else None
        labels = None if crop_flags else second
        x = augment(images, cropped)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = loss_fn(x, labels)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        for opt in optimizers:
            opt.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        count += 1
        seen += images.shape[0]
        bar.update(1)
        if (step + 1) % log_every == 0:
            if not torch.isfinite(losses["loss"].detach()).item():
                raise FloatingPointError(f"loss became {losses['loss'].item()} at epoch {epoch} step {step}")
            bar.set_postfix(loss=f"{(sums['loss'] / count).item():.4f}")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    metrics = {k: v.item() / max(1, count) for k, v in sums.items()}
    if world > 1:
        t = torch.tensor([metrics.get(k, 0.0) for k in sorted(metrics)], device=device)
        dist.all_reduce(t)
        metrics = dict(zip(sorted(metrics), (t / world).tolist()))
    metrics["img_per_s"] = seen * world / max(seconds, 1e-9)
    metrics["seconds"] = seconds
    if not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"non-finite training metrics at epoch {epoch}: {metrics}")
    return metrics


@torch.no_grad()
def evaluate(model, batches, augment, device, amp_dtype=None):
    """Top-1 / top-5 accuracy (%) over the test batches; sharded under torchrun and summed."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)   # top1, top5, count, summed cross-entropy
    for images, labels in batches.epoch(0):
        labels = labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(augment(images.to(device, non_blocking=True))).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        loss = F.cross_entropy(logits, labels, reduction="sum")
        sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(labels), device=device),
                             loss]).double()
    if rank_world()[1] > 1:
        dist.all_reduce(sums)
    top1, top5, n, loss = sums.tolist()
    return {"acc1": 100 * top1 / max(n, 1), "acc5": 100 * top5 / max(n, 1), "loss": loss / max(n, 1), "n": int(n)}


# ---- run folder: lock, log, checkpoints -------------------------------------------------

def rng_state():
    """Global RNG states (the run itself reseeds per epoch; these restore anything else drawn)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(path, **state):
    """Atomic save of plain tensors, state dicts and primitives (loadable with weights_only=True)."""
    atomic_torch_save(state, path)


def load_resume(path):
    try:
        ckpt = safe_torch_load(path)
    except InputError as err:
        raise InputError(f"cannot resume: {err}") from None
    if not isinstance(ckpt, dict):
        raise InputError(f"cannot resume from {path}: it holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def unwrap(module):
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(module, "module"):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def log_line(path, record):
    """Append one JSON line; a write cut short (full disk) is taken back, so no torn line stays."""
    with writing(path), open(path, "a") as f:
        size = f.tell()
        try:
            f.write(json.dumps(record) + "\n")
            f.flush()
        except OSError:
            f.truncate(size)
            raise


def commit_epoch(log_path, record, save):
    """End an epoch: save() its checkpoint, which must hold `record` (the resume restores a line a
    failure cut off), then log the line; so the log never holds an epoch that no checkpoint backs.
    SIGINT/SIGTERM wait until both are written. Runs on rank 0; under torchrun every rank raises
    rank 0's failure (a full disk: OutOfSpace on each)."""
    def commit():
        with signals_deferred():
            save()
            log_line(log_path, record)
    on_rank0(commit)


def resume_path(flag, last_path):
    """--resume 'auto' | 'no' | PATH -> the checkpoint to resume from, or None."""
    if flag == "no":
        return None
    if flag == "auto":
        return last_path if os.path.exists(last_path) else None
    if not os.path.isfile(flag):
        raise InputError(f"--resume {flag}: no such file")
    return flag


def check_same_settings(saved, args, ignore, path, output_flag, why=None):
    """Refuse to resume `path` when its saved args differ from this command's in a setting not in `ignore`:
    one error naming each changed flag, its old and new value (and `why[flag]` where given), and the way out."""
    current = vars(args)
    changed = sorted(k for k in saved if k not in ignore and k in current and saved[k] != current[k])
    if changed:
        raise InputError(f"{path} belongs to a run with other settings: " + ", ".join(
            f"--{k} {saved[k]!r} (now {current[k]!r})" + ((why or {}).get(k) or "") for k in changed)
            + f"; rerun with the old values to continue it, or pass --resume no (or another {output_flag}) "
            "to start over")


def move_aside(paths):
    """Keep a previous run's files (and folders) beside the new run's: each of `paths` that exists becomes
    <stem>.<n><ext> (log.txt -> log.1.txt, student -> student.1), with one n free for all of them.
    Returns the new names."""
    present = [p for p in paths if os.path.exists(p)]

    def numbered(p, n):
        stem, ext = os.path.splitext(p)
        return f"{stem}.{n}{ext}"
    n = 1
    while any(os.path.exists(numbered(p, n)) for p in paths):
        n += 1
    for p in present:
        os.replace(p, numbered(p, n))
    return [numbered(p, n) for p in present]


def trim_log(path, resumed_epoch, record=None):
    """A resumed run's JSON-lines log keeps exactly the lines of epochs <= resumed_epoch (a kill may have
    torn a line); `record`, the resumed checkpoint's own line, is appended when a failure after its
    save cut it off."""
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            lines = f.readlines()
    keep, logged = [], set()
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue   # torn by a kill
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] <= resumed_epoch:
            keep.append(line if line.endswith("\n") else line + "\n")
            logged.add(rec["epoch"])
    if record is not None and resumed_epoch not in logged and (resumed_epoch - 1 in logged or (
            resumed_epoch == 0 and os.path.exists(path))):   # not into the log of another run folder
        keep.append(json.dumps(record) + "\n")
    if keep != lines:
        atomic_write_text(path, "".join(keep))


def remove_temp_files(folder, targets=None):
    """Temp files of a save that a kill cut off: all in `folder` (the caller holds its lock), or only
    those of the files named in `targets` (a folder shared with other runs)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(".tmp-") and (targets is None or name.endswith(tuple(targets))):
            os.unlink(os.path.join(folder, name))
