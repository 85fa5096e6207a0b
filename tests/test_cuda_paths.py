"""The fast paths on the device they are for: bf16 scoring, the inductor-compiled scorer, the compiled
(CUDA-graph) distillation step and the on-device crop + flip, each against its plain version.

Runs on CUDA and skips without it. AP_TEST_DEVICE=cpu runs the same checks on the CPU (compiling with
aot_eager instead of inductor), which is how this file itself is tested where there is no GPU.
tools/gpu_check.sh part 1 runs it on a GPU machine.
"""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import data  # noqa: E402
import distill  # noqa: E402
import engine  # noqa: E402
import fixtures  # noqa: E402
import models  # noqa: E402
import scoring  # noqa: E402
import select_data  # noqa: E402
from attention_probe import FEATURE_BLOCKS, WithFeatures  # noqa: E402
from losses import LossConfig, NoiseAdaptation  # noqa: E402

MEAN, STD = fixtures.FAST_MEAN, fixtures.FAST_STD
DEVICE = os.environ.get("AP_TEST_DEVICE", "cuda")
CUDA = DEVICE.startswith("cuda")
pytestmark = pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="no CUDA")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    import torch._dynamo
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_bf16_scores_agree_with_fp32_on_device():
    model = fixtures.peaked_vit().to(DEVICE)
    images = fixtures.uint8_images(256).to(DEVICE)
    fp32 = scoring.score_images(model, images, MEAN, STD, (3, 7), 0)
    bf16 = scoring.score_images(model, images, MEAN, STD, (3, 7), 0, amp_dtype=torch.bfloat16)
    assert bf16["value_out"].device.type == torch.device(DEVICE).type
    assert not torch.equal(fp32["value_out"], bf16["value_out"]), "autocast had no effect: bf16 not exercised"
    # the tolerances of test_fast_paths' CPU check: bf16 keeps 8 mantissa bits through 8 blocks
    assert torch.allclose(bf16["value_out"], fp32["value_out"], rtol=0.03, atol=0.02)
    for b in (3, 7):
        assert torch.allclose(bf16[f"value_blk{b}"], fp32[f"value_blk{b}"], atol=5e-3)
    assert (bf16["pred_out"] == fp32["pred_out"]).float().mean() >= 0.9


def test_compiled_scorer_matches_eager_on_device():
    model = fixtures.peaked_vit(depth=3, dim=32).to(DEVICE)
    images = fixtures.uint8_images(64).to(DEVICE)
    eager = scoring.score_images(model, images, MEAN, STD, (1, 2), 0)
    backend = "inductor" if CUDA else "aot_eager"   # inductor's C++ build takes minutes on a shared CPU
    compiled = torch.compile(scoring.score_images, backend=backend, dynamic=False)
    out = compiled(model, images, MEAN, STD, (1, 2), 0)
    for key in ("value_out", "value_blk1", "value_blk2", "probs"):
        assert torch.allclose(out[key], eager[key], atol=2e-4, rtol=0), key
    assert (out["pred_out"] == eager["pred_out"]).float().mean() >= 0.98   # ties may flip under fused kernels


def _distill_steps(compiled, steps=3, seed=0):
    """distill.py's step as it runs there (fused AdamW on CUDA, compiled student and teacher modules),
    on a fixed batch sequence; returns the per-step losses and the student's weight change (flat)."""
    torch.manual_seed(seed)
    teacher = models.create("deit_tiny_patch4_32_teacher", 10).to(DEVICE).eval().requires_grad_(False)
    student = models.create("deit_tiny_patch4_32", 10).to(DEVICE)
    noise = NoiseAdaptation(10, 0.7630).to(DEVICE)
    before = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    student_net, teacher_net = WithFeatures(student, FEATURE_BLOCKS), WithFeatures(teacher, FEATURE_BLOCKS)
    if compiled:
        kw = dict(mode="reduce-overhead") if CUDA else dict(backend="aot_eager")
        student_net, teacher_net = torch.compile(student_net, **kw), torch.compile(teacher_net, **kw)
    fused = {"fused": True} if CUDA else {}
    opts = [torch.optim.AdamW(student.parameters(), lr=1e-3, **fused), torch.optim.AdamW(noise.parameters(), lr=1e-3)]
    augment = engine.Augment(MEAN, STD, 4)
    augment.seed(seed, torch.device(DEVICE))
    losses = []
    for step in range(steps):
        x = augment(fixtures.uint8_images(16, seed=10 + step).to(DEVICE))
        out = distill.distill_step(x, teacher_net, student_net, noise, LossConfig(patchattn=0.8))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        for opt in opts:
            opt.step()
        losses.append(out["loss"].detach().float().item())
    return losses, torch.cat([p.detach().flatten() for p in student.parameters()]) - before


def test_compiled_distill_step_matches_eager_on_device():
    eager_losses, eager_step = _distill_steps(compiled=False)
    comp_losses, comp_step = _distill_steps(compiled=True)
    assert all(torch.isfinite(torch.tensor(comp_losses)))
    assert eager_losses[0] != eager_losses[-1]          # the steps changed the student
    # same weights at step 0: only kernel rounding differs
    assert abs(comp_losses[0] - eager_losses[0]) <= 1e-4 * abs(eager_losses[0]), (comp_losses, eager_losses)
    # Adam moves a weight by ~lr whatever its gradient's size, so rounding can flip the step of a weight
    # whose gradient is ~0: compare the whole update, not the worst weight
    for a, b in zip(comp_losses[1:], eager_losses[1:]):
        assert abs(a - b) <= 5e-3 * abs(b), (comp_losses, eager_losses)
    rel = ((comp_step - eager_step).norm() / eager_step.norm()).item()
    assert eager_step.norm() > 0 and rel < 0.05, rel


def test_crop_flip_statistics_on_device():
    size, padding, n = 8, 2, 20000
    src = (torch.arange(size * size) + 1).to(torch.uint8).view(1, 1, size, size)
    images = src.expand(n, 1, size, size).contiguous().to(DEVICE)      # (n, 1, 8, 8), all the same image
    g = torch.Generator(device=DEVICE).manual_seed(0)
    out = data.random_crop_flip(images, padding, g)
    assert out.device.type == torch.device(DEVICE).type
    dy, dx, flip = (t.cpu() for t in fixtures.decode_crop_flip(out, size, padding))
    # the device's draws give the same output as the CPU gather with those parameters
    assert torch.equal(out.cpu(), data.apply_crop_flip(images.cpu(), padding, dy, dx, flip))
    k = 2 * padding + 1
    assert abs(flip.float().mean().item() - 0.5) < 0.02                 # binomial sd 0.0035
    counts = torch.bincount(dy * k + dx, minlength=k * k).float()       # each ≈ 800, sd ≈ 28
    assert ((counts - n / k ** 2).abs() / (n / k ** 2)).max() < 0.2, counts
    assert abs((dy == dx).float().mean().item() - 1 / k) < 0.02
