"""data.py on files generated in the real on-disk formats (CIFAR pickles, IDX: tests/fixtures.py; ImageFolder)."""
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import data  # noqa: E402
import fixtures as fx  # noqa: E402
from utils import InputError  # noqa: E402

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------- generators

def cifar_expected(files, train, dataset):
    """The images and labels fixtures.write_cifar wrote into the train or test split."""
    if dataset == "cifar10":
        keys = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:
        keys = ["train"] if train else ["test"]
    x = np.concatenate([files[k][0] for k in keys])
    y = np.concatenate([files[k][1] for k in keys])
    return x, y


def make_folder(root, names, per_class=2, size=(8, 6), mode="RGB", ext=".png"):
    rng = np.random.default_rng(1)
    for n in names:
        os.makedirs(os.path.join(root, n), exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                os.path.join(root, n, f"img{i}{ext}"))


# --------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_read_cifar_layout_and_roots(tmp_path, dataset):
    cifar = fx.write_cifar(tmp_path, dataset, n_train=4, n_test=10)
    names = cifar.names
    for train in (True, False):
        x, y = cifar_expected(cifar.files, train, dataset)
        imgs, labels, classes = data.read_cifar(tmp_path, dataset, train)
        assert imgs.dtype == np.uint8 and imgs.shape == (len(x), 32, 32, 3)
        assert labels.dtype == np.int64 and np.array_equal(labels, y)
        assert classes == names
        # RGB planes: channel c of pixel (r, q) is byte c*1024 + r*32 + q of the row
        assert imgs[3, 5, 7, 2] == x[3, 2 * 1024 + 5 * 32 + 7]
        assert np.array_equal(imgs[:, :, :, 0].reshape(len(x), -1), x[:, :1024])
    # the pickle folder itself is accepted too
    sub = os.path.join(tmp_path, "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")
    assert np.array_equal(data.read_cifar(sub, dataset, False)[0], data.read_cifar(tmp_path, dataset, False)[0])


def test_read_cifar_missing_names_path(tmp_path):
    fx.write_cifar(tmp_path, "cifar10", n_train=4, n_test=10)
    missing = os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_3")
    os.remove(missing)
    with pytest.raises(InputError, match=missing):
        data.read_cifar(tmp_path, "cifar10", True)
    with pytest.raises(InputError, match=os.path.join("nowhere", "cifar-100-python", "meta")):
        data.read_cifar(os.path.join(tmp_path, "nowhere"), "cifar100", True)


def test_read_cifar_refuses_foreign_pickle(tmp_path):
    fx.write_cifar(tmp_path, "cifar10", n_train=4, n_test=10)
    path = os.path.join(tmp_path, "cifar-10-batches-py", "test_batch")
    with open(path, "wb") as f:
        pickle.dump({b"data": os.getcwd}, f)  # a global outside the numpy allow-list
    with pytest.raises(InputError, match="test_batch"):
        data.read_cifar(tmp_path, "cifar10", False)


def test_load_labelled_cifar_pickles(tmp_path):
    cifar = fx.write_cifar(tmp_path, "cifar10", n_train=4, n_test=10)
    names = cifar.names
    x, y = cifar_expected(cifar.files, False, "cifar10")
    ds = data.load_labelled("cifar10", tmp_path, "val", 32, 3)
    assert isinstance(ds, data.ArrayDataset) and len(ds) == len(y)
    assert ds.num_classes == 10 and ds.classes == names
    img, label = ds[4]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and label == y[4]
    assert np.array_equal(img.numpy().reshape(-1), x[4])
    gray = data.load_labelled("cifar10", tmp_path, "train", 28, 1)
    assert gray.images.shape == (20, 1, 28, 28)


