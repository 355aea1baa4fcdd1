"""Training ENAT by the paper's recipe, on the kernels of enat_kernels.ops (their autograd formulas).

    import enat, enat.training as T
    model = enat.ENAT(cfg)
    ema = T.EMA(model, decay=0.9999)                   # warmed up: update t decays by min(0.9999, (1 + t) / (10 + t))
    opt, sched = T.optimizer(model, lr=4e-4, warmup=5000)
    gen = torch.Generator().manual_seed(0)             # every random choice of the recipe comes from it
    for ids, labels in batches:                        # ids (B, L) int64 token ids, labels (B,) classes
        loss = T.loss(model, ids, labels, prev_model=ema.model, generator=gen)
        loss.backward(); opt.step(); sched.step(); opt.zero_grad(); ema.update(model)

The recipe (docs/MODEL.md, "Training recipe"), per batch:

- One mask ratio r ~ Beta(12, 3) for the batch; round(L r) positions per row (clamped to [1, L - 1]),
  chosen at random per row, become [MASK].
- Label dropout for classifier-free guidance, as the paper's code does it, in two places: the batch's
  labels are replaced by the null class with p = 0.15 here (`label_drop`, drawn from `generator`),
  and the model's LabelEmbedder drops labels again with p = 0.1 while the model is in training mode
  (its own draw, from torch's global RNG on the model's device, like the embedding dropout).
- Feature-reuse training (`prev_model` given, usually the EMA model): with probability `reuse_prob`
  (one coin per batch) a random U(0, 1) share of the visible tokens is masked as well, making the
  "previous step"; prev_model runs on it in eval mode, without gradients and without reuse, and its
  (feat, masking) is the `prev` of the trained model's forward on the real input, whose encoder then
  runs only the critical tokens over prev_proj of the cached features.
- Chained previous steps (`reuse_steps` > 1; an option of this package, not the paper's recipe; 1,
  the default, is the paper's): the previous step is itself made by reuse, as in sampling. A reuse
  batch draws a chain length k uniform in 1..reuse_steps and k - 1 earlier steps, each masking a
  further U(0, 1) share of the tokens the next one shows; prev_model runs the earliest step without
  reuse and each later one with the step before it as prev. The sampler feeds every step's features
  back through prev_proj (a token revealed at step j is projected again at every later step), while
  the paper's recipe trains prev_proj on features projected once: chains let training see the
  repeated projection (docs/MODEL.md, "Training recipe").
- Cross-entropy with label smoothing 0.1 over the masked positions only.

Randomness: the ratio, the coin, the reuse share, the masked positions, the label dropout and the
chain (with reuse_steps > 1) are drawn on the CPU from `generator` in a fixed order (the same draws
whether or not the batch reuses, whatever the device), then moved to the model's device; the mask
counts are passed to the model, so a step never waits on the device. Under data parallelism every
rank holds the same generator and draws the global batch's masks, keeping its own rows
(`shard=(rank, world_size)`), so N processes compute exactly the masks of one process on the whole
batch.
"""

import copy
import math
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import enat_kernels.ops as K

MASK_RATIO_BETA = (12, 3)  # r ~ Beta(12, 3): mean 0.8
LABEL_SMOOTHING = 0.1
LABEL_DROP = 0.15  # dataset-level label dropout (the model's LabelEmbedder adds its own 0.1 in training)
REUSE_PROB = 0.5
ADAMW_BETAS = (0.99, 0.99)
WEIGHT_DECAY = 0.03
LEARNING_RATE = 4e-4  # 1e-4 at 512 px
WARMUP_STEPS = 5000
EMA_DECAY = 0.9999


