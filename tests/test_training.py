"""enat.training and `python -m enat.train`: the loss against an independent computation on fixed
masks, the recipe's random choices, gradients in reuse mode (every parameter in every step's graph),
EMA and its warm-up, the optimiser settings, the token dataset and its shards, two gloo processes
against one, bit-identical resume (from older checkpoints too), and the command.
"""

import math
import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import enat
import enat.train
import enat.training as T
from enat import ENAT, ENATConfig
from helpers import perturbed

# A non-default vocabulary and class count: 16 ids ([MASK] = 16), 5 classes (null = 5), 4 x 4 grid.
CFG = ENATConfig("train-tiny", depth_enc=2, depth_dec=1, width=32, heads=2, resolution=64, vocab_size=16,
                 num_classes=5)
L = CFG.seq_len


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (n, L), generator=g), torch.randint(0, CFG.num_classes, (n,), generator=g)


def _no_dropout(model):
    model.x_embedder.dropout.p = 0.0
    model.y_embedder.dropout_prob = 0.0
    return model


def _fixed_masks(n, n_masked, n_prev=None, drop_rows=(1,), seed=3, earlier=()):
    """Masks from one random ranking per row: the n_masked lowest ranks now, the n_prev lowest in the
    previous step, and for each count in `earlier` (earliest first) an earlier step of the chain."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.rand(n, L, generator=g).argsort(1).argsort(1)
    drop = torch.zeros(n, dtype=torch.bool)
    drop[list(drop_rows)] = True
    return T.Masks(0.5, rank < n_masked, n_masked, None if n_prev is None else rank < n_prev, n_prev, drop,
                   tuple((rank < c, c) for c in earlier))


def _independent_loss(logits, ids, mask, eps=0.1):
    """Cross-entropy with label smoothing eps over the masked positions, written out: mean over masked
    positions of -(1 - eps) log p(target) - eps / V sum_v log p(v)."""
    logp = torch.log_softmax(logits.double(), dim=-1)[mask]  # (n, V)
    target = ids[mask]
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    uniform = -logp.mean(dim=1)
    return ((1 - eps) * nll + eps * uniform).mean()


@pytest.mark.parametrize("mode", ["plain", "reuse", "chain"])
def test_loss_matches_an_independent_computation(mode):
    model = perturbed(ENAT, CFG, dtype=torch.float64, seed=1).train()
    _no_dropout(model)
    prev_model = perturbed(ENAT, CFG, dtype=torch.float64, seed=2).train()  # switched to eval for the prev step
    ids, labels = _batch()
    reuse = mode != "plain"
    earlier = (16, 15) if mode == "chain" else ()  # 16: every token [MASK] in the earliest step
    masks = _fixed_masks(len(ids), 9, 13 if reuse else None, earlier=earlier)
    loss = T.loss_on_masks(model, ids, labels, masks, prev_model=prev_model if reuse else None)
    # The same step by hand: dropped labels, [MASK] inputs, the prev step's features with boolean masks
    # (in a chain, each step of prev_model over the one before, the earliest without reuse).
    dropped = labels.clone()
    dropped[1] = CFG.num_classes
    inp = torch.where(masks.mask, CFG.vocab_size, ids)
    prev = None
    if reuse:
        prev_model.eval()
        for step_mask in [m for m, _ in masks.earlier] + [masks.prev_mask]:
            step_inp = torch.where(step_mask, CFG.vocab_size, ids)
            with torch.no_grad():
                step_out = prev_model(step_inp, dropped, prev)
            prev = {"feat": step_out.feat, "masking": step_inp == CFG.vocab_size}
        prev_model.train()
    logits = model(inp, dropped, prev).logits
    assert prev_model.training  # loss_on_masks restored the mode
    expected = _independent_loss(logits, ids, masks.mask)
    assert loss.dtype == torch.float32 or loss.dtype == torch.float64
    assert abs(loss.item() - expected.item()) <= 1e-10 * abs(expected.item())


def test_reuse_changes_the_loss():
    """Guards the comparison above: the prev step matters."""
    model = _no_dropout(perturbed(ENAT, CFG, dtype=torch.float64, seed=1).train())
    ids, labels = _batch()
    with_prev = T.loss_on_masks(model, ids, labels, _fixed_masks(len(ids), 9, 13), prev_model=model)
    without = T.loss_on_masks(model, ids, labels, _fixed_masks(len(ids), 9))
    chained = T.loss_on_masks(model, ids, labels, _fixed_masks(len(ids), 9, 13, earlier=(15,)), prev_model=model)
    assert abs(with_prev.item() - without.item()) > 1e-6 and abs(chained.item() - with_prev.item()) > 1e-6
    with pytest.raises(ValueError, match="prev_mask is None"):
        T.loss_on_masks(model, ids, labels, _fixed_masks(len(ids), 9, None, earlier=(15,)), prev_model=model)


def test_recipe_random_choices():
    g = torch.Generator().manual_seed(0)
    ratios, reused = [], 0
    for _ in range(400):
        m = T.draw_masks(3, 256, reuse_prob=0.5, generator=g)
        ratios.append(m.ratio)
        assert m.n_masked == min(max(round(256 * m.ratio), 1), 255)
        assert (m.mask.sum(1) == m.n_masked).all()
        if m.prev_mask is not None:
            reused += 1
            assert (m.prev_mask.sum(1) == m.n_prev_masked).all() and m.n_masked <= m.n_prev_masked <= 256
            assert not (m.mask & ~m.prev_mask).any()  # the previous step masks a superset
    assert abs(np.mean(ratios) - 0.8) < 0.02 and abs(np.std(ratios) - math.sqrt(12 * 3 / (15 ** 2 * 16))) < 0.02
    assert 150 < reused < 250
    # L = 2: the clamp keeps one masked and one visible token.
    m = T.draw_masks(4, 2, generator=torch.Generator().manual_seed(1))
    assert m.n_masked == 1 and (m.mask.sum(1) == 1).all()
    # The same generator state gives the same choices; reuse_prob does not shift the stream.
    a = T.draw_masks(5, 16, reuse_prob=1.0, generator=torch.Generator().manual_seed(7))
    b = T.draw_masks(5, 16, reuse_prob=0.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.label_drop, b.label_drop) and b.prev_mask is None
    assert a.earlier == () and b.earlier == ()


def test_chained_previous_steps():
    """reuse_steps=K: chains of 1..K steps, each earlier step's mask a superset of the next one's, its count
    the next count plus round(share x the next step's visible count); the other choices as without."""
    g = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(300):
        m = T.draw_masks(3, 64, reuse_prob=1.0, reuse_steps=3, generator=g)
        lengths.append(len(m.earlier) + 1)
        steps = [*m.earlier, (m.prev_mask, m.n_prev_masked), (m.mask, m.n_masked)]
        for (before, n_before), (after, n_after) in zip(steps, steps[1:]):
            assert (before.sum(1) == n_before).all() and n_after <= n_before <= 64
            assert not (after & ~before).any()  # an earlier step masks a superset
    assert set(lengths) == {1, 2, 3} and all(60 < lengths.count(k) < 140 for k in (1, 2, 3))
    a = T.draw_masks(5, 16, reuse_prob=1.0, generator=torch.Generator().manual_seed(7))
    b = T.draw_masks(5, 16, reuse_prob=1.0, reuse_steps=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.prev_mask, b.prev_mask) and a.n_prev_masked == b.n_prev_masked
    assert torch.equal(a.label_drop, b.label_drop)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="reuse_steps"):
            T.draw_masks(5, 16, reuse_steps=bad)


