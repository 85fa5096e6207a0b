"""The published algorithm, re-enacted on timm models: the reference our fast paths are measured
against (benchmark.py) and checked against (tests/test_fast_paths.py).

    import reference
    scores = reference.published_scores(teacher, x)          # identify_attnlier + identify_outlier
    with reference.PublishedView(student) as s, reference.PublishedView(teacher) as t:
        loss = reference.published_step_loss(s, t, reference.PublishedNoise(100, 0.763, device).matrix, x)

Slow on purpose: it repeats the published code's work (two passes, per-image weight copies, full
attention and Gram matrices, a Python-loop noise matrix). Selection and distillation never use it.
"""
import torch
import torch.nn.functional as F

# The published constants, written out here (not imported from the code this file checks), so that a
# changed constant in our code makes the comparison tests fail.
PROBE_BLOCKS = (3, 7)           # identify_attnlier: value_blk3, value_blk7
FEATURE_BLOCKS = (3, 7, 11)     # TeacherVisionTransformer: outputs of blocks 3, 7, 11 for probe distillation
ATTNLIER, OUTLIER = 0.05, 0.9   # get_positive: weights of the probe scores and of the confidence score
PATCHATTN = 0.8                 # weight of probe distillation


def csloss(y, uniform):
    """The published loss.csloss: cosine similarity of each row of `y` (B, M) with `uniform` -> (B,)."""
    return F.cosine_similarity(y, uniform.expand_as(y), dim=1)


class PublishedView:
    """The published TeacherVisionTransformer.forward on a timm model: (logits, features (L, B, N, C)).

    The published model appends the outputs of blocks 3, 7, 11 to a list in every forward and
    concatenates them; here forward hooks do the same. A context manager, so the hooks never
    stay on a model that our code (or torch.compile) uses afterwards.
    """

    def __init__(self, model, feature_blocks=FEATURE_BLOCKS):
        self.model, self.feature_blocks = model, tuple(feature_blocks)
        self._feats, self._hooks = [], []

    def __enter__(self):
        self._hooks = [self.model.blocks[b].register_forward_hook(lambda m, i, o: self._feats.append(o))
                       for b in self.feature_blocks]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks, self._feats = [], []

    def __call__(self, x):
        self._feats = []
        logits = self.model(x)
        feats, self._feats = self._feats, []
        B, N, C = feats[0].shape
        return logits, torch.cat(feats, dim=0).view(len(feats), B, N, C)


class PublishedScorer:
    """identify_attnlier + identify_outlier of the published code, for one batch of normalised images.

    Pass 1: forward with hooks on blocks[b].attn capturing its input; for each probe block the qkv
    weight is repeated per image, (B, 3C, C), and applied with bmm; all heads' full attention
    matrices (B, heads, N, N) are formed and head `head`'s CLS row kept; cosine with uniform (csloss).
    Pass 2: another full forward for the logits -> cross-entropy against the argmax.
    """

    def __init__(self, model, probe_blocks=PROBE_BLOCKS, head=0):
        self.model, self.probe_blocks, self.head = model, tuple(probe_blocks), head
        self._inputs = {b: [] for b in self.probe_blocks}
        self._hooks, self._capture = [], False

    def _keep(self, b, inp):
        if self._capture:  # published: the hooks exist during identify_attnlier only, not in pass 2
            self._inputs[b].append(inp)

    def __enter__(self):
        self._hooks = [self.model.blocks[b].attn.register_forward_hook(
            lambda m, inp, out, b=b: self._keep(b, inp)) for b in self.probe_blocks]
        self._view = PublishedView(self.model).__enter__()
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._view.__exit__()
        self._hooks = []

    @torch.no_grad()
    def __call__(self, x):
        out = {}
        self._capture = True
        try:
            self._view(x)                                                  # pass 1: logits unused
        finally:
            self._capture = False
        for b in self.probe_blocks:
            attn = self.model.blocks[b].attn
            h = self._inputs[b][0][0]                                      # (B, N, C): norm1 output
            B, N, C = h.shape
            heads, hd = attn.num_heads, attn.head_dim
            uniform = (torch.ones(B, N - 1) / (N - 1)).float().to(x.device)
            # (B, 3C, C): a copy of the weight per image, a temporary as in the published expression
            qkv = torch.bmm(h, attn.qkv.weight.unsqueeze(0).repeat(B, 1, 1).transpose(1, 2)) + attn.qkv.bias
            qkv = qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)   # (3, B, heads, N, hd)
            q, k = qkv[0], qkv[1]
            a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)   # (B, heads, N, N)
            out[f"value_blk{b}"] = csloss(a[:, self.head, 0, 1:], uniform).detach().clone()
            self._inputs[b].clear()
        logits, _ = self._view(x)                                          # pass 2
        pred = logits.max(1)[1]
        out["value_out"] = F.cross_entropy(logits, pred, reduction="none").detach().clone()
        out["pred_out"] = pred
        return out