def unwrap(model):
    """The ENAT inside a DistributedDataParallel (or DataParallel) wrapper, or the model itself."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _beta(a, b, generator):
    """One draw of Beta(a, b) for integer a, b >= 1: the a-th smallest of a + b - 1 uniforms (an exact
    identity; torch's Beta sampler takes no generator)."""
    u = torch.rand(a + b - 1, generator=generator, dtype=torch.float64)
    return u.sort().values[a - 1].item()


class Masks(NamedTuple):
    """One batch's random choices (CPU tensors); `take` keeps a shard's rows."""

    ratio: float  # the batch's mask ratio r
    mask: torch.Tensor  # (B, L) bool, True = [MASK] in the trained model's input
    n_masked: int  # round(L r) clamped to [1, L - 1]: [MASK] per row
    prev_mask: Optional[torch.Tensor]  # (B, L) bool, a superset of mask: the previous step's input; None: no reuse
    n_prev_masked: Optional[int]
    label_drop: torch.Tensor  # (B,) bool, True = the label becomes the null class
    # The steps before the previous one, earliest first: ((B, L) bool mask, its [MASK] count) pairs, each
    # mask a superset of the next (the last one's next is prev_mask). Empty: prev_model runs without reuse.
    earlier: Tuple[Tuple[torch.Tensor, int], ...] = ()

    def take(self, start, stop):
        return Masks(self.ratio, self.mask[start:stop], self.n_masked,
                     None if self.prev_mask is None else self.prev_mask[start:stop], self.n_prev_masked,
                     self.label_drop[start:stop], tuple((m[start:stop], n) for m, n in self.earlier))


def draw_masks(batch, seq_len, *, reuse_prob=REUSE_PROB, label_drop=LABEL_DROP, reuse_steps=1, generator=None):
    """The recipe's random choices for a batch of `batch` rows of `seq_len` tokens, drawn on the CPU
    from `generator` (torch's default CPU generator if None) in this order: the ratio (13 uniforms,
    float64), the reuse coin, the reuse share (one uniform each, float64), one uniform per position
    (float32, (batch, L)) whose ranks pick the masked positions per row (the n_masked lowest are
    [MASK] now, the n_prev_masked lowest in the previous step), one uniform per row for the label
    dropout; then, only with reuse_steps > 1, the chain: one uniform (float64) for its length k =
    1 + floor(u reuse_steps) and reuse_steps - 1 shares (float64), the j-th earlier step masking
    round(share_j x its visible count) more of the lowest-ranked tokens. Every draw is made whether
    or not it is used, so reuse_prob never shifts the stream and reuse_steps leaves the other choices
    as they are."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one masked and one visible token), got {seq_len}")
    if isinstance(reuse_steps, bool) or not isinstance(reuse_steps, int) or reuse_steps < 1:
        raise ValueError(f"reuse_steps must be an int >= 1 (1: the paper's recipe), got {reuse_steps!r}")
    L = seq_len
    ratio = _beta(*MASK_RATIO_BETA, generator)
    n = min(max(int(round(L * ratio)), 1), L - 1)
    coin = torch.rand((), generator=generator, dtype=torch.float64).item()
    share = torch.rand((), generator=generator, dtype=torch.float64).item()
    scores = torch.rand((batch, L), generator=generator)
    drop = torch.rand((batch,), generator=generator) < label_drop
    length, shares = 1, []
    if reuse_steps > 1:
        length = min(int(torch.rand((), generator=generator, dtype=torch.float64).item() * reuse_steps) + 1,
                     reuse_steps)
        shares = torch.rand(reuse_steps - 1, generator=generator, dtype=torch.float64).tolist()
    rank = scores.argsort(dim=1).argsort(dim=1)  # each position's rank within its row
    mask = rank < n
    if coin >= reuse_prob:
        return Masks(ratio, mask, n, None, None, drop)
    n_prev = n + int(round((L - n) * share))
    counts = [n_prev]
    for s in shares[:length - 1]:
        counts.append(counts[-1] + int(round((L - counts[-1]) * s)))
    earlier = tuple((rank < c, c) for c in reversed(counts[1:]))
    return Masks(ratio, mask, n, rank < n_prev, n_prev, drop, earlier)


def loss(model, ids, labels, *, prev_model=None, reuse_prob=REUSE_PROB, reuse_steps=1, generator=None,
         label_drop=LABEL_DROP, shard=None):
    """One batch's training loss by the paper's recipe (module docstring): a scalar tensor (fp32, or
    fp64 for an fp64 model).

    model: an enat.ENAT (or one wrapped in DistributedDataParallel), in training mode for training;
    ids (B, L) int64 token ids in [0, vocab_size); labels (B,) int64 classes, on the model's device;
    prev_model: the model whose features the reuse batches reuse (the paper uses the EMA model);
    None trains without reuse. reuse_steps: the longest chain of previous steps (module docstring;
    1 is the paper's recipe). generator: a CPU torch.Generator for every random choice.
    shard=(index, count): ids are the index-th of `count` equal row blocks of a global batch (one per
    data-parallel rank); the masks are drawn for the global batch, so the ranks together compute the
    loss of one process on the whole batch (the mean of their losses, as DDP averages gradients)."""
    B, L = ids.shape
    index, count = (0, 1) if shard is None else shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
    masks = draw_masks(B * count, L, reuse_prob=reuse_prob if prev_model is not None else 0.0,
                       label_drop=label_drop, reuse_steps=reuse_steps, generator=generator)
    return loss_on_masks(model, ids, labels, masks.take(index * B, (index + 1) * B), prev_model=prev_model)


def loss_on_masks(model, ids, labels, masks, *, prev_model=None, label_smoothing=LABEL_SMOOTHING):
    """The loss for given random choices (a Masks, e.g. from draw_masks, or written by hand): the label
    dropout applied, the reuse step run when masks.prev_mask is set (prev_model required then; with
    masks.earlier, the chain of steps before it), cross-entropy with label smoothing over the
    positions of masks.mask."""
    cfg = unwrap(model).cfg
    device = ids.device
    mask = masks.mask.to(device, non_blocking=True)
    labels = torch.where(masks.label_drop.to(device, non_blocking=True), cfg.null_class, labels)
    prev = n_prev = None
    if masks.earlier and masks.prev_mask is None:
        raise ValueError("masks.earlier holds steps before the previous one but prev_mask is None")
    if masks.prev_mask is not None:
        if prev_model is None:
            raise ValueError("masks ask for a reuse step (prev_mask is set) but prev_model is None")
        was_training = prev_model.training
        prev_model.eval()
        try:
            with torch.no_grad():  # the earliest step without reuse, each later one over the step before
                for step_mask, n_step in (*masks.earlier, (masks.prev_mask, masks.n_prev_masked)):
                    step_ids = ids.masked_fill(step_mask.to(device, non_blocking=True), cfg.mask_id)
                    prev = prev_model(step_ids, labels, prev, n_masked=n_step, n_prev_masked=n_prev)
                    n_prev = n_step
        finally:
            prev_model.train(was_training)
        prev = {"feat": prev.feat.detach(), "masking": prev.masking}
    out = model(ids.masked_fill(mask, cfg.mask_id), labels, prev, n_masked=masks.n_masked, n_prev_masked=n_prev)
    at = K.mask_to_index(mask, masks.n_masked)  # (B, n) the masked positions
    logits = K.gather_tokens(out.logits, at)  # (B, n, V)
    targets = ids.gather(1, at)
    logits = logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits, targets.reshape(-1), label_smoothing=label_smoothing)
    skipped = skipped_parameters(unwrap(model), masks)
    if skipped:  # weight 0: the loss's value stays bit for bit, the skipped parameters' gradients are zeros
        loss = loss + 0.0 * torch.stack([p.sum() for p in skipped]).sum().to(loss.dtype)
    return loss


def skipped_parameters(model, masks):
    """The parameters of `model` that its forward in `loss_on_masks` does not reach for `masks` (they
    are the same on every data-parallel rank: the counts and the reuse coin are the global batch's):
    prev_proj in a step without reuse; the encoder blocks in a reuse step without critical tokens
    (n_prev_masked == n_masked: every visible token comes from the cache). The encoder and decoder
    run in every other step, as 1 <= n_masked <= L - 1 leaves a visible and a masked token in each
    row, and prev_proj runs (on no rows) even when the previous step is all [MASK]. The loss adds
    them with weight 0, so every parameter takes part in every step: DistributedDataParallel needs no
    find_unused_parameters (an extra autograd traversal each step), and one process and N agree, the
    skipped parameters getting zero gradients rather than none (AdamW moves them by their moments
    and weight decay, as any parameter with a zero gradient)."""
    if not model.reuses_features:
        return []
    if masks.prev_mask is None:
        return list(model.prev_proj.parameters())
    if masks.n_prev_masked == masks.n_masked:
        return [p for block in model.blocks[:model.cfg.depth_enc] for p in block.parameters()]
    return []


class EMA:
    """An exponential moving average of a model's parameters: update t (t = 0, 1, ... counted in
    `updates`) sets ema = d_t * ema + (1 - d_t) * param (buffers copied), with
    d_t = min(decay, (1 + t) / (10 + t)) (`warmup`, the default, as diffusers and timm do) or
    d_t = decay (warmup=False, the paper's fixed decay). Without the warm-up a decay of 0.9999 still
    holds 0.9999^t of the initial weights after t updates (74% after 3000); with it the initial
    weights' share is the product of the d_t, 9! t! / (t + 9)! (under 1e-20 after 3000), and d_t
    reaches 0.9999 at t = 89,990. `.model` is an eval-mode copy without gradients, usable with
    enat.sample and as the `prev_model` of `loss`."""

    def __init__(self, model, decay=EMA_DECAY, *, warmup=True):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        if not isinstance(warmup, bool):
            raise ValueError(f"warmup must be a bool, got {warmup!r}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    def decay_at(self, t):
        """d_t, the decay of update t (0-based)."""
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model):
        source = unwrap(model)
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in source.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA.update: the model does not have the EMA model's parameters")
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(self.updates))
        for b_ema, b in zip(self.model.buffers(), source.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self):
        """{"state_dict": the EMA weights under the official keys, "updates": the update count}: the
        weights sit under "state_dict", so enat.load_official reads this dict as it is."""
        return {"state_dict": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state, *, updates=None):
        """Restore a `state_dict()`, or bare weights (official keys: the EMA entry of checkpoints
        written before the count was stored), which need `updates`, the count to go on from (for a
        run of enat.train, the checkpoint's step: one update per optimizer step)."""
        if "state_dict" in state and "updates" in state:
            weights, count = state["state_dict"], state["updates"]
            if updates is not None and updates != count:
                raise ValueError(f"updates={updates!r} given, but the state holds the count {count}")
        elif updates is None:
            raise ValueError("the state holds bare weights without the update count (a checkpoint written "
                             "before EMA warm-up): pass updates=, e.g. the training step it was saved at")
        else:
            weights, count = state, updates
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"updates must be an int >= 0, got {count!r}")
        self.model.load_state_dict(weights)
        self.updates = count


def parameter_groups(model, weight_decay=WEIGHT_DECAY):
    """AdamW groups: weight decay on the weights of nn.Linear layers only; none on biases, LayerNorm
    parameters, the word / position / label embeddings and mlm_layer.bias. (The paper gives one weight
    decay; decaying the tied word embeddings, the norms and the biases towards zero is the usual thing
    to avoid, and the embeddings' N(0, 0.02) scale is what the logits are built on.)"""
    model = unwrap(model)
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


def optimizer(model, lr=LEARNING_RATE, warmup=WARMUP_STEPS, *, weight_decay=WEIGHT_DECAY, betas=ADAMW_BETAS):
    """(torch.optim.AdamW, LambdaLR) with the paper's settings: betas (0.99, 0.99), weight decay 0.03
    (Linear weights only, see parameter_groups), lr 4e-4 reached by a linear warm-up over `warmup`
    steps (lr (s + 1) / warmup at step s), then constant. Call scheduler.step() after each
    optimizer.step()."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    opt = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return opt, sched


class TokenDataset(torch.utils.data.Dataset):
    """Token grids stored the way the paper's code stores them: one row per image, the class label
    then the L token ids, an integer .npy array (N, 1 + L), read memory-mapped
    (numpy.load(mmap_mode="r")). Item i is (ids (L,) int64, label () int64); `batch(indices)` reads
    several rows at once."""

    def __init__(self, path):
        self.path = str(path)
        self.data = np.load(self.path, mmap_mode="r")
        if self.data.ndim != 2 or self.data.shape[1] < 2 or not np.issubdtype(self.data.dtype, np.integer):
            raise ValueError(f"{self.path}: expected an integer array (N, 1 + L) of rows [label, ids...], got "
                             f"{self.data.dtype} {self.data.shape}")

    @property
    def seq_len(self):
        return self.data.shape[1] - 1

    def __len__(self):
        return self.data.shape[0]

    def __getitem__(self, i):
        row = torch.from_numpy(np.array(self.data[i], dtype=np.int64))
        return row[1:], row[0]

    def batch(self, indices):
        """(ids (n, L) int64, labels (n,) int64) for the rows `indices` (in that order)."""
        rows = torch.from_numpy(np.asarray(self.data[np.asarray(indices)], dtype=np.int64))
        return rows[:, 1:].contiguous(), rows[:, 0].contiguous()

    def check(self, cfg, chunk=65536):
        """Raise ValueError unless every row fits cfg: L = cfg.seq_len, ids in [0, vocab_size), labels in
        [0, num_classes). Reads the whole file once."""
        if self.seq_len != cfg.seq_len:
            side = math.isqrt(self.seq_len)
            hint = f" (a {side} x {side} grid: resolution {16 * side})" if side * side == self.seq_len else ""
            raise ValueError(f"{self.path}: rows hold {self.seq_len} tokens{hint}, the config {cfg.seq_len}")
        for start in range(0, len(self), chunk):
            part = np.asarray(self.data[start:start + chunk])
            if part[:, 0].min() < 0 or part[:, 0].max() >= cfg.num_classes:
                raise ValueError(f"{self.path}: labels must lie in [0, {cfg.num_classes}), got "
                                 f"[{part[:, 0].min()}, {part[:, 0].max()}] in rows {start}..")
            if part[:, 1:].min() < 0 or part[:, 1:].max() >= cfg.vocab_size:
                raise ValueError(f"{self.path}: token ids must lie in [0, {cfg.vocab_size}), got "
                                 f"[{part[:, 1:].min()}, {part[:, 1:].max()}] in rows {start}..")


def shard_indices(n_items, step, global_batch, *, rank=0, world_size=1, micro_batch=None, micro_step=0, seed=0):
    """The dataset rows of one rank's micro-batch: deterministic, like DistributedSampler over an endless
    stream of seeded permutations. The stream is perm(seed, epoch 0), perm(seed, epoch 1), ...
    (numpy's PCG64 seeded with [seed, epoch]); optimizer step `step` takes the next `global_batch`
    items, in micro-steps of world_size * micro_batch items, rank r taking the r-th block of each."""
    micro_batch = global_batch // world_size if micro_batch is None else micro_batch
    start = step * global_batch + micro_step * world_size * micro_batch + rank * micro_batch
    positions = np.arange(start, start + micro_batch)
    out = np.empty(micro_batch, dtype=np.int64)
    for epoch in np.unique(positions // n_items):
        sel = positions // n_items == epoch
        perm = _permutation(n_items, seed, int(epoch))
        out[sel] = perm[positions[sel] % n_items]
    return out


_PERMS = {}


def _permutation(n, seed, epoch):
    key = (n, seed, epoch)
    if key not in _PERMS:
        if len(_PERMS) > 4:
            _PERMS.clear()
        _PERMS[key] = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)
    return _PERMS[key]
