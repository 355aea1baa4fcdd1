"""ENAT and PlainNAT: one step of the network, with the official checkpoint's parameter names.

    out = model(ids, labels, prev=None)   # ids (B, L) with [MASK] = 1024, labels (B,)
    out.logits (B, L, 1024), out.feat (B, L, d), out.masking (B, L) bool

(1024 and 1000 are the defaults: a config's vocab_size is the [MASK] id and the logits' width, its
num_classes the null class.)

ENAT encodes visible tokens among themselves and decodes [MASK] tokens over [visible ; [MASK]] keys;
with `prev` (the previous step's output) it encodes only the critical tokens (revealed since `prev`)
over the projected cache of the others. The attention and every movement of token rows go through
`model.ops`, by default the kernels of enat_kernels.ops (enat.paper_style swaps in the paper code's
way for comparisons). Given `n_masked` and `n_prev_masked` the forward has static shapes and never
syncs with the host, so it runs under torch.compile(fullgraph=True) and in CUDA graphs.
"""

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import enat_kernels.ops as K
from enat_kernels import checks as _checks

from .config import NUM_CLASSES, VOCAB, ENATConfig


class ENATOutput(NamedTuple):
    """One step's result; (feat, masking) is the state the next step reuses."""

    logits: torch.Tensor  # (B, L, 1024)
    feat: torch.Tensor  # (B, L, d): every token's features before the final norm
    masking: torch.Tensor  # (B, L) bool: the [MASK] positions of this step's input


class KernelOps:
    """The ops the model is written against, from enat_kernels.ops. A selector is what `positions`
    returns for (mask, count): here int64 positions (B, count)."""

    attention = staticmethod(K.asymmetric_attention)  # (q, k_ctx, v_ctx, k_self, v_self) -> out
    split = staticmethod(K.split_tokens)  # (x, mask, n_masked) -> (visible, masked)
    restore = staticmethod(K.restore_tokens)  # (visible, masked, mask) -> x
    positions = staticmethod(K.mask_to_index)  # (mask, count) -> selector
    gather = staticmethod(K.gather_tokens)  # (x, selector) -> rows
    merge = staticmethod(K.merge_cache)  # (fresh, fresh_selector, cached, cached_selector) -> rows
    adaln = staticmethod(K.adaln)  # (x, shift, scale, eps=) -> LayerNorm(x) * (1 + scale) + shift
    residual_adaln = staticmethod(K.residual_adaln)  # (x, y, gate, shift, scale, eps=) -> (x + gate y, adaln of it)


@contextlib.contextmanager
def ops_swapped(model, ops):
    """Within the block, `model` runs with `ops` (a class with KernelOps' static methods) instead of
    its own; restored afterwards."""
    saved, model.ops = model.ops, ops
    try:
        yield model
    finally:
        model.ops = saved


def _values_checked(t):
    """Check tensor values: on CPU (free) or in debug mode, never while torch.compile traces."""
    return _checks.values_checked(t) and not torch.compiler.is_compiling()


class Mlp(nn.Module):
    def __init__(self, dim, hidden, approximate):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Embeddings(nn.Module):
    """`x_embedder`: word + learned absolute position embeddings, LayerNorm, dropout."""

    def __init__(self, dim, seq_len, dropout=0.1, vocab_size=VOCAB):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size + 1, dim)  # the last row is [MASK]
        self.position_embeddings = nn.Embedding(seq_len, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids):
        """ids (B, L) -> (B, L, d)."""
        x = self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]]
        return self.dropout(self.LayerNorm(x))


class LabelEmbedder(nn.Module):
    """`y_embedder`: class embedding; row num_classes (1000) is the null class. In training a label
    becomes the null class with probability `dropout_prob` (for classifier-free guidance)."""

    def __init__(self, dim, dropout_prob=0.1, num_classes=NUM_CLASSES):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.null_class = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels):
        """labels (B,) -> (B, d)."""
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.null_class, labels)
        return self.embedding_table(labels)


