import math
from types import SimpleNamespace

import pytest
import torch

from losses import TERMS, LossConfig, NoiseAdaptation, kdloss, patch_attention_probe_loss, robust_kdloss


def test_kd_zero_for_equal_logits_and_known_value():
    s = torch.randn(4, 10)
    assert kdloss(s, s).abs().item() < 1e-5
    # two classes, T=1: KL([0.5,0.5] ‖ softmax([ln 3, 0]) = [0.75, 0.25])
    y, t = torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kdloss(y, t, T=1).item() == pytest.approx(expected, rel=1e-5)
    # T scaling: T² times KL of the softened distributions, batch mean
    y2 = torch.tensor([[4 * math.log(3.0), 0.0]] * 3)
    assert kdloss(y2, torch.zeros(3, 2), T=4).item() == pytest.approx(16 * expected, rel=1e-5)


def test_robust_kd_weights_per_sample():
    torch.manual_seed(0)
    y, t = torch.randn(5, 6), torch.randn(5, 6)
    assert robust_kdloss(y, t, torch.ones(5)).item() == pytest.approx(kdloss(y, t).item(), rel=1e-5)
    w = torch.tensor([2.0, 0, 0, 0, 0])
    assert robust_kdloss(y, t, w).item() == pytest.approx(2 * kdloss(y[:1], t[:1]).item() / 5, rel=1e-5)


def test_loss_config_picks_each_term_by_name():
    """LossConfig: KD plain, or robust when per-image weights come; PD's variant of losses.TERMS by name;
    the published ones by default, and each field from the stage-2 flag of its name."""
    torch.manual_seed(0)
    s, t, w = torch.randn(5, 6), torch.randn(5, 6), torch.rand(5)
    assert LossConfig().kd(s, t).item() == kdloss(s, t).item()
    assert LossConfig().kd(s, t, w).item() == robust_kdloss(s, t, w).item() != kdloss(s, t).item()
    assert LossConfig(temperature=2).kd(s, t).item() == kdloss(s, t, T=2).item() != kdloss(s, t).item()
    f, g = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 4)
    assert LossConfig().pd(f, g).item() == patch_attention_probe_loss(f, g).item()
    assert (LossConfig().patchattn, LossConfig().temperature) == (0.8, 4)
    flags = SimpleNamespace(pd_loss="cls_gram", patchattn=0.3, attnprobe_dist=False, robust=True)
    assert LossConfig.from_flags(flags) == LossConfig(patchattn=0.0)          # no PD without --attnprobe_dist
    with_pd = SimpleNamespace(**{**vars(flags), "attnprobe_dist": True})
    assert LossConfig.from_flags(with_pd) == LossConfig(patchattn=0.3)
    with pytest.raises(KeyError):
        LossConfig(pd_loss="nope").pd(f, g)
    import distill
    parser = distill.get_args_parser()
    assert parser.parse_args([]).pd_loss == "cls_gram"      # --pd_loss offers every PD variant of the table
    assert next(a for a in parser._actions if a.dest == "pd_loss").choices == list(TERMS["pd"])


def test_probe_loss_zero_and_known_value():
    f = torch.randn(3, 2, 5, 8)
    assert patch_attention_probe_loss(f, f.clone()).item() == 0
    # independent of width: the student may be narrower than the teacher
    assert patch_attention_probe_loss(f, torch.randn(3, 2, 5, 4)).item() > 0
    # hand case: L=B=1, N=2, C=1; token-axis normalisation makes f = [a, b]/|(a,b)|
    ft = torch.tensor([3.0, 4.0]).view(1, 1, 2, 1)    # normalised -> [0.6, 0.8], g = 0.48
    fs = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)    # -> [1, 0], g = 0
    assert patch_attention_probe_loss(ft, fs).item() == pytest.approx(0.48 ** 2, rel=1e-6)
    # lists of per-block tensors are accepted as the published code passes them
    assert patch_attention_probe_loss(list(f), list(f)).item() == 0


def test_noise_adaptation_matrix():
    na = NoiseAdaptation(4, 0.8)
    with torch.no_grad():
        na.theta.copy_(torch.randn(4, 3))
    q = na.transition()
    assert torch.allclose(q.sum(1), torch.ones(4), atol=1e-6)
    assert torch.allclose(q.diagonal(), torch.full((4,), 0.8))
    # row 1 off-diagonal = 0.2 · softmax(theta[1]) placed in columns 0, 2, 3
    assert torch.allclose(q[1, [0, 2, 3]], 0.2 * na.theta[1].softmax(0), atol=1e-6)
    # at start (theta = 0) the off-diagonal mass is spread evenly
    assert torch.allclose(NoiseAdaptation(4, 0.8).transition()[0, 1:], torch.full((3,), 0.2 / 3))


def test_noise_adaptation_loss_and_grad():
    na = NoiseAdaptation(3, 0.9)
    s = torch.tensor([[10.0, -10, -10]], requires_grad=True)
    t = torch.tensor([[5.0, 0, 0]])
    # student sure of class 0 -> probs @ Q ≈ row 0 of Q -> loss = -log 0.9
    assert na(s, t).item() == pytest.approx(-math.log(0.9), rel=1e-4)
    na(s, torch.tensor([[0.0, 5, 0]])).backward()
    assert na.theta.grad is not None and na.theta.grad.abs().sum() > 0


def test_noise_adaptation_is_cheap_for_1000_classes():
    na = NoiseAdaptation(1000, 0.81)
    q = na.transition()
    assert q.shape == (1000, 1000) and torch.allclose(q.sum(1), torch.ones(1000), atol=1e-5)