def test_loss_is_reproducible_and_sharded_draws_match():
    model = _no_dropout(ENAT(CFG).train())
    ema = T.EMA(model)
    ids, labels = _batch(8)
    losses = [T.loss(model, ids, labels, prev_model=ema.model, generator=torch.Generator().manual_seed(5)).item()
              for _ in range(2)]
    assert losses[0] == losses[1]
    # Shards of a global batch: the mean of the shards' losses is the whole batch's loss.
    whole = T.loss(model, ids, labels, prev_model=ema.model, generator=torch.Generator().manual_seed(5))
    parts = [T.loss(model, ids[4 * i:4 * i + 4], labels[4 * i:4 * i + 4], prev_model=ema.model,
                    generator=torch.Generator().manual_seed(5), shard=(i, 2)) for i in range(2)]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole, rtol=1e-6, atol=1e-7)
    # ... with chains of previous steps too (their masks sliced per shard).
    chain = dict(prev_model=ema.model, reuse_prob=1.0, reuse_steps=3)
    drawn = T.draw_masks(8, L, reuse_prob=1.0, reuse_steps=3, generator=torch.Generator().manual_seed(11))
    assert len(drawn.earlier) == 2  # the seed below draws the longest chain
    whole = T.loss(model, ids, labels, generator=torch.Generator().manual_seed(11), **chain)
    parts = [T.loss(model, ids[4 * i:4 * i + 4], labels[4 * i:4 * i + 4], generator=torch.Generator().manual_seed(11),
                    shard=(i, 2), **chain) for i in range(2)]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole, rtol=1e-6, atol=1e-7)


