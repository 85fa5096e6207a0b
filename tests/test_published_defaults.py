"""The published commands build the published configuration (the defaults of the published
DFND_DeiT-train.py / DFND_DeiT-imagenet.py and the flags of its training*.sh): the flags our run scripts
pass, parsed by our parsers, give the published defaults; parsers refuse abbreviations and accept the
DeiT/timm spellings users type."""
import os
import re
import shlex

import pytest

import distill
import published
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


def script_defaults(script):
    """NAME=${NAME:-value} lines of a run script (and of the script it runs) -> {NAME: value}."""
    text = open(os.path.join(ROOT, script)).read()
    values = {}
    for other in re.findall(r'bash "\$\(dirname "\$0"\)/(\w+\.sh)"', text):
        values.update(script_defaults(other))
    values.update(dict(re.findall(r'^(?:export )?(\w+)=\$\{\1:-([^}]*)\}', text, flags=re.M)))
    return values


def parse_script(script, occurrence=0, env=None):
    target = "training_imagenet.sh" if script == "training_tinyimagenet.sh" else script
    argv = script_argv(target, occurrence=occurrence)
    values = {**script_defaults(script), **(env or {})}
    # an unquoted $VAR splits into words, as bash does (VAR=${VAR:-"a b"} holds a b)
    argv = [word for a in argv
            for word in (values[a[4:]].strip('"').split() if a.startswith("VAR_") and a[4:] in values else [a])]
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
        assert args.crop_padding is None and published.crop_padding(32) == 4


def test_224px_scripts_pass_the_published_normalisation_and_32px_ones_none():
    """DFND_DeiT-imagenet.py normalised every image with CIFAR's mean/std; the 32-px commands pass none, so
    every image gets the teacher file's mean/std, else ImageNet's."""
    for script in ("training_imagenet.sh", "training_tinyimagenet.sh"):
        args = parse_script(script)
        assert args.mean == [0.4914, 0.4822, 0.4465] and args.std == [0.2023, 0.1994, 0.2010], script
    for occurrence in (0, 1):
        args = parse_script("training.sh", occurrence)
        assert args.mean is None and args.std is None


def test_parsers_refuse_abbreviations_and_take_deit_spellings(capsys):
    p = distill.get_args_parser()
    for wrong in (["--lr", "0.1"], ["--eval_o", "x"], ["--patch", "0.5"]):
        with pytest.raises(SystemExit):
            p.parse_args(wrong)
    capsys.readouterr()
    a = p.parse_args(["--batch-size", "64", "--num_workers", "3", "--output-dir", "o", "--weight-decay", "0.05"])
    assert (a.batch_size, a.workers, a.output_dir, a.weight_decay) == (64, 3, "o", 0.05)
    assert p.parse_args(["--eval", "ck.pth", "--num_workers", "3"]).eval_only == "ck.pth"
    s = select_data.get_args_parser().parse_args(["--batch-size", "32", "--num-workers", "2"])
    assert (s.score_batch_size, s.workers) == (32, 2)      # the old spelling of --score_batch_size
    with pytest.raises(SystemExit):
        select_data.get_args_parser().parse_args(["--num_sel", "5"])
    t = train_teacher.get_args_parser().parse_args(["--dataset", "cifar10", "--data-path", "d", "--output", "t.pth",
                                                    "--batch-size", "8", "--smoothing", "0.2", "--num_workers", "1"])
    assert (t.data, t.batch_size, t.label_smoothing, t.workers) == ("d", 8, 0.2, 1)
    with pytest.raises(SystemExit):
        train_teacher.get_args_parser().parse_args(["--dataset", "cifar10", "--data", "d", "--output", "t",
                                                    "--epoch", "3"])


def test_defaults_without_flags_are_the_published_ones(tmp_path):
    import torch
    import settings
    a = distill.get_args_parser().parse_args([])
    # unset, they resolve to the published values (the teacher file's model name first, when it names one)
    assert (a.num_select, a.dataset, a.teacher) == (None, None, None)
    assert a.lr_S == 7.5e-4 and a.patchattn == 0.8 and a.schedule == [200, 300]
    for folder in ("pool", "cifar"):
        os.makedirs(tmp_path / folder)
    (tmp_path / "t.pth").touch()   # the resolver checks that the files exist; nothing is read
    paths = ["--data_imagenet", tmp_path / "pool", "--teacher_dir", tmp_path / "t.pth", "--selected_file",
             tmp_path / "sel", "--data_cifar", tmp_path / "cifar", "--output_dir", tmp_path / "out"]
    s = settings.resolve_settings(distill.get_args_parser().parse_args(map(str, paths)), torch.device("cpu"))
    assert (s.select.num_select, s.dataset, s.select.teacher_spec["name"]) == (600000, "cifar10", None)
    assert published.TEACHER == "deit_base_patch4_32_teacher"      # what load_teacher falls back to
    assert (s.loss.patchattn, s.robust, s.loss.pd_loss, s.loss.temperature) == (0.0, False, "cls_gram", 4)
    assert (s.select.attnlier, s.select.outlier, s.select.probe_blocks, s.select.probe_head) == (0.05, 0.9, (3, 7), 0)
    s = settings.resolve_settings(distill.get_args_parser().parse_args([*map(str, paths), "--attnprobe_dist"]),
                                  torch.device("cpu"))
    assert s.loss.patchattn == 0.8 and s.pd_blocks == ((3, 7, 11), (3, 7, 11))


