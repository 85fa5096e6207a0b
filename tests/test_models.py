import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import models
from utils import InputError


@pytest.mark.parametrize("name,params,chans,size", [
    ("deit_tiny_patch4_32_teacher", 2.40e6, 3, 32),
    ("deit_base_patch4_32_teacher", 21.34e6, 3, 32),
    ("deit_tiny_patch4_32", 2.40e6, 3, 32),
    ("deit_small_patch4_28_teacher", None, 1, 28),
])
def test_registered_models(name, params, chans, size):
    m = timm.create_model(name, num_classes=10)
    assert isinstance(m, VisionTransformer)
    assert models.input_spec(m) == (chans, size)
    assert len(m.blocks) == 12 and m.blocks[0].norm1.eps == 1e-6
    if params:
        assert abs(sum(p.numel() for p in m.parameters()) - params) / params < 0.01
    assert m(torch.zeros(2, chans, size, size)).shape == (2, 10)


def _plain_base():
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=3,
                             qkv_bias=True, num_classes=10)


def test_published_teacher_format_loads(tmp_path):
    torch.manual_seed(0)
    src = _plain_base()
    torch.save({"model": src.state_dict()}, tmp_path / "t.pth")
    teacher = models.load_teacher("deit_base_patch4_32_teacher", 10, tmp_path / "t.pth")
    x = torch.randn(2, 3, 32, 32)
    # plain timm uses LayerNorm eps 1e-6 too, so the outputs match exactly
    assert torch.allclose(teacher.model(x), src.eval()(x), atol=1e-5)
    # the published file carries no accuracy or normalisation: ImageNet's statistics
    assert teacher.accuracy is None and teacher.mean == (0.485, 0.456, 0.406) and teacher.std == (0.229, 0.224, 0.225)
    assert (teacher.in_chans, teacher.img_size, teacher.num_classes) == (3, 32, 10)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())


def test_teacher_carries_its_file_and_input_spec(tmp_path):
    """Our teacher format: class count read from the head, accuracy and normalisation from the file;
    explicit mean/std win, and an --img_size the model does not take is refused."""
    model = timm.create_model("deit_tiny_patch4_28_teacher", num_classes=7)
    torch.save({"model": model.state_dict(), "acc1": 87.5, "mean": [0.3], "std": [0.2]}, tmp_path / "t.pth")
    teacher = models.load_teacher("deit_tiny_patch4_28_teacher", None, tmp_path / "t.pth")
    assert (teacher.num_classes, teacher.in_chans, teacher.img_size) == (7, 1, 28)
    assert teacher.accuracy == 0.875 and teacher.mean == (0.3,) and teacher.std == (0.2,)
    assert teacher.path == str(tmp_path / "t.pth") and teacher.device == torch.device("cpu")
    own = models.load_teacher("deit_tiny_patch4_28_teacher", None, tmp_path / "t.pth", mean=[0.5], std=[0.25])
    assert own.mean == (0.5,) and own.std == (0.25,)
    with pytest.raises(InputError, match=r"--img_size 32 does not fit deit_tiny_patch4_28_teacher.*28x28"):
        models.load_teacher("deit_tiny_patch4_28_teacher", None, tmp_path / "t.pth", img_size=32)
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}},
               tmp_path / "headless.pth")
    with pytest.raises(InputError, match="no 'head.weight': pass --nb_classes"):
        models.load_teacher("deit_tiny_patch4_28_teacher", None, tmp_path / "headless.pth")


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module", "orig_mod", "safetensors"])
def test_checkpoint_variants(tmp_path, wrap):
    src = timm.create_model("deit_tiny_patch4_32", num_classes=10)
    sd = src.state_dict()
    path = tmp_path / "c.pth"
    if wrap == "plain":
        torch.save(sd, path)
    elif wrap == "state_dict":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif wrap == "module":
        torch.save({"model": {"module." + k: v for k, v in sd.items()}}, path)
    elif wrap == "orig_mod":
        torch.save({"_orig_mod." + k: v for k, v in sd.items()}, path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "c.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    dst, name, _ = models.load_student(path, "deit_tiny_patch4_32")
    assert name == "deit_tiny_patch4_32" and dst.num_classes == 10
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k])


def test_wrong_class_count_names_the_cause(tmp_path):
    torch.save({"model": timm.create_model("deit_tiny_patch4_32", num_classes=100).state_dict()}, tmp_path / "c.pth")
    with pytest.raises(InputError, match=r"100 classes.*built with 10.*--nb_classes"):
        models.load_teacher("deit_tiny_patch4_32", 10, tmp_path / "c.pth")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = timm.create_model("deit_tiny_patch4_32", num_classes=10).state_dict()
    sd.pop("blocks.3.attn.qkv.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(InputError, match=r"missing keys: blocks\.3\.attn\.qkv\.weight.*unexpected keys: extra\.weight"):
        models.load_student(tmp_path / "c.pth", "deit_tiny_patch4_32", num_classes=10)


def test_unsafe_and_broken_files_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match="weights_only"):
        models.read_checkpoint(tmp_path / "evil.pth")
    good = tmp_path / "good.pth"
    torch.save(timm.create_model("deit_tiny_patch4_32", num_classes=10).state_dict(), good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(InputError, match="cut.pth is not a readable PyTorch checkpoint"):
        models.read_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(InputError, match="not found"):
        models.read_checkpoint(tmp_path / "absent.pth")


def test_unknown_model_name():
    with pytest.raises(InputError, match="unknown model 'deit_huge_patch4_32'"):
        models.create("deit_huge_patch4_32", 10)
