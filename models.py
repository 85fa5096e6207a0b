"""ViT teachers and students of the paper, registered with timm, and checkpoint loading.

    import models
    teacher = models.load_teacher("deit_base_patch4_32_teacher", None, "cifar100_teacher.pth")
    teacher.model, teacher.num_classes, teacher.img_size, teacher.mean, teacher.accuracy

All models are timm's own `VisionTransformer` (class token, qkv bias, LayerNorm eps 1e-6,
MLP ratio 4); this module only fixes their sizes. The 224-pixel DeiTs are timm's own names.
"""
import argparse
import os
from dataclasses import dataclass
from functools import partial

import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import data
from utils import InputError, safe_torch_load

# size name -> (embed_dim, num_heads); depth is 12 for all (the published vision_transformer.py)
_SIZES = {"tiny": (128, 2), "small": (192, 2), "base": (384, 3)}
# resolution -> in_chans: 32x32 RGB (CIFAR), 28x28 grey (MNIST-style)
_INPUTS = {32: 3, 28: 1}


def _build_vit(embed_dim, num_heads, img_size, in_chans, patch_size=4, **kwargs):
    # timm passes its pretrained-config arguments to every entry point; we have no weights to fetch
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "pretrained", "cache_dir"):
        kwargs.pop(key, None)
    kwargs.setdefault("in_chans", in_chans)
    model = VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=12, num_heads=num_heads,
        mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    grey = kwargs["in_chans"] == 1
    model.pretrained_cfg = dict(
        input_size=(kwargs["in_chans"], img_size, img_size),
        mean=data.GRAY_MEAN if grey else data.IMAGENET_MEAN, std=data.GRAY_STD if grey else data.IMAGENET_STD,
        num_classes=model.num_classes)
    return model


def _register(size, img_size, suffix, patch=4, sizes=_SIZES):
    embed_dim, num_heads = sizes[size]
    name = f"deit_{size}_patch{patch}_{img_size}{suffix}"

    def entry(pretrained=False, **kwargs):
        if pretrained:
            raise InputError(f"{name} has no downloadable weights: pass a checkpoint file instead")
        return _build_vit(embed_dim, num_heads, img_size, _INPUTS[img_size], patch_size=patch, **kwargs)

    entry.__name__ = name
    entry.__doc__ = f"ViT {size}: dim {embed_dim}, {num_heads} heads, depth 12, {img_size}x{img_size}, patch {patch}."
    register_model(entry)


for _size in _SIZES:
    for _img in _INPUTS:
        for _suffix in ("_teacher", ""):  # the paper's teacher names and plain student names
            _register(_size, _img, _suffix)

# CPU-sized 28x28 ViTs for demo.py (not in the paper); depth 12 keeps probe blocks 3, 7 and PD blocks 3, 7, 11
_DEMO_SIZES = {"demo": (64, 2), "mini": (32, 2)}
for _size in _DEMO_SIZES:
    for _patch in (4, 7):
        for _suffix in ("_teacher", ""):
            _register(_size, 28, _suffix, _patch, _DEMO_SIZES)


def create(name, num_classes, **kwargs):
    """timm.create_model with a clear error for an unknown name."""
    if name not in timm.list_models(name):
        raise InputError(f"unknown model '{name}'; registered here: "
                         + ", ".join(timm.list_models("deit_*patch4*")) + ", and timm's own models")
    return timm.create_model(name, num_classes=num_classes, **kwargs)


# where each writer keeps its weights: (plain weights, EMA weights)
_WEIGHT_KEYS = (("model", "model_ema"),          # DeiT main.py, published teachers, train_teacher.py
                ("state_dict", "state_dict_ema"),  # timm train.py (CheckpointSaver)
                ("model_state_dict", None), ("student", None))


