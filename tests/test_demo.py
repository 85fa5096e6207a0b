"""demo.py / demo_pool.py: pool manifest, teacher/pool separation, metrics, and a tiny end-to-end run."""
import json
import os

import numpy as np
import pytest
import torch

import demo
import demo_pool as dp
import pool


@pytest.fixture(scope="module")
def fake_fm(tmp_path_factory):
    root = dp.write_fake_idx(str(tmp_path_factory.mktemp("fmnist")), n_train=1200, n_test=200)
    return dp.load_fashion_mnist(root)


def test_fake_idx_reads_like_fashion_mnist(fake_fm):
    tx, ty, vx, vy = fake_fm
    assert tx.shape == (1200, 28, 28) and tx.dtype == np.uint8 and vx.shape == (200, 28, 28)
    assert set(np.unique(ty)) == set(range(10)) and ty.dtype == np.int64


@pytest.mark.parametrize("kind", ["mismatch", "far-ood"])
def test_pool_manifest_and_no_teacher_overlap(tmp_path, fake_fm, kind):
    classes = dp.MISMATCH_CLASSES if kind == "mismatch" else tuple(range(10))
    share = 0.2 if kind == "mismatch" else 0.25
    split = dp.teacher_split(len(fake_fm[0]))
    sources = dp.export_teacher_data(str(tmp_path / "teacher"), fake_fm, classes, max_train=150, max_val=40)
    m = dp.build_pool(str(tmp_path / "pool"), kind, fake_fm, classes, share, pool_size=200)
    # manifest row i is pool image i, in the order select_data scores them
    assert pool.list_pool(str(tmp_path / "pool" / "images")).ids == m["id"].tolist()
    n = len(m["id"])
    assert abs(n - 200) <= 1 and abs(m["relevant"].mean() - share) < 0.02
    held = m["source"] == "heldout"
    assert ((m["source_index"][held] >= split) & (m["source_index"][held] < 2 * split)).all()
    assert len(set(m["source_index"][held].tolist())) == held.sum()            # no image twice
    assert set(sources["train"]).isdisjoint(m["source_index"][held].tolist())   # the teacher never saw them
    assert max(sources["train"]) < split
    # relevant == held-out image of a teacher class, by its true Fashion-MNIST label
    ty = fake_fm[1]
    assert (ty[m["source_index"][held]] == m["fmnist_label"][held]).all()
    assert (m["relevant"] == (held & np.isin(m["fmnist_label"], classes))).all()
    # teacher tree: labels 0..C-1 in zero-padded class folders
    names = sorted(os.listdir(tmp_path / "teacher" / "train"))
    assert len(names) == len(classes) and names[0].startswith("0")
    if kind == "far-ood":
        made = ~held
        assert set(m["source"][made]) == set(dp.MADE_SOURCES) and made.mean() > 0.7
        from PIL import Image
        for i in np.nonzero(made)[0][:20]:
            a = np.asarray(Image.open(tmp_path / "pool" / "images" / m["id"][i]))
            corners = a[[0, 0, -1, -1], [0, -1, 0, -1]]
            assert a.shape == (28, 28) and corners.max() < 40 and a.max() > 60   # bright object on black
    else:
        assert held.all() and not np.isin(m["fmnist_label"][~m["relevant"]], classes).any()


def test_auroc_and_pixel_baseline():
    assert dp.auroc([0, 1, 2, 3], [True, True, False, False]) == 1.0
    assert dp.auroc([3, 2, 1, 0], [True, True, False, False]) == 0.0
    assert dp.auroc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    assert dp.auroc([0, 1, 2, 3], [True, False, True, False]) == 0.75
    rng = np.random.default_rng(0)
    bright = rng.integers(150, 255, (100, 28, 28)).astype(np.uint8)
    dark = rng.integers(0, 60, (100, 28, 28)).astype(np.uint8)
    pos = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    assert dp.pixel_baseline_auroc(np.concatenate([bright, dark]), pos) > 0.99
    assert dp.pixel_features(bright).shape == (100, 4)


