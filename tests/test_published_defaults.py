"""The published commands build the published configuration (SPEC §7): the flags the run scripts pass,
parsed by our parsers, give the published defaults; parsers refuse abbreviations and accept the
DeiT/timm spellings users type."""
import os
import re
import shlex

import pytest

import distill
import select_data
import train_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_argv(script, marker="DFND_DeiT-train.py", occurrence=0):
    """The arguments a run script passes to `marker` (its n-th call), with $variables as placeholders."""
    text = open(os.path.join(ROOT, script)).read().replace("\\\n", " ")
    calls = [line for line in text.splitlines() if marker in line and not line.lstrip().startswith("#")]
    line = calls[occurrence].split(marker, 1)[1].split(";;")[0]
    line = re.sub(r'"?\$\{?(\w+)\}?"?', lambda m: f"VAR_{m.group(1)}", line)
    return [a for a in shlex.split(line) if a != "VAR_EXTRA"]


def parse_script(script, occurrence=0, env=None):
    argv = script_argv(script, occurrence=occurrence)
    defaults = env or {}
    argv = [defaults.get(a[4:], a) if a.startswith("VAR_") else a for a in argv]
    return distill.get_args_parser().parse_args(argv)


def test_training_sh_builds_the_published_cifar_configuration():
    for occurrence, (dataset, classes, lr) in enumerate([("cifar10", "10", 7.5e-4), ("cifar100", "100", 8.5e-4)]):
        args = parse_script("training.sh", occurrence, {"NUM_SELECT": "650000"})
        assert args.dataset == dataset and args.nb_classes == int(classes) and args.lr_S == lr
        assert args.num_select == 650000
        assert args.attnprobe_sel and args.attnprobe_dist and not args.robust and not args.random
        assert args.patchattn == 0.8 and args.attnlier == 0.05 and args.outlier == 0.9
        assert args.schedule == [200, 300] and not args.cos
        assert args.weight_decay == 0.025 and args.batch_size == 256
        assert args.holdout == 0 and args.epochs is None and args.pos_num == 0
        assert args.crop_padding is None and distill.default_crop_padding(32) == 4


def test_parsers_refuse_abbreviations_and_take_deit_spellings(capsys):
    p = distill.get_args_parser()
    for wrong in (["--lr", "0.1"], ["--eval_o", "x"], ["--patch", "0.5"]):
        with pytest.raises(SystemExit):
            p.parse_args(wrong)
    capsys.readouterr()
    a = p.parse_args(["--batch-size", "64", "--num_workers", "3", "--eval", "ck.pth", "--output-dir", "o",
                      "--weight-decay", "0.05"])
    assert (a.batch_size, a.workers, a.eval_only, a.output_dir, a.weight_decay) == (64, 3, "ck.pth", "o", 0.05)
    s = select_data.get_args_parser().parse_args(["--batch-size", "32", "--num-workers", "2"])
    assert (s.batch_size, s.workers) == (32, 2)
    with pytest.raises(SystemExit):
        select_data.get_args_parser().parse_args(["--num_sel", "5"])
    t = train_teacher.get_args_parser().parse_args(["--dataset", "cifar10", "--data-path", "d", "--output", "t.pth",
                                                    "--batch-size", "8", "--smoothing", "0.2", "--num_workers", "1"])
    assert (t.data, t.batch_size, t.label_smoothing, t.workers) == ("d", 8, 0.2, 1)
    with pytest.raises(SystemExit):
        train_teacher.get_args_parser().parse_args(["--dataset", "cifar10", "--data", "d", "--output", "t",
                                                    "--epoch", "3"])


def test_defaults_without_flags_are_the_published_ones():
    a = distill.get_args_parser().parse_args([])
    assert a.num_select == 600000 and a.dataset == "cifar10" and a.teacher == "deit_base_patch4_32_teacher"
    assert a.lr_S == 7.5e-4 and a.patchattn == 0.8 and a.schedule == [200, 300]