def read_checkpoint(path, ema=False):
    """Read a checkpoint file safely -> (state_dict, meta).

    Accepts the files researchers have: DeiT main.py checkpoints and the official DeiT releases
    ({'model': sd, 'model_ema', 'optimizer', 'args': Namespace, ...}), timm train.py checkpoints
    ({'state_dict': sd, 'state_dict_ema', 'arch', 'metric', 'args': Namespace, ...}),
    {'model_state_dict': sd}, plain state dicts and .safetensors files; strips 'module.'
    (DataParallel) and '_orig_mod.' (torch.compile) prefixes. `ema` picks the EMA weights.
    `meta` holds the plain entries saved beside the weights (e.g. 'acc1', 'mean', 'std', 'arch',
    'epoch'; a pickled Namespace becomes the dict meta['args']).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            obj = load_file(path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise InputError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})")
    else:
        obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a state dict")
    meta = {}
    for key, ema_key in _WEIGHT_KEYS:
        if isinstance(obj.get(key), dict):
            meta = {k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool, list, tuple))}
            if isinstance(obj.get("args"), argparse.Namespace):
                meta["args"] = vars(obj["args"])
            if ema:
                if ema_key is None or not isinstance(obj.get(ema_key), dict) or not obj[ema_key]:
                    raise InputError(f"{path} holds no EMA weights (entries: {', '.join(map(str, obj))}); "
                                     "drop --teacher_ema")
                key = ema_key
            obj = obj[key]
            break
    else:
        if ema:
            raise InputError(f"{path} is a plain state dict without EMA weights; drop --teacher_ema")
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        state_dict[key] = value
    if not state_dict:
        raise InputError(f"{path} holds no tensors (keys: {', '.join(list(obj)[:8])})")
    return state_dict, meta


def load_state_dict_strict(model, state_dict, source="checkpoint"):
    """load_state_dict that names every missing, unexpected or mis-shaped key in one error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    problems = []
    if "head.weight" in misshaped:
        problems.append(f"the checkpoint has {state_dict['head.weight'].shape[0]} classes but the model was "
                        f"built with {own['head.weight'].shape[0]} (check --nb_classes)")
    if misshaped:
        problems.append("mis-shaped keys: " + ", ".join(
            f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in misshaped[:4])
            + (" …" if len(misshaped) > 4 else ""))
    if missing:
        problems.append("missing keys: " + ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected[:5]) + (" …" if len(unexpected) > 5 else ""))
    if problems:
        raise InputError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(model, path, ema=False):
    """Load a checkpoint file into `model` strictly; returns the checkpoint's meta dict."""
    state_dict, meta = read_checkpoint(path, ema)
    load_state_dict_strict(model, state_dict, source=os.fspath(path))
    return meta


@dataclass
class Teacher:
    """A frozen teacher and everything the stages need to feed it: what stage 1 scores with and stage 2
    distills from, so neither re-derives its input size, normalisation or class count."""
    model: nn.Module          # eval mode, no gradients
    name: str                 # registered model name (--teacher)
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple               # normalisation of its inputs, one value per channel
    std: tuple
    accuracy: float = None    # top-1 test accuracy as a fraction, when the file records 'acc1' (percent)
    path: str = None          # the checkpoint file (fingerprints hash it)
    ema: bool = False         # its EMA weights were loaded (--teacher_ema)
    norm_source: str = None   # where mean/std came from, for the run's first lines

    @property
    def device(self):
        return next(self.model.parameters()).device

    @classmethod
    def of(cls, model, name, mean=None, std=None, path=None, accuracy=None):
        """Wrap a built model (e.g. random weights in the benchmark); mean/std default to ImageNet's."""
        in_chans, img_size = input_spec(model)
        mean, std = data.resolve_mean_std(mean, std, in_chans)
        return cls(model.eval().requires_grad_(False), name, model.num_classes, in_chans, img_size, mean, std,
                   accuracy, path)


def num_classes_of(state_dict, source):
    """The class count of a read checkpoint, from its head."""
    if "head.weight" not in state_dict:
        raise InputError(f"{source} has no 'head.weight': pass --nb_classes")
    return state_dict["head.weight"].shape[0]