def test_add_spread_mean_sample_sd_and_values():
    r = {}
    demo.add_spread(r, "acc", [60.0, 62.0, 67.0])
    assert r["acc"] == pytest.approx(63.0) and r["acc_per_seed"] == [60.0, 62.0, 67.0]
    assert r["acc_sd"] == pytest.approx(np.sqrt((9 + 1 + 16) / 2))       # ddof=1, not the population sd
    one = {}
    demo.add_spread(one, "acc", [61.5])
    assert one == {"acc": 61.5, "acc_per_seed": [61.5]}                    # no sd from one seed
    assert demo.fmt_spread(one, "acc", 2) == "61.50"
    assert demo.fmt_spread(r, "acc", 2) == f"63.00 ± {r['acc_sd']:.2f} (60.00, 62.00, 67.00)"


def test_tiny_preset_two_seeds_progress_and_spread(tmp_path, capsys):
    import re
    out = tmp_path / "demo"
    demo.main(["--tiny", "--seeds", "0", "1", "--out", str(out), "--threads", "1", "--device", "cpu"])
    printed = capsys.readouterr().out
    r = json.load(open(out / "results.json"))
    assert r["seeds"] == [0, 1]
    assert 0 <= r["teacher_acc1"] <= 100
    assert r["pool"]["overlap_with_teacher_train"] == 0 and r["pool"]["num_select"] == r["pool"]["in_domain"]
    for rule in demo.RULES:
        for field in demo.RESULT_FIELDS:
            assert field in r[rule], (rule, field)
        assert 0 <= r[rule]["selection_precision"] <= 1 and 0 <= r[rule]["auroc"] <= 1
        assert 0 <= r[rule]["student_acc1"] <= 100 and r[rule]["seconds"] >= 0
        assert 0 <= r[rule]["classes_covered"] <= 6
    assert r["oracle"]["selection_precision"] == 1.0 and r["oracle"]["auroc"] == 1.0
    assert r["oracle"]["classes_covered"] == 6
    assert (out / "results_mismatch.json").exists() and (out / "results.md").exists()
    for path in r["pictures"].values():
        assert (out / path).stat().st_size > 0 and path.endswith(".png")
    # one teacher per seed, in its own folder; the per-seed teacher acc1 is that teacher's
    teacher_acc = []
    for seed in (0, 1):
        tdir = out / f"teacher_6cls_seed{seed}"
        info = json.load(open(tdir / "teacher.json"))
        assert (tdir / "teacher.pth").exists() and info["seed"] == seed
        teacher_acc.append(info["acc1"])
        # the per-epoch progress line reached the terminal, not only the log file
        assert re.search(rf"teacher seed {seed} epoch 1/1: test acc1 [\d.]+%.*\d+s", printed), printed
    assert r["teacher_checkpoints"] == [str(out / f"teacher_6cls_seed{s}" / "teacher.pth") for s in (0, 1)]
    assert r["teacher_acc1_per_seed"] == teacher_acc
    assert r["teacher_acc1"] == pytest.approx(np.mean(teacher_acc))
    assert r["teacher_acc1_sd"] == pytest.approx(np.std(teacher_acc, ddof=1))
    student_lines = re.findall(r"student (\d+)/14: (\w+) +seed (\d): acc1 ([\d.]+)% .*?([\d.]+) min", printed)
    assert sorted(int(n) for n, *_ in student_lines) == list(range(1, 15))    # one line per student
    assert "min left" in printed
    for rule in demo.RULES:
        x = r[rule]
        assert [p["seed"] for p in x["per_seed"]] == [0, 1]
        for field in ("selection_precision", "auroc", "classes_covered", "jaccard_with_outlier", "student_acc1"):
            values = [p[field] for p in x["per_seed"]]
            assert x[f"{field}_per_seed"] == values, (rule, field)
            assert x[field] == pytest.approx(np.mean(values)), (rule, field)
            assert x[f"{field}_sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-12), (rule, field)
        # the printed accuracy is the one the results hold
        got = {int(seed): float(acc) for _, name, seed, acc, _ in student_lines if name == rule}
        assert got == pytest.approx({p["seed"]: round(p["student_acc1"], 2) for p in x["per_seed"]}, abs=0.006)
        assert all(p["teacher_acc1"] == teacher_acc[i] for i, p in enumerate(x["per_seed"]))
    assert r["oracle"]["selection_precision_per_seed"] == [1.0, 1.0]
    assert r["outlier"]["jaccard_with_outlier_per_seed"] == [1.0, 1.0]
    for key, per in zip(r["auroc_diagnostics_sd"], zip(*[d.values() for d in r["auroc_diagnostics_per_seed"]])):
        assert r["auroc_diagnostics_sd"][key] == pytest.approx(np.std(per, ddof=1), abs=1e-12)
    md = (out / "results.md").read_text()
    assert "mean ± sample sd (ddof=1)" in md and f"{r['outlier']['student_acc1_sd']:.2f}" in md


def test_compare_spread_criterion():
    # +2 in every seed, both sds and the sd of the differences below 2: beyond the spread
    c = demo.compare([62.0, 63.0, 64.0], [60.0, 61.0, 62.0])
    assert c["diff"] == pytest.approx(2.0) and c["diff_per_seed"] == [2.0, 2.0, 2.0] and c["beyond_spread"]
    # the same mean difference, one seed the other way: not beyond
    assert not demo.compare([62.0, 63.0, 58.0], [60.0, 61.0, 62.0])["beyond_spread"]
    # same sign everywhere, but one rule's own sd (2.8) exceeds the difference (2.0)
    c = demo.compare([58.5, 63.1, 63.5], [56.5, 61.1, 61.5])
    assert c["diff"] == pytest.approx(2.0) and not c["beyond_spread"]
    c = demo.compare([60.0, 61.0, 62.0], [62.0, 63.0, 64.0])
    assert c["diff"] == pytest.approx(-2.0) and c["beyond_spread"]


def test_ablation_pd_config():
    cfg = demo.resolve_config(demo.get_args_parser().parse_args(["--ablation", "pd"]))
    assert cfg["pools"] == [("mismatch", 0.2), ("far-ood", 0.25)] and cfg["seeds"] == [0, 1, 2]
    assert cfg["rules"] == list(demo.ABLATIONS["pd"]) and cfg["student_epochs"] == 25
    # every selection appears with and without PD
    specs = {demo.RULE_SPECS[r] for r in cfg["rules"]}
    assert {(how, pd) for how, _, pd in specs} == {(h, pd) for h in ("random", "outlier", "probe", "oracle")
                                                   for pd in (False, True)}
    plain = demo.resolve_config(demo.get_args_parser().parse_args([]))
    assert plain["rules"] == list(demo.RULES) and plain["seeds"] == [0] and plain["pools"] == [("mismatch", 0.2)]


def test_tiny_ablation_pd_swaps_images_and_loss(tmp_path):
    out = tmp_path / "abl"
    demo.main(["--tiny", "--ablation", "pd", "--pool", "mismatch", "--seeds", "0", "1", "--keep_ratio", "0.5",
               "--out", str(out), "--threads", "1", "--device", "cpu"])
    r = json.load(open(out / "results_mismatch.json"))
    p = r["pool"]
    assert p["num_select"] == round(0.5 * p["in_domain"]) and p["keep_ratio"] == 0.5
    assert r["oracle_pd"]["selection_precision_per_seed"] == [1.0, 1.0]
    rules_dir = out / "mismatch" / "rules"
    for rule in demo.ABLATIONS["pd"]:
        how, balanced, pd = demo.RULE_SPECS[rule]
        for seed in (0, 1):
            a = json.load(open(rules_dir / rule / f"student_seed{seed}" / "args.json"))
            assert a["attnprobe_dist"] == pd and a["attnprobe_sel"] == (how == "probe"), rule
            assert a["random"] == (how == "random") and a["num_select"] == p["num_select"], rule
    for seed in (0, 1):   # the same images with and without PD
        for x, y in (("outlier", "outlier_pd"), ("probe", "probe_nopd"), ("random", "random_pd")):
            ix, iy = (torch.load(rules_dir / z / f"selected_seed{seed}" / "selection.pt", weights_only=True)
                      ["indices"] for z in (x, y))
            assert torch.equal(ix, iy), (x, y, seed)
    pairs = {(c["a"], c["b"]): c for c in r["comparisons"]}
    for a, b, _ in demo.ABLATION_PAIRS["pd"]:
        c = pairs[(a, b)]
        assert c == {**demo.compare(r[a]["student_acc1_per_seed"], r[b]["student_acc1_per_seed"]),
                     "a": a, "b": b, "what": c["what"]}
    assert "| probe − outlier_pd | probe's images vs outlier's, with PD |" in (out / "results.md").read_text()
