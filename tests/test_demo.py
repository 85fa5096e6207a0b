"""demo.py / demo_pool.py: pool manifest, teacher/pool separation, metrics, and a tiny end-to-end run."""
import json
import os

import numpy as np
import pytest

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


def test_tiny_preset_results(tmp_path):
    out = tmp_path / "demo"
    demo.main(["--tiny", "--out", str(out), "--threads", "1", "--device", "cpu"])
    r = json.load(open(out / "results.json"))
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