class PrevProj(nn.Module):
    """`prev_proj`: x + MLP(LN(x)), the projection of reused features."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim, "tanh")

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Attention(nn.Module):
    """Queries and self keys/values from the block's tokens, context keys/values from the context
    tokens; one softmax over [context ; self].

    The official `q` (d -> d) and `kv.B` (d -> 2d: K then V) read the same input, so they are held
    as one (3d, d) projection `qkv` and run as one GEMM; `kv.A` (the context's K/V) is `kv_ctx`.
    state_dict() and load_state_dict() speak the official names (`attn.q.*`, `attn.kv.A.*`,
    `attn.kv.B.*`): the weights are joined once, on load, and split only when saved."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.kv_ctx = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_state_dict_post_hook(_official_attention_keys)
        self.register_load_state_dict_pre_hook(_fused_attention_keys)

    def _heads(self, t, parts):
        """(B, n, parts * d) -> `parts` views (B, H, n, d/H)."""
        B, n, width = t.shape
        t = t.view(B, n, parts, self.heads, width // (parts * self.heads))
        return [t[:, :, i].transpose(1, 2) for i in range(parts)]

    def forward(self, x, ctx, ops):
        """x (B, Lq, d) modulated block tokens, ctx (B, Lc, d) modulated context (Lc may be 0)."""
        B, Lq, d = x.shape
        q, k_self, v_self = self._heads(self.qkv(x), 3)
        k_ctx, v_ctx = self._heads(self.kv_ctx(ctx), 2)
        out = ops.attention(q, k_ctx, v_ctx, k_self, v_self)
        # The kernels' output (B, H, Lq, D) is (B, Lq, H, D) memory, so merging the heads is a view.
        return self.proj(out.transpose(1, 2).reshape(B, Lq, d))


def _official_attention_keys(module, state_dict, prefix, local_metadata):
    """state_dict() post-hook: qkv -> q and kv.B, kv_ctx -> kv.A."""
    d = module.proj.in_features
    for kind in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}qkv.{kind}")
        state_dict[f"{prefix}q.{kind}"] = fused[:d]
        state_dict[f"{prefix}kv.A.{kind}"] = state_dict.pop(f"{prefix}kv_ctx.{kind}")
        state_dict[f"{prefix}kv.B.{kind}"] = fused[d:]


def _fused_attention_keys(module, state_dict, prefix, *args):
    """load_state_dict() pre-hook: the official q and kv.B join into qkv, kv.A becomes kv_ctx. Keys
    that are absent stay absent, so strict loading reports them under the fused name."""
    for kind in ("weight", "bias"):
        q, kv_b = f"{prefix}q.{kind}", f"{prefix}kv.B.{kind}"
        if q in state_dict and kv_b in state_dict:
            state_dict[f"{prefix}qkv.{kind}"] = torch.cat([state_dict.pop(q), state_dict.pop(kv_b)])
        kv_a = f"{prefix}kv.A.{kind}"
        if kv_a in state_dict:
            state_dict[f"{prefix}kv_ctx.{kind}"] = state_dict.pop(kv_a)


class Block(nn.Module):
    """DiT block with adaLN: 8 modulation chunks from the label embedding. The norms and modulations
    run through `ops` as fused kernels: adaLN of the tokens and of the context, the attention, the
    gated residual fused with the MLP's adaLN, the MLP, the last gated residual."""

    def __init__(self, dim, heads):
        super().__init__()
        self.eps = 1e-6  # norm1, norm1_ and norm2: LayerNorm without affine
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, 4 * dim, "tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 8 * dim))

    def forward(self, x, ctx, c, ops):
        """x (B, Lq, d) block tokens, ctx (B, Lc, d) context tokens, c (B, d) label embedding."""
        (shift_q, scale_q, shift_ctx, scale_ctx, gate_attn,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(8, dim=-1)  # (B, d) each
        x_mod = ops.adaln(x, shift_q, scale_q, eps=self.eps)
        ctx_mod = ops.adaln(ctx, shift_ctx, scale_ctx, eps=self.eps)
        x, h = ops.residual_adaln(x, self.attn(x_mod, ctx_mod, ops), gate_attn, shift_mlp, scale_mlp, eps=self.eps)
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(h))


class MlmLayer(nn.Module):
    """`mlm_layer`: fc, exact GELU, LayerNorm, then logits against the (detached) word embeddings."""

    def __init__(self, dim, vocab_size=VOCAB):
        super().__init__()
        self.vocab_size = vocab_size
        self.fc = nn.Linear(dim, dim)
        self.gelu = nn.GELU()
        self.ln = nn.LayerNorm(dim, eps=1e-5)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size + 1))

    def forward(self, x, word_embeddings):
        """x (B, L, d) -> logits (B, L, vocab_size) (the [MASK] entry is cut)."""
        h = self.ln(self.gelu(self.fc(x)))
        V = self.vocab_size
        return F.linear(h, word_embeddings.detach()[:V], self.bias[0, 0, :V])