def test_gradients_in_reuse_mode_reach_prev_proj_and_never_the_prev_model():
    model = perturbed(ENAT, CFG, dtype=torch.float32).train()  # the official init's zero gates would stop gradients
    ema = T.EMA(model, decay=0.9)
    ids, labels = _batch()
    T.loss(model, ids, labels, prev_model=ema.model, reuse_prob=1.0, generator=torch.Generator().manual_seed(0)).backward()
    for name, p in model.prev_proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in ema.model.parameters())
    assert not ema.model.training
    model.zero_grad(set_to_none=True)
    T.loss(model, ids, labels, prev_model=ema.model, reuse_prob=0.0, generator=torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.prev_proj.parameters())  # unused: zeros


# Every kind of step: (n_masked, n_prev_masked, the earlier steps' counts) on L = 16 tokens, and the
# parameters its forward skips.
STEP_KINDS = {"plain": ((9, None, ()), "prev_proj"), "reuse": ((9, 13, ()), None),
              "no critical token": ((9, 9, ()), "encoder"), "previous step all [MASK]": ((9, 16, ()), None),
              "one masked token": ((1, 15, ()), None), "no critical token, one visible": ((15, 15, ()), "encoder"),
              "chain": ((9, 13, (16,)), None)}


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_every_parameter_takes_part_in_every_step(kind, monkeypatch):
    """Each step's backward reaches every parameter (so DDP needs no find_unused_parameters): the ones
    the forward skips (those autograd leaves without a gradient when the loss does not add them) get
    exactly zero gradients, the others the same gradients, and the loss is the same bit for bit."""
    (n, n_prev, earlier), skipped = STEP_KINDS[kind]
    model = _no_dropout(perturbed(ENAT, CFG, dtype=torch.float32, seed=1).train())
    ids, labels = _batch()
    masks = _fixed_masks(len(ids), n, n_prev, earlier=earlier)
    loss = T.loss_on_masks(model, ids, labels, masks, prev_model=model)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(T, "skipped_parameters", lambda model, masks: [])
    bare = T.loss_on_masks(model, ids, labels, masks, prev_model=model)
    bare.backward()
    assert loss.item() == bare.item()
    prefixes = {"prev_proj": ("prev_proj.",), "encoder": tuple(f"blocks.{i}." for i in range(CFG.depth_enc)),
                None: ()}[skipped]
    unreached = {name for name, p in model.named_parameters() if p.grad is None}
    assert unreached == {name for name in grads if name.startswith(prefixes)}
    for name, p in model.named_parameters():
        assert grads[name] is not None, name
        assert not grads[name].any() if name in unreached else torch.equal(grads[name], p.grad), name


def test_ema_fixed_decay():
    model = ENAT(CFG)
    ema = T.EMA(model, decay=0.75, warmup=False)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for b, e, p in zip(before, ema.model.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * p)
    assert ema.updates == 1 and ema.decay_at(0) == ema.decay_at(10 ** 6) == 0.75


