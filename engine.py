"""The training engine shared by probe distillation and teacher training: batches, on-device augmentation,
one epoch's bookkeeping, evaluation and the learning rate. The loops themselves stand in the scripts.

Batches are uint8 images (B, C, H, W); augmentation (per-image random crop + flip) and normalisation run
on the training device, so the data path is a memory gather. Each epoch's shuffle and augmentation are
seeded by (seed, epoch, rank): resuming from `last.pth` at an epoch boundary reproduces an uninterrupted
run exactly on the CPU.
"""
import math
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
from safety import set_phase
from utils import rank_world


class Batch(NamedTuple):
    images: torch.Tensor                # (B, C, H, W): uint8 from the batches, float once augmented
    labels: torch.Tensor = None         # (B,) long; None for the wild images of distillation
    cropped: torch.Tensor = None        # (B,) bool: images their dataset already cropped and flipped


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
            yield Batch(self.images[idx], None if self.labels is None else self.labels[idx])


class LoaderBatches:
    """Epochs over a Dataset decoded by DataLoader workers (224-px data). Items are (uint8 (C,H,W), label),
    or {'images': uint8 (C,H,W), 'cropped': 0 or 1} for the unlabelled images of distillation."""

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
            if isinstance(batch, dict):
                yield Batch(batch["images"], cropped=batch["cropped"].bool())
            else:
                yield Batch(batch[0], batch[1] if torch.is_tensor(batch[1]) else None)


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


def autocast(device, dtype):
    """torch.autocast to `dtype` on `device`'s type; dtype None: off (fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---- one epoch --------------------------------------------------------------------------

def adamw(params, lr, weight_decay, device):
    """AdamW, with the fused kernel on a GPU (the same update in fewer launches)."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)


def distribute(module, device):
    """The module in DistributedDataParallel under torchrun; itself in one process."""
    if rank_world()[1] == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def compiled(module, cuda_graphs=False):
    """--compile: static shapes (a last, partial batch gets its own graph instead of turning all of them
    dynamic); --cuda_graphs: mode='reduce-overhead'."""
    return torch.compile(module, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_at(epoch, base_lr, epochs, schedule=(), cosine=False):
    """Per-epoch learning rate: ×0.1 at each milestone in `schedule`, or cosine to 0."""
    if cosine:
        return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    return base_lr * 0.1 ** sum(epoch >= m for m in schedule)


class TrainEpoch:
    """One training epoch's bookkeeping, for any loop: the modules in train mode, the epoch's augmentation
    seeded by (seed, epoch, rank), a progress bar, loss sums kept on the device (read every `log_every`
    steps, so steps do not wait on the host) and the epoch's mean metrics over every rank.

        epoch_run = TrainEpoch(batches, augment, epoch, device, seed, log_every, "distill", modules)
        for batch in epoch_run:                  # batch.images: augmented float (B, C, H, W) on the device
            losses = ...                         # a dict with the total under 'loss'
            epoch_run.step(losses, optimizers)   # backward, one step of each optimizer
        metrics = epoch_run.metrics()            # the mean of each loss, img_per_s, seconds
    """

    def __init__(self, batches, augment, epoch, device, seed=0, log_every=50, desc="train", modules=(), phase=None,
                 resumes="the last finished epoch"):
        self.batches, self.augment, self.epoch, self.device = batches, augment, epoch, device
        self.log_every, self.desc, self.modules = log_every, desc, modules
        # for the line a lost rank ends with: what this loop is (default: desc), what a restart resumes from
        self.phase, self.resumes = phase or desc, resumes
        self.seed_value = seed * 1000003 + epoch * 1009 + rank_world()[0]
        self.sums, self.count, self.seen = {}, 0, 0

    def __iter__(self):
        for m in self.modules:
            m.train()
        self.augment.seed(self.seed_value, self.device)
        self.t0 = time.time()
        self.bar = tqdm(total=len(self.batches), desc=f"{self.desc} {self.epoch}", disable=rank_world()[0] != 0,
                        leave=False, dynamic_ncols=True)
        for step, batch in enumerate(self.batches.epoch(self.epoch)):
            set_phase(f"{self.phase} epoch {self.epoch} step {step}", self.resumes)
            images = batch.images.to(self.device, non_blocking=True)
            labels, cropped = (None if t is None else t.to(self.device, non_blocking=True)
                               for t in (batch.labels, batch.cropped))
            self.batch_size = images.shape[0]
            yield Batch(self.augment(images, cropped), labels, cropped)
        self.bar.close()

    def step(self, losses, optimizers):
        """Backward of losses['loss'], a step of each optimizer; the losses summed for the epoch's means."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        for opt in optimizers:
            opt.step()
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.count += 1
        self.seen += self.batch_size
        self.bar.update(1)
        if self.count % self.log_every == 0:
            if not torch.isfinite(losses["loss"].detach()).item():
                raise FloatingPointError(f"loss became {losses['loss'].item()} at epoch {self.epoch} "
                                         f"step {self.count - 1}")
            self.bar.set_postfix(loss=f"{(self.sums['loss'] / self.count).item():.4f}")

    def metrics(self):
        """The epoch's mean losses (averaged over the ranks), its img/s and seconds."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - self.t0
        world = rank_world()[1]
        metrics = {k: v.item() / max(1, self.count) for k, v in self.sums.items()}
        if world > 1:
            t = torch.tensor([metrics.get(k, 0.0) for k in sorted(metrics)], device=self.device)
            dist.all_reduce(t)
            metrics = dict(zip(sorted(metrics), (t / world).tolist()))
        metrics["img_per_s"] = self.seen * world / max(seconds, 1e-9)
        metrics["seconds"] = seconds
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite training metrics at epoch {self.epoch}: {metrics}")
        return metrics


@torch.no_grad()
def evaluate(model, batches, augment, device, amp_dtype=None):
    """Top-1 / top-5 accuracy (%) over the test batches; sharded under torchrun and summed."""
    set_phase("testing")
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)   # top1, top5, count, summed cross-entropy
    for batch in batches.epoch(0):
        labels = batch.labels.to(device)
        with autocast(device, amp_dtype):
            logits = model(augment(batch.images.to(device, non_blocking=True))).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        loss = F.cross_entropy(logits, labels, reduction="sum")
        sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(labels), device=device),
                             loss]).double()
    if rank_world()[1] > 1:
        dist.all_reduce(sums)
    top1, top5, n, loss = sums.tolist()
    return {"acc1": 100 * top1 / max(n, 1), "acc5": 100 * top5 / max(n, 1), "loss": loss / max(n, 1), "n": int(n)}
