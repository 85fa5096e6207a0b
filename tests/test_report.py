"""The selection report (report.py, tools/show_selection.py) and a run's curves (plots.py): what the pictures
and the page say equals what was selected."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures as fx
import plots
import pool
import pool_share
import report
from select_data import rank_pool
from selection import RULE_SETTINGS, SELECTION_FILE, select_indices

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A 32-px pool with broken files, scored and selected by select_data.py (report drawn)."""
    base = tmp_path_factory.mktemp("report")
    fx.write_pool(base / "pool", 120, size=40, broken=3)
    fx.write_teacher(base / "teacher.pth")
    common = ["--data_imagenet", base / "pool", "--teacher", fx.TEACHER, "--teacher_dir", base / "teacher.pth",
              "--selected_file", base / "sel", "--workers", "0"]
    proc = fx.run_script("select_data.py", *common, "--num_select", "30", "--attnprobe_sel")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, common, proc


def test_report_counts_are_the_selection_and_the_cut_is_its_threshold(scored):
    base, _, proc = scored
    sel = fx.assert_report_is_the_selection(base / "sel")
    assert proc.stdout.count("report: ") == 1
    with Image.open(base / "sel/report/probe_heatmaps.png") as im:
        assert im.height > im.width   # 8 image rows (4 kept, 4 dropped) of 3 panels
    _, _, skipped, cut = fx.report_page(base / "sel/report/report.md")
    assert skipped == 3
    assert cut == pytest.approx(float(sel["value"].max()), rel=1e-5)   # the threshold of the ranking
    text = (base / "sel/report/report.md").read_text()
    assert "broken/zero_0000.jpg" in text and "--attnprobe_sel" in text


def test_report_estimates_the_teachers_domain_and_says_what_the_demo_measured(scored):
    """report.md: the `mixture` estimate of the in-domain images from the stored value_out, with the error it had
    on the demo's pools and the grid's sentence for the nearest measured share."""
    base, _, _ = scored
    text = (base / "sel/report/report.md").read_text()
    value_out = torch.load(base / "sel" / "value_out.pth", weights_only=True)
    pred = torch.load(base / "sel" / "pred_out.pth", weights_only=True)
    usable = torch.isfinite(value_out) & (pred >= 0)
    count = pool_share.mixture_estimate(value_out, usable)
    assert f"the teacher's domain: about {count:,.0f} of the 117 usable images" in text
    assert f"off by up to {100 * pool_share.MEASURED_ERROR['mixture']:.0f} %" in text
    share = count / 117
    nearest = min(pool_share.GRID_SAYS, key=lambda row: abs(row[0] - share))
    assert f"what the demo measured at share {nearest[0]:g}, every student with probe distillation: {nearest[1]}" in text


def test_grid_sentence_of_the_nearest_measured_share():
    usable = torch.ones(1000, dtype=torch.bool)
    for share, sentence in pool_share.GRID_SAYS:
        value = torch.cat([torch.full((round(share * 1000),), 1e-4), torch.full((1000 - round(share * 1000),), 1.5)])
        value = value * torch.exp(torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.1)
        lines = pool_share.report_lines(value, usable)
        assert lines[1].endswith(sentence), (share, lines)


def test_the_histogram_cut_line_is_drawn_at_the_threshold(scored, tmp_path):
    base, _, _ = scored
    sel = torch.load(base / "sel" / SELECTION_FILE, weights_only=True)
    s = SimpleNamespace(selected_file=str(base / "sel"), **{RULE_SETTINGS[k]: v for k, v in sel["settings"].items()})
    out = report.draw(s, rank_pool(s, 120), sel["indices"], sel["rule"], 10, pool.list_pool(base / "pool"),
                      out_dir=tmp_path / "r")
    # drawn on the combined score's panel (the one --attnprobe_sel ranks by), at the largest kept value
    (title, x), = out["cut_lines"].items()
    assert title.startswith("combined") and x == pytest.approx(float(sel["value"].double().max()), rel=1e-6)
    assert "probe_heatmaps" not in out["files"]   # no teacher given


