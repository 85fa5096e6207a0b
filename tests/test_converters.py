"""Converter scripts on generated CIFAR pickles, IDX files and a tiny Tiny-ImageNet tree."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
import fixtures as fx  # noqa: E402
import process_cifar10  # noqa: E402
import process_cifar100  # noqa: E402
import process_mnist  # noqa: E402
import process_move_file  # noqa: E402
import process_tinyimagenet  # noqa: E402


def run_cli(script, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def run_main(module, *args):
    module.main(module.get_args_parser().parse_args([str(a) for a in args]))


def snapshot(root):
    """{relative path: (size, mtime_ns)} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def assert_single_error_line(proc, path):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and path in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- CIFAR

def test_cifar10_cli_round_trip_and_idempotent(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    fx.write_cifar(src, "cifar10", n_train=6, n_test=10)
    proc = run_cli("process_cifar10.py", "--root", src, "--out", out)
    assert proc.returncode == 0, proc.stderr
    for split, train in (("train", True), ("val", False)):
        x, y, classes = data.read_cifar(src, "cifar10", train)
        samples, got_classes = data.list_image_folder(out / split)
        assert got_classes == classes and len(samples) == len(y)
        assert sorted(os.listdir(out / split))[0] == "00_airplane"
        for path, label in samples:
            i = int(os.path.splitext(os.path.basename(path))[0])  # file name = source index
            assert label == y[i]
            assert np.array_equal(np.array(Image.open(path)), x[i])
        ds = data.load_labelled("cifar10", out, split, 32, 3)
        order = np.argsort([int(os.path.basename(p)[:-4]) for p, _ in samples])
        assert torch.equal(ds.images[order], torch.from_numpy(x).permute(0, 3, 1, 2))
        assert torch.equal(ds.labels[order], torch.from_numpy(y))
    before = snapshot(out)
    run_main(process_cifar10, "--root", src, "--out", out)
    assert snapshot(out) == before  # nothing rewritten


def test_cifar100_label_order_and_resume(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    fx.write_cifar(src, "cifar100", n_train=300, n_test=20)
    run_main(process_cifar100, "--root", src / "cifar-100-python", "--out", out)
    folders = sorted(os.listdir(out / "train"))
    assert len(folders) == 100 and folders[:2] == ["000_apple", "001_aquarium_fish"]
    assert folders[10] == "010_class10" and folders[2] == "002_class2"  # no '10' < '2' scramble
    x, y, classes = data.read_cifar(src, "cifar100", True)
    ds = data.load_labelled("cifar100", out, "train", 32, 3)
    assert ds.num_classes == 100 and ds.classes == classes
    samples, _ = data.list_image_folder(out / "train")
    idx = [int(os.path.basename(p)[:-4]) for p, _ in samples]
    assert np.array_equal(ds.labels.numpy(), y[idx])
    assert torch.equal(ds.images, torch.from_numpy(x[idx]).permute(0, 3, 1, 2))
    # an interrupted run: some images never written, a temp file left behind
    victims = [p for p, _ in samples[::37]]
    for p in victims:
        os.remove(p)
    stray = os.path.join(os.path.dirname(victims[0]), ".00000.png.123.tmp")
    open(stray, "wb").write(b"half")
    run_main(process_cifar100, "--root", src, "--out", out)
    for p in victims:
        i = int(os.path.basename(p)[:-4])
        assert np.array_equal(np.array(Image.open(p)), x[i])
    assert len(data.list_image_folder(out / "train")[0]) == 300  # the temp file is not an image


def test_cifar_missing_file_exit_2(tmp_path):
    fx.write_cifar(tmp_path, "cifar10")
    missing = os.path.join(tmp_path, "cifar-10-batches-py", "test_batch")
    os.remove(missing)
    proc = run_cli("process_cifar10.py", "--root", tmp_path, "--out", tmp_path / "out")
    assert_single_error_line(proc, missing)
    assert not (tmp_path / "out").exists()  # checked before writing anything


# --------------------------------------------------------------------------- MNIST

def test_mnist_converter_fashion_names(tmp_path, capsys):
    rng = np.random.default_rng(0)
    xtr, ytr = rng.integers(0, 256, (25, 28, 28), dtype=np.uint8), np.arange(25) % 10
    xte, yte = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12)[::-1] % 10
    fx.write_idx(tmp_path / "idx", "train", xtr, ytr, gz=True)
    fx.write_idx(tmp_path / "idx", "t10k", xte, yte, gz=False)
    out = tmp_path / "out"
    run_main(process_mnist, "--root", tmp_path / "idx", "--out", out, "--names", "fashion")
    assert sorted(os.listdir(out / "val"))[0] == "00_T-shirt-top"
    assert sorted(os.listdir(out / "val"))[9] == "09_Ankle-boot"
    for split, x, y in (("train", xtr, ytr), ("val", xte, yte)):
        ds = data.load_labelled("fashionmnist", out, split, 28, 1)
        samples, _ = data.list_image_folder(out / split)
        idx = [int(os.path.basename(p)[:-4]) for p, _ in samples]
        assert np.array_equal(ds.labels.numpy(), y[idx])
        assert torch.equal(ds.images[:, 0], torch.from_numpy(x[idx]))
    before = snapshot(out)
    run_main(process_mnist, "--root", tmp_path / "idx", "--out", out, "--names", "fashion")
    assert snapshot(out) == before
    run_main(process_mnist, "--root", tmp_path / "idx", "--out", tmp_path / "digits")
    assert sorted(os.listdir(tmp_path / "digits" / "train")) == [f"{i:02d}" for i in range(10)]
    os.remove(tmp_path / "idx" / "t10k-labels-idx1-ubyte")
    with pytest.raises(SystemExit) as e:
        run_main(process_mnist, "--root", tmp_path / "idx", "--out", tmp_path / "o2")
    assert e.value.code == 2
    assert "t10k-labels-idx1-ubyte" in capsys.readouterr().err


# --------------------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n02", "n10", "n01"]


def make_tiny(root):
    """Raw Tiny-ImageNet layout with 2 train + 2 val JPEGs per class; -> {val file: wnid}."""
    rng = np.random.default_rng(0)
    jpeg = lambda p: Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)  # noqa: E731
    ann = {}
    for w in WNIDS:
        os.makedirs(root / "train" / w / "images")
        (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t10\t10\n")
        for i in range(2):
            jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG")
    os.makedirs(root / "val" / "images")
    for k in range(6):
        name, w = f"val_{k}.JPEG", WNIDS[k % 3]
        jpeg(root / "val" / "images" / name)
        ann[name] = w
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{n}\t{w}\t1\t2\t30\t40\n" for n, w in ann.items()))
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    return ann


def test_tinyimagenet_scripts(tmp_path):
    root = tmp_path / "tiny"
    ann = make_tiny(root)
    with pytest.raises(data.InputError, match="process_tinyimagenet.py"):
        data.load_labelled("tinyimagenet", root, "val", 64, 3)
    # resume: one file was already moved by an interrupted run
    os.makedirs(root / "val" / "n10")
    os.replace(root / "val" / "images" / "val_1.JPEG", root / "val" / "n10" / "val_1.JPEG")
    for _ in range(2):  # second run must be a no-op
        run_main(process_tinyimagenet, "--root", root)
        run_main(process_move_file, "--root", root)
    assert not (root / "val" / "images").exists()
    for name, w in ann.items():
        assert (root / "val" / w / name).is_file()
    for w in WNIDS:
        assert not (root / "train" / w / "images").exists()
        assert sorted(os.listdir(root / "train" / w)) == [f"{w}_0.JPEG", f"{w}_1.JPEG", f"{w}_boxes.txt"]
    train = data.load_labelled("tinyimagenet", root, "train", 32, 3)
    val = data.load_labelled("tinyimagenet", root, "val", 32, 3)
    assert train.classes == sorted(WNIDS) == val.classes and len(train) == 6 and len(val) == 6
    for path, label in val.samples:
        assert val.classes[label] == ann[os.path.basename(path)]
    img, _ = val[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8


def test_tinyimagenet_bad_annotations_move_nothing(tmp_path, capsys):
    root = tmp_path / "tiny"
    make_tiny(root)
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "broken-line-without-tabs\n")
    with pytest.raises(SystemExit) as e:
        run_main(process_tinyimagenet, "--root", root)
    assert e.value.code == 2 and f"{ann}:7" in capsys.readouterr().err
    assert len(os.listdir(root / "val" / "images")) == 6


def test_tinyimagenet_missing_exit_2(tmp_path, capsys):
    root = tmp_path / "tiny"
    make_tiny(root)
    os.remove(root / "val" / "val_annotations.txt")
    assert_single_error_line(run_cli("process_tinyimagenet.py", "--root", root),
                             str(root / "val" / "val_annotations.txt"))
    with pytest.raises(SystemExit) as e:  # in-process: each subprocess pays a torch import
        run_main(process_move_file, "--root", tmp_path / "nope")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: missing folder: {tmp_path / 'nope' / 'train'}"
