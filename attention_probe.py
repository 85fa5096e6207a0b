"""The attention probe: one teacher forward pass -> logits, CLS->patch attention rows, block features.

timm's fused attention never forms the attention matrix, so for each probe block we compute
the single row we need (head h, CLS query against all keys) from that block's `norm1` output
and its own `qkv` weights: O(B·N·d_head) extra work, no weight copies, no second pass.

    out = probe_forward(teacher, images, probe_blocks=(3, 7), head=0, feature_blocks=(3, 7, 11))
    out.logits      # (B, num_classes)
    out.probes[3]   # (B, N - num_prefix_tokens): softmax(q_cls · Kᵀ / sqrt(d_head)) without prefix columns
    out.features    # (L, B, N, C): token outputs of the feature blocks, before the final norm
    WithFeatures(model, (3, 7, 11))(images) -> (logits, features)   # the module stage 2 trains through

With extras=True the same pass also returns what signals.py scores (no second forward):
    out.pre_logits      # (B, C): the head's input
    out.block_cls_norm  # (B, depth): L2 norm of the CLS token after each block
    out.block_tok_norm  # (B, depth): mean L2 norm of the patch tokens after each block
    out.head_rows       # (B, depth, heads, N - prefix): every head's CLS row of every block
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PROBE_BLOCKS = (3, 7)
FEATURE_BLOCKS = (3, 7, 11)


@dataclass
class ProbeOutput:
    logits: torch.Tensor
    probes: dict = field(default_factory=dict)   # block index -> (B, N - prefix) attention row
    features: torch.Tensor = None                # (L, B, N, C) or None
    pre_logits: torch.Tensor = None              # (B, C), extras only
    block_cls_norm: torch.Tensor = None          # (B, depth), extras only
    block_tok_norm: torch.Tensor = None          # (B, depth), extras only
    head_rows: torch.Tensor = None               # (B, depth, heads, N - prefix), extras only


def cls_attention_row(block, x, head=0, num_prefix_tokens=1):
    """Head `head`'s attention of the CLS token over the tokens of `x`, prefix columns dropped.

    x: (B, N, C) input of `block` (the residual stream). Returns (B, N - num_prefix_tokens).
    """
    attn = block.attn
    if not 0 <= head < attn.num_heads:
        raise ValueError(f"probe head {head} out of range: the block has {attn.num_heads} heads")
    hd, width = attn.head_dim, attn.num_heads * attn.head_dim
    h = block.norm1(x)                                           # (B, N, C)
    w, b = attn.qkv.weight, attn.qkv.bias                        # (3·width, C), (3·width,)
    q_rows = slice(head * hd, (head + 1) * hd)                   # qkv output layout: [q | k | v], heads inside
    k_rows = slice(width + head * hd, width + (head + 1) * hd)
    q = F.linear(h[:, 0], w[q_rows], None if b is None else b[q_rows])   # (B, hd): the CLS query only
    k = F.linear(h, w[k_rows], None if b is None else b[k_rows])         # (B, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)                        # Identity unless the model uses qk_norm
    logits = torch.einsum("bd,bnd->bn", q, k) * attn.scale       # (B, N)
    return logits.float().softmax(dim=-1)[:, num_prefix_tokens:]


def cls_rows_all_heads(block, x, num_prefix_tokens=1):
    """Every head's attention of the CLS token over the tokens of `x` -> (B, heads, N - prefix).

    x: (B, N, C) input of `block`. Without qk-norm the keys are never formed: q_h·(W_k,h n + b_k,h)
    = n·(W_k,hᵀ q_h) + q_h·b_k,h, so each row costs O(B·N·C) per head instead of the O(B·N·C·width)
    of a key projection (the block's own qkv output is not reachable without a hook, and hooks stop
    torch.compile from tracing the scorer in one graph).
    """
    attn = block.attn
    heads, hd, width = attn.num_heads, attn.head_dim, attn.num_heads * attn.head_dim
    h = block.norm1(x)                                                    # (B, N, C)
    w, b = attn.qkv.weight, attn.qkv.bias                                 # (3·width, C), (3·width,)
    B, N, C = h.shape
    q = F.linear(h[:, 0], w[:width], None if b is None else b[:width])    # (B, width): CLS queries
    q = attn.q_norm(q.reshape(B, heads, hd))                              # (B, heads, hd)
    wk, bk = w[width:2 * width], None if b is None else b[width:2 * width]
    if isinstance(attn.k_norm, torch.nn.Identity):
        u = torch.einsum("bhd,hdc->bhc", q, wk.reshape(heads, hd, C))     # (B, heads, C)
        logits = torch.einsum("bnc,bhc->bhn", h, u)                       # (B, heads, N)
        if bk is not None:
            logits = logits + torch.einsum("bhd,hd->bh", q, bk.reshape(heads, hd))[..., None]
    else:                                                                 # qk-norm: the keys must be formed
        k = attn.k_norm(F.linear(h, wk, bk).reshape(B, N, heads, hd))     # (B, N, heads, hd)
        logits = torch.einsum("bhd,bnhd->bhn", q, k)
    return (logits * attn.scale).float().softmax(dim=-1)[..., num_prefix_tokens:]


def probe_forward(model, images, probe_blocks=PROBE_BLOCKS, head=0, feature_blocks=(), extras=False):
    """One forward pass of a timm VisionTransformer that also returns probe rows and block features.

    Walks timm's own modules in the order of `VisionTransformer.forward_features`; the blocks
    themselves run unchanged (fused attention stays on). extras=True adds the fields signals.py
    needs; logits and probe rows are the same numbers either way.
    """
    depth = len(model.blocks)
    for b in (*probe_blocks, *feature_blocks):
        if not 0 <= b < depth:
            raise ValueError(f"block {b} out of range: the model has {depth} blocks (0-based)")
    if getattr(model, "cls_token", None) is None:
        raise ValueError("the attention probe needs a model with a class token")
    prefix = model.num_prefix_tokens
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    probes, features, head_rows, cls_norm, tok_norm = {}, [], [], [], []
    for i, block in enumerate(model.blocks):
        if i in probe_blocks:
            probes[i] = cls_attention_row(block, x, head, prefix)
        if extras:
            head_rows.append(cls_rows_all_heads(block, x, prefix))
        x = block(x)
        if i in feature_blocks:
            features.append(x)
        if extras:
            cls_norm.append(x[:, 0].float().norm(dim=-1))
            tok_norm.append(x[:, prefix:].float().norm(dim=-1).mean(dim=1))
    out = ProbeOutput(None, probes, torch.stack(features) if features else None)
    if not extras:
        out.logits = model.forward_head(model.norm(x))
        return out
    # forward_head(x) == head(forward_head(x, pre_logits=True)): the same ops, split to keep the head input
    out.pre_logits = model.forward_head(model.norm(x), pre_logits=True)
    out.logits = model.head(out.pre_logits)
    out.block_cls_norm = torch.stack(cls_norm, dim=1)                        # (B, depth)
    out.block_tok_norm = torch.stack(tok_norm, dim=1)                        # (B, depth)
    out.head_rows = torch.stack(head_rows, dim=1)                             # (B, depth, heads, N - prefix)
    return out


class WithFeatures(torch.nn.Module):
    """model(x) -> (logits, (L, B, N, C) token outputs of `blocks`): one module for DDP and torch.compile
    to wrap, so the block features of probe distillation come from the same forward as the logits."""

    def __init__(self, model, blocks=()):
        super().__init__()
        self.model, self.blocks = model, tuple(blocks)

    def forward(self, x):
        out = probe_forward(self.model, x, probe_blocks=(), feature_blocks=self.blocks)
        return out.logits, out.features


def probe_maps(out, blocks):
    """The probe rows of a probe_forward output on their patch grid: {block: (B, g, g) float32 numpy}."""
    maps = {}
    for b in blocks:
        rows = out.probes[b].float().cpu()                   # (B, g * g)
        g = int(round(rows.shape[1] ** 0.5))
        maps[b] = rows.view(-1, g, g).numpy()
    return maps


def probe_uniformity(probe):
    """Cosine similarity of each probe row with the uniform vector: (B, M) -> (B,).

    Equals sum(a) / (||a|| · sqrt(M)); 1 for flat attention, low when attention is peaked.
    """
    m = probe.shape[-1]
    return probe.sum(-1) / (probe.norm(dim=-1).clamp_min(1e-12) * m ** 0.5)