def test_show_selection_redraws_what_select_data_would_choose(scored, tmp_path):
    """Another --num_select / --per_class / --rule: the redrawn page equals select_data's own selection."""
    base, common, _ = scored
    for flags in (["--num_select", "40", "--per_class", "3"], ["--num_select", "25", "--rule", "entropy"]):
        out = tmp_path / flags[-1]
        proc = fx.run_script("tools/show_selection.py", base / "sel", *flags, "--out", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "report: " in proc.stdout
        kept, table, _, cut = fx.report_page(out / "report.md")
        assert "the teacher's domain: about" in (out / "report.md").read_text()   # the estimate, redrawn too
        # the same flags through select_data.py (reusing the scores) write the selection.pt to compare with
        probe = [] if "--rule" in flags else ["--attnprobe_sel"]   # a --rule ranks by its own score
        again = fx.run_script("select_data.py", *common, *flags, "--no_report", *probe)
        assert again.returncode == 0 and "report: " not in again.stdout, again.stderr[-3000:]
        sel = torch.load(base / "sel" / SELECTION_FILE, weights_only=True)
        assert kept == len(sel["indices"])
        assert {c: k for c, (_, k) in table.items() if k} == {
            c: int(n) for c, n in enumerate(torch.bincount(sel["pred"], minlength=10)) if n}
        if "--per_class" in flags:
            assert cut is None   # class-balanced: no single cut
        # back to the stored selection the next flags are relative to
        back = fx.run_script("select_data.py", *common, "--num_select", "30", "--attnprobe_sel", "--no_report")
        assert back.returncode == 0, back.stderr[-3000:]


def test_a_1000_class_teacher_gives_readable_pictures(tmp_path):
    """Synthetic scores of a 1,000-class teacher: sorted class bars, a contact sheet of 20 classes."""
    n, classes = 400, 1000
    fx.write_pool(tmp_path / "pool", n, size=24, subfolders=2)
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "sel"
    folder.mkdir()
    value = torch.rand(n, generator=g) + 0.5
    pred = torch.randint(0, classes, (n,), generator=g)
    for name, t in (("value_out", value), ("pred_out", pred), ("value_blk3", torch.rand(n, generator=g)),
                    ("value_blk7", torch.rand(n, generator=g))):
        torch.save(t, folder / f"{name}.pth")
    (folder / "scores_meta.json").write_text(json.dumps({"pool_size": n, "nb_classes": classes, "img_size": 24,
                                                         "in_chans": 3}))
    s = SimpleNamespace(selected_file=str(folder), rule="published", attnprobe_sel=False, attnlier=0.05, outlier=0.9,
                        probe_blocks=(3, 7), probe_head=0, num_select=100, per_class=None, random=False, seed=0)
    chosen = select_indices(value.double(), torch.ones(n, dtype=torch.bool), 100)
    out = report.draw(s, rank_pool(s, n), chosen, "outlier (confidence)", classes, pool.list_pool(tmp_path / "pool"))
    sheet = report._sheet_classes(torch.bincount(pred, minlength=classes))
    assert len(sheet) == report.SHEET_CLASSES
    with Image.open(out["files"]["contact_sheet"]) as im:
        width = (1.5 + (3 * report.SHEET_IMAGES + 2) * 0.8) * plots.DPI
        assert abs(im.width - width) <= 2 and im.height > 10 * 0.8 * plots.DPI   # 20 rows
    with Image.open(out["files"]["classes"]) as im:
        assert im.size == (10 * plots.DPI, 3.6 * plots.DPI)
    kept, table, _, cut = fx.report_page(folder / "report" / "report.md")
    assert kept == 100 and sum(k for _, k in table.values()) == 100 and len(table) == len(torch.unique(pred))
    assert cut == pytest.approx(float(value[chosen].max()), rel=1e-5)
    (title, x), = out["cut_lines"].items()
    assert title.startswith("value_out")   # without --attnprobe_sel the ranking is value_out


def test_curves_follow_the_log(tmp_path):
    log = tmp_path / "log.txt"
    lines = [{"epoch": e, "train_lr": 1e-3 / (e + 1), "train_loss": 3.0 - e, "train_kd": 2.0 - e / 2,
              "train_pd": 0.1, "train_img_per_s": 900.0 + e, **({"test_acc1": 10.0 * e, "test_acc5": 30.0 + e}
                                                               if e % 2 else {})} for e in range(4)]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 4, "train_lo')   # a torn last line
    path = plots.curves(log)
    assert path == str(tmp_path / "curves.png")
    with Image.open(path) as im:
        assert im.size == (4 * 4.2 * plots.DPI, 3.0 * plots.DPI)   # losses, accuracy, lr, img/s
    teacher_log = tmp_path / "t.log.txt"
    teacher_log.write_text(json.dumps({"epoch": 0, "train_loss": 1.0}) + "\n")
    assert plots.curves(teacher_log) == str(tmp_path / "t.curves.png")
    empty = tmp_path / "empty" / "log.txt"
    empty.parent.mkdir()
    empty.write_text("")
    assert plots.curves(empty) is None and not (empty.parent / "curves.png").exists()


def test_image_sheet_lays_out_rows_and_blanks(tmp_path):
    tiles = [torch.full((1, 8, 8), 40 * i, dtype=torch.uint8) if i % 3 else None for i in range(6)]
    plots.image_sheet(tmp_path / "s.png", tiles, columns=3, captions=[str(i) for i in range(6)],
                      frames=[plots.KEPT] * 6)
    with Image.open(tmp_path / "s.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[1] == round(3 * 0.8 * plots.DPI)
    # the first tile of each row is empty: white there, a framed image beside it
    assert (rgb[rgb.shape[0] // 4, : rgb.shape[1] // 6] > 250).all()
    assert not (rgb[rgb.shape[0] // 4, rgb.shape[1] // 3: rgb.shape[1] // 2] > 250).all()
