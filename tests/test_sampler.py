"""enat.sample: the reveal schedule, ids equal to the independent two-pass sampler of enat_oracle.py
(which keeps a separate cache per CFG branch), batched CFG equal to two passes, the paper-style path
equal to ours, determinism, valid ids, and no host synchronisation on a GPU.
"""

import functools

import pytest
import torch

import enat
import enat.paper_style
from enat import ENAT, ENATConfig, PlainNAT
from enat.config import MASK_ID, VOCAB
from enat_oracle import oracle_forward, oracle_plain_forward, oracle_sample
from helpers import TINY, needs_gpu, oracle_cfg, perturbed

LABELS = torch.tensor([3, 1000, 17])
SETTINGS = dict(cfg_scale=2.5, mask_temp=1.5, samp_temp=6.0)


def _gen(seed=0, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def test_schedule_matches_the_paper():
    counts = enat.mask_schedule(256, 8)
    assert [a - b for a, b in zip(counts, counts[1:])] == [5, 15, 24, 31, 39, 45, 48, 49]
    assert counts[0] == 256 and counts[-1] == 0
    with pytest.raises(ValueError, match="steps must be a positive int"):
        enat.mask_schedule(256, 0)


def test_sampling_reveals_the_scheduled_counts():
    """At L = 256, T = 8, the forward of step k sees the scheduled number of [MASK] tokens."""
    cfg = ENATConfig("tiny-256px", depth_enc=1, depth_dec=1, width=32, heads=2, resolution=256)
    model = perturbed(ENAT, cfg, dtype=torch.float32)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((args[0] == MASK_ID).sum(1).tolist()))
    ids = enat.sample(model, LABELS, steps=8, generator=_gen())
    assert seen == [[n] * 2 * len(LABELS) for n in enat.mask_schedule(256, 8)[:-1]]  # 2B rows: both branches
    assert not (ids == MASK_ID).any()


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_ids_match_the_oracle_sampler(reuse):
    model = perturbed(ENAT, TINY)
    forward = functools.partial(oracle_forward, model.state_dict(), oracle_cfg(TINY))
    expected = oracle_sample(forward, LABELS, steps=5, reuse=reuse, generator=_gen(), seq_len=TINY.seq_len, **SETTINGS)
    ids = enat.sample(model, LABELS, steps=5, reuse=reuse, generator=_gen(), **SETTINGS)
    assert torch.equal(ids, expected)


def test_plain_nat_samples_like_the_oracle():
    model = perturbed(PlainNAT, TINY)
    forward = functools.partial(
        lambda sd, cfg, ids, labels, prev: oracle_plain_forward(sd, cfg, ids, labels), model.state_dict(), oracle_cfg(TINY)
    )
    expected = oracle_sample(forward, LABELS, steps=4, reuse=False, generator=_gen(), seq_len=TINY.seq_len, **SETTINGS)
    assert torch.equal(enat.sample(model, LABELS, steps=4, generator=_gen(), **SETTINGS), expected)


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_batched_cfg_equals_two_passes(reuse):
    model = perturbed(ENAT, TINY)
    batched = enat.sample(model, LABELS, steps=6, reuse=reuse, generator=_gen(3))
    two_passes = enat.sample(model, LABELS, steps=6, reuse=reuse, generator=_gen(3), cfg_batch=False)
    assert torch.equal(batched, two_passes)


def test_paper_style_path_gives_the_same_ids():
    """The benchmark's baseline does the same computation: same weights, same ids."""
    model = perturbed(ENAT, TINY)
    ours = enat.sample(model, LABELS, steps=6, generator=_gen(4))
    paper = enat.paper_style.sample(model, LABELS, steps=6, generator=_gen(4))
    assert torch.equal(ours, paper)
    assert model.ops is enat.model.KernelOps  # restored afterwards


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_fused_engine_gives_the_ids_of_the_unfused_paths_in_fp32(reuse):
    """fp32 on CPU: the fused engine (adaLN ops, fused projection, kernels' references) returns the ids
    of the plain-PyTorch baseline (SDPA over torch.cat, F.layer_norm, torch.gather) and of the
    paper-style path, for the same weights and generator."""
    model = perturbed(ENAT, TINY, dtype=torch.float32, seed=2)
    ours = enat.sample(model, LABELS, steps=6, reuse=reuse, generator=_gen(9))
    assert torch.equal(ours, enat.torch_baseline.sample(model, LABELS, steps=6, reuse=reuse, generator=_gen(9)))
    assert torch.equal(ours, enat.paper_style.sample(model, LABELS, steps=6, reuse=reuse, generator=_gen(9)))
    assert model.ops is enat.model.KernelOps