def is_pretrained(source):
    """True for weights timm loads itself: 'hf-hub:org/name', or a timm name with a pretrained tag
    ('deit_base_patch16_224.fb_in1k') that is not a file here."""
    source = os.fspath(source)
    return source.startswith("hf-hub:") or (not os.path.exists(source) and source in timm.list_pretrained(source))


def load_pretrained(source, num_classes=None):
    """timm.create_model(source, pretrained=True) -> (model, meta, weights file): timm's own loading, from
    the hub cache (HF_HUB_CACHE; HF_HUB_OFFLINE=1 never downloads). meta holds the model's mean/std."""
    try:
        model = timm.create_model(source, pretrained=True)
    except InputError:
        raise
    except Exception as e:  # hub, network and config errors come in many types
        raise InputError(f"--teacher_dir {source}: timm could not load these weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if num_classes not in (None, model.num_classes):
        raise InputError(f"--teacher_dir {source} has {model.num_classes} classes, not --nb_classes {num_classes}")
    cfg = model.pretrained_cfg
    meta = {"mean": list(cfg["mean"]), "std": list(cfg["std"])} if "mean" in cfg else {}
    return model, meta, _pretrained_file(cfg)


def _pretrained_file(cfg):
    """The cached file timm loaded the weights from: what score fingerprints hash."""
    hub = cfg.get("hf_hub_id")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        repo, _, revision = hub.partition("@")
        for name in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"):
            path = name and try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(path, str):
                return path
    if cfg.get("url"):
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg["url"]))
        if os.path.isfile(path):
            return path
    raise InputError(f"cannot find the weights file of {cfg.get('architecture')} in the local caches")


def load_teacher(name, num_classes, path, device="cpu", mean=None, std=None, img_size=None, ema=False) -> Teacher:
    """A frozen teacher in eval mode from a checkpoint (its EMA weights with ema=True), or from weights timm
    loads itself (is_pretrained(path): the architecture comes with them, `name` is not used).

    num_classes None: read from the checkpoint. mean/std None: the checkpoint's (train_teacher.py saves
    them; a pretrained model's config), else ImageNet's. img_size, when given, must be the model's input size.
    """
    if is_pretrained(path):
        if ema:
            raise InputError(f"--teacher_ema applies to checkpoint files, not to {path}")
        name = os.fspath(path)
        model, meta, path = load_pretrained(name, num_classes)
        own = "the model's pretrained config"
    else:
        state_dict, meta = read_checkpoint(path, ema)   # read once: a DeiT main.py file holds optimizer state too
        model = create(name, num_classes or num_classes_of(state_dict, path))
        load_state_dict_strict(model, state_dict, source=os.fspath(path))
        own = "the teacher file"
    in_chans, size = input_spec(model)
    if img_size not in (None, size):
        raise InputError(f"--img_size {img_size} does not fit {name}, which takes {size}x{size}")
    source = ("--mean/--std" if mean is not None else own if meta.get("mean") is not None
              else f"ImageNet's ({own} has none)")
    mean = mean if mean is not None else meta.get("mean")
    std = std if std is not None else meta.get("std")
    accuracy = float(meta["acc1"]) / 100 if "acc1" in meta else None
    teacher = Teacher.of(model.to(device), name, mean, std, os.fspath(path), accuracy)
    teacher.ema, teacher.norm_source = ema, source
    return teacher


def teacher_from_args(args, device):
    """The teacher of --teacher/--teacher_dir/--nb_classes/--img_size/--mean/--std/--teacher_ema."""
    return load_teacher(args.teacher, args.nb_classes, args.teacher_dir, device, mean=args.mean, std=args.std,
                        img_size=args.img_size, ema=args.teacher_ema)


def input_spec(model):
    """(in_chans, img_size) a timm ViT expects."""
    embed = model.patch_embed
    return embed.proj.in_channels, embed.img_size[0]