def _lr_plan(args, img_size):
    import engine
    import settings
    epochs, offset, _ = settings.epoch_plan(args.epochs, args.num_select or published.NUM_SELECT, img_size)
    return [engine.lr_at(k + offset, args.lr_S, epochs + offset, args.schedule, args.cos) for k in range(epochs)]


def test_published_epoch_count_and_schedule():
    """650,000 selected: E = int(320000 / 650000 * 512) = 252, the loop range(1, 252) trains 251 epochs,
    the lr evaluated at e = 1..251: 199 epochs at lr_S, 52 at 0.1 lr_S."""
    args = parse_script("training.sh", 1, {"NUM_SELECT": "650000"})
    lrs = _lr_plan(args, 32)
    assert len(lrs) == 251
    assert lrs.count(8.5e-4) == 199 and sum(abs(v - 8.5e-5) < 1e-12 for v in lrs) == 52
    cos = distill.get_args_parser().parse_args(["--num_select", "650000", "--cos"])
    lrs = _lr_plan(cos, 32)
    import math
    assert lrs[0] == pytest.approx(7.5e-4 * 0.5 * (1 + math.cos(math.pi / 252)))
    assert lrs[-1] == pytest.approx(7.5e-4 * 0.5 * (1 + math.cos(math.pi * 251 / 252)))
    # 224 px: int(640000 / num_select * 512) - 1 epochs
    assert len(_lr_plan(parse_script("training_imagenet.sh"), 224)) == int(640000 / 1_000_000 * 512) - 1
    # --epochs N (ignored by the published code): N epochs, lr from lr_S
    n = distill.get_args_parser().parse_args(["--epochs", "5", "--schedule", "2"])
    assert _lr_plan(n, 32) == [7.5e-4, 7.5e-4] + [pytest.approx(7.5e-5)] * 3


def test_robust_weights_are_the_published_perturbation():
    import torch
    from selection import robust_kd_weights, weights_from_mass
    mass = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    a, b = robust_kd_weights(mass, "softmax", 0), robust_kd_weights(mass, "softmax", 0)
    assert torch.equal(a, b) and not torch.equal(a, robust_kd_weights(mass, "softmax", 1))
    w = weights_from_mass(mass, "softmax")
    assert ((a - w) >= 0).all() and ((a - w) < 0.1).all()


# every flag of the published DFND_DeiT-train.py and DFND_DeiT-imagenet.py parsers
PUBLISHED_PARSER_FLAGS = ["num_select", "data_cifar", "data_imagenet", "teacher", "teacher_dir", "nb_classes", "lr_S",
                          "robust", "attnprobe_sel", "random", "attnprobe_dist", "attnlier", "outlier", "patchattn",
                          "dataset", "epochs", "output_dir", "selected_file", "schedule", "cos", "pos_num"]


def test_differences_page_holds_the_generated_table():
    assert sorted(published.FLAGS) == sorted(PUBLISHED_PARSER_FLAGS)
    parser = distill.get_args_parser()
    for flag in PUBLISHED_PARSER_FLAGS:     # each published flag exists here under its published name
        assert any(f"--{flag}" in a.option_strings for a in parser._actions), flag
    readme = open(os.path.join(ROOT, "docs", "differences.md")).read()
    start = readme.index("<!-- defaults-table: generated by published.defaults_table(distill.get_args_parser()) -->\n")
    end = readme.index("\n<!-- /defaults-table -->")
    table = readme[start:end].split("\n", 1)[1]
    assert table == published.defaults_table(parser), \
        "docs/differences.md's defaults table is stale: paste published.defaults_table(distill.get_args_parser())"
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in table.splitlines()[2:]}
    assert rows["`--patchattn`"] == "0.8" and rows["`--num_select`"] == "600000" and rows["`--pos_num`"] == "0"


def test_every_script_parser_refuses_abbreviations():
    import ast
    import glob
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py")):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "ArgumentParser":
                kw = {k.arg: k.value for k in node.keywords}
                assert "allow_abbrev" in kw and kw["allow_abbrev"].value is False, path
