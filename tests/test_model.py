"""enat.ENAT and enat.PlainNAT against the independent float64 implementation of docs/MODEL.md in
enat_oracle.py, with every weight perturbed (the official initialisation zeroes the adaLN layers,
which would hide most of the block), at the first step, with and without reuse, at a reuse step with
no critical tokens, at the last step and with nothing masked; the official parameter names;
torch.compile; gradients; and bad input.
"""

import pytest
import torch
import torch.nn.functional as F

import enat
from enat import ENAT, ENATConfig, PlainNAT
from enat.config import MASK_ID, VOCAB
from enat_oracle import oracle_forward, oracle_plain_forward
from helpers import SMALL_S, TINY, needs_gpu, needs_triton, oracle_cfg, perturbed, triton_device

CONFIGS = [pytest.param(TINY, id="tiny"), pytest.param(SMALL_S, id="ENAT-S-shape")]
B = 3


def random_ids(cfg, n_masked, seed, keep=None):
    """ids (B, L) with exactly n_masked [MASK] per row; `keep` (previous ids) fixes the visible tokens
    of a previous step, revealing some of its [MASK] positions at random."""
    g = torch.Generator().manual_seed(seed)
    L = cfg.seq_len
    ids = torch.randint(0, VOCAB, (B, L), generator=g) if keep is None else keep.clone()
    for row in range(B):
        if keep is None:
            candidates = torch.randperm(L, generator=g)
        else:
            masked = (keep[row] == MASK_ID).nonzero().squeeze(1)
            candidates = masked[torch.randperm(masked.numel(), generator=g)]
            ids[row, candidates] = torch.randint(0, VOCAB, (candidates.numel(),), generator=g)
        ids[row, candidates[:n_masked]] = MASK_ID
    return ids


LABELS = torch.tensor([3, 1000, 999])  # the null class included


def _assert_close(out, ref, rel):
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} above {rel:.0e} x {scale:.3e}"


# Each case: n masked in the previous step's input (None: no prev), n masked now.
STEP_CASES = {
    "first step (no visible token)": (None, "L", None),
    "no reuse, some visible": (None, 11, None),
    "reuse with critical tokens": (17, 11, None),
    "reuse, no critical token": (11, 11, None),
    "last step": (6, 2, None),
    "nothing masked, with prev": (2, 0, None),
    "prev as a dict": (17, 11, "dict"),
}


def _step_inputs(cfg, case):
    n_prev, n_now, form = STEP_CASES[case]
    L = cfg.seq_len
    n_now = L if n_now == "L" else n_now
    if n_prev is None:
        return None, random_ids(cfg, n_now, seed=1), form
    prev_ids = random_ids(cfg, n_prev, seed=1)
    return prev_ids, random_ids(cfg, n_now, seed=2, keep=prev_ids), form


@pytest.mark.parametrize("case", list(STEP_CASES))
@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_matches_oracle(cfg, case):
    model = perturbed(ENAT, cfg)
    sd, ocfg = model.state_dict(), oracle_cfg(cfg)
    prev_ids, ids, form = _step_inputs(cfg, case)
    prev = oracle_prev = None
    if prev_ids is not None:  # each side runs its own previous step
        prev = model(prev_ids, LABELS)
        _, prev_feat = oracle_forward(sd, ocfg, prev_ids, LABELS)
        oracle_prev = (prev_feat, prev_ids == MASK_ID)
        if form == "dict":
            prev = {"feat": prev.feat, "masking": prev.masking}
    out = model(ids, LABELS, prev)
    logits, feat = oracle_forward(sd, ocfg, ids, LABELS, oracle_prev)
    assert out.logits.shape == (B, cfg.seq_len, VOCAB) and out.feat.shape == (B, cfg.seq_len, cfg.width)
    assert torch.equal(out.masking, ids == MASK_ID)
    _assert_close(out.logits, logits, 1e-10)
    _assert_close(out.feat, feat, 1e-10)


