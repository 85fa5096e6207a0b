"""select_data.py: scores equal an independent computation of the paper's score; selection rules; reuse."""
import os
import subprocess
import sys

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import fixtures as fx
import select_data
import selection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_base_teacher(path, num_classes=10, seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=3,
                              qkv_bias=True, num_classes=num_classes)
    torch.save({"model": model.state_dict()}, path)
    return model.eval()


def run_select(*flags, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "select_data.py"), "--workers", "0", *flags],
                          capture_output=True, text=True, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sel")
    paths = fx.write_blob_pool(tmp / "pool")
    teacher = save_base_teacher(tmp / "teacher.pth")
    proc = run_select("--data_imagenet", str(tmp / "pool"), "--teacher", "deit_base_patch4_32_teacher",
                      "--teacher_dir", str(tmp / "teacher.pth"), "--num_select", "10",
                      "--selected_file", str(tmp / "sel"), "--attnprobe_sel", "--chunk_size", "7")
    return tmp, paths, teacher, proc


def test_scores_match_direct_computation(scored):
    tmp, paths, teacher, _ = scored
    expected = fx.direct_scores(teacher, paths)
    for key in ("value_out", "value_blk3", "value_blk7"):
        got = torch.load(tmp / "sel" / f"{key}.pth", weights_only=True)
        assert got.shape == (len(paths),)
        assert torch.allclose(got, expected[key], atol=1e-4), key
    assert torch.equal(torch.load(tmp / "sel" / "pred_out.pth", weights_only=True), expected["pred_out"])


def test_attnprobe_selection_uses_the_probe(scored):
    tmp, paths, teacher, proc = scored
    expected = fx.direct_scores(teacher, paths)
    value = 0.05 * (expected["value_blk3"] + expected["value_blk7"]) + 0.9 * expected["value_out"]
    want = [os.path.relpath(paths[i], tmp / "pool") for i in torch.argsort(value)[:10].tolist()]
    assert (tmp / "sel" / "selected.txt").read_text().split() == want
    weights = torch.load(tmp / "sel" / "class_weights.pth", weights_only=True)
    assert weights.shape == (10,) and weights.sum().item() == pytest.approx(10, rel=1e-5)
    assert "attention probe" in proc.stdout


def test_reuse_and_rules_without_rescoring(scored):
    tmp, paths, teacher, _ = scored
    before = os.path.getmtime(tmp / "sel" / "value_out.pth")
    common = ["--data_imagenet", str(tmp / "pool"), "--teacher", "deit_base_patch4_32_teacher",
              "--teacher_dir", str(tmp / "teacher.pth"), "--selected_file", str(tmp / "sel")]
    # outlier rule (no --attnprobe_sel): value_out alone
    run_select(*common, "--num_select", "5")
    expected = fx.direct_scores(teacher, paths)
    want = [os.path.relpath(paths[i], tmp / "pool") for i in torch.argsort(expected["value_out"])[:5].tolist()]
    assert (tmp / "sel" / "selected.txt").read_text().split() == want
    # random: distinct indices inside the real pool
    run_select(*common, "--num_select", "20", "--random", "--seed", "3")
    sel = torch.load(tmp / "sel" / "selection.pt", weights_only=True)
    idx = sel["indices"].tolist()
    assert len(set(idx)) == 20 and all(0 <= i < len(paths) for i in idx)
    assert os.path.getmtime(tmp / "sel" / "value_out.pth") == before


def test_per_class_balanced_selection():
    value = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    pred = torch.tensor([0, 0, 0, 0, 1, 1, 2, 0])
    usable = torch.ones(8, dtype=torch.bool)
    # best 1 per class -> 0 (class 0), 4 (class 1), 6 (class 2); then fill from the global order: 1
    got = selection.select_indices(value, usable, 4, pred, per_class=1)
    assert got.tolist() == [0, 1, 4, 6]
    # a class running short is filled from the global order
    got = selection.select_indices(value, usable, 6, pred, per_class=2)
    assert sorted(got.tolist()) == [0, 1, 2, 4, 5, 6]
    # skipped images are never chosen
    usable[0] = False
    assert 0 not in selection.select_indices(value, usable, 7, pred).tolist()


