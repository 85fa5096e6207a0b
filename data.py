"""Labelled datasets (CIFAR pickles, MNIST IDX, ImageFolder trees), the student's training set, and uint8
batch augmentation.

Images travel as uint8 tensors (C,H,W) / (B,C,H,W); `normalize` turns a batch into float on the
device, after `random_crop_flip`, so the loader never does float work.
"""
import codecs
import gzip
import io
import os
import pickle
import re

import numpy as np
import torch
import torchvision.transforms.functional as TF

import pool
import published
from published import LARGE_INPUT
from safety import atomic_write_bytes
from utils import InputError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]
# --dataset name -> its class count (None: as many as the folder holds)
DATASETS = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashionmnist": 10, "tinyimagenet": 200,
            "imagenet": 1000, "folder": None}

# --------------------------------------------------------------------------- CIFAR pickles

_CIFAR = {
    # dataset: (folder, train files, test files, meta file, label key, class-name key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


def _numpy_pickle_globals():
    # Take the callables numpy itself pickles with, so the allow-list works on numpy 1 and 2.
    recon = np.zeros(1, np.uint8).__reduce__()[0]
    frombuf = np.zeros(1, np.uint8).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed = {("_codecs", "encode"): codecs.encode}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                "numpy._core.numeric", "numpy"):
        allowed[(mod, "_reconstruct")] = recon
        allowed[(mod, "_frombuffer")] = frombuf
        allowed[(mod, "scalar")] = scalar
        allowed[(mod, "ndarray")] = np.ndarray
        allowed[(mod, "dtype")] = np.dtype
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """A CIFAR pickle holds only dicts, lists, bytes and numpy arrays: refuse anything else,
    since unpickling a foreign file could otherwise run arbitrary code."""
    allowed = None

    def find_class(self, module, name):
        if _SafeUnpickler.allowed is None:
            _SafeUnpickler.allowed = _numpy_pickle_globals()
        try:
            return _SafeUnpickler.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _load_pickle(path):
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: not a CIFAR python pickle ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    # Python-2 pickles read with encoding='bytes' have bytes keys; ours may have str keys.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _get(d, key, path):
    if key not in d:
        raise InputError(f"{path}: missing key '{key}' (has {sorted(map(str, d))})")
    return d[key]


def cifar_dir(root, dataset):
    """The folder holding the pickles: `root/cifar-10-batches-py` or `root` itself."""
    if dataset not in _CIFAR:
        raise InputError(f"unknown CIFAR dataset '{dataset}' (expected cifar10 or cifar100)")
    folder, train_files = _CIFAR[dataset][:2]
    root = os.fspath(root)
    if os.path.isfile(os.path.join(root, train_files[0])) or os.path.basename(
            os.path.normpath(root)) == folder:
        return root
    return os.path.join(root, folder)


def check_cifar_files(root, dataset):
    """Raise InputError naming the first missing pickle; return the pickle folder."""
    d = cifar_dir(root, dataset)
    _, train_files, test_files, meta = _CIFAR[dataset][:4]
    for name in [meta] + train_files + test_files:
        p = os.path.join(d, name)
        if not os.path.isfile(p):
            raise InputError(f"missing CIFAR file: {p}")
    return d