def published_scores(model, x, probe_blocks=PROBE_BLOCKS, head=0):
    """Published scores of a normalised float batch x (B, C, H, W) -> dict of (B,) tensors."""
    with PublishedScorer(model, probe_blocks, head) as scorer:
        return scorer(x)


def published_selection(value_blk3, value_blk7, value_out, num_select, attnlier=ATTNLIER, outlier=OUTLIER):
    """get_positive with the probe in the score (the published flag is inverted; this is the rule the
    paper describes): indices of the num_select lowest attnlier · (blk3 + blk7) + outlier · out."""
    value = attnlier * (value_blk3 + value_blk7) + outlier * value_out
    return value.topk(num_select, largest=False)[1]


def published_kdloss(y, teacher_scores, T=4.0):
    p = F.log_softmax(y / T, dim=1)
    q = F.softmax(teacher_scores / T, dim=1)
    return F.kl_div(p, q, reduction="none").sum() / y.shape[0] * T * T


def published_pd_loss(feature_T, feature_S):
    """Full (L, B, N, N) Gram matrices of token-normalised features, then their CLS rows."""
    L, B, N, _ = feature_T.shape
    ft, fs = F.normalize(feature_T, p=2, dim=2), F.normalize(feature_S, p=2, dim=2)
    gt, gs = ft @ ft.transpose(-2, -1), fs @ fs.transpose(-2, -1)
    diff = gt[:, :, 0, 1:] - gs[:, :, 0, 1:]
    return (diff * diff).view(-1, 1).sum(0).squeeze() / (L * B * (N - 1))


class PublishedNoise:
    """The published noise layer: θ lives on the CPU, Q is built row by row in Python, then copied over."""

    def __init__(self, num_classes, acc, device):
        self.theta = torch.nn.Parameter(torch.zeros(num_classes, num_classes - 1))
        self.acc, self.num_classes, self.device = torch.tensor([acc]), num_classes, device

    def matrix(self):
        c = self.num_classes
        sm = torch.softmax(self.theta, dim=1) * (1 - self.acc)            # (C, C-1)
        q = torch.zeros(c, c)
        for i in range(c):
            q[i] = torch.cat([sm[i][:i], self.acc, sm[i][i:]])
        return q.to(self.device)


def published_step_loss(s_view, t_view, noise_matrix, x, patchattn=PATCHATTN):
    """The published train() loss for one batch: KD + NA + patchattn · PD (views are PublishedView)."""
    out_s, feat_s = s_view(x)
    out_t, feat_t = t_view(x)
    out_t, feat_t = out_t.detach(), feat_t.detach()
    pred = out_t.data.max(1)[1]
    preds_t = pred.cpu().numpy()                        # published: host copy every step (robust weights)
    del preds_t
    loss = published_kdloss(out_s, out_t)
    adapted = F.softmax(out_s, dim=1) @ noise_matrix()
    loss = loss + F.nll_loss(torch.log(adapted), pred)
    return loss + patchattn * published_pd_loss(feat_t, feat_s)
