"""An independent float64 implementation of docs/MODEL.md, used as the tests' oracle.

Written from the spec alone, not from the enat package: one batch row at a time, boolean masks,
explicit torch.cat of context and self keys, explicit per-head softmax(q k^T * head_dim**-0.5) v,
LayerNorm and GELU written out. Slow and plain on purpose; only torch and the standard library.
"""

import math

import torch

MASK = 1024
NULL = 1000
VOCAB = 1024


# Elementary layers, all float64.


def _ln(x, w=None, b=None, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y if w is None else y * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _silu(x):
    return x * torch.sigmoid(x)


def _lin(P, name, x):
    return x @ P[name + ".weight"].T + P[name + ".bias"]


def _mlp(P, name, x):
    return _lin(P, name + ".fc2", _gelu_tanh(_lin(P, name + ".fc1", x)))


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


def _attn(q, k, v, H):
    """q (n, d), k and v (m, d) -> (n, d); heads are contiguous [head, head_dim] channel groups."""
    d = q.shape[-1]
    hd = d // H
    outs = []
    for h in range(H):
        sl = slice(h * hd, (h + 1) * hd)
        s = q[:, sl] @ k[:, sl].T * hd ** -0.5
        outs.append(torch.softmax(s, dim=-1) @ v[:, sl])
    return torch.cat(outs, dim=-1)


def _block(P, i, x, c, H, ctx=None):
    """DiT block i on self tokens x (n, d) for one row; ctx (m, d) or None (no context)."""
    p = f"blocks.{i}."
    d = x.shape[-1]
    mod = _lin(P, p + "adaLN_modulation.1", _silu(c))
    sh_q, sc_q, sh_c, sc_c, g_attn, sh_m, sc_m, g_mlp = mod.chunk(8, dim=-1)
    h = _modulate(_ln(x), sh_q, sc_q)  # norm1
    q = _lin(P, p + "attn.q", h)
    kv_self = _lin(P, p + "attn.kv.B", h)
    k, v = kv_self[:, :d], kv_self[:, d:]
    if ctx is not None:
        hc = _modulate(_ln(ctx), sh_c, sc_c)  # norm1_
        kv_ctx = _lin(P, p + "attn.kv.A", hc)
        k = torch.cat([kv_ctx[:, :d], k], dim=0)
        v = torch.cat([kv_ctx[:, d:], v], dim=0)
    x = x + g_attn * _lin(P, p + "attn.proj", _attn(q, k, v, H))
    x = x + g_mlp * _mlp(P, p + "mlp", _modulate(_ln(x), sh_m, sc_m))  # norm2
    return x


def _params(sd):
    return {k: v.detach().to(torch.float64) for k, v in sd.items() if not k.startswith("prev_embedder.")}


def _embed(P, ids_row):
    L = ids_row.shape[0]
    x = P["x_embedder.word_embeddings.weight"][ids_row] + P["x_embedder.position_embeddings.weight"][:L]
    return _ln(x, P["x_embedder.LayerNorm.weight"], P["x_embedder.LayerNorm.bias"], 1e-6)


def _head(P, feat):
    h = _ln(feat, P["norm.weight"], P["norm.bias"], 1e-5)
    h = _gelu_erf(_lin(P, "mlm_layer.fc", h))
    h = _ln(h, P["mlm_layer.ln.weight"], P["mlm_layer.ln.bias"], 1e-5)
    logits = h @ P["x_embedder.word_embeddings.weight"].T + P["mlm_layer.bias"].reshape(-1)
    return logits[:, :VOCAB]


# One ENAT step.


def oracle_forward(sd, cfg, ids, labels, prev=None):
    """One ENAT step, plain PyTorch in float64, one batch row at a time.

    Returns (logits (B, L, 1024), feat (B, L, d)); feat is every token's feature before the final
    norm, the state passed as prev (together with this step's masking) to the next step.
    """
    P = _params(sd)
    NE, ND, d, H = cfg["depth_enc"], cfg["depth_dec"], cfg["width"], cfg["heads"]
    B, L = ids.shape
    all_logits, all_feat = [], []
    for b in range(B):
        x = _embed(P, ids[b])
        c = P["y_embedder.embedding_table.weight"][labels[b]]
        masking = ids[b] == MASK
        vis = ~masking
        feat = torch.zeros(L, d, dtype=torch.float64)
        if prev is None:
            xv = x[vis]
            if xv.shape[0] > 0:
                for i in range(NE):
                    xv = _block(P, i, xv, c, H)
            feat[vis] = xv
        else:
            prev_feat = prev[0][b].to(torch.float64)
            prev_vis = ~prev[1][b].bool()
            xc = prev_feat[prev_vis]
            ctx = xc + _mlp(P, "prev_proj.mlp", _ln(xc, P["prev_proj.norm.weight"], P["prev_proj.norm.bias"], 1e-6))
            crit = vis & ~prev_vis  # visible now, [MASK] in prev
            xk = x[crit]
            if xk.shape[0] > 0:
                for i in range(NE):
                    xk = _block(P, i, xk, c, H, ctx=ctx)
            # Cache merge: projected context at the visible non-critical positions, encoded critical ones.
            proj_full = torch.zeros(L, d, dtype=torch.float64)
            proj_full[prev_vis] = ctx
            keep = vis & ~crit
            feat[keep] = proj_full[keep]
            feat[crit] = xk
        visible_set = feat[vis]  # ascending position order, fixed for all decoder blocks
        xm = x[masking]
        if xm.shape[0] > 0:
            for i in range(NE, NE + ND):
                xm = _block(P, i, xm, c, H, ctx=visible_set)
        feat[masking] = xm
        all_feat.append(feat)
        all_logits.append(_head(P, feat))
    return torch.stack(all_logits), torch.stack(all_feat)


def oracle_plain_forward(sd, cfg, ids, labels):
    """The conventional NAT with the same block type: all L tokens through all N_E + N_D blocks as
    self tokens (K/V from kv.B only), then final norm + mlm_layer. Returns (logits, feat), float64."""
    P = _params(sd)
    NE, ND, H = cfg["depth_enc"], cfg["depth_dec"], cfg["heads"]
    all_logits, all_feat = [], []
    for b in range(ids.shape[0]):
        x = _embed(P, ids[b])
        c = P["y_embedder.embedding_table.weight"][labels[b]]
        for i in range(NE + ND):
            x = _block(P, i, x, c, H)
        all_feat.append(x)
        all_logits.append(_head(P, x))
    return torch.stack(all_logits), torch.stack(all_feat)


# Sampler.


def _gumbel(u):
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))