class _NATBase(nn.Module):
    """Embeddings, blocks, final norm and head, shared by ENAT and PlainNAT."""

    reuses_features = False

    def __init__(self, cfg):
        super().__init__()
        if not isinstance(cfg, ENATConfig):
            raise TypeError(f"cfg must be an ENATConfig (see enat.config), got {type(cfg).__name__}")
        self.cfg = cfg
        self.ops = KernelOps
        d = cfg.width
        self.x_embedder = Embeddings(d, cfg.seq_len, vocab_size=cfg.vocab_size)
        self.y_embedder = LabelEmbedder(d, num_classes=cfg.num_classes)
        self.blocks = nn.ModuleList(Block(d, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.mlm_layer = MlmLayer(d, cfg.vocab_size)

    def initialize_weights(self):
        """The official initialisation: xavier-uniform Linear layers with zero bias, zero adaLN layers,
        N(0, 0.02) word, position and label embeddings."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for table in (self.x_embedder.word_embeddings, self.x_embedder.position_embeddings,
                      self.y_embedder.embedding_table):
            nn.init.normal_(table.weight, std=0.02)
        nn.init.zeros_(self.mlm_layer.bias)

    def _check_inputs(self, ids, labels):
        L = self.cfg.seq_len
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != L:
            raise ValueError(f"ids must be a (B, {L}) tensor of token ids for {self.cfg.name} at "
                             f"{self.cfg.resolution} px, got {_checks.describe(ids)}")
        if ids.dtype != torch.int64:
            raise TypeError(f"ids must be int64, got {ids.dtype}")
        if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape[:1]:
            raise ValueError(f"labels must be a ({ids.shape[0]},) tensor, one class per row of ids "
                             f"{tuple(ids.shape)}; got {_checks.describe(labels)}")
        if labels.dtype != torch.int64:
            raise TypeError(f"labels must be int64, got {labels.dtype}")
        if ids.device != labels.device:
            raise ValueError(f"ids and labels must be on one device, got {ids.device} and {labels.device}")
        mask_id, null_class = self.cfg.mask_id, self.cfg.null_class
        if _values_checked(ids):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > mask_id):
                raise ValueError(f"ids must lie in [0, {mask_id}] ({mask_id} = [MASK]), got values in "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > null_class):
                raise ValueError(f"labels must lie in [0, {null_class}] ({null_class} = null class), got values "
                                 f"in [{int(labels.min())}, {int(labels.max())}]")

    def _head(self, feat):
        return self.mlm_layer(self.norm(feat), self.x_embedder.word_embeddings.weight)


class ENAT(_NATBase):
    """The ENAT network: `depth_enc` encoder blocks over visible tokens, `depth_dec` decoder blocks
    for [MASK] tokens, and `prev_proj` for reused features. Parameter names are the official keys."""

    reuses_features = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prev_proj = PrevProj(cfg.width)
        self.initialize_weights()

    def forward(self, ids, labels, prev=None, *, n_masked=None, n_prev_masked=None):
        """One step. ids (B, L) int64 with [MASK] = 1024, the same number of [MASK] in every row;
        labels (B,) int64 (1000 = null class); prev: the previous step's ENATOutput, or a dict with
        "feat" (B, L, d) and "masking" (B, L), whose [MASK] set contains this step's. n_masked and
        n_prev_masked (the [MASK] counts of ids and prev) are read from the masks if not given,
        one host sync each. Returns ENATOutput(logits (B, L, 1024), feat (B, L, d), masking (B, L))."""
        self._check_inputs(ids, labels)
        ops, enc, dec = self.ops, self.blocks[: self.cfg.depth_enc], self.blocks[self.cfg.depth_enc:]
        masking = ids == self.cfg.mask_id
        x = self.x_embedder(ids)
        c = self.y_embedder(labels)
        visible, masked = ops.split(x, masking, n_masked)
        if prev is None:  # encode every visible token, among visible tokens only
            if visible.shape[1]:
                no_ctx = visible[:, :0]
                for block in enc:
                    visible = block(visible, no_ctx, c, ops)
        else:  # encode the critical tokens over the projected cache; reuse the cache for the rest
            prev_feat, prev_masking = self._check_prev(prev, ids, masking)
            if n_prev_masked is None:
                n_prev_masked = _checks.uniform_row_count("prev masking", prev_masking)
            _checks.count("n_prev_masked", n_prev_masked, ids.shape[1], "the sequence length")
            cached_at = ops.positions(~prev_masking, ids.shape[1] - n_prev_masked)
            critical_at = ops.positions(prev_masking & ~masking, n_prev_masked - masked.shape[1])
            cached = self.prev_proj(ops.gather(prev_feat, cached_at))
            critical = ops.gather(x, critical_at)
            if critical.shape[1]:
                for block in enc:
                    critical = block(critical, cached, c, ops)
            visible = ops.merge(critical, critical_at, cached, cached_at)
        if masked.shape[1]:
            for block in dec:
                masked = block(masked, visible, c, ops)
        feat = ops.restore(visible, masked, masking)
        return ENATOutput(self._head(feat), feat, masking)

    def _check_prev(self, prev, ids, masking):
        if isinstance(prev, ENATOutput):
            feat, prev_masking = prev.feat, prev.masking
        elif isinstance(prev, dict) and {"feat", "masking"} <= prev.keys():
            feat, prev_masking = prev["feat"], prev["masking"]
        else:
            raise TypeError(f"prev must be an ENATOutput or a dict with 'feat' and 'masking', got "
                            f"{type(prev).__name__}")
        B, L = ids.shape
        if not isinstance(feat, torch.Tensor) or feat.shape != (B, L, self.cfg.width):
            raise ValueError(f"prev feat must be ({B}, {L}, {self.cfg.width}) for ids {tuple(ids.shape)}, "
                             f"got {_checks.describe(feat)}")
        if not isinstance(prev_masking, torch.Tensor) or prev_masking.shape != (B, L):
            raise ValueError(f"prev masking must be ({B}, {L}) for ids {tuple(ids.shape)}, got "
                             f"{_checks.describe(prev_masking)}")
        if prev_masking.dtype != torch.bool:
            raise TypeError(f"prev masking must be bool, got {prev_masking.dtype}")
        if feat.device != ids.device or prev_masking.device != ids.device:
            raise ValueError(f"prev must be on the device of ids ({ids.device}), got feat on {feat.device} "
                             f"and masking on {prev_masking.device}")
        if _values_checked(ids) and bool((masking & ~prev_masking).any()):
            raise ValueError("prev masking must contain this step's [MASK] positions (a token visible in "
                             "prev cannot be [MASK] again)")
        return feat, prev_masking


class PlainNAT(_NATBase):
    """The conventional NAT for comparisons: every token, [MASK] included, goes through all
    depth_enc + depth_dec blocks at every step (same block type, no context). It reuses nothing:
    `prev` is accepted and ignored, so it runs in enat.sample like ENAT."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.initialize_weights()

    def forward(self, ids, labels, prev=None, *, n_masked=None, n_prev_masked=None):
        """ids (B, L), labels (B,) -> ENATOutput(logits (B, L, 1024), feat (B, L, d), masking (B, L))."""
        self._check_inputs(ids, labels)
        x = self.x_embedder(ids)
        c = self.y_embedder(labels)
        no_ctx = x[:, :0]
        for block in self.blocks:
            x = block(x, no_ctx, c, self.ops)
        return ENATOutput(self._head(x), x, ids == self.cfg.mask_id)
