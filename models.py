"""ViT teachers and students of the paper, registered with timm, and checkpoint loading.

    import models
    teacher = models.load_teacher("deit_base_patch4_32_teacher", None, "cifar100_teacher.pth")
    teacher.model, teacher.num_classes, teacher.img_size, teacher.mean, teacher.accuracy

All models are timm's own `VisionTransformer` (class token, qkv bias, LayerNorm eps 1e-6,
MLP ratio 4); this module only fixes their sizes. The 224-pixel DeiTs are timm's own names.
"""
import argparse
import os
from dataclasses import dataclass, field
from functools import partial

import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import data
import published
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


def create(name, num_classes, flag=None, **kwargs):
    """timm.create_model with a clear error for an unknown name (naming `flag`, the option that gave it)."""
    if name not in timm.list_models(name):
        raise InputError((f"{flag} {name}: unknown model" if flag else f"unknown model '{name}'") + "; registered here: "
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
    'epoch'; 'args', a pickled Namespace or a dict, becomes the dict meta['args']).
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
            if isinstance(obj.get("args"), (argparse.Namespace, dict)):   # DeiT's and timm's; our vars(args)
                meta["args"] = dict(vars(obj["args"]) if isinstance(obj["args"], argparse.Namespace) else obj["args"])
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
    if "head.weight" in misshaped and state_dict["head.weight"].shape[0] != own["head.weight"].shape[0]:
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
    accuracy: float = None    # top-1 test accuracy as a fraction, when the file records it
    path: str = None          # the checkpoint file (fingerprints hash it)
    ema: bool = False         # its EMA weights were loaded (--teacher_ema)
    norm_source: str = None   # where mean/std came from, for the run's first lines
    notes: list = field(default_factory=list)   # flags that differ from the teacher file, for the first lines
    accuracy_source: str = None  # where `accuracy` came from

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


def teacher_file_info(meta):
    """What a teacher file says about itself -> ({'model', 'mean', 'std', 'num_classes', 'accuracy'}, {key: where
    it says it}); None where it says nothing. Read: 'arch' (ours; timm's train.py writes args.model there),
    DeiT's args.model, 'mean'/'std' or args.mean/args.std (timm), 'nb_classes' or args.nb_classes /
    args.num_classes, 'acc1' (%) or timm's 'metric' when its args.eval_metric is top1 (%)."""
    args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    is_model = lambda v: isinstance(v, str) and bool(timm.list_models(v))   # timm without args writes a class name
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    top1 = meta.get("metric") if args.get("eval_metric", "top1") == "top1" else None
    candidates = {
        "model": [("'arch'", meta.get("arch"), is_model), ("args.model", args.get("model"), is_model)],
        "mean": [("'mean'", meta.get("mean"), None), ("args.mean", args.get("mean"), None)],
        "std": [("'std'", meta.get("std"), None), ("args.std", args.get("std"), None)],
        "num_classes": [("'nb_classes'", meta.get("nb_classes"), is_number),
                        ("args.nb_classes", args.get("nb_classes"), is_number),
                        ("args.num_classes", args.get("num_classes"), is_number)],
        "accuracy": [("'acc1'", meta.get("acc1"), is_number), ("'metric' (timm, top1)", top1, is_number)],
    }
    info, where = {}, {}
    for key, options in candidates.items():
        info[key] = None
        for label, value, ok in options:
            if value is not None and (ok is None or ok(value)):
                info[key], where[key] = value, label
                break
    if info["accuracy"] is not None:
        info["accuracy"] = float(info["accuracy"]) / 100   # both record percent
    return info, where


def _resolve(flag, given, info, where, key, notes, default=None, same=lambda a, b: a == b, origin="the teacher file"):
    """The flag's value when given (noted when the file disagrees), else the file's, else `default`."""
    in_file = info.get(key)
    if given is not None:
        if in_file is not None and not same(given, in_file):
            notes.append(f"{flag} {given} differs from the teacher file's {where[key]} {in_file}: using {flag}")
        return given, flag
    if in_file is not None:
        return in_file, f"{origin} ({where[key]})"
    return default, None


def _same_numbers(a, b):
    try:
        a = [float(v) for v in (a if isinstance(a, (list, tuple)) else [a])]
        b = [float(v) for v in (b if isinstance(b, (list, tuple)) else [b])]
    except (TypeError, ValueError):
        return False
    return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b))