def oracle_sample(forward, labels, *, steps, cfg_scale, mask_temp, samp_temp, reuse, generator, seq_len):
    """The ENAT sampler with CFG as two separate passes per step (conditional, unconditional), each
    branch with its own previous-step state (used only when reuse). Exactly two torch.rand draws per
    step on `generator`: u1 (B, n, 1024) then u2 (B, n), float32. Returns ids (B, seq_len) int64."""
    B, L, T = labels.shape[0], seq_len, steps
    ids = torch.full((B, L), MASK, dtype=torch.int64)
    null = torch.full_like(labels, NULL)
    prev_c = prev_u = None
    for k in range(T):
        r = (k + 1) / T
        masking = ids == MASK
        n = int(masking[0].sum())
        assert bool((masking.sum(1) == n).all()), "rows must have the same number of [MASK] tokens"
        n_after = math.floor(L * math.cos(math.pi / 2 * r))
        cond, feat_c = forward(ids, labels, prev_c if reuse else None)
        uncond, feat_u = forward(ids, null, prev_u if reuse else None)
        if reuse:
            prev_c, prev_u = (feat_c, masking), (feat_u, masking)
        cond, uncond = cond.to(torch.float64), uncond.to(torch.float64)
        g = k / T * cfg_scale
        logp = torch.log_softmax(cond + g * (cond - uncond), dim=-1)
        pos = torch.stack([torch.nonzero(masking[b]).flatten() for b in range(B)])  # (B, n) ascending
        lp = torch.stack([logp[b][pos[b]] for b in range(B)])  # (B, n, 1024)
        u1 = torch.rand((B, n, VOCAB), generator=generator, dtype=torch.float32).to(torch.float64)
        temp = max(samp_temp * (1 - r), 1e-3)
        sampled = (lp / temp + _gumbel(u1)).argmax(dim=-1)  # (B, n)
        u2 = torch.rand((B, n), generator=generator, dtype=torch.float32).to(torch.float64)
        conf_m = lp.gather(-1, sampled[..., None]).squeeze(-1) + mask_temp * (1 - r) * _gumbel(u2)
        new = ids.clone()
        for b in range(B):
            conf = torch.full((L,), math.inf, dtype=torch.float64)
            conf[pos[b]] = conf_m[b]
            new[b, pos[b]] = sampled[b]
            lowest = torch.argsort(conf, stable=True)[:n_after]  # ties: lower position first
            new[b, lowest] = MASK
        ids = new
    assert not bool((ids == MASK).any())
    return ids