# --------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    xtr, ytr = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7)
    xte, yte = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), rng.integers(0, 10, 3)
    fx.write_idx(tmp_path, "train", xtr, ytr, gz)
    fx.write_idx(tmp_path, "t10k", xte, yte, gz)
    imgs, labels = data.read_idx(tmp_path, True)
    assert imgs.shape == (7, 28, 28, 1) and imgs.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(imgs[..., 0], xtr) and np.array_equal(labels, ytr)
    imgs, labels = data.read_idx(tmp_path, False)
    assert np.array_equal(imgs[..., 0], xte) and np.array_equal(labels, yte)
    ds = data.load_labelled("fashionmnist", tmp_path, "train", 32, 3)
    assert ds.images.shape == (7, 3, 32, 32) and ds.classes[0] == "T-shirt/top"
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # gray copied to all channels


def test_read_idx_bad_files(tmp_path):
    x, y = np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.int64)
    fx.write_idx(tmp_path, "train", x, y)
    img = os.path.join(tmp_path, "train-images-idx3-ubyte")
    blob = open(img, "rb").read()
    open(img, "wb").write(b"\x00\x00\x08\x01" + blob[4:])  # labels magic on an image file
    with pytest.raises(InputError, match="bad IDX magic"):
        data.read_idx(tmp_path, True)
    open(img, "wb").write(blob[:-5])  # truncated body
    with pytest.raises(InputError, match="header says"):
        data.read_idx(tmp_path, True)
    fx.write_idx(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), y)
    os.remove(os.path.join(tmp_path, "train-labels-idx1-ubyte"))
    fx.write_idx(os.path.join(tmp_path, "x"), "train", x, y)
    os.replace(os.path.join(tmp_path, "x", "train-labels-idx1-ubyte"),
               os.path.join(tmp_path, "train-labels-idx1-ubyte"))
    with pytest.raises(InputError, match="3 images but .* 2 labels"):
        data.read_idx(tmp_path, True)
    with pytest.raises(InputError, match=os.path.join(str(tmp_path), "t10k-images-idx3-ubyte")):
        data.read_idx(tmp_path, False)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    xtr, ytr = data.read_idx(FASHION_DIR, True)
    xte, yte = data.read_idx(FASHION_DIR, False)
    assert xtr.shape == (60000, 28, 28, 1) and xte.shape == (10000, 28, 28, 1)
    assert set(np.unique(ytr)) == set(range(10)) and set(np.unique(yte)) == set(range(10))
    assert (np.bincount(yte) == 1000).all()


# --------------------------------------------------------------------------- ImageFolder

def test_list_image_folder_integer_names(tmp_path):
    names = [str(i) for i in range(12)]  # string sort: 0 1 10 11 2 ...
    make_folder(tmp_path, names, per_class=1)
    samples, classes = data.list_image_folder(tmp_path)
    assert classes == names
    for path, label in samples:
        assert os.path.basename(os.path.dirname(path)) == str(label)


def test_list_image_folder_prefixed_and_padded(tmp_path):
    make_folder(tmp_path / "a", ["000", "002", "010"], per_class=1)
    samples, classes = data.list_image_folder(tmp_path / "a")
    assert sorted(lab for _, lab in samples) == [0, 2, 10]
    assert len(classes) == 11 and classes[10] == "010" and classes[1] is None
    make_folder(tmp_path / "b", ["00_apple", "01_aquarium_fish", "007_bee"], per_class=1)
    samples, classes = data.list_image_folder(tmp_path / "b")
    assert classes[:2] == ["apple", "aquarium_fish"] and classes[7] == "bee"
    assert {os.path.basename(os.path.dirname(p)): lab for p, lab in samples} == {
        "00_apple": 0, "01_aquarium_fish": 1, "007_bee": 7}


