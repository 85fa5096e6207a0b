"""pool_share's estimators of the in-domain count, on generated score mixtures of known share."""
import torch
import pytest

import pool_share


def mixture(n, share, seed=0, sd_in=1.0, sd_out=0.5):
    """value_out of a pool: in-domain images confident (value_out ~ e^N(-4, sd_in)), the rest not
    (e^N(-0.3, sd_out)); -> (value_out (n,), in-domain mask, labelled images' value_out)."""
    g = torch.Generator().manual_seed(seed)
    k = round(share * n)
    value = torch.cat([torch.exp(torch.randn(k, generator=g) * sd_in - 4),
                       torch.exp(torch.randn(n - k, generator=g) * sd_out - 0.3)])
    relevant = torch.arange(n) < k
    labelled = torch.exp(torch.randn(3000, generator=g) * sd_in - 4)
    perm = torch.randperm(n, generator=g)
    return value[perm], relevant[perm], labelled


@pytest.mark.parametrize("share", [0.02, 0.05, 0.2, 0.6])
def test_both_estimators_recover_a_known_share(share):
    value, relevant, labelled = mixture(20000, share, seed=int(share * 100))
    usable = torch.ones(len(value), dtype=torch.bool)
    est = pool_share.estimate_in_domain(value, usable, labelled)
    truth = int(relevant.sum())
    assert set(est) == {"mixture", "labelled"}
    for name, count in est.items():
        assert abs(count - truth) / truth < 0.1, (name, count, truth)


def test_unusable_images_are_left_out_and_labelled_needs_labelled_images():
    value, relevant, labelled = mixture(10000, 0.2)
    usable = torch.ones(len(value), dtype=torch.bool)
    usable[:1000] = False
    value = value.clone()
    value[:1000] = float("inf")          # skipped images: +inf, as scoring stores them
    est = pool_share.estimate_in_domain(value, usable)
    assert set(est) == {"mixture"}
    truth = int((relevant & usable).sum())
    assert abs(est["mixture"] - truth) / truth < 0.1


def test_labelled_estimator_is_the_share_below_the_labelled_quantile():
    value = torch.tensor([0.1, 0.2, 0.3, 5.0, 6.0])
    labelled = torch.linspace(0.0, 1.0, 101)            # its 0.9 quantile: 0.9
    usable = torch.ones(5, dtype=torch.bool)
    assert pool_share.labelled_estimate(value, usable, labelled) == pytest.approx(3 / 0.9)


def test_em_finds_two_separated_components_in_order():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(3000, generator=g) * 0.5 - 5, torch.randn(7000, generator=g) * 0.5 + 1])
    weights, means, sds = pool_share.two_gaussians(x[torch.randperm(10000, generator=g)])
    assert weights.tolist() == pytest.approx([0.3, 0.7], abs=0.01)
    assert means.tolist() == pytest.approx([-5, 1], abs=0.05) and sds.tolist() == pytest.approx([0.5, 0.5], abs=0.05)
