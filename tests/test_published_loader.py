"""Image files of every kind score as the published pipeline scored them.

The re-enactment below is the published code's own composition, written out here with its own
literals: torchvision's ImageFolder (its loader is pil_loader, `Image.open(f).convert('RGB')`) under
`ImageFile.LOAD_TRUNCATED_IMAGES = True` (set at the top of DFND_DeiT-train.py and
DFND_DeiT-imagenet.py; here only for the duration of each test), `Resize((s, s))`, `ToTensor()`,
`Normalize(...)`, then identify_attnlier (hooks on `blocks[b].attn`, the qkv weight applied per
image with bmm, every head's attention, head 0's CLS row, cosine with the uniform vector) and
identify_outlier (cross-entropy against the argmax). Our select_data.py scores the same folder.
"""
import io
import os
from functools import partial
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from timm.models.vision_transformer import VisionTransformer

from fixtures import encode, run_script_inprocess, smooth_rgb, write_bytes

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]   # DFND_DeiT-train.py
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]    # DFND_DeiT-imagenet.py


def odd_files(w=50, h=40):
    """{name: bytes}: one file per kind the published loader converted its own way."""
    rgb = smooth_rgb(w, h, 1)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1)))   # 0 .. 255 left to right
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    la = rgb.convert("L")
    la.putalpha(alpha)
    pal = rgb.convert("P")
    sixteen = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 300).astype(np.uint16)   # up to 76,500 / 65,535
    big = encode(smooth_rgb(4 * w, 4 * h, 2), "JPEG", quality=90)
    cmyk = smooth_rgb(w, h, 3).convert("CMYK")
    return {
        "truncated.jpg": big[: len(big) * 6 // 10],
        "truncated.png": encode(smooth_rgb(w, h, 4), "PNG")[:1500],
        "rgba.png": encode(rgba, "PNG"),
        "la.png": encode(la, "PNG"),
        "palette_transparent.png": encode(pal, "PNG", transparency=int(np.asarray(pal)[0, 0])),
        "sixteen_bit.png": encode(Image.fromarray(sixteen), "PNG"),
        "cmyk.jpg": encode(cmyk, "JPEG", quality=92),
        "grey.jpg": encode(smooth_rgb(w, h, 5).convert("L"), "JPEG", quality=92),
        "grey.png": encode(smooth_rgb(w, h, 6).convert("L"), "PNG"),
        "plain.jpg": encode(smooth_rgb(w, h, 7), "JPEG", quality=92),
    }


def write_image_folder(root, files):
    for name, data in files.items():
        write_bytes(os.path.join(root, "wild", name), data)   # one class folder, as ImageFolder wants


def published_vit(img_size, patch, dim, heads, in_chans=3, num_classes=10):
    return VisionTransformer(img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=12,
                             num_heads=heads, mlp_ratio=4, qkv_bias=True, num_classes=num_classes,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()


def published_scores(model, state_dict, x, heads, blocks=(3, 7)):
    """identify_attnlier + identify_outlier on one batch of normalised images."""
    inputs = {}
    hooks = [model.blocks[b].attn.register_forward_hook(lambda m, i, o, b=b: inputs.__setitem__(b, i[0]))
             for b in blocks]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    out = {}
    for b in blocks:
        B, N, C = inputs[b].shape
        w, bias = state_dict[f"blocks.{b}.attn.qkv.weight"], state_dict[f"blocks.{b}.attn.qkv.bias"]
        qkv = torch.bmm(inputs[b], w.unsqueeze(0).repeat(B, 1, 1).permute(0, 2, 1)) + bias
        qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        y, uniform = attn[:, 0, 0, 1:], torch.ones(B, N - 1) / (N - 1)
        out[f"value_blk{b}"] = (torch.bmm(y.unsqueeze(1), uniform.unsqueeze(2)).squeeze()
                                / (y.pow(2).sum(1).sqrt() * uniform.pow(2).sum(1).sqrt()))
    pred = logits.max(1)[1]
    out["value_out"] = F.cross_entropy(logits, pred, reduction="none")
    out["pred_out"] = pred
    return out


def reenact(root, model, state_dict, heads, size, mean, std, grey=False):
    """The published wild-image dataset (data_train) over `root`, scored -> (file names, scores)."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(mean, std)])
    # a one-channel teacher had no published path: its loader is pil_loader with convert('L')
    loader = (lambda p: Image.open(open(p, "rb")).convert("L")) if grey else None
    ds = ImageFolder(root, tf, **({"loader": loader} if loader else {}))
    with published_pil():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
    names = [os.path.relpath(p, root) for p, _ in ds.samples]
    return names, published_scores(model, state_dict, x, heads)


def ours(tmp_path, root, teacher_name, teacher_file, name, *flags):
    sel = tmp_path / name
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False     # PIL's default: our decoding sets what it needs
    code = run_script_inprocess("select_data.py", "--data_imagenet", root, "--teacher", teacher_name,
                                "--teacher_dir", teacher_file, "--num_select", "2", "--selected_file", sel,
                                "--workers", "0", "--attnprobe_sel", *flags)
    assert code == 0
    assert (sel / "skipped.txt").read_text() == ""     # every one of these files decodes
    return {k: torch.load(sel / f"{k}.pth", weights_only=True)
            for k in ("value_out", "value_blk3", "value_blk7", "pred_out")}


def published_pil():
    """The published scripts' global PIL setting, only while the re-enactment decodes: our code must not
    depend on it."""
    return mock.patch.object(ImageFile, "LOAD_TRUNCATED_IMAGES", True)


def assert_same_scores(got, want, names, tol=1e-5):
    for key in ("value_out", "value_blk3", "value_blk7"):
        diff = (got[key] - want[key]).abs()
        assert diff.max() <= tol, (key, names[int(diff.argmax())], float(diff.max()))
    assert torch.equal(got["pred_out"], want["pred_out"])


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "on_the_fly"])
def test_every_kind_of_file_scores_as_the_published_loader(tmp_path, cache):
    """Truncated JPEG and PNG, RGBA / LA / palette-with-transparency PNG, 16-bit PNG, CMYK JPEG and greyscale
    files, resized from 50x40 to the 32-px teacher: our scores within 1e-5 of the re-enactment."""
    files = odd_files()
    write_image_folder(tmp_path / "pool", files)
    torch.manual_seed(0)
    model = published_vit(32, 4, 128, 2)
    torch.save({"model": model.state_dict()}, tmp_path / "teacher.pth")
    names, want = reenact(tmp_path / "pool", model, model.state_dict(), 2, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert sorted(names) == sorted(f"wild/{n}" for n in files)
    got = ours(tmp_path, tmp_path / "pool", "deit_tiny_patch4_32_teacher", tmp_path / "teacher.pth", "sel",
               *([] if cache else ["--no_cache"]))
    assert_same_scores(got, want, names)


def test_these_files_differ_from_other_decodings():
    """The files above tell the published conversion apart (else the score test could not fail): alpha
    composited on black, 16-bit values scaled by 1/257, or truncated files refused would all differ."""
    import pool
    files = odd_files()
    for name in ("rgba.png", "la.png"):
        img = Image.open(io.BytesIO(files[name]))
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        composited = np.asarray(Image.alpha_composite(black, img.convert("RGBA")).convert("RGB"))
        ours = pool.decode_image(files[name], None, 3)
        assert (ours == np.asarray(img.convert("RGB"))).all() and np.abs(ours - composited.astype(int)).max() > 100
    sixteen = np.asarray(Image.open(io.BytesIO(files["sixteen_bit.png"]))).astype(np.int64)
    ours = pool.decode_image(files["sixteen_bit.png"], None, 1)[..., 0].astype(np.int64)
    assert (ours == np.minimum(sixteen, 255)).all() and (ours != np.rint(sixteen / 257)).any()
    with pytest.raises(OSError):
        Image.open(io.BytesIO(files["truncated.jpg"])).load()   # PIL's default refuses it


def test_greyscale_teacher_takes_convert_L(tmp_path):
    """A one-channel (28-px) teacher: every kind of file through convert('L'), then Resize((28, 28))."""
    files = odd_files(36, 30)
    write_image_folder(tmp_path / "pool", files)
    torch.manual_seed(1)
    model = published_vit(28, 4, 128, 2, in_chans=1)
    torch.save({"model": model.state_dict()}, tmp_path / "teacher.pth")
    names, want = reenact(tmp_path / "pool", model, model.state_dict(), 2, 28, [0.449], [0.226], grey=True)
    got = ours(tmp_path, tmp_path / "pool", "deit_tiny_patch4_28_teacher", tmp_path / "teacher.pth", "sel",
               "--mean", "0.449", "--std", "0.226")
    assert_same_scores(got, want, names)


def test_224px_scores_with_the_published_normalisation(tmp_path):
    """The 224-px pipeline (decoded on the fly) with the CIFAR mean/std the 224-px run scripts pass, as
    DFND_DeiT-imagenet.py normalised every image."""
    files = {k: v for k, v in odd_files(60, 45).items()
             if k in ("truncated.jpg", "rgba.png", "palette_transparent.png", "sixteen_bit.png")}
    write_image_folder(tmp_path / "pool", files)
    torch.manual_seed(2)
    model = published_vit(224, 16, 192, 3)
    torch.save({"model": model.state_dict()}, tmp_path / "teacher.pth")
    names, want = reenact(tmp_path / "pool", model, model.state_dict(), 3, 224, CIFAR_MEAN, CIFAR_STD)
    got = ours(tmp_path, tmp_path / "pool", "deit_tiny_patch16_224", tmp_path / "teacher.pth", "sel",
               "--mean", *map(str, CIFAR_MEAN), "--std", *map(str, CIFAR_STD))
    assert_same_scores(got, want, names)


def test_labelled_224px_images_of_every_kind_as_the_published_test_transform(tmp_path):
    """Labelled images go through the same loader: Resize(224) -> CenterCrop(224) of the published
    test transform, on truncated, RGBA, palette and 16-bit files."""
    import data
    from torchvision import transforms
    ref = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.PILToTensor()])
    for name, blob in odd_files(300, 240).items():
        path = write_bytes(tmp_path / name, blob)
        with open(path, "rb") as f, published_pil():
            want = ref(Image.open(f).convert("RGB"))
        assert torch.equal(data.decode_resize_center_crop(str(path), 224), want), name