def test_reuse_changes_the_result():
    """Guards the oracle comparison itself: reuse and no reuse differ, so a model that ignored prev fails."""
    model = perturbed(ENAT, TINY)
    prev_ids, ids, _ = _step_inputs(TINY, "reuse with critical tokens")
    with_prev = model(ids, LABELS, model(prev_ids, LABELS))
    without = model(ids, LABELS)
    assert (with_prev.logits - without.logits).abs().max() > 1e-3


def test_counts_given_match_counts_read():
    model = perturbed(ENAT, TINY)
    prev_ids, ids, _ = _step_inputs(TINY, "reuse with critical tokens")
    prev = model(prev_ids, LABELS)
    read = model(ids, LABELS, prev)
    given = model(ids, LABELS, prev, n_masked=11, n_prev_masked=17)
    assert torch.equal(read.logits, given.logits)


def test_fp32_forward_within_budget():
    model = perturbed(ENAT, SMALL_S)
    sd = model.state_dict()
    model = model.float()
    prev_ids, ids, _ = _step_inputs(SMALL_S, "reuse with critical tokens")
    _, prev_feat = oracle_forward(sd, oracle_cfg(SMALL_S), prev_ids, LABELS)
    logits, _ = oracle_forward(sd, oracle_cfg(SMALL_S), ids, LABELS, (prev_feat, prev_ids == MASK_ID))
    out = model(ids, LABELS, model(prev_ids, LABELS))
    assert out.logits.dtype == torch.float32
    _assert_close(out.logits, logits, 1e-4)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_plain_nat_matches_oracle(cfg):
    model = perturbed(PlainNAT, cfg)
    ids = random_ids(cfg, 7, seed=3)
    out = model(ids, LABELS)
    logits, feat = oracle_plain_forward(model.state_dict(), oracle_cfg(cfg), ids, LABELS)
    _assert_close(out.logits, logits, 1e-10)
    _assert_close(out.feat, feat, 1e-10)
    assert torch.equal(model(ids, LABELS, out).logits, out.logits)  # prev is ignored


@pytest.mark.parametrize("device", [
    pytest.param("interpreter", id="triton", marks=needs_triton),
    pytest.param("cuda", id="cuda", marks=needs_gpu),
])
def test_kernel_backends_in_the_model(device, monkeypatch):
    """The model on the Triton kernels (interpreted on CPU; compiled, and CUDA where chosen, on a GPU)
    equals the model on the reference ops."""
    if device == "interpreter":
        dev = triton_device()  # skips when the interpreter cannot run
        monkeypatch.setenv("ENAT_KERNELS_BACKEND", "triton")
    else:
        dev = "cuda"
    ref_model = perturbed(ENAT, TINY, dtype=torch.float32)
    prev_ids, ids, _ = _step_inputs(TINY, "reuse with critical tokens")
    with monkeypatch.context() as m:
        m.setenv("ENAT_KERNELS_BACKEND", "reference")
        expected = ref_model(ids, LABELS, ref_model(prev_ids, LABELS))
    model = ref_model.to(dev)
    out = model(ids.to(dev), LABELS.to(dev), model(prev_ids.to(dev), LABELS.to(dev)))
    _assert_close(out.logits.cpu(), expected.logits.double(), 1e-4)


