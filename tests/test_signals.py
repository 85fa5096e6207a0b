"""signals.py and select_data's extra signal files: each signal against an independent computation on a
tiny model; the published score files and the default selection unchanged; --rule selects by its rule."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import data
import distill
import pool
import reference
import scoring
import select_data
import selection
import signals
from attention_probe import probe_forward
from utils import InputError
from tests.fixtures import MICRO, run_script_inprocess, write_pool, write_teacher


def _tiny(reg_tokens=0, seed=0, qk_norm=False):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, qkv_bias=True,
                              reg_tokens=reg_tokens, qk_norm=qk_norm, num_classes=5).eval()
    if qk_norm:   # LayerNorms start as identity maps: give them weights so the test can tell
        for blk in model.blocks:
            for norm in (blk.attn.q_norm, blk.attn.k_norm):
                torch.nn.init.normal_(norm.weight, 1.0, 0.3)
                torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    return model


def _reference(model, x):
    """Plain recomputation with hooks: full attention matrices of every head, block outputs, head input."""
    norm1, blocks, head_in = {}, {}, []
    hooks = [b.norm1.register_forward_hook(lambda m, i, o, j=j: norm1.__setitem__(j, o))
             for j, b in enumerate(model.blocks)]
    hooks += [b.register_forward_hook(lambda m, i, o, j=j: blocks.__setitem__(j, o))
              for j, b in enumerate(model.blocks)]
    hooks.append(model.head.register_forward_pre_hook(lambda m, i: head_in.append(i[0])))
    logits = model(x).double()
    for h in hooks:
        h.remove()
    p = model.num_prefix_tokens
    uni = []
    for j, b in enumerate(model.blocks):
        attn = b.attn
        B, N, C = norm1[j].shape
        qkv = attn.qkv(norm1[j]).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])                                        # (B, heads, N, hd)
        a = torch.softmax(q @ k.transpose(-2, -1) * attn.head_dim ** -0.5, dim=-1)             # (B, heads, N, N)
        row = a[:, :, 0, p:]                                                                 # (B, heads, M)
        uni.append(F.cosine_similarity(row, torch.full_like(row, 1.0), dim=-1))
    return {"energy": -torch.log(torch.exp(logits).sum(1)),
            "maxlogit": logits.max(1).values,
            "feat_norm": head_in[0].double().pow(2).sum(1).sqrt(),
            "cls_norm": torch.stack([blocks[j][:, 0].double().pow(2).sum(-1).sqrt() for j in blocks], 1),
            "tok_norm": torch.stack([blocks[j][:, p:].double().pow(2).sum(-1).sqrt().mean(1) for j in blocks], 1),
            "probe_heads": torch.stack(uni, 1)}, logits


@pytest.mark.parametrize("reg_tokens,qk_norm", [(0, False), (1, False), (0, True)])
def test_signals_match_independent_computation(reg_tokens, qk_norm):
    model = _tiny(reg_tokens, qk_norm=qk_norm)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        got = signals.batch_signals(probe_forward(model, x, probe_blocks=(1, 3), extras=True))
        want, logits = _reference(model, x)
        flipped = model(torch.flip(x, dims=[3])).double()
        flip = signals.flip_signals(logits, flipped)
    assert got["probe_heads"].shape == (6, 4, 2) and got["cls_norm"].shape == (6, 4)
    for name, value in want.items():
        assert torch.allclose(got[name].double(), value.double(), atol=1e-5, rtol=1e-5), name
    p, q = logits.softmax(1), flipped.softmax(1)
    assert torch.allclose(flip["flip_kl"].double(), (p * (p / q).log()).sum(1), atol=1e-6)
    assert flip["flip_agree"].tolist() == (p.argmax(1) == q.argmax(1)).double().tolist()


def test_extras_leave_logits_and_probe_rows_bit_identical():
    model = _tiny()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        plain = probe_forward(model, x, probe_blocks=(1, 3), head=1)
        extra = probe_forward(model, x, probe_blocks=(1, 3), head=1, extras=True)
    assert torch.equal(plain.logits, extra.logits)
    for b in (1, 3):
        assert torch.equal(plain.probes[b], extra.probes[b])
    assert plain.pre_logits is None and extra.pre_logits.shape == (5, 32)


def _knn_brute(feats, pred, value_out, k, frac, cap):
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    out = np.full(len(pred), np.inf)
    for c in np.unique(pred):
        members = np.nonzero(pred == c)[0]
        n_core = max(1, min(cap, int(round(frac * len(members)))))
        core = members[np.argsort(value_out[members], kind="stable")[:n_core]]
        for i in members:
            sims = sorted((float(f[i] @ f[j]) for j in core if j != i), reverse=True)[:k]
            out[i] = 1 - np.mean(sims) if sims else 2.0
    return out


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(90, 8)).astype(np.float32)
    pred = rng.integers(0, 3, 90)
    pred[-1] = 3                              # a class of one image: it is its own core, no neighbour
    value_out = rng.random(90)
    got = signals.knn_distance(feats, torch.from_numpy(pred), torch.from_numpy(value_out), k=3, core_frac=0.2,
                               core_max=4, chunk=7)
    want = _knn_brute(feats, pred, value_out, 3, 0.2, 4)
    assert np.allclose(got.numpy(), want, atol=1e-5)
    assert got[-1].item() == 2.0
    # unusable images are +inf and are never part of a core
    usable = torch.ones(90, dtype=torch.bool)
    usable[:5] = False
    got2 = signals.knn_distance(feats, torch.from_numpy(pred), torch.from_numpy(value_out), usable=usable)
    assert torch.isinf(got2[:5]).all() and torch.isfinite(got2[5:]).all()


def test_zscore_combination():
    cols = {"a": torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64),
            "b": torch.tensor([4.0, 0.0, 2.0, 2.0], dtype=torch.float64)}
    usable = torch.tensor([True, True, True, False])
    value = selection.combine(cols, [("a", +1), ("b", -1)], usable)
    a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 0.0, 2.0])
    want = (a - a.mean()) / a.std(ddof=1) - (b - b.mean()) / b.std(ddof=1)
    assert np.allclose(value[:3].numpy(), want) and value[3].item() == float("inf")


# ---- select_data: files of the one pass, default unchanged, --rule ------------------------------

@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sig")
    write_pool(tmp / "pool", 30, size=32)
    write_teacher(tmp / "teacher.pth", name=MICRO, num_classes=4)
    common = ["--data_imagenet", tmp / "pool", "--teacher", MICRO, "--teacher_dir", tmp / "teacher.pth",
              "--selected_file", tmp / "sel", "--workers", "0", "--device", "cpu"]
    assert run_script_inprocess("select_data.py", *common, "--num_select", "8", "--attnprobe_sel",
                                "--flip_signal") == 0
    return tmp, common


def _reference_scores(tmp):
    """The published scores by the unchanged path (no extras), one batch of the decoded pool."""
    index = pool.list_pool(str(tmp / "pool"))
    ds = pool.PoolDataset(index, 32, 3)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    import timm
    teacher = timm.create_model(MICRO, num_classes=4)
    teacher.load_state_dict(torch.load(tmp / "teacher.pth", weights_only=True)["model"])
    teacher.eval()
    mean, std = data.resolve_mean_std(None, None, 3)
    plain = scoring.score_images(teacher, images, mean, std, [3, 7], 0, extras=False)
    extra = scoring.score_images(teacher, images, mean, std, [3, 7], 0, extras=True, flip=True)
    return plain, extra


def test_published_files_and_default_selection_unchanged(scored):
    tmp, _ = scored
    plain, extra = _reference_scores(tmp)
    sel = tmp / "sel"
    for key in ("value_out", "value_blk3", "value_blk7", "pred_out"):
        assert torch.equal(torch.load(sel / f"{key}.pth", weights_only=True), plain[key]), key
        assert torch.equal(extra[key], plain[key]), key                  # extras change no published number
    want = reference.published_selection(plain["value_blk3"].double(), plain["value_blk7"].double(),
                                         plain["value_out"].double(), 8)
    assert torch.load(sel / "selection.pt", weights_only=True)["indices"].tolist() == want.tolist()
    # the extra signals sit beside them under their own names, one row per pool image
    for name in ("energy", "maxlogit", "feat_norm", "cls_norm", "tok_norm", "probe_heads", "flip_agree",
                 "flip_kl", "knn"):
        got = torch.load(sel / signals.signal_file(name), weights_only=True)
        assert got.shape[0] == 30, name
        if name != "knn":
            assert torch.allclose(got, extra[f"sig_{name}"].float(), atol=1e-5), name
    feats = np.load(sel / "prelogits_out.npy")
    assert feats.shape == (30, 32) and np.allclose(feats, extra["prelogits"].numpy(), atol=1e-2)
    knn = signals.knn_distance(feats, plain["pred_out"], plain["value_out"])
    assert torch.allclose(torch.load(sel / "sig_knn.pth", weights_only=True), knn)


def test_rule_selects_by_its_signals(scored):
    tmp, common = scored
    before = os.path.getmtime(tmp / "sel" / "value_out.pth")
    assert run_script_inprocess("select_data.py", *common, "--num_select", "8",
                                "--rule", "confidence+feat_norm") == 0
    v = torch.load(tmp / "sel" / "value_out.pth", weights_only=True).double().numpy()
    f = torch.load(tmp / "sel" / "sig_feat_norm.pth", weights_only=True).double().numpy()
    z = (v - v.mean()) / v.std(ddof=1) - (f - f.mean()) / f.std(ddof=1)
    sel = torch.load(tmp / "sel" / "selection.pt", weights_only=True)
    assert sel["indices"].tolist() == np.argsort(z, kind="stable")[:8].tolist()
    assert sel["rule"] == "signal rule confidence+feat_norm"
    # the study's rule: a flat published probe (high Σ value_blk) and large block-2 patch-token norms kept
    assert run_script_inprocess("select_data.py", *common, "--num_select", "8",
                                "--rule", "flatprobe+tok_norm_b2") == 0
    p = sum(torch.load(tmp / "sel" / f"value_blk{b}.pth", weights_only=True).double().numpy() for b in (3, 7))
    t = torch.load(tmp / "sel" / "sig_tok_norm.pth", weights_only=True)[:, 2].double().numpy()
    z = -(p - p.mean()) / p.std(ddof=1) - (t - t.mean()) / t.std(ddof=1)
    sel = torch.load(tmp / "sel" / "selection.pt", weights_only=True)
    assert sel["indices"].tolist() == np.argsort(z, kind="stable")[:8].tolist()
    # --per_class still applies on top of a rule
    assert run_script_inprocess("select_data.py", *common, "--num_select", "8", "--rule", "knn",
                                "--per_class", "1") == 0
    sel = torch.load(tmp / "sel" / "selection.pt", weights_only=True)
    knn = torch.load(tmp / "sel" / "sig_knn.pth", weights_only=True).double()
    pred = torch.load(tmp / "sel" / "pred_out.pth", weights_only=True)
    want = selection.select_indices(knn, torch.ones(30, dtype=torch.bool), 8, pred, per_class=1)
    assert torch.equal(sel["indices"], want)
    assert os.path.getmtime(tmp / "sel" / "value_out.pth") == before     # no rescoring


def test_default_pass_stores_no_signals_and_a_rule_adds_them(scored, tmp_path, capsys):
    tmp, common = scored
    args = [a if a != tmp / "sel" else tmp_path / "sel" for a in common]
    assert run_script_inprocess("select_data.py", *args, "--num_select", "8", "--attnprobe_sel") == 0
    sel = tmp_path / "sel"
    assert not list(sel.glob("sig_*.pth")) and not (sel / "prelogits_out.npy").exists()
    for key in ("value_out", "value_blk3", "value_blk7", "pred_out"):   # the same numbers as with the signals
        assert torch.equal(torch.load(sel / f"{key}.pth", weights_only=True),
                           torch.load(tmp / "sel" / f"{key}.pth", weights_only=True)), key
    value = selection.combined_value(scoring.load_scores(str(sel), [3, 7]), True)
    want = selection.select_indices(value, torch.ones(30, dtype=torch.bool), 8)
    assert torch.equal(torch.load(sel / "selection.pt", weights_only=True)["indices"], want)
    capsys.readouterr()
    # a rule whose signals were not stored: one extra pass stores them, the published files unchanged
    assert run_script_inprocess("select_data.py", *args, "--num_select", "8", "--rule", "knn") == 0
    assert "scoring again to store them" in capsys.readouterr().out
    assert torch.equal(torch.load(sel / "sig_knn.pth", weights_only=True),
                       torch.load(tmp / "sel" / "sig_knn.pth", weights_only=True))
    assert torch.equal(torch.load(sel / "value_out.pth", weights_only=True),
                       torch.load(tmp / "sel" / "value_out.pth", weights_only=True))
    # rescoring without signals drops the old ones: no rule reads signals of other scores
    assert run_script_inprocess("select_data.py", *args, "--num_select", "8", "--force") == 0
    assert not list(sel.glob("sig_*.pth"))
    assert run_script_inprocess("select_data.py", *args, "--num_select", "8", "--rule", "knn", "--random") == 2
    assert "exclude each other" in capsys.readouterr().err


def test_missing_signal_file_is_one_error(scored, capsys):
    tmp, _ = scored
    with pytest.raises(InputError, match="sig_nope.pth is missing.*--store_signals --force"):
        scoring.load_signals(str(tmp / "sel"), ["nope"])


def test_a_rule_that_reads_what_is_stored_never_rescores(scored, tmp_path, monkeypatch):
    """--rule confidence reads value_out.pth, --rule entropy the stored softmax (probs_out.npy): neither needs
    a signal, so neither runs the teacher again nor stores signals."""
    tmp, common = scored
    args = [a if a != tmp / "sel" else tmp_path / "sel" for a in common]
    assert run_script_inprocess("select_data.py", *args, "--num_select", "8") == 0   # the published files alone
    sel = tmp_path / "sel"

    def no_pass(*a, **k):
        raise AssertionError("the rule rescored the pool")
    monkeypatch.setattr(scoring, "score_pool", no_pass)
    assert run_script_inprocess("select_data.py", *args, "--num_select", "8", "--rule", "confidence") == 0
    value = torch.load(sel / "value_out.pth", weights_only=True).double()
    got = torch.load(sel / "selection.pt", weights_only=True)
    assert got["indices"].tolist() == torch.argsort(value, stable=True)[:8].tolist()
    assert run_script_inprocess("select_data.py", *args, "--num_select", "8", "--rule", "entropy") == 0
    p = np.load(sel / "probs_out.npy").astype(np.float64)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)
    got = torch.load(sel / "selection.pt", weights_only=True)
    assert got["indices"].tolist() == np.argsort(entropy, kind="stable")[:8].tolist()
    assert got["rule"] == "signal rule entropy" and not list(sel.glob("sig_*.pth"))
    assert selection.rule_needs("entropy") == ["probs"] and selection.rule_needs("knn") == ["knn"]
    assert selection.rule_needs("flatprobe+tok_norm_b2") == ["tok_norm", "value_blk"]


def test_distillation_takes_the_rule():
    import checkpoint
    args = distill.get_args_parser().parse_args(["--rule", "confidence+feat_norm"])
    assert args.rule == "confidence+feat_norm"
    assert "rule" not in checkpoint.RESUME_IGNORES       # a resume with another rule is refused


# ---- signal_study: the pre-registered choice ---------------------------------------------------------

def test_study_fixes_signs_on_the_selection_pool_and_prefers_fewer_terms():
    import signal_study as st
    rng = np.random.default_rng(0)
    relevant = rng.random(400) < 0.3
    noise = lambda: torch.from_numpy(rng.normal(size=400))                      # noqa: E731
    rel = torch.from_numpy(relevant).double()
    cols = {c: noise() for c in st.BASE if c not in ("value_out", "feat_norm")}
    cols["value_out"] = noise() - 3.0 * rel          # low for in-domain: kept as is
    cols["feat_norm"] = noise() + 0.5 * rel          # high for in-domain: sign flipped
    cols.update({"cls_norm_b0": noise(), "tok_norm_b1": noise() + 0.2 * rel, "probe_b0_h0": noise(),
                 "flip_kl": noise() - 9.0 * rel})
    signs, cands, picked = st.candidates(cols, relevant)
    assert signs["value_out"] == 1 and signs["feat_norm"] == -1
    assert picked["best_block_norm"] == "tok_norm_b1"
    usable = torch.ones(400, dtype=torch.bool)
    source = np.where(relevant, "in", "other")
    res = {st.rule_name(t): st.evaluate(selection.combine(cols, t, usable), usable, relevant, source) for t in cands}
    res["published"] = res["value_out"]
    chosen = st.choose({st.SELECTION_POOL: {st.SELECTION_SEED: res}}, cands)
    best = max(res[st.rule_name(t)]["auroc"] for t in cands if "flip_kl" not in st.rule_name(t))
    assert "flip_kl" not in st.rule_name(chosen)      # needs a second forward: not eligible
    assert res[st.rule_name(chosen)]["auroc"] >= best - st.SIMPLER_WITHIN
    assert all(len(t) >= len(chosen) for t in cands if res[st.rule_name(t)]["auroc"] >= best - st.SIMPLER_WITHIN
               and "flip_kl" not in st.rule_name(t))