def test_list_image_folder_names_extensions_and_errors(tmp_path):
    make_folder(tmp_path, ["dog", "cat"], per_class=1, ext=".JPG")
    make_folder(tmp_path, ["cat"], per_class=1, ext=".webp")
    (tmp_path / "cat" / "notes.txt").write_text("x")
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"x")
    samples, classes = data.list_image_folder(tmp_path)
    assert classes == ["cat", "dog"]
    assert [(os.path.basename(p), lab) for p, lab in samples] == [
        ("img0.JPG", 0), ("img0.webp", 0), ("img0.JPG", 1)]
    with pytest.raises(InputError, match="missing image folder"):
        data.list_image_folder(tmp_path / "nope")
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(InputError, match="no images"):
        data.list_image_folder(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    with pytest.raises(InputError, match="no class folders"):
        data.list_image_folder(tmp_path / "flat")
    make_folder(tmp_path / "dup", ["1", "01"], per_class=1)
    with pytest.raises(InputError, match="label 1"):
        data.list_image_folder(tmp_path / "dup")


def test_load_labelled_folder_resize_convert_and_val_mapping(tmp_path):
    make_folder(tmp_path / "train", ["ant", "bee", "cow"], size=(10, 7))
    make_folder(tmp_path / "val", ["bee", "cow"], per_class=1, size=(10, 7), mode="L")
    ds = data.load_labelled("folder", tmp_path, "train", 16, 3)
    assert isinstance(ds, data.FolderDataset) and len(ds) == 6 and ds.num_classes == 3
    img, label = ds[2]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label == 1
    val = data.load_labelled("folder", tmp_path, "val", 16, 3)
    assert [lab for _, lab in val.samples] == [1, 2]  # mapped with train's classes, not shifted
    g = data.load_labelled("folder", tmp_path, "train", 7, 1)
    path = g.samples[0][0]
    want = np.array(Image.open(path).convert("L").resize((7, 7), Image.BILINEAR))
    assert torch.equal(g[0][0][0], torch.from_numpy(want))
    native = data.load_labelled("folder", tmp_path, "val", None, 3)[0][0]
    assert native.shape == (3, 7, 10) and torch.equal(native[0], native[1])  # L -> RGB
    (tmp_path / "bare").mkdir()
    with pytest.raises(InputError, match=os.path.join(str(tmp_path / "bare"), "val")):
        data.load_labelled("imagenet", tmp_path / "bare", "val", 8, 3)
    with pytest.raises(InputError, match="--dataset"):
        data.load_labelled("svhn", tmp_path, "val", 8, 3)


def test_array_dataset_gray_matches_pil(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (5, 9, 9, 3), dtype=np.uint8)
    ds = data.ArrayDataset(x, [0, 1, 2, 0, 1], ["a", "b", "c"], in_chans=1)
    for i in range(5):
        assert np.array_equal(ds.images[i, 0].numpy(), np.array(Image.fromarray(x[i]).convert("L")))
    same = data.ArrayDataset(x, [0] * 5, ["a"], img_size=9, in_chans=3)
    assert np.array_equal(same.images.permute(0, 2, 3, 1).numpy(), x)
    assert data.ArrayDataset(x, [0] * 5, ["a"], img_size=4).images.shape == (5, 3, 4, 4)


# --------------------------------------------------------------------------- crop / flip

def test_crop_flip_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 6), dtype=torch.uint8, generator=g)
    for padding in (0, 1, 4, 9):  # 9 > image size: crops land entirely in padding
        dy, dx, flip = data.draw_crop_flip(64, padding, generator=g)
        out = data.apply_crop_flip(x, padding, dy, dx, flip)
        assert out.dtype == torch.uint8 and out.shape == x.shape
        assert torch.equal(out, fx.random_crop_flip_reference(x, padding, dy, dx, flip))
        assert torch.equal(out, data.apply_crop_flip(x, padding, dy.int(), dx.int(), flip.to(torch.uint8)))


def test_crop_flip_identity_and_single_shift():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    zero = torch.zeros(2, dtype=torch.long)
    assert torch.equal(data.apply_crop_flip(x, 0, zero, zero, zero.bool()), x)
    assert torch.equal(data.apply_crop_flip(x, 3, zero + 3, zero + 3, zero.bool()), x)
    assert torch.equal(data.apply_crop_flip(x, 0, zero, zero, ~zero.bool()), x.flip(-1))
    # dy = 0 with padding 1: one zero row on top, image shifted down
    out = data.apply_crop_flip(x, 1, zero, zero + 1, zero.bool())
    assert (out[:, :, 0] == 0).all() and torch.equal(out[:, :, 1:], x[:, :, :3])