def test_official_parameter_names():
    """The names listed in docs/MODEL.md, written out here independently of the model code."""
    d, depth = TINY.width, TINY.depth
    expected = {"x_embedder.word_embeddings.weight", "x_embedder.position_embeddings.weight",
                "x_embedder.LayerNorm.weight", "x_embedder.LayerNorm.bias", "y_embedder.embedding_table.weight",
                "norm.weight", "norm.bias", "mlm_layer.fc.weight", "mlm_layer.fc.bias", "mlm_layer.ln.weight",
                "mlm_layer.ln.bias", "mlm_layer.bias"}
    block = ["adaLN_modulation.1", "attn.q", "attn.kv.A", "attn.kv.B", "attn.proj", "mlp.fc1", "mlp.fc2"]
    expected |= {f"blocks.{i}.{layer}.{p}" for i in range(depth) for layer in block for p in ("weight", "bias")}
    prev_proj = {f"prev_proj.{layer}.{p}" for layer in ("norm", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
    assert set(ENAT(TINY).state_dict()) == expected | prev_proj
    assert set(PlainNAT(TINY).state_dict()) == expected
    shapes = {k: tuple(v.shape) for k, v in ENAT(TINY).state_dict().items()}
    assert shapes["blocks.0.attn.kv.A.weight"] == (2 * d, d)
    assert shapes["blocks.0.adaLN_modulation.1.weight"] == (8 * d, d)
    assert shapes["mlm_layer.bias"] == (1, 1, VOCAB + 1)
    assert shapes["x_embedder.position_embeddings.weight"] == (TINY.seq_len, d)
    assert shapes["y_embedder.embedding_table.weight"] == (1001, d)


def test_fused_projection_round_trips_the_official_keys():
    """q and kv.B are one (3d, d) GEMM inside; state_dict() splits it into the official keys and
    load_state_dict() joins them again, bit for bit, once per load."""
    source = perturbed(ENAT, TINY, dtype=torch.float32, seed=3)
    state = source.state_dict()
    d = TINY.width
    attn = source.blocks[1].attn
    assert torch.equal(state["blocks.1.attn.q.weight"], attn.qkv.weight[:d])
    assert torch.equal(state["blocks.1.attn.kv.B.bias"], attn.qkv.bias[d:])
    assert torch.equal(state["blocks.1.attn.kv.A.weight"], attn.kv_ctx.weight)
    target = ENAT(TINY)
    target.load_state_dict(state)
    for (name, a), b in zip(source.named_parameters(), target.parameters()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 5, d)
    q, k, v = (t.transpose(1, 2).reshape(2, 5, -1) for t in attn._heads(attn.qkv(x), 3))
    assert torch.allclose(q, F.linear(x, state["blocks.1.attn.q.weight"], state["blocks.1.attn.q.bias"]),
                          rtol=1e-5, atol=1e-6)
    kv = F.linear(x, state["blocks.1.attn.kv.B.weight"], state["blocks.1.attn.kv.B.bias"])
    assert torch.allclose(torch.cat([k, v], -1), kv, rtol=1e-5, atol=1e-6)
    del state["blocks.0.attn.kv.B.bias"]
    with pytest.raises(RuntimeError, match="blocks.0.attn"):
        ENAT(TINY).load_state_dict(state)


@pytest.mark.parametrize(("name", "paper_millions"), [("ENAT-S", 50), ("ENAT-B", 219), ("ENAT-L", 574)])
def test_parameter_counts_match_the_paper(name, paper_millions):
    """Table 7's counts include the checkpoint's unused prev_embedder MLP (d -> 4d -> d)."""
    cfg = enat.config(name)
    with torch.device("meta"):
        model = ENAT(cfg)
    d = cfg.width
    total = sum(p.numel() for p in model.parameters()) + 8 * d * d + 5 * d
    assert abs(total / 1e6 - paper_millions) / paper_millions < 0.015


def test_initialisation_is_the_official_one():
    model = ENAT(TINY)
    for block in model.blocks:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
    assert not model.state_dict()["blocks.0.attn.q.bias"].any()
    std = model.x_embedder.word_embeddings.weight.std().item()
    assert 0.015 < std < 0.025


def test_gradients_reach_every_parameter():
    """Training: one reuse-step loss, backward through the kernels' autograd; every parameter gets a
    finite gradient (the word embeddings through the input, not the tied logits)."""
    model = perturbed(ENAT, TINY, dtype=torch.float32).train()
    prev_ids, ids, _ = _step_inputs(TINY, "reuse with critical tokens")
    with torch.no_grad():
        prev = model.eval()(prev_ids, LABELS)
    out = model.train()(ids, LABELS, prev)
    targets = torch.randint(0, VOCAB, ids.shape)
    loss = torch.nn.functional.cross_entropy(out.logits[out.masking], targets[out.masking], label_smoothing=0.1)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_compiles_without_graph_breaks():
    model = perturbed(ENAT, TINY, dtype=torch.float32)
    prev_ids, ids, _ = _step_inputs(TINY, "reuse with critical tokens")
    prev = model(prev_ids, LABELS)
    expected = model(ids, LABELS, prev, n_masked=11, n_prev_masked=17)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids, LABELS, prev, n_masked=11, n_prev_masked=17)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)


