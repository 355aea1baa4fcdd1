"""enat.flops.generation_macs: the paper's numbers, and agreement with torch.utils.flop_counter on
real sampling runs (which count a multiply-accumulate as two FLOPs)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import enat
from enat import ENAT, PlainNAT
from enat.flops import generation_macs
from helpers import TINY, perturbed


def test_paper_ablation_numbers():
    """ENAT-S, 256 px, 8 steps, both CFG passes, without the VQ decoder: 22.6 G with reuse, 39.8 G without."""
    assert round(generation_macs("ENAT-S") / 1e9, 1) == 22.6
    assert round(generation_macs("ENAT-S", reuse=False) / 1e9, 1) == 39.8


def test_paper_system_numbers():
    """ENAT-L at 256 px: about 251 GMACs transformer-only and 0.3 T with the VQ decoder (about 93 G)."""
    transformer = generation_macs("ENAT-L")
    assert abs(transformer / 251e9 - 1) < 0.015
    assert round(generation_macs("ENAT-L", vq_decoder=True) / 1e12, 1) == 0.3
    assert generation_macs("ENAT-L", vq_decoder=True) - transformer == 93e9
    assert generation_macs("ENAT-L", resolution=512, vq_decoder=True) - generation_macs("ENAT-L", resolution=512) == 373e9


def test_counting_rules():
    full = generation_macs("ENAT-B")
    assert generation_macs("ENAT-B", guidance=False) * 2 == full
    assert generation_macs("ENAT-B", steps=4) < full < generation_macs("ENAT-B", reuse=False)
    assert generation_macs("ENAT-B", reuse=False) < generation_macs("ENAT-B", plain=True)
    assert generation_macs(enat.config("ENAT-B", 512)) == generation_macs("ENAT-B", resolution=512)
    with pytest.raises(ValueError, match="VQ decoder cost is known at"):
        generation_macs(TINY, vq_decoder=True)


@pytest.mark.parametrize(("kind", "reuse"), [("enat", True), ("enat", False), ("plain", False)])
def test_agrees_with_flop_counter_on_a_sampling_run(kind, reuse):
    model = perturbed(PlainNAT if kind == "plain" else ENAT, TINY, dtype=torch.float32)
    labels = torch.tensor([1, 2, 3])
    with FlopCounterMode(display=False) as counter:
        enat.sample(model, labels, steps=5, reuse=reuse, generator=torch.Generator().manual_seed(0))
    expected = generation_macs(TINY, steps=5, reuse=reuse, plain=kind == "plain") * len(labels)
    assert counter.get_total_flops() == 2 * expected