def test_crop_flip_statistics():
    g = torch.Generator().manual_seed(1)
    B, p = 20000, 4
    # a single bright pixel at (0, 0) reveals each image's offset and flip in the output
    x = torch.zeros(B, 1, 16, 16, dtype=torch.uint8)
    x[:, :, 0, 0] = 255
    out = data.random_crop_flip(x, p, generator=g)
    visible = out.flatten(1).amax(1) == 255
    pos = out.flatten(1).argmax(1)
    r, c = pos // 16, pos % 16
    dy = (p - r)[visible]
    rows = torch.bincount(dy, minlength=2 * p + 1).float() / visible.sum()
    assert dy.min() >= 0 and dy.max() <= 2 * p
    # the pixel stays in view only for dy, dx <= p; those offsets must be equally likely
    assert rows[: p + 1].sub(1 / (p + 1)).abs().max() < 0.03
    dy, dx, flip = data.draw_crop_flip(B, p, generator=g)
    assert abs(flip.float().mean().item() - 0.5) < 0.02
    for d in (dy, dx):
        assert d.min() == 0 and d.max() == 2 * p
        freq = torch.bincount(d, minlength=2 * p + 1).float() / B
        assert freq.sub(1 / (2 * p + 1)).abs().max() < 0.02
    # flip half the time: the pixel lands in the right half when flipped
    assert abs((c[visible] >= 8).float().mean().item() - 0.5) < 0.03


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_crop_flip_cuda_matches_cpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, device="cuda")
    dy, dx, flip = data.draw_crop_flip(512, 4, "cuda", g)
    out = data.apply_crop_flip(x, 4, dy, dx, flip)
    assert out.is_cuda
    assert torch.equal(out.cpu(), data.apply_crop_flip(x.cpu(), 4, dy.cpu(), dx.cpu(), flip.cpu()))


# --------------------------------------------------------------------------- normalisation

def test_normalize_and_mean_std():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).repeat(2, 1, 2, 2)
    y = data.normalize(x, (0.5, 0.2, 0.0), (0.5, 0.1, 2.0))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([-1.0, 0.0, 0.5]))
    assert data.resolve_mean_std(None, None, 3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert data.resolve_mean_std(None, None, 1) == ((0.449,), (0.226,))
    assert data.resolve_mean_std([0.5], [0.25], 3) == ((0.5,) * 3, (0.25,) * 3)
    assert data.resolve_mean_std([1, 2, 3], None, 3)[0] == (1.0, 2.0, 3.0)
    with pytest.raises(InputError, match="--mean/--std"):
        data.resolve_mean_std((0.5, 0.5, 0.5), None, 1)
    with pytest.raises(InputError, match="--std"):
        data.resolve_mean_std(None, (0.0,), 1)


# --------------------------------------------------------------------------- published 224-px transforms

def write_photos(root, sizes, seed=0):
    """root/{train,val}/<c>/ with one photo-like image of each (w, h) per class (JPEG and PNG)."""
    from fixtures import encode, smooth_rgb, write_bytes
    for split in ("train", "val"):
        for c in ("c0", "c1"):
            for i, (w, h) in enumerate(sizes):
                fmt = ("JPEG", "PNG")[i % 2]
                write_bytes(root / split / c / f"{i}.{fmt.lower()}",
                            encode(smooth_rgb(w, h, seed + 10 * i + len(c)), fmt))


SIZES = [(300, 200), (199, 301), (64, 64), (500, 375), (225, 640)]


def test_224_test_transform_is_torchvision_resize_center_crop(tmp_path):
    from torchvision import transforms
    write_photos(tmp_path, SIZES)
    val = data.load_labelled("imagenet", tmp_path, "val", 224, 3)
    ref = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.PILToTensor()])
    assert len(val) == 2 * len(SIZES)
    for i, (path, label) in enumerate(val.samples):
        img, lab = val[i]
        want = ref(Image.open(path).convert("RGB"))
        assert img.dtype == torch.uint8 and img.shape == (3, 224, 224) and lab == label
        assert torch.equal(img, want), path
    # the non-square images really were cropped, not squashed to 224x224
    squash = data.read_image(val.samples[0][0], 224, 3)
    assert not torch.equal(val[0][0], squash)
    # 32-px paths unchanged: resized to (32, 32), train split too
    for split in ("train", "val"):
        small = data.load_labelled("imagenet", tmp_path, split, 32, 3)
        assert torch.equal(small[0][0], data.read_image(small.samples[0][0], 32, 3))