# not torchvision.datasets.CIFAR10/100: they md5-check every file against the official archive (any other pickles,
# the generated test data too, are "not found or corrupted", no file named) and unpickle without an allow-list
def read_cifar(root, dataset, train: bool):
    """-> (images uint8 (N,32,32,3), labels int64 (N,), class names) from the python pickles."""
    d = check_cifar_files(root, dataset)
    _, train_files, test_files, meta, label_key, names_key = _CIFAR[dataset]
    meta_path = os.path.join(d, meta)
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n)
               for n in _get(_load_pickle(meta_path), names_key, meta_path)]
    images, labels = [], []
    for name in (train_files if train else test_files):
        p = os.path.join(d, name)
        batch = _load_pickle(p)
        x = np.asarray(_get(batch, "data", p))
        y = np.asarray(_get(batch, label_key, p), dtype=np.int64).reshape(-1)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            raise InputError(f"{p}: 'data' must be uint8 N x 3072, got {x.dtype} {x.shape}")
        if len(y) != len(x):
            raise InputError(f"{p}: {len(x)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise InputError(f"{p}: labels outside 0..{len(classes) - 1}")
        # rows are 1024 R, then G, then B values, each plane row-major
        images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes


def download_cifar(root, dataset):
    """Fetch the official archive with torchvision (needs network)."""
    import torchvision
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[dataset]
    try:
        os.makedirs(root, exist_ok=True)
        cls(root, train=True, download=True)  # one archive holds both splits
    except Exception as e:  # network / disk errors reach the user as one line
        raise InputError(f"--download of {dataset} into {root} failed: {e}") from None


# --------------------------------------------------------------------------- IDX (MNIST)

def _idx_path(root, name):
    for cand in (os.path.join(root, name), os.path.join(root, name + ".gz")):
        if os.path.isfile(cand):
            return cand
    raise InputError(f"missing IDX file: {os.path.join(root, name)}[.gz]")


def _read_idx_file(path, ndim):
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise InputError(f"{path}: broken gzip file ({e})") from None
    if len(raw) < 4 + 4 * ndim:
        raise InputError(f"{path}: too short for an IDX header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise InputError(f"{path}: bad IDX magic {raw[:4].hex()} (expected 000008{ndim:02x})")
    dims = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    n = int(np.prod(dims))
    body = raw[4 + 4 * ndim:]
    if len(body) != n:
        raise InputError(f"{path}: header says {dims} = {n} bytes, file has {len(body)}")
    return np.frombuffer(body, np.uint8).reshape(dims)


def read_idx(root, train: bool):
    """-> (images uint8 (N,H,W,1), labels int64 (N,)) from MNIST-style IDX files, raw or gzipped."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise InputError(f"missing IDX folder: {root}")
    prefix = "train" if train else "t10k"
    img_path = _idx_path(root, f"{prefix}-images-idx3-ubyte")
    lab_path = _idx_path(root, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx_file(img_path, 3)
    labels = _read_idx_file(lab_path, 1).astype(np.int64)
    if len(images) != len(labels):
        raise InputError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
    return images[..., None].copy(), labels


# --------------------------------------------------------------------------- ImageFolder

def find_classes(root):
    """-> (class_to_idx: {folder name: label}, classes: list indexed by label).

    Folder names that are all integers ('7', '007') or all '<digits>_<name>' ('07_bee') take the
    integer as label, since a string sort would put '10' before '2'. Otherwise: sorted names.
    With integer labels a missing class leaves a gap: classes[label] is None there.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise InputError(f"missing image folder: {root}")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise InputError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    if all(re.fullmatch(r"[0-9]+", n) for n in names):
        pairs = [(n, int(n), n) for n in names]
    elif all(re.match(r"[0-9]+_", n) for n in names):
        pairs = [(n, int(n.split("_", 1)[0]), n.split("_", 1)[1]) for n in names]
    else:
        pairs = [(n, i, n) for i, n in enumerate(names)]
    class_to_idx, classes = {}, [None] * (max(p[1] for p in pairs) + 1)
    for folder, label, display in pairs:
        if classes[label] is not None:
            raise InputError(f"{root}: class folders '{folder}' and another both mean label {label}")
        class_to_idx[folder], classes[label] = label, display
    return class_to_idx, classes


def list_image_folder(root, class_to_idx=None, classes=None):
    """-> (samples [(path, label)], classes) for `root/<class>/<image>` (walks sub-folders).

    Pass the train split's `find_classes` result for a val split so labels agree even when a
    class folder is missing from val.
    """
    root = os.fspath(root)
    if class_to_idx is None:
        class_to_idx, classes = find_classes(root)
    elif not os.path.isdir(root):
        raise InputError(f"missing image folder: {root}")
    samples = []
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if not e.is_dir() or e.name.startswith("."):
            continue
        if e.name not in class_to_idx:
            raise InputError(f"{e.path}: class folder not in the train split's classes")
        label = class_to_idx[e.name]
        for dirpath, dirnames, filenames in os.walk(e.path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            samples += [(os.path.join(dirpath, f), label) for f in filenames if pool.is_image_file(f)]
    # torchvision ImageFolder's order, which --pos_num's "first K per class" follows
    samples.sort(key=lambda s: pool.image_folder_key(os.path.relpath(s[0], root).replace(os.sep, "/")))
    if not samples:
        raise InputError(f"no images ({' '.join(pool.IMG_EXTENSIONS)}) under {root}")
    return samples, list(classes)


# --------------------------------------------------------------------------- datasets

def _rgb_to_gray(x):
    # PIL's convert('L') formula (ITU-R 601-2, fixed point), so array and PIL paths agree
    x = x.to(torch.int32)
    y = (x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 0x8000) >> 16
    return y.to(torch.uint8)[:, None]


def convert_uint8_batch(x, img_size=None, in_chans=None, chunk=4096):
    """uint8 (N,C,H,W) -> channel count `in_chans` and size (img_size, img_size): torchvision's resize of
    uint8 tensors (bilinear, antialiased)."""
    if in_chans is not None and x.shape[1] != in_chans:
        if in_chans == 1 and x.shape[1] == 3:
            x = torch.cat([_rgb_to_gray(x[i:i + chunk]) for i in range(0, len(x), chunk)])
        elif in_chans == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        else:
            raise InputError(f"cannot convert {x.shape[1]}-channel images to {in_chans} channels")
    if img_size is not None and tuple(x.shape[2:]) != (img_size, img_size):
        # chunked: torchvision's resize works on a float copy, and one of a whole set would be large
        out = [TF.resize(x[i:i + chunk], [img_size, img_size], antialias=True) for i in range(0, len(x), chunk)]
        x = torch.cat(out) if out else x.new_zeros((0, x.shape[1], img_size, img_size))
    return x


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory labelled set: `images` uint8 (N,C,H,W) tensor, `labels` int64 (N,) tensor."""

    def __init__(self, images, labels, classes, img_size=None, in_chans=None, num_classes=None):
        images = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N,H,W,C), got {images.dtype} {tuple(images.shape)}")
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = convert_uint8_batch(images.permute(0, 3, 1, 2).contiguous(), img_size, in_chans)
        self.labels = labels
        self.classes = list(classes)
        self.num_classes = num_classes or len(self.classes)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise InputError(f"labels outside 0..{self.num_classes - 1}")

    @property
    def targets(self):
        return self.labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _decode_array(path, img_size, in_chans):
    """A labelled image file -> uint8 (H,W,C) in RGB/L, resized to (img_size, img_size) unless None."""
    with open(path, "rb") as f:
        encoded = f.read()
    try:
        return pool.decode_image(encoded, img_size, in_chans)
    except pool.BadImage as e:
        raise InputError(f"cannot decode image {path}: {e}") from None


def read_image(path, img_size=None, in_chans=3):
    """A labelled image file -> uint8 (C,H,W) in RGB/L, resized to img_size unless None."""
    return torch.from_numpy(_decode_array(path, img_size, in_chans)).permute(2, 0, 1).contiguous()


def _to_pil(arr):
    """uint8 (H,W,C) -> the PIL image it came from ('L' for one channel), for torchvision's PIL transforms."""
    from PIL import Image
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def _pil_to_uint8(img):
    """PIL image -> uint8 (C,H,W), contiguous."""
    return TF.pil_to_tensor(img).contiguous()


def decode_resize_center_crop(path, img_size, in_chans=3):
    """The published 224-px test transform, Resize(img_size) -> CenterCrop(img_size), by torchvision's own
    functions on the PIL image (shorter side img_size, bilinear with PIL's antialiasing): uint8 (C,S,S)."""
    img = TF.resize(_to_pil(_decode_array(path, None, in_chans)), img_size)
    return _pil_to_uint8(TF.center_crop(img, img_size))


class FolderDataset(torch.utils.data.Dataset):
    """Lazily decoded ImageFolder split yielding (uint8 (C,img_size,img_size), label).

    center_crop=False: each image resized to (img_size, img_size); True: the published 224-px test
    transform, Resize(img_size) (shorter side, aspect kept) then CenterCrop(img_size)."""

    def __init__(self, samples, classes, img_size, in_chans=3, num_classes=None, center_crop=False):
        pool.check_channels(in_chans)
        self.samples = list(samples)
        self.classes = list(classes)
        self.num_classes = num_classes or len(self.classes)
        self.img_size, self.in_chans = img_size, in_chans
        self.center_crop = bool(center_crop)

    @property
    def targets(self):
        return [s[1] for s in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        if self.center_crop:
            return decode_resize_center_crop(path, self.img_size, self.in_chans), label
        return read_image(path, self.img_size, self.in_chans), label


def set_epoch(dataset, epoch):
    """Call set_epoch(epoch) on every dataset with one inside `dataset` (ConcatDataset parts,
    Subset and wrapper `.dataset`s included); before iterating that epoch's DataLoader."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    for inner in getattr(dataset, "datasets", None) or [getattr(dataset, "dataset", None)]:
        if inner is not None:
            set_epoch(inner, epoch)


class RandomCropImages(torch.utils.data.Dataset):
    """The published train transform of labelled 224-px images (--pos_num): Resize(img_size)
    (shorter side, aspect kept) -> RandomCrop(img_size, padding, zero fill) -> horizontal flip with
    p = 0.5. Done here on the CPU, per image, because the images differ in shape before the crop;
    so the training step must not crop or flip these images again.

    `base` is a FolderDataset (decoded at their own size, then resized) or an in-memory set of
    square img_size images (ArrayDataset: Resize is then the identity); `indices` pick its items.
    Item k -> (uint8 (C,img_size,img_size), label). The draws depend only on (seed, epoch, base
    index): call set_epoch(e) before each epoch; the epoch lives in shared memory, so DataLoader
    workers (persistent ones too) see it."""

    def __init__(self, base, indices=None, img_size=224, padding=4, seed=0):
        self.base = base
        self.indices = list(range(len(base))) if indices is None else [int(i) for i in indices]
        self.img_size, self.padding, self.seed = int(img_size), int(padding), int(seed)
        self.classes, self.num_classes = base.classes, base.num_classes
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self._epoch.fill_(int(epoch))

    @property
    def targets(self):
        t = self.base.targets
        return [t[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def draw(self, k, size_hw):
        """-> (top, left, flip) of item k for an image of size_hw = (H, W) after the resize."""
        rng = np.random.default_rng([self.seed, int(self._epoch), self.indices[k]])
        h, w = size_hw
        top = int(rng.integers(0, h + 2 * self.padding - self.img_size + 1))
        left = int(rng.integers(0, w + 2 * self.padding - self.img_size + 1))
        return top, left, bool(rng.integers(0, 2))

    def __getitem__(self, k):
        i = self.indices[k]
        if isinstance(self.base, FolderDataset):
            path, label = self.base.samples[i]
            img = _to_pil(_decode_array(path, None, self.base.in_chans))
        else:
            x, label = self.base[i]
            img = TF.to_pil_image(x)
        # the published transforms' own functions on the PIL image; only the draws are ours
        img = TF.resize(img, self.img_size)   # shorter side img_size
        top, left, flip = self.draw(k, (img.height, img.width))
        img = TF.crop(TF.pad(img, self.padding), top, left, self.img_size, self.img_size)
        if flip:
            img = TF.hflip(img)
        return _pil_to_uint8(img), int(label)


def _folder_to_array(samples, classes, img_size, in_chans, num_classes):
    """Decode a small-image ImageFolder split fully into memory (CIFAR/MNIST converter output)."""
    imgs = [read_image(p, None, in_chans) for p, _ in samples]
    if len({tuple(t.shape) for t in imgs}) > 1:  # mixed sizes: bring each to img_size first
        imgs = [read_image(p, img_size, in_chans) for p, _ in samples]
    x = torch.stack(imgs).permute(0, 2, 3, 1)
    return ArrayDataset(x, [s[1] for s in samples], classes, img_size, in_chans, num_classes)


def _folder_split(root, split):
    """Samples for root/<split>, labels mapped with the train split's classes."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise InputError(f"missing split folder: {split_dir}")
    if os.path.isdir(os.path.join(split_dir, "images")) and os.path.isfile(
            os.path.join(split_dir, "val_annotations.txt")):
        raise InputError(f"{split_dir} is the raw Tiny-ImageNet layout: run "
                         f"process_tinyimagenet.py --root {root} first")
    train_dir = os.path.join(root, "train")
    if split != "train" and os.path.isdir(train_dir):
        c2i, classes = find_classes(train_dir)
        return list_image_folder(split_dir, c2i, classes)
    return list_image_folder(split_dir)


def load_labelled(dataset, root, split, img_size, in_chans):
    """Labelled train/val ('val' = the test set) split as a Dataset of (uint8 (C,H,W), label).

    cifar10/100: pickle root or converter ImageFolder tree; mnist/fashionmnist: IDX root or
    ImageFolder tree (both in memory); tinyimagenet/imagenet/folder: root/{train,val}, lazy; their
    'val' split for models above LARGE_INPUT px is Resize(img_size) -> CenterCrop(img_size), as published.
    """
    if dataset not in DATASETS:
        raise InputError(f"unknown --dataset '{dataset}' (choose from {', '.join(DATASETS)})")
    if split not in ("train", "val"):
        raise InputError(f"split must be 'train' or 'val', got '{split}'")
    pool.check_channels(in_chans)
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise InputError(f"missing data root: {root}")
    train = split == "train"
    n_cls = DATASETS[dataset]

    if dataset in ("cifar10", "cifar100"):
        pickles = cifar_dir(root, dataset)
        if os.path.isdir(pickles):
            ds = ArrayDataset(*read_cifar(root, dataset, train), img_size, in_chans, n_cls)
        elif os.path.isdir(os.path.join(root, split)):
            ds = _folder_to_array(*_folder_split(root, split), img_size, in_chans, n_cls)
        else:
            raise InputError(f"{root}: neither CIFAR pickles ({pickles}) nor an ImageFolder "
                             f"split ({os.path.join(root, split)}) found")
    elif dataset in ("mnist", "fashionmnist"):
        if os.path.isdir(os.path.join(root, split)):
            ds = _folder_to_array(*_folder_split(root, split), img_size, in_chans, n_cls)
        else:
            names = FASHION_CLASSES if dataset == "fashionmnist" else DIGIT_CLASSES
            ds = ArrayDataset(*read_idx(root, train), names, img_size, in_chans, n_cls)
    else:
        samples, classes = _folder_split(root, split)
        # the published 224-px test transform; the train split stays resized to (img_size, img_size)
        # (--pos_num images get RandomCropImages, the published train transform)
        ds = FolderDataset(samples, classes, img_size, in_chans,
                           center_crop=not train and img_size is not None and img_size > LARGE_INPUT)
    if n_cls is not None and len(ds.classes) > n_cls:
        raise InputError(f"{root}: {len(ds.classes)} classes found, {dataset} has {n_cls}")
    return ds


# --------------------------------------------------------------------------- the student's training set

def holdout_size(k, share):
    """Images of a k-image selection held out by --holdout `share` (none of a single image)."""
    return int(round(share * k)) if share > 0 and k >= 2 else 0


def split_holdout(indices, share, seed):
    """Deterministic split of the selection -> (train positions, holdout positions) into `indices`."""
    k = len(indices)
    n_hold = holdout_size(k, share)
    g = torch.Generator().manual_seed(seed + 7)
    perm = torch.randperm(k, generator=g)
    hold = perm[:n_hold].sort().values
    keep = torch.ones(k, dtype=torch.bool)
    keep[hold] = False
    return keep.nonzero().squeeze(1), hold


def labelled_positives(dataset, root, per_class, img_size, in_chans, padding, seed):
    """The first `per_class` images of each class of the labelled train set (--pos_num) -> (the dataset to
    train on, their train indices, the same images unaugmented).

    Above LARGE_INPUT px each comes out as published: Resize(img_size) -> RandomCrop(img_size, padding) -> flip,
    drawn per image and epoch on the CPU (the images differ in shape before the crop); unaugmented:
    Resize(img_size) -> CenterCrop(img_size)."""
    train = load_labelled(dataset, root, "train", img_size, in_chans)
    labels = torch.as_tensor(train.targets)
    chosen = []
    for c in range(int(labels.max()) + 1):
        chosen += (labels == c).nonzero().squeeze(1)[:per_class].tolist()
    chosen.sort()
    plain = torch.utils.data.Subset(train, chosen)
    if img_size > LARGE_INPUT:
        if isinstance(train, FolderDataset):
            plain = FolderDataset([train.samples[i] for i in chosen], train.classes, img_size, in_chans,
                                  train.num_classes, center_crop=True)
        return RandomCropImages(train, chosen, img_size, padding, seed=seed), chosen, plain
    return plain, chosen, plain


class ImagesWithCropFlag(torch.utils.data.Dataset):
    """The images of a PoolDataset or labelled set as {'images', 'cropped'} items for the distillation loader;
    cropped = 1 marks images their dataset already cropped and flipped, which the training step leaves alone."""

    def __init__(self, dataset, cropped=0):
        self.dataset, self.cropped = dataset, cropped

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {"images": self.dataset[i][0], "cropped": self.cropped}


def training_set(selection, img_size, in_chans, holdout, seed, workers=0, fast_decode=False, positives=None):
    """The student's training images -> (in memory: uint8 (K, C, H, W) up to LARGE_INPUT px, else a decoding
    Dataset; (holdout images uint8 (H, C, H, W), their teacher classes (H,))). `holdout`: the share of the
    selection held out; `positives`: the --pos_num images, trained on with the selection."""
    train_pos, hold_pos = split_holdout(selection.indices, holdout, seed)
    train_idx, hold_idx = selection.indices[train_pos], selection.indices[hold_pos]
    source = selection.source
    held = (pool.load_selected_uint8(source, hold_idx, img_size, in_chans, workers, fast_decode=fast_decode),
            selection.pred[hold_pos].long())
    if img_size <= LARGE_INPUT:
        train = pool.load_selected_uint8(source, train_idx, img_size, in_chans, workers, fast_decode=fast_decode)
        if positives is not None and len(positives):
            train = torch.cat([train, torch.stack([positives[i][0] for i in range(len(positives))])])
        return train, held
    train = ImagesWithCropFlag(pool.PoolDataset(selection.pool_index, img_size, in_chans, indices=train_idx.numpy(),
                                                fast_decode=fast_decode))
    if positives is not None:
        train = torch.utils.data.ConcatDataset([train, ImagesWithCropFlag(positives, cropped=1)])
    return train, held


# --------------------------------------------------------------------------- converters

def class_folder_names(classes):
    """Zero-padded label prefix so string order == label order: '00_airplane', '007_bee', '03'."""
    width = len(str(len(classes)))
    out = []
    for i, name in enumerate(classes):
        safe = re.sub(r"[^0-9A-Za-z_.+-]+", "-", str(name)).strip("-.")
        out.append(f"{i:0{width}d}" if safe in ("", str(i)) else f"{i:0{width}d}_{safe}")
    return out


def export_image_folder(images, labels, classes, out_dir, desc=None):
    """Write uint8 (N,H,W,C) images as PNGs to out_dir/<class folder>/<index>.png.

    Files already there are kept (safe to re-run). Returns (written, skipped).
    """
    from PIL import Image
    from tqdm import tqdm
    folders = class_folder_names(classes)
    for f in folders:
        os.makedirs(os.path.join(out_dir, f), exist_ok=True)
    existing = {f: set(os.listdir(os.path.join(out_dir, f))) for f in folders}
    width = max(5, len(str(len(images) - 1)))
    written = skipped = 0
    for i in tqdm(range(len(images)), desc=desc, unit="img", mininterval=1.0):
        folder = folders[int(labels[i])]
        name = f"{i:0{width}d}.png"
        if name in existing[folder]:
            skipped += 1
            continue
        img = images[i]
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        # no fsync per file: most of the time for 70k tiny PNGs, and a rerun writes a lost one again
        atomic_write_bytes(os.path.join(out_dir, folder, name), buf.getvalue(), sync=False)
        written += 1
    return written, skipped


def cifar_export_parser(dataset):
    """Flags of process_cifar10.py / process_cifar100.py."""
    import argparse
    name = dataset.upper().replace("CIFAR", "CIFAR-")
    p = argparse.ArgumentParser(description=f"Convert the {name} python pickles into a PNG ImageFolder tree.", allow_abbrev=False)
    p.add_argument("--root", default="data", help=f"folder holding the {name} pickles")
    p.add_argument("--out", default=f"data/{dataset}", help="output ImageFolder root")
    p.add_argument("--download", action="store_true",
                   help="fetch the archive into --root with torchvision first (needs network)")
    return p


def export_cifar_image_folder(root, dataset, out, download=False):
    """CIFAR pickles under `root` -> PNG ImageFolder tree out/{train,val}/<NN_name>/."""
    if download:
        download_cifar(root, dataset)
    check_cifar_files(root, dataset)  # fail before writing anything
    for split, train in (("train", True), ("val", False)):
        images, labels, classes = read_cifar(root, dataset, train)
        w, s = export_image_folder(images, labels, classes, os.path.join(out, split),
                                   desc=f"{dataset} {split}")
        print(f"{dataset} {split}: {w} written, {s} already present -> {os.path.join(out, split)}")


def export_idx_image_folder(root, out, classes):
    """MNIST-style IDX files under `root` -> PNG ImageFolder tree out/{train,val}/."""
    for train in (True, False):  # fail before writing anything
        read_idx(root, train)
    for split, train in (("train", True), ("val", False)):
        images, labels = read_idx(root, train)
        if labels.max() >= len(classes):
            raise InputError(f"{root}: label {labels.max()} but only {len(classes)} class names")
        w, s = export_image_folder(images, labels, classes, os.path.join(out, split),
                                   desc=f"idx {split}")
        print(f"{split}: {w} written, {s} already present -> {os.path.join(out, split)}")


# --------------------------------------------------------------------------- augmentation

def draw_crop_flip(batch, padding, device=None, generator=None):
    """Random crop offsets dy, dx in [0, 2*padding] and flip flags, one per image.

    `generator` must live on `device`.
    """
    kw = dict(device=device, generator=generator)
    dy = torch.randint(0, 2 * padding + 1, (batch,), **kw)
    dx = torch.randint(0, 2 * padding + 1, (batch,), **kw)
    flip = torch.randint(0, 2, (batch,), **kw).bool()
    return dy, dx, flip


def apply_crop_flip(x, padding, dy, dx, flip):
    """Crop x (B,C,H,W) zero-padded by `padding` at (dy, dx), then flip horizontally where
    `flip`; one gather over the batch, no per-image loop."""
    if x.ndim != 4:
        raise ValueError(f"expected (B,C,H,W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    dev = x.device
    dy, dx, flip = dy.to(dev, torch.long), dx.to(dev, torch.long), flip.to(dev, torch.bool)
    i = torch.arange(H, device=dev)
    j = torch.arange(W, device=dev)
    # output pixel (i, j) reads padded (i+dy, j'+dx), j' = W-1-j when flipped; minus padding
    # gives the source pixel, which is zero when it falls in the padding
    rows = i[None, :] + (dy - padding)[:, None]  # (B,H)
    cols = torch.where(flip[:, None], W - 1 - j[None, :], j[None, :]) + (dx - padding)[:, None]
    valid = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
    idx = rows.clamp(0, H - 1)[:, :, None] * W + cols.clamp(0, W - 1)[:, None, :]  # (B,H,W)
    out = torch.gather(x.reshape(B, C, H * W), 2, idx.reshape(B, 1, H * W).expand(B, C, H * W))
    if padding > 0:
        out.mul_(valid.reshape(B, 1, H * W))
    return out.view(B, C, H, W)


def crop_padding(flag, img_size):
    """The random crop's padding: --crop_padding, else the published one of the input size. One wider than the
    image would crop windows holding none of it: refused."""
    padding = flag if flag is not None else published.crop_padding(img_size)
    if padding > img_size:
        raise InputError(f"--crop_padding {padding} is wider than the {img_size}-px images: at most {img_size}")
    return padding


def random_crop_flip(x, padding, generator=None, done=None):
    """Per-image random crop (zero padding) + horizontal flip with p=0.5, vectorised.

    done: optional (B,) bool, images already cropped and flipped (RandomCropImages): they pass
    unchanged (centre offset, no flip), so every image gets exactly one crop and one flip. The
    draws do not depend on `done`."""
    dy, dx, flip = draw_crop_flip(x.shape[0], padding, x.device, generator)
    if done is not None:
        done = done.to(x.device, torch.bool)
        dy, dx = dy.masked_fill(done, padding), dx.masked_fill(done, padding)
        flip = flip & ~done
    return apply_crop_flip(x, padding, dy, dx, flip)


# --------------------------------------------------------------------------- normalisation

def resolve_mean_std(mean, std, in_chans):
    """None -> ImageNet statistics (gray: their channel average). One value is repeated to
    in_chans; any other length mismatch is an error. Returns (mean, std) tuples of floats."""
    out = []
    for flag, val, default in (("--mean", mean, IMAGENET_MEAN if in_chans == 3 else GRAY_MEAN),
                               ("--std", std, IMAGENET_STD if in_chans == 3 else GRAY_STD)):
        if val is None:
            val = default
        if isinstance(val, (int, float)):
            val = (val,)
        try:
            val = tuple(float(v) for v in val)
        except (TypeError, ValueError):
            raise InputError(f"{flag} must be numbers, got {val!r}") from None
        if len(val) == 1 and in_chans > 1:
            val = val * in_chans
        if len(val) != in_chans:
            raise InputError(f"--mean/--std need {in_chans} value(s) for a {in_chans}-channel model; "
                             f"{flag} has {len(val)}: {val}")
        out.append(val)
    if any(s <= 0 for s in out[1]):
        raise InputError(f"--std values must be > 0, got {out[1]}")
    return out[0], out[1]


def normalize(x, mean, std):
    """uint8 (…,C,H,W) -> float32 (x/255 - mean) / std per channel."""
    C = x.shape[-3]
    if len(mean) != C or len(std) != C:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {C} channels")
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(C, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(C, 1, 1)
    return x.to(torch.float32).div_(255).sub_(m).div_(s)