def test_ema_warmup_schedule():
    """d_t = min(decay, (1 + t) / (10 + t)); after T updates towards fixed weights the initial weights'
    share is the product of the d_t, in closed form 9! T! / (T + 9)! while the warm-up lasts."""
    ema = T.EMA(ENAT(CFG), decay=0.95)
    assert ema.warmup
    crossover = 171  # (1 + t) / (10 + t) >= 0.95 from t = (10 * 0.95 - 1) / 0.05 = 170 on
    for t in (0, 1, 9, 50, 169, 170, crossover, 10 ** 5):
        assert ema.decay_at(t) == pytest.approx((1 + t) / (10 + t) if t < 170 else 0.95, rel=1e-15), t
    assert ema.decay_at(0) == 0.1 and ema.decay_at(170) == pytest.approx(0.95)
    model = ENAT(CFG).double()
    ema = T.EMA(model, decay=0.9999)
    init = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    n = 40
    for _ in range(n):
        ema.update(model)
    share = math.factorial(9) * math.factorial(n) / math.factorial(n + 9)
    for a, e, p in zip(init, ema.model.parameters(), model.parameters()):
        torch.testing.assert_close(e, share * a + (1 - share) * p, rtol=1e-12, atol=1e-14)
    assert ema.updates == n and share < 1e-7  # 0.9999 ** 40 = 99.6% without the warm-up


def test_ema_state_round_trip_and_older_states():
    model = ENAT(CFG)
    ema = T.EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(3):
        ema.update(model)
    state = ema.state_dict()
    assert state["updates"] == 3 and set(state["state_dict"]) == set(model.state_dict())  # the official keys
    assert enat.load_official(state, CFG).state_dict().keys() == model.state_dict().keys()
    other = T.EMA(ENAT(CFG), decay=0.9)
    other.load_state_dict(state)
    assert other.updates == 3
    assert all(torch.equal(a, b) for a, b in zip(other.model.parameters(), ema.model.parameters()))
    bare = state["state_dict"]  # an older state: the weights alone
    with pytest.raises(ValueError, match="pass updates="):
        other.load_state_dict(bare)
    other.load_state_dict(bare, updates=7)
    assert other.updates == 7
    with pytest.raises(ValueError, match="holds the count 3"):
        other.load_state_dict(state, updates=4)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="updates must be"):
            other.load_state_dict(bare, updates=bad)
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match="decay"):
            T.EMA(model, decay=bad)
    with pytest.raises(ValueError, match="warmup"):
        T.EMA(model, warmup=1)


def test_optimizer_settings():
    model = ENAT(CFG)
    opt, sched = T.optimizer(model, lr=1e-3, warmup=4)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.03 and plain["weight_decay"] == 0.0 and opt.defaults["betas"] == (0.99, 0.99)
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decayed["params"]} == linear_weights
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_token_dataset_and_shards(tmp_path):
    rows = np.concatenate([np.arange(10)[:, None] % 5, np.arange(10 * L).reshape(10, L) % 16], axis=1).astype(np.int32)
    np.save(tmp_path / "tokens.npy", rows)
    data = T.TokenDataset(tmp_path / "tokens.npy")
    assert isinstance(data.data, np.memmap) and len(data) == 10 and data.seq_len == L
    ids, label = data[3]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.from_numpy(rows[3, 1:]).long()) and label.item() == 3
    ids, labels = data.batch([4, 1])
    assert torch.equal(labels, torch.tensor([4, 1]))
    data.check(CFG)
    with pytest.raises(ValueError, match="token ids must lie in"):
        data.check(ENATConfig("x", 1, 1, 8, 1, resolution=64, vocab_size=8, num_classes=5))
    with pytest.raises(ValueError, match="rows hold 16 tokens"):
        data.check(ENATConfig("x", 1, 1, 8, 1, resolution=128))
    # Shards: two ranks x two micro-steps cover a step's global batch exactly once; an epoch is a permutation.
    step_rows = [T.shard_indices(10, 0, 8, rank=r, world_size=2, micro_batch=2, micro_step=a, seed=1)
                 for a in range(2) for r in range(2)]
    one = T.shard_indices(10, 0, 8, micro_batch=8, seed=1)
    assert np.array_equal(np.concatenate(step_rows), one)
    epoch = np.concatenate([T.shard_indices(10, s, 5, seed=1) for s in range(2)])
    assert sorted(epoch) == list(range(10))


