"""load_official: a state dict with the official keys round-trips through a file with strict key
checking; the checkpoint's unused prev_embedder keys and a DataParallel prefix are accepted; a
mismatched checkpoint is refused with the keys and shapes that differ."""

import pytest
import torch

import enat
from enat import ENAT
from enat.config import MASK_ID
from helpers import TINY, perturbed

LABELS = torch.tensor([4, 1000])


def _official(model):
    """The model's weights as the paper's checkpoint holds them: fp32, plus prev_embedder (d -> 4d -> d)."""
    d = model.cfg.width
    state = {k: v.float() for k, v in model.state_dict().items()}
    state.update({"prev_embedder.fc1.weight": torch.randn(4 * d, d), "prev_embedder.fc1.bias": torch.randn(4 * d),
                  "prev_embedder.fc2.weight": torch.randn(d, 4 * d), "prev_embedder.fc2.bias": torch.randn(d)})
    return state


def test_round_trip_through_a_file(tmp_path):
    source = perturbed(ENAT, TINY, dtype=torch.float32)
    path = tmp_path / "nnet_ema.pth"
    torch.save(_official(source), path)
    loaded = enat.load_official(path, TINY)
    assert not loaded.training
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids = torch.full((2, TINY.seq_len), MASK_ID)
    ids[:, :5] = 7
    assert torch.equal(loaded(ids, LABELS).logits, source(ids, LABELS).logits)


def test_data_parallel_prefix_is_stripped():
    source = perturbed(ENAT, TINY, dtype=torch.float32)
    state = {f"module.{k}": v for k, v in _official(source).items()}
    loaded = enat.load_official(state, TINY)
    assert torch.equal(loaded.blocks[1].attn.kv_ctx.weight, source.blocks[1].attn.kv_ctx.weight)


def test_named_configuration():
    with torch.device("meta"):
        state = ENAT(enat.config("ENAT-S")).state_dict()
    state = {k: torch.zeros(v.shape) for k, v in state.items()}
    model = enat.load_official(state, "ENAT-S")
    assert model.cfg == enat.config("ENAT-S") and model.cfg.head_dim == 61


def test_mismatches_are_refused():
    state = _official(ENAT(TINY))
    missing = dict(state)
    del missing["blocks.1.attn.kv.B.weight"]
    with pytest.raises(ValueError, match=r"missing \(1\): blocks.1.attn.kv.B.weight"):
        enat.load_official(missing, TINY)
    extra = dict(state, **{"blocks.9.attn.q.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected \(1\): blocks.9.attn.q.weight"):
        enat.load_official(extra, TINY)
    with pytest.raises(ValueError, match=r"x_embedder.position_embeddings.weight: checkpoint \(25, 48\), model \(1024, 48\)"):
        enat.load_official(state, enat.ENATConfig("tiny-512", 2, 2, 48, 3, resolution=512))
    with pytest.raises(TypeError, match="must be a state dict"):
        enat.load_official([1, 2], TINY)
