"""The ENAT sampler: T steps of cosine-scheduled reveals with classifier-free guidance and feature reuse.

Randomness, so that any implementation can reproduce the ids from the same generator: at step k,
with n [MASK] tokens and P their positions in ascending order, exactly two draws are made,
u1 = torch.rand((B, n, V)) (V = model.cfg.vocab_size, 1024 by default) then u2 = torch.rand((B, n)),
float32 on `generator`. With
gumbel(u) = -log(-log(max(u, tiny))) in the logits' dtype (float32 at least):
sampled = argmax(logp[P] / temp + gumbel(u1)) and confidence = logp[P][sampled] + mask_temp * (1 - r)
* gumbel(u2), where logp = log_softmax(cond + g_k (cond - uncond)).
"""

import math

import torch
from tqdm.auto import tqdm

import enat_kernels.ops as K
from enat_kernels import checks as _checks

from .schedule import mask_schedule


def _gumbel(u, dtype):
    u = u.to(dtype)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))


def settings(model, cfg_scale=None, mask_temp=None, samp_temp=None):
    """The sampler settings, each None taken from model.cfg (the paper's values for its resolution):
    a dict with cfg_scale, mask_temp and samp_temp."""
    given = dict(cfg_scale=cfg_scale, mask_temp=mask_temp, samp_temp=samp_temp)
    return {name: getattr(model.cfg, name) if value is None else value for name, value in given.items()}


