import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from attention_probe import probe_forward, probe_uniformity


def _reference_rows(model, x, blocks, head):
    """Plain recomputation: full attention matrices from hooked norm1 outputs, no fused kernels."""
    captured = {}
    hooks = [model.blocks[b].norm1.register_forward_hook(
        lambda m, i, o, b=b: captured.__setitem__(b, o)) for b in blocks]
    logits = model(x)
    for h in hooks:
        h.remove()
    rows = {}
    for b in blocks:
        attn = model.blocks[b].attn
        B, N, C = captured[b].shape
        qkv = attn.qkv(captured[b]).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]                                        # (B, heads, N, hd)
        a = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1)  # (B, heads, N, N)
        rows[b] = a[:, head, 0, model.num_prefix_tokens:]
    return logits, rows


@pytest.mark.parametrize("head", [0, 1])
def test_probe_rows_match_full_attention(head):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=8, num_heads=2,
                              qkv_bias=True, num_classes=7).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = probe_forward(model, x, probe_blocks=(3, 7), head=head, feature_blocks=(1, 5))
        ref_logits, ref_rows = _reference_rows(model, x, (3, 7), head)
    assert torch.allclose(out.logits, ref_logits, atol=1e-5)
    for b in (3, 7):
        assert out.probes[b].shape == (3, 64)
        assert torch.allclose(out.probes[b], ref_rows[b], atol=1e-5)
    assert out.features.shape == (2, 3, 65, 48)


def test_prefix_tokens_respected():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                              qkv_bias=True, reg_tokens=1, num_classes=3).eval()
    assert model.num_prefix_tokens == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = probe_forward(model, x, probe_blocks=(2,), head=1)
        _, ref = _reference_rows(model, x, (2,), 1)
    assert out.probes[2].shape == (2, 16)
    assert torch.allclose(out.probes[2], ref[2], atol=1e-5)


def test_uniformity_score():
    flat = torch.full((1, 16), 1 / 17)
    peaked = torch.zeros(1, 16)
    peaked[0, 3] = 0.9
    assert probe_uniformity(flat).item() == pytest.approx(1.0, abs=1e-6)
    assert probe_uniformity(peaked).item() == pytest.approx(0.25, abs=1e-6)  # 1/sqrt(16)


def test_bad_block_or_head():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match="block 7 out of range"):
        probe_forward(model, torch.zeros(1, 3, 32, 32), probe_blocks=(7,))
    with pytest.raises(ValueError, match="head 2 out of range"):
        probe_forward(model, torch.zeros(1, 3, 32, 32), probe_blocks=(1,), head=2)