# Data parallel: two gloo processes against one.


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_setup():
    torch.manual_seed(0)
    model = _no_dropout(ENAT(CFG).train())
    with torch.no_grad():  # a non-trivial model (the official init zeroes adaLN)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prev = T.EMA(model, 0.9).model
    ids, labels = _batch(8, seed=4)
    return model, prev, ids, labels


# The steps: drawn by T.loss (reuse_prob, seed) or fixed masks, among them the ones whose forward skips
# parameters (prev_proj without reuse, the encoder without critical tokens), each followed by another
# step (DDP without find_unused_parameters would fail at the next forward if a gradient were missing).
DP_STEPS = [(1.0, 0), (0.0, 1), ("masks", 9, 9), ("masks", 9, 16), (1.0, 2)]


def _dp_loss(model, ids, labels, prev, step, shard=(0, 1)):
    index, count = shard
    rows = slice(index * len(ids) // count, (index + 1) * len(ids) // count)
    if step[0] == "masks":
        masks = _fixed_masks(len(ids), step[1], step[2]).take(rows.start, rows.stop)
        return T.loss_on_masks(model, ids[rows], labels[rows], masks, prev_model=prev)
    return T.loss(model, ids[rows], labels[rows], prev_model=prev, reuse_prob=step[0],
                  generator=torch.Generator().manual_seed(step[1]), shard=shard)


def _dp_worker(rank, port, out_dir):
    # DDP's reducer warns from C++ (on stderr, not through Python's warnings): fd 2 goes to a file.
    os.dup2(os.open(os.path.join(out_dir, f"rank{rank}.err"), os.O_WRONLY | os.O_CREAT, 0o644), 2)
    warnings.simplefilter("always")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, prev, ids, labels = _dp_setup()
        ddp = enat.train.data_parallel(model, torch.device("cpu"))  # as enat.train wraps the model
        losses = []
        for step in DP_STEPS:
            ddp.zero_grad(set_to_none=True)
            loss = _dp_loss(ddp, ids, labels, prev, step, shard=(rank, 2))
            loss.backward()
            losses.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None}))
        torch.save(losses, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    """enat.train's DistributedDataParallel (no find_unused_parameters) on two gloo processes: no
    warning, every parameter's gradient in every step (the steps that skip parameters included), the
    loss and gradients of one process on the whole batch."""
    torch.multiprocessing.spawn(_dp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in range(2):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert "find_unused_parameters" not in err, err[-2000:]
    model, prev, ids, labels = _dp_setup()
    for i, step in enumerate(DP_STEPS):
        model.zero_grad(set_to_none=True)
        loss = _dp_loss(model, ids, labels, prev, step)
        loss.backward()
        torch.testing.assert_close((ranks[0][i][0] + ranks[1][i][0]) / 2, loss.detach(), rtol=1e-6, atol=1e-7)
        for name, p in model.named_parameters():
            for r in range(2):
                g = ranks[r][i][1].get(name)
                assert g is not None and p.grad is not None, (step, name)
                # fp32 sums over the batch in another order: a few ulps of the gradient's scale
                scale = p.grad.abs().max().item()
                torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6 * max(scale, 1e-3), msg=name)


# The command.


def _token_file(tmp_path, n=64):
    from enat.demo import make_dataset

    path = tmp_path / "tokens.npy"
    np.save(path, make_dataset(n_per_class=n // 8).astype(np.int32))
    return path


TINY_ARGS = ["--depth-enc", "1", "--depth-dec", "1", "--width", "32", "--heads", "2", "--resolution", "128",
             "--vocab-size", "8", "--num-classes", "8", "--batch-size", "8", "--lr", "1e-3", "--warmup", "2",
             "--ema", "0.9", "--no-progress", "--log-every", "2", "--sample-every", "0"]


@pytest.mark.parametrize("older", [False, True], ids=["checkpoint", "older checkpoint"])
def test_resume_is_bit_identical(tmp_path, older):
    """A resumed run ends where a straight one does, the EMA's warm-up included (its decays 0.1, 0.18,
    0.25, 0.31 at updates 0..3 are below --ema 0.9, so a count restarted at 0 would show). An older
    checkpoint, whose EMA entry is the bare weights, resumes with the count set to its step."""
    data = str(_token_file(tmp_path))
    common = TINY_ARGS + ["--data", data, "--accum", "2", "--reuse-steps", "3"]
    straight, _ = enat.train.main(common + ["--out", str(tmp_path / "a"), "--steps", "4", "--ckpt-every", "2"])
    enat.train.main(common + ["--out", str(tmp_path / "b"), "--steps", "2", "--ckpt-every", "2"])
    if older:
        path = tmp_path / "b" / "checkpoints" / "step_0000002.pt"
        state = torch.load(path, weights_only=False)
        assert state["ema"]["updates"] == 2
        state["ema"] = state["ema"]["state_dict"]
        torch.save(state, path)
    resumed, ema = enat.train.main(common + ["--out", str(tmp_path / "b"), "--steps", "4", "--ckpt-every", "2",
                                             "--resume"])
    a = torch.load(tmp_path / "a" / "checkpoints" / "latest.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "latest.pt", weights_only=False)
    assert a["step"] == b["step"] == 4 and a["ema"]["updates"] == b["ema"]["updates"] == ema.updates == 4
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["ema"]["state_dict"]:
        assert torch.equal(a["ema"]["state_dict"][name], b["ema"]["state_dict"][name]), name
    for pa, pb in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    assert torch.equal(a["loss_generator"], b["loss_generator"])
    # and the run moved: the weights differ from the initial ones
    torch.manual_seed(0)
    assert any(not torch.equal(p, q) for p, q in zip(ENAT(straight.cfg).parameters(), straight.parameters()))


def test_train_command_writes_a_checkpoint_and_samples(tmp_path):
    data = _token_file(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "enat.train", *TINY_ARGS, "--data", str(data), "--out", str(out), "--steps", "4",
           "--ckpt-every", "4", "--sample-every", "4", "--sample-per-class", "2", "--samp-temp", "0.5"]
    env = dict(os.environ, ENAT_KERNELS_BACKEND="reference")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4/4 loss" in proc.stdout and "images/s" in proc.stdout
    # the sampler settings: the config's (a custom config: ENATConfig's defaults) unless a flag is given
    assert "steps 8, cfg_scale 2.5, mask_temp 1.5, samp_temp 0.5" in proc.stdout
    ckpt = torch.load(out / "checkpoints" / "step_0000004.pt", weights_only=False)
    assert ckpt["step"] == 4 and {"model", "ema", "optimizer", "scheduler", "rng", "loss_generator"} <= ckpt.keys()
    cfg = ENATConfig(**ckpt["config"])
    assert cfg.vocab_size == 8 and cfg.seq_len == 64
    model = enat.load_official(ckpt["ema"], cfg)  # the EMA weights under the official keys
    assert model.cfg.num_classes == 8
    assert (out / "samples" / "step_0000004.png").exists()
    ids = np.load(out / "samples" / "step_0000004.npy")
    assert ids.shape == (16, 65) and ids[:, 1:].max() < 8
    assert (out / "checkpoints" / "latest.pt").exists()


def test_train_command_ema_warmup_flag(tmp_path):
    args = TINY_ARGS + ["--data", str(_token_file(tmp_path)), "--steps", "2"]
    _, ema = enat.train.main(args + ["--out", str(tmp_path / "a")])
    assert ema.warmup and ema.updates == 2 and ema.decay_at(0) == 0.1
    _, ema = enat.train.main(args + ["--out", str(tmp_path / "b"), "--no-ema-warmup"])
    assert not ema.warmup and ema.updates == 2 and ema.decay_at(0) == 0.9


@pytest.mark.parametrize("bad, message", [(["--reuse-steps", "0"], "--reuse-steps"),
                                          (["--batch-size", "6", "--accum", "4"], "--batch-size"),
                                          (["--ema", "1.5"], "--ema"), (["--samp-temp", "-1"], "--samp-temp"),
                                          (["--sample-steps", "0"], "--sample-steps")])
def test_train_command_rejects_bad_arguments(tmp_path, bad, message):
    args = TINY_ARGS + ["--data", str(_token_file(tmp_path)), "--out", str(tmp_path / "run"), "--steps", "1"] + bad
    with pytest.raises(SystemExit, match=message):
        enat.train.main(args)