def test_fingerprint_mismatch_is_refused(scored, tmp_path):
    tmp, paths, _, _ = scored
    save_base_teacher(tmp_path / "other.pth", seed=1)
    proc = run_select("--data_imagenet", str(tmp / "pool"), "--teacher", "deit_base_patch4_32_teacher",
                      "--teacher_dir", str(tmp_path / "other.pth"), "--num_select", "5",
                      "--selected_file", str(tmp / "sel"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: score files in") and "teacher checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tar_shard_pool_scores_like_the_folder(scored, tmp_path):
    """WebDataset-style shards: streamed without unpacking, ids 'shard.tar:key', same scores as the files."""
    import tarfile
    tmp, paths, _, _ = scored
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(s * 12, (s + 1) * 12):
                ext = os.path.splitext(paths[i])[1]
                tar.add(paths[i], arcname=f"sample{i:03d}{ext}")
                caption = tmp_path / "caption.txt"
                caption.write_text("a caption")
                tar.add(caption, arcname=f"sample{i:03d}.txt")
    run_select("--data_imagenet", str(shards), "--teacher", "deit_base_patch4_32_teacher",
               "--teacher_dir", str(tmp / "teacher.pth"), "--num_select", "10",
               "--selected_file", str(tmp_path / "sel"), "--attnprobe_sel")
    for key in ("value_out", "value_blk3", "value_blk7"):
        assert torch.allclose(torch.load(tmp_path / "sel" / f"{key}.pth", weights_only=True),
                              torch.load(tmp / "sel" / f"{key}.pth", weights_only=True), atol=1e-6), key
    ids = (tmp_path / "sel" / "selected.txt").read_text().split()
    assert all(":" in i and i.split(":")[0] in ("00000.tar", "00001.tar") for i in ids)
    # the same images, best first: sample numbers are the folder pool's indices
    scores = {k: torch.load(tmp / "sel" / f"{k}.pth", weights_only=True) for k in ("value_out", "value_blk3", "value_blk7")}
    value = 0.05 * (scores["value_blk3"] + scores["value_blk7"]) + 0.9 * scores["value_out"]
    assert [int(i.split("sample")[1][:3]) for i in ids] == torch.argsort(value)[:10].tolist()


def test_default_decoding_scores_equal_the_published_transform(tmp_path):
    """Photos of other sizes than the teacher's: our decode + resize (cache and on-the-fly) score exactly
    like PIL convert('RGB') + torchvision Resize((32, 32)) + ToTensor + Normalize; --fast_decode does not."""
    from fixtures import encode, smooth_rgb, write_bytes
    sizes = [(500, 375), (333, 500), (64, 64), (1024, 768), (100, 37), (17, 40)]
    for i, (w, h) in enumerate(sizes):
        write_bytes(tmp_path / "pool" / f"img{i}.jpg", encode(smooth_rgb(w, h, 10 + i), "JPEG", quality=90))
    paths = [str(tmp_path / "pool" / f"img{i}.jpg") for i in range(len(sizes))]
    teacher = save_base_teacher(tmp_path / "teacher.pth")
    expected = fx.direct_scores(teacher, paths, resize=32)
    common = ["--data_imagenet", str(tmp_path / "pool"), "--teacher", "deit_base_patch4_32_teacher",
              "--teacher_dir", str(tmp_path / "teacher.pth"), "--num_select", "3", "--attnprobe_sel"]
    runs = {"cache": [], "on_the_fly": ["--no_cache"], "fast": ["--fast_decode"]}
    got = {}
    for name, flags in runs.items():
        run_select(*common, "--selected_file", str(tmp_path / name), *flags)
        got[name] = {k: torch.load(tmp_path / name / f"{k}.pth", weights_only=True)
                     for k in ("value_out", "value_blk3", "value_blk7", "pred_out")}
    assert (tmp_path / "cache" / "pool_cache_32px_3ch").is_dir() and (tmp_path / "fast" / "pool_cache_32px_3ch_fast").is_dir()
    for name in ("cache", "on_the_fly"):
        for key in ("value_out", "value_blk3", "value_blk7"):
            assert torch.allclose(got[name][key], expected[key], atol=1e-4), (name, key)
        assert torch.equal(got[name]["pred_out"], expected["pred_out"]), name
    # the reduced-scale decoding is measurably another computation (else this test could not fail)
    assert (got["fast"]["value_out"] - expected["value_out"]).abs().max() > 1e-4
    # scores of one decoding are never reused for the other
    proc = run_select(*common, "--selected_file", str(tmp_path / "cache"), "--fast_decode", check=False)
    assert proc.returncode == 2 and "image decoding (--fast_decode)" in proc.stderr


def _select_with_scores(scored, dst, pred, value, *flags):
    """Select from the generated pool's real score files with the teacher's predictions and confidences
    replaced by `pred` / `value` (a teacher that is sure of some classes only) -> (stdout, selection.pt)."""
    import contextlib
    import io
    import shutil
    tmp, paths, _, _ = scored
    shutil.copytree(tmp / "sel", dst)
    torch.save(torch.as_tensor(pred), dst / "pred_out.pth")
    torch.save(torch.as_tensor(value, dtype=torch.float32), dst / "value_out.pth")
    args = select_data.get_args_parser().parse_args(
        ["--data_imagenet", str(tmp / "pool"), "--teacher", "deit_base_patch4_32_teacher", "--teacher_dir",
         str(tmp / "teacher.pth"), "--selected_file", str(dst), "--workers", "0", "--device", "cpu", *flags])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        select_data.main(args)
    return out.getvalue(), torch.load(dst / "selection.pt", weights_only=True)


def test_class_collapse_warns_and_is_recorded(scored, tmp_path):
    n = len(scored[1])                                            # 24 images, a 10-class teacher
    # the teacher is most confident on class 0: the 10 best images are all class 0, the other
    # classes are in the pool (images 12..23) but less confident
    pred = [0] * 12 + [i % 10 for i in range(12, n)]
    out, sel = _select_with_scores(scored, tmp_path / "sel", pred, list(range(n)), "--num_select", "10")
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "class collapse: 9 of 10" in warnings[0] and "--per_class 1" in warnings[0]
    assert "1: 0" in warnings[0] and "9: 0" in warnings[0] and "0: 10" not in warnings[0]
    assert sel["collapsed_classes"] == [(c, 0) for c in range(1, 10)]
    # the way out the warning names: balanced, every class is kept and nothing is said
    out, sel = _select_with_scores(scored, tmp_path / "sel_balanced", pred, list(range(n)),
                                   "--num_select", "10", "--per_class", "1")
    assert "warning:" not in out and sel["collapsed_classes"] == []
    assert sorted(sel["pred"].tolist()) == list(range(10))


def test_balanced_selection_is_silent(scored, tmp_path):
    n = len(scored[1])
    pred = [i % 10 for i in range(n)]                             # the best 10 cover every class once
    out, sel = _select_with_scores(scored, tmp_path / "sel", pred, list(range(n)), "--num_select", "10")
    assert "warning:" not in out and sel["collapsed_classes"] == []
    # the threshold is a tenth of an even share: 20 kept of 10 classes (2 each), a class with 0 is lost
    assert selection.class_collapse(torch.tensor([0] * 4 + [1, 2, 3, 4, 5, 6, 7, 8] * 2), 10) == [(9, 0)]
    assert selection.class_collapse(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2), 10) == []