def load_teacher(name, num_classes, path, device="cpu", mean=None, std=None, img_size=None, ema=False) -> Teacher:
    """A frozen teacher in eval mode from a checkpoint (its EMA weights with ema=True), or from weights timm
    loads itself (is_pretrained(path): the architecture comes with them, `name` is not used).

    Every value the file records is used unless its flag is given (name, mean/std, accuracy; the class
    count is the head's); a flag that differs from the file is kept and noted in `teacher.notes`.
    name None: the file's model name, else the published default. mean/std None: the file's (a pretrained
    model's config), else ImageNet's. img_size, when given, must be the model's input size (--img_size).
    """
    notes, origin = [], "the teacher file"
    if is_pretrained(path):
        if ema:
            raise InputError(f"--teacher_ema applies to checkpoint files, not to {path}")
        name = os.fspath(path)
        model, meta, path = load_pretrained(name, num_classes)
        info, where = teacher_file_info(meta)
        origin = "the model's pretrained config"
    else:
        state_dict, meta = read_checkpoint(path, ema)   # read once: a DeiT main.py file holds optimizer state too
        info, where = teacher_file_info(meta)
        flag = "--teacher" if name else None
        name, _ = _resolve("--teacher", name, info, where, "model", notes, published.TEACHER)
        head = state_dict.get("head.weight")
        if info["num_classes"] is not None and head is not None and info["num_classes"] != head.shape[0]:
            notes.append(f"the teacher file's {where['num_classes']} says {info['num_classes']} classes but its "
                         f"head has {head.shape[0]}: using {head.shape[0]}")
        model = create(name, num_classes or num_classes_of(state_dict, path), flag=flag)
        try:
            load_state_dict_strict(model, state_dict, source=os.fspath(path))
        except InputError as e:
            if info["model"] is not None and info["model"] != name:
                raise InputError(f"{e} (the teacher file names model {info['model']}, --teacher is {name})") from None
            raise
    in_chans, size = input_spec(model)
    check_img_size(img_size, name, size)
    mean, mean_from = _resolve("--mean", mean, info, where, "mean", notes, same=_same_numbers, origin=origin)
    std, std_from = _resolve("--std", std, info, where, "std", notes, same=_same_numbers, origin=origin)
    source = " and ".join(dict.fromkeys(s for s in (mean_from, std_from) if s)) or f"ImageNet's ({origin} has none)"
    teacher = Teacher.of(model.to(device), name, mean, std, os.fspath(path), info["accuracy"])
    teacher.ema, teacher.norm_source, teacher.notes = ema, source, notes
    teacher.accuracy_source = f"the teacher file ({where['accuracy']})" if info["accuracy"] is not None else None
    return teacher


def default_student(img_size):
    """The paper's student for a teacher's input size: the tiny DeiT (patch 4 at 32 and 28 px, timm's at 224)."""
    return {32: "deit_tiny_patch4_32", 28: "deit_tiny_patch4_28"}.get(img_size, "deit_tiny_patch16_224")


def load_student(path, name=None, num_classes=None, img_size=None):
    """A student checkpoint (student/final.pth, checkpoint.pth) -> (model, its name, the file's meta). name
    None: the one the file records, else the default student whose patch embedding and positions fit it;
    num_classes None: its head's; img_size (--img_size), when given, must be the model's."""
    sd, meta = read_checkpoint(path)
    saved = meta.get("args") or {}
    num_classes = num_classes or num_classes_of(sd, path)
    name = name or meta.get("student") or saved.get("student") or _default_student_fitting(sd, num_classes)
    model = create(name, num_classes)
    load_state_dict_strict(model, sd, source=os.fspath(path))
    check_img_size(img_size, name, input_spec(model)[1])
    return model, name, meta


def _default_student_fitting(state_dict, num_classes):
    keys = ("pos_embed", "patch_embed.proj.weight")
    for size in (32, 28, 224):
        name = default_student(size)
        own = create(name, num_classes).state_dict()
        if all(k in state_dict and state_dict[k].shape == own[k].shape for k in keys):
            return name
    raise InputError("cannot tell which student this checkpoint holds: pass --student")


def check_img_size(flag, name, size):
    """--img_size, when given, must be the model's input size."""
    if flag not in (None, size):
        raise InputError(f"--img_size {flag} does not fit {name}, which takes {size}x{size}")


def input_spec(model):
    """(in_chans, img_size) a timm ViT expects."""
    embed = model.patch_embed
    return embed.proj.in_channels, embed.img_size[0]