def test_positives_published_random_crop_per_image_and_epoch(tmp_path):
    import torchvision.transforms.functional as TF
    from torchvision import transforms
    write_photos(tmp_path, SIZES)
    train = data.load_labelled("tinyimagenet", tmp_path, "train", 224, 3)
    pos = data.RandomCropImages(train, [0, 2, 3, 6], img_size=224, padding=4, seed=5)
    assert len(pos) == 4 and pos.targets == [train.targets[i] for i in (0, 2, 3, 6)]
    by_epoch = []
    for epoch in (0, 1, 0):
        pos.set_epoch(epoch)
        items = [pos[k] for k in range(len(pos))]
        for k, (img, label) in enumerate(items):
            assert img.dtype == torch.uint8 and img.shape == (3, 224, 224)
            assert label == train.samples[pos.indices[k]][1]
            # torchvision's Resize(224) -> pad 4 -> crop at the drawn offset -> flip
            pil = transforms.Resize(224)(Image.open(train.samples[pos.indices[k]][0]).convert("RGB"))
            top, left, flip = pos.draw(k, (pil.height, pil.width))
            want = TF.pil_to_tensor(TF.crop(TF.pad(pil, 4), top, left, 224, 224))
            assert torch.equal(img, TF.hflip(want) if flip else want)
        by_epoch.append(torch.stack([img for img, _ in items]))
    assert not torch.equal(by_epoch[0], by_epoch[1])     # another epoch, other crops and flips
    assert torch.equal(by_epoch[0], by_epoch[2])         # same (seed, epoch): same images
    # offsets cover the whole resized image (the 300x200 photo is 336x224: left up to 120)
    draws = []
    for e in range(200):
        pos.set_epoch(e)
        draws.append(pos.draw(0, (224, 336)))
    assert max(d[1] for d in draws) > 2 * 4 and {d[2] for d in draws} == {True, False}
    # data.set_epoch finds it inside the loader's wrappers
    class Wrap(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)
    data.set_epoch(torch.utils.data.ConcatDataset([train, Wrap(pos)]), 9)
    assert int(pos._epoch) == 9
    # set_epoch reaches persistent DataLoader workers
    loader = torch.utils.data.DataLoader(pos, batch_size=4, num_workers=1, persistent_workers=True)
    seen = []
    for epoch in (0, 1):
        pos.set_epoch(epoch)
        seen.append(next(iter(loader))[0])
    assert torch.equal(seen[0], by_epoch[0]) and torch.equal(seen[1], by_epoch[1])


def test_crop_flip_leaves_done_images_alone():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=g)
    done = torch.arange(32) % 3 == 0
    out = data.random_crop_flip(x, 4, torch.Generator().manual_seed(7), done=done)
    ref = data.random_crop_flip(x, 4, torch.Generator().manual_seed(7))
    assert torch.equal(out[done], x[done])                # exactly one crop/flip: theirs
    assert torch.equal(out[~done], ref[~done])            # the others as without the mask
    assert not torch.equal(ref[done], x[done])