# Bad input.


def test_bad_ids_and_labels():
    model = ENAT(TINY)
    L = TINY.seq_len
    ids = torch.full((B, L), MASK_ID)
    with pytest.raises(ValueError, match=r"ids must be a \(B, 25\)"):
        model(ids[:, :-1], LABELS)
    with pytest.raises(TypeError, match="ids must be int64"):
        model(ids.int(), LABELS)
    with pytest.raises(ValueError, match="labels must be a \\(3,\\)"):
        model(ids, LABELS[:2])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 1024\]"):
        model(ids + 1, LABELS)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1000\]"):
        model(ids, LABELS + 2)
    uneven = ids.clone()
    uneven[0, 0] = 5
    with pytest.raises(ValueError, match="same number of True"):
        model(uneven, LABELS)


def test_bad_prev():
    model = ENAT(TINY)
    prev_ids, ids, _ = _step_inputs(TINY, "reuse with critical tokens")
    prev = model(prev_ids, LABELS)
    with pytest.raises(TypeError, match="prev must be an ENATOutput or a dict"):
        model(ids, LABELS, prev.feat)
    with pytest.raises(ValueError, match="prev feat must be"):
        model(ids, LABELS, {"feat": prev.feat[:, 1:], "masking": prev.masking})
    with pytest.raises(TypeError, match="prev masking must be bool"):
        model(ids, LABELS, {"feat": prev.feat, "masking": prev.masking.long()})
    with pytest.raises(ValueError, match="must contain this step's"):
        model(prev_ids, LABELS, model(ids, LABELS))  # the reverse order: tokens masked again


def test_bad_config():
    with pytest.raises(ValueError, match="name must be one of"):
        enat.config("ENAT-XL")
    with pytest.raises(ValueError, match="resolution must be one of"):
        enat.config("ENAT-S", 384)
    with pytest.raises(ValueError, match="divisible by heads"):
        ENATConfig("x", 1, 1, 50, 3)
    with pytest.raises(TypeError, match="cfg must be an ENATConfig"):
        ENAT("ENAT-S")


# A non-default vocabulary and class count (a tokenizer of 16 codes, 5 classes, a 4 x 4 grid).
SMALL_VOCAB = ENATConfig("vocab16", depth_enc=2, depth_dec=1, width=32, heads=2, resolution=64, vocab_size=16,
                         num_classes=5)


def test_non_default_vocabulary_and_classes():
    cfg = SMALL_VOCAB
    assert (cfg.mask_id, cfg.null_class, cfg.seq_len) == (16, 5, 16)
    assert (enat.config("ENAT-S").mask_id, enat.config("ENAT-S").null_class) == (MASK_ID, 1000)
    model = perturbed(ENAT, cfg, dtype=torch.float32)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["x_embedder.word_embeddings.weight"] == (17, 32)
    assert shapes["y_embedder.embedding_table.weight"] == (6, 32)
    assert shapes["mlm_layer.bias"] == (1, 1, 17)
    g = torch.Generator().manual_seed(0)
    prev_ids = torch.randint(0, 16, (2, 16), generator=g)
    prev_ids[:, :9] = cfg.mask_id  # [MASK] is id 16
    ids = prev_ids.clone()
    ids[:, 6:9] = 3
    labels = torch.tensor([4, cfg.null_class])
    prev = model(prev_ids, labels)
    out = model(ids, labels, prev)
    assert out.logits.shape == (2, 16, 16) and out.feat.shape == (2, 16, 32)
    assert torch.equal(out.masking, ids == 16) and out.masking.sum(1).tolist() == [6, 6]
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 16\] \(16 = \[MASK\]\)"):
        model(ids + 16, labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\]"):
        model(ids, labels + 2)
    # A model trained with another vocabulary cannot take an ENAT-S checkpoint's word embeddings.
    with pytest.raises(ValueError, match="vocabulary 16"):
        enat.load_official(perturbed(ENAT, TINY).state_dict(), ENATConfig(**{**TINY.__dict__, "vocab_size": 16}))