def test_torch_baseline_ops_match_the_kernels():
    """Each TorchOps op against enat_kernels.ops (exact for token movement)."""
    import enat_kernels.ops as K
    from enat.torch_baseline import TorchOps

    g = torch.Generator().manual_seed(0)
    B, L, D, n = 3, 11, 5, 4
    x = torch.randn(B, L, D, generator=g)
    mask = torch.stack([torch.randperm(L, generator=g) < n for _ in range(B)])
    index = K.mask_to_index(mask, n)
    assert torch.equal(TorchOps.positions(mask, n), index)
    assert torch.equal(TorchOps.gather(x, index), K.gather_tokens(x, index))
    for a, b in zip(TorchOps.split(x, mask, n), K.split_tokens(x, mask, n)):
        assert torch.equal(a, b)
    visible, masked = K.split_tokens(x, mask, n)
    assert torch.equal(TorchOps.restore(visible, masked, mask), x)
    other = K.mask_to_index(~mask, L - n)
    assert torch.equal(TorchOps.merge(masked, index, visible, other), x)


def test_deterministic_with_a_generator_and_valid():
    model = perturbed(ENAT, TINY, dtype=torch.float32)
    a = enat.sample(model, LABELS, generator=_gen(5))
    b = enat.sample(model, LABELS, generator=_gen(5))
    c = enat.sample(model, LABELS, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.shape == (len(LABELS), TINY.seq_len)
    assert a.min() >= 0 and a.max() < VOCAB


def test_more_steps_than_needed_and_one_step():
    model = perturbed(ENAT, TINY, dtype=torch.float32)
    for steps in (1, 30):  # T = 30 > L = 25: some steps reveal nothing, so the reuse step has no critical token
        ids = enat.sample(model, LABELS, steps=steps, generator=_gen())
        assert ids.min() >= 0 and ids.max() < VOCAB


def test_bad_arguments():
    model = ENAT(TINY)
    with pytest.raises(ValueError, match="labels must be a \\(B,\\) int64"):
        enat.sample(model, LABELS.int())
    with pytest.raises(ValueError, match="steps must be a positive int"):
        enat.sample(model, LABELS, steps=0)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        enat.sample(model, LABELS, cfg_scale=float("nan"))
    with pytest.raises(ValueError, match="labels must be on the model's device"):
        enat.sample(model, LABELS.to("meta"))
    with pytest.raises(ValueError, match="labels must hold at least one class"):
        enat.sample(model, LABELS[:0])
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got 0"):
        enat.sample(model, LABELS, generator=0)
    with pytest.raises(ValueError, match=r"labels must be classes in \[0, 999\] .* got values in \[-1, 17\]"):
        enat.sample(model, torch.tensor([3, -1, 17]))


def test_a_model_in_training_mode_samples_in_eval_mode():
    """Dropout and label dropout are off while sampling, so a training-mode model gives the ids of
    eval mode for the same generator; its mode is restored afterwards."""
    model = perturbed(ENAT, TINY, dtype=torch.float32)
    expected = enat.sample(model.eval(), LABELS, generator=_gen(7))
    model.train()
    for _ in range(2):
        assert torch.equal(enat.sample(model, LABELS, generator=_gen(7)), expected)
    assert model.training and all(m.training for m in model.modules())


def test_progress_bar_on_request(capsys):
    model = perturbed(ENAT, TINY, dtype=torch.float32)
    quiet = enat.sample(model, LABELS, steps=3, generator=_gen(8))
    assert capsys.readouterr().err == ""
    shown = enat.sample(model, LABELS, steps=3, generator=_gen(8), progress=True)
    assert "enat.sample" in capsys.readouterr().err and torch.equal(quiet, shown)


@needs_gpu
def test_no_host_sync_in_the_step_loop():
    model = perturbed(ENAT, TINY, dtype=torch.float32).cuda()
    labels = LABELS.cuda()
    enat.sample(model, labels, steps=4, generator=_gen(0, "cuda"))  # warm-up: Triton compiles, autotunes
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids = enat.sample(model, labels, steps=4, generator=_gen(0, "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = enat.sample(model.cpu(), LABELS, steps=4, generator=_gen(0))
    assert (ids.cpu() == expected).float().mean() > 0.9  # GPU and CPU arithmetic differ by rounding


def test_graphed_sampler_rejects_bad_input():
    model = perturbed(ENAT, TINY, dtype=torch.float32)
    with pytest.raises(ValueError, match="model must be on a CUDA device, got cpu"):
        enat.GraphedSampler(model, batch=2)


@needs_gpu
def test_graphed_sampler_replays_sample():
    """Replays give the ids of enat.sample with the same seed, for new labels and seeds each call,
    in fp32 and under fp16 autocast."""
    model = perturbed(ENAT, TINY, dtype=torch.float32).cuda()
    for autocast in (None, torch.float16):
        sampler = enat.GraphedSampler(model, batch=3, steps=4, autocast=autocast, **SETTINGS)
        for labels, seed in ((LABELS, 0), (torch.tensor([5, 6, 1000]), 1), (LABELS, 7)):
            labels = labels.cuda()
            with torch.autocast("cuda", autocast or torch.float16, enabled=autocast is not None):
                expected = enat.sample(model, labels, steps=4, generator=_gen(seed, "cuda"), **SETTINGS)
            assert torch.equal(sampler(labels, seed=seed), expected)
    with pytest.raises(ValueError, match=r"labels must be a \(3,\) int64 tensor"):
        sampler(LABELS[:2].cuda())
    with pytest.raises(ValueError, match="labels must be on cuda"):
        sampler(LABELS)
    with pytest.raises(ValueError, match="autocast must be None"):
        enat.GraphedSampler(model, batch=3, autocast=torch.float32)
    with torch.autocast("cuda", torch.float16), pytest.raises(ValueError, match="construct GraphedSampler outside"):
        enat.GraphedSampler(model, batch=3)


def test_non_default_vocabulary_and_classes():
    """vocab_size 16 ([MASK] = 16) and 5 classes (null = 5): ids in [0, 16), every [MASK] revealed, and the
    unconditional branch uses the config's null class."""
    cfg = ENATConfig("vocab16", depth_enc=2, depth_dec=1, width=32, heads=2, resolution=64, vocab_size=16,
                     num_classes=5)
    model = perturbed(ENAT, cfg, dtype=torch.float32)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[1].tolist()))
    labels = torch.tensor([0, 4, 5])
    for reuse in (True, False):
        ids = enat.sample(model, labels, steps=4, reuse=reuse, generator=_gen())
        assert ids.shape == (3, 16) and ids.min() >= 0 and ids.max() < 16
    assert seen[0] == [0, 4, 5, 5, 5, 5]
    with pytest.raises(ValueError, match=r"labels must be classes in \[0, 4\] \(or 5"):
        enat.sample(model, torch.tensor([6]))
    assert enat.flops.generation_macs(cfg) < enat.flops.generation_macs(ENATConfig(**{**cfg.__dict__, "vocab_size": 1024}))


def test_sampler_settings_default_to_the_model_config():
    """cfg_scale, mask_temp and samp_temp left out (or None) are the model config's, e.g. a 512 px
    model's 3.5 / 1.5 / 4 rather than the 256 px values; each given one wins over the config."""
    cfg = ENATConfig("tiny-own-settings", depth_enc=2, depth_dec=1, width=48, heads=3, resolution=80,
                     cfg_scale=3.5, mask_temp=0.5, samp_temp=4.0)
    model = perturbed(ENAT, cfg, dtype=torch.float32)
    own = dict(cfg_scale=3.5, mask_temp=0.5, samp_temp=4.0)
    ids = enat.sample(model, LABELS, steps=4, generator=_gen())
    assert torch.equal(ids, enat.sample(model, LABELS, steps=4, generator=_gen(), **own))
    assert torch.equal(ids, enat.sample(model, LABELS, steps=4, generator=_gen(), cfg_scale=None, samp_temp=None))
    assert not torch.equal(ids, enat.sample(model, LABELS, steps=4, generator=_gen(), **SETTINGS))
    assert enat.sampler.settings(model, samp_temp=1.0) == dict(cfg_scale=3.5, mask_temp=0.5, samp_temp=1.0)
    assert (enat.config("ENAT-L", 512).cfg_scale, enat.config("ENAT-L", 512).samp_temp) == (3.5, 4.0)


def test_imagenet_constants_are_deprecated_in_favour_of_the_config():
    with pytest.warns(DeprecationWarning, match="use model.cfg.mask_id"):
        assert enat.MASK_ID == 1024
    with pytest.warns(DeprecationWarning, match="use model.cfg.null_class"):
        assert enat.NULL_CLASS == 1000
    assert "MASK_ID" not in enat.__all__