def _check(model, labels, steps, cfg_scale, mask_temp, samp_temp, generator):
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be a (B,) int64 tensor of classes, got "
                         f"{type(labels).__name__ if not isinstance(labels, torch.Tensor) else (labels.dtype, tuple(labels.shape))}")
    if labels.numel() == 0:
        raise ValueError("labels must hold at least one class, got an empty tensor")
    null_class = model.cfg.null_class
    if _checks.values_checked(labels) and (int(labels.min()) < 0 or int(labels.max()) > null_class):
        raise ValueError(f"labels must be classes in [0, {null_class - 1}] (or {null_class}, the null class, for "
                         f"unconditional samples), got values in [{int(labels.min())}, {int(labels.max())}]")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    for name, value in (("cfg_scale", cfg_scale), ("mask_temp", mask_temp), ("samp_temp", samp_temp)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    device = model.x_embedder.word_embeddings.weight.device
    if labels.device != device:
        raise ValueError(f"labels must be on the model's device ({device}), got {labels.device}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator must be on the model's device ({device}), got one on {generator.device}")


@torch.no_grad()
def sample(model, labels, *, steps=8, cfg_scale=None, mask_temp=None, samp_temp=None, reuse=True, generator=None,
           cfg_batch=True, progress=False):
    """Generate token ids (B, L) for labels (B,) int64 with an enat.ENAT or enat.PlainNAT.

    Step k (r = (k+1)/T) keeps floor(L cos(pi/2 r)) tokens masked, guidance weight g_k = k/T * cfg_scale.
    Both CFG branches (labels, and the null class) run as one forward of 2B rows, each row keeping its
    own cache (cfg_batch=False runs them as two passes, as the paper's code does; same ids).
    reuse=False runs ENAT without feature reuse (the disentangled model); PlainNAT reuses nothing.
    cfg_scale, mask_temp and samp_temp default to model.cfg's (the paper's: 2.5, 1.5, 6 at 256 px and
    3.5, 1.5, 4 at 512 px). The step loop reads nothing back from the device: every count
    is known from the schedule. The model runs in eval mode (no dropout, no label dropout), so the
    same generator gives the same ids; a model in training mode is switched back afterwards.
    progress=True shows a progress bar over the steps (tqdm, on stderr)."""
    cfg_scale, mask_temp, samp_temp = settings(model, cfg_scale, mask_temp, samp_temp).values()
    _check(model, labels, steps, cfg_scale, mask_temp, samp_temp, generator)
    was_training = model.training
    model.eval()
    try:
        return _sample(model, labels, steps, cfg_scale, mask_temp, samp_temp, reuse, generator, cfg_batch, progress)
    finally:
        model.train(was_training)


def _sample(model, labels, steps, cfg_scale, mask_temp, samp_temp, reuse, generator, cfg_batch, progress):
    B, L, device = labels.shape[0], model.cfg.seq_len, labels.device
    counts = mask_schedule(L, steps)
    reuse = reuse and model.reuses_features
    mask_id, vocab = model.cfg.mask_id, model.cfg.vocab_size
    ids = torch.full((B, L), mask_id, dtype=torch.int64, device=device)
    null = torch.full_like(labels, model.cfg.null_class)
    branches = [torch.cat([labels, null])] if cfg_batch else [labels, null]
    states = [None] * len(branches)
    for k in tqdm(range(steps), desc="enat.sample", unit="step", disable=not progress):
        n, n_after, r = counts[k], counts[k + 1], (k + 1) / steps
        logits = []
        for i, branch_labels in enumerate(branches):
            rows = ids.repeat(len(branch_labels) // B, 1)
            prev = states[i] if reuse and k > 0 else None
            out = model(rows, branch_labels, prev, n_masked=n, n_prev_masked=None if prev is None else counts[k - 1])
            states[i] = out
            logits.append(out.logits)
        cond, uncond = logits[0].chunk(2) if cfg_batch else logits
        masked_at = K.mask_to_index(ids == mask_id, n)  # P, (B, n)
        cond, uncond = K.gather_tokens(cond, masked_at), K.gather_tokens(uncond, masked_at)
        dtype = torch.promote_types(cond.dtype, torch.float32)
        guided = cond.to(dtype) + (k / steps * cfg_scale) * (cond.to(dtype) - uncond.to(dtype))
        logp = torch.log_softmax(guided, dim=-1)  # (B, n, V)
        temp = max(samp_temp * (1 - r), 1e-3)
        u1 = torch.rand((B, n, vocab), generator=generator, dtype=torch.float32, device=device)
        sampled = (logp / temp + _gumbel(u1, dtype)).argmax(dim=-1)
        u2 = torch.rand((B, n), generator=generator, dtype=torch.float32, device=device)
        confidence = logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1) + mask_temp * (1 - r) * _gumbel(u2, dtype)
        remask = confidence.topk(n_after, dim=-1, largest=False).indices  # the least confident stay [MASK]
        ids = ids.scatter(1, masked_at, sampled.scatter(1, remask, mask_id))
    return ids


class GraphedSampler:
    """`sample` captured once as a CUDA graph and replayed: one launch per call instead of the
    step loop's thousands, for a fixed model, batch size and sampler settings.

        sampler = enat.GraphedSampler(model, batch=32, autocast=torch.float16)  # warms up, captures
        ids = sampler(labels, seed=0)  # (B, L), the ids of enat.sample(model, labels, generator=
                                       # torch.Generator("cuda").manual_seed(0)) under that autocast

    The graph reads the model's parameters in place (update them with copy_, not by assignment) and
    draws from its own generator, seeded per call. autocast=None runs in the model's dtype; a float16
    or bfloat16 dtype captures under torch.autocast (construct the sampler outside autocast).
    Settings as in `sample` (None: model.cfg's)."""

    def __init__(self, model, batch, *, steps=8, cfg_scale=None, mask_temp=None, samp_temp=None, reuse=True,
                 autocast=None):
        device = model.x_embedder.word_embeddings.weight.device
        if device.type != "cuda":
            raise ValueError(f"GraphedSampler captures a CUDA graph: model must be on a CUDA device, got {device}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if autocast not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"autocast must be None, torch.float16 or torch.bfloat16, got {autocast!r}")
        if torch.is_autocast_enabled("cuda"):
            raise ValueError("construct GraphedSampler outside torch.autocast and pass autocast=dtype instead "
                             "(capture needs autocast's weight cache off)")
        self.batch = batch
        self.labels = torch.zeros(batch, dtype=torch.int64, device=device)
        self.generator = torch.Generator(device)
        chosen = dict(steps=steps, reuse=reuse, **settings(model, cfg_scale, mask_temp, samp_temp))
        _check(model, self.labels, steps, chosen["cfg_scale"], chosen["mask_temp"], chosen["samp_temp"], self.generator)

        def run():
            with torch.autocast("cuda", autocast or torch.float16, enabled=autocast is not None, cache_enabled=False):
                return sample(model, self.labels, generator=self.generator, **chosen)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile and autotune kernels, set up library workspaces
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.generator)
        self.generator.manual_seed(0)
        with torch.cuda.graph(self.graph):
            self.ids = run()

    def __call__(self, labels, seed=0):
        """labels (batch,) int64 on the model's device; returns new token ids (batch, L)."""
        if not isinstance(labels, torch.Tensor) or labels.shape != self.labels.shape or labels.dtype != torch.int64:
            raise ValueError(f"labels must be a ({self.batch},) int64 tensor (the captured batch), got "
                             f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}"
                             f"{list(labels.shape) if isinstance(labels, torch.Tensor) else ''}")
        if labels.device != self.labels.device:
            raise ValueError(f"labels must be on {self.labels.device}, got {labels.device}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.labels.copy_(labels)
        self.generator.manual_seed(seed)
        self.graph.replay()
        return self.ids.clone()
