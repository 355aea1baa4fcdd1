"""enat.vq: the VQGAN tokenizer of docs/VQ.md against the independent float64 oracle tests/vq_oracle.py,
its parameter names and shapes, the nearest-row rule, loading, bad input, and its FLOP count."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import enat
import vq_oracle
from enat.vq import PAPER_CONFIG, TINY_CONFIG, VQGAN, decoder_macs, load_vqgan

# A reduced tokenizer for the oracle comparisons: four levels (8x), blocks with in != out in both
# networks (encoder levels 1 and 3, decoder levels 2 and 0), group sizes 1 to 4, a 96-row codebook.
REDUCED = dict(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=64, n_embed=96)
U32 = 2.0 ** -24  # unit roundoff of float32


def perturbed(config, seed=0, dtype=torch.float32):
    """A VQGAN whose every parameter is random: norm scales near 1, norm and conv biases ~ 0.2 N(0, 1),
    conv weights ~ N(0, 1/fan_in), codebook rows ~ N(0, 1)."""
    model = VQGAN(**config).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            elif p.dim() == 4:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(noise)
    return model


def budget(config, encoder):
    """Error budget, relative to the largest |oracle| entry, of a float32 run of one network.

    Each conv output is a dot product of fan_in float32 terms; with rounding errors that are independent
    and of either sign, its relative error is about sqrt(fan_in) u (Higham and Mary's probabilistic
    bound; the constant is covered by a factor 4). Group norms and swish add a few u each and pass the
    relative error of their input on unchanged (activations are centred: the norms' mean is small
    against their spread); residual sums do not amplify. Along the deepest path the stages add at most
    linearly. Any wrong block (a missing bias, the shortcut on x, a wrong level order) is off by O(1)."""
    widths = [config["ch"] * m for m in config["ch_mult"]]
    convs = 1 + 2 * config["num_res_blocks"] * len(widths) + 4 + 1 + (0 if encoder else len(widths) - 1)
    stages = 2 * convs  # a norm before every conv
    fan_in = 9 * max(widths)
    return 4 * stages * math.sqrt(fan_in) * U32


def rel_error(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


# Names and shapes.


def test_full_size_parameter_names_and_shapes():
    """The paper's tokenizer (built on the meta device): every key and shape docs/VQ.md lists, bias-free
    block convs, a 1x1 out->out nin_shortcut (it acts on h), 23.8 M + 30.5 M parameters."""
    with torch.device("meta"):
        model = VQGAN()
    assert model.config == {**PAPER_CONFIG, "ch_mult": tuple(PAPER_CONFIG["ch_mult"])}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == vq_oracle.expected_shapes()
    assert got["encoder.down.2.block.0.nin_shortcut.weight"] == (256, 256, 1, 1)
    assert "encoder.down.2.block.0.conv1.bias" not in got and "decoder.up.3.upsample.conv.bias" in got
    assert not any("attn" in k or "quant_conv" in k for k in got)
    assert round(sum(p.numel() for p in model.encoder.parameters()) / 1e6, 1) == 23.8
    assert round(sum(p.numel() for p in model.decoder.parameters()) / 1e6, 1) == 30.5
    assert model.downsample == 16


def test_reduced_configuration_names_and_shapes():
    got = {k: tuple(v.shape) for k, v in VQGAN(**REDUCED).state_dict().items()}
    assert got == vq_oracle.expected_shapes(**REDUCED)


# Against the oracle.


def test_encoder_matches_oracle():
    model = perturbed(REDUCED)
    sd = model.state_dict()
    images = torch.rand(2, 3, 40, 32, generator=torch.Generator().manual_seed(1))  # a 5 x 4 grid
    with torch.no_grad():
        z = model.encoder(images.contiguous(memory_format=torch.channels_last))
        ids = model.encode(images)
    assert ids.shape == (2, 20) and ids.dtype == torch.int64
    tol = budget(REDUCED, encoder=True)
    certain = 0
    for b in range(2):
        z_ref = vq_oracle.encoder(images[b], sd)
        assert rel_error(z[b], z_ref) <= tol
        # ids must agree wherever no error within the budget can change the nearest row: an error vector
        # of norm r moves |z - e|^2 by at most 2 |z - e| r + r^2
        r = tol * z_ref.abs().max().item() * math.sqrt(z_ref.shape[0])
        dist = vq_oracle.distances(z_ref, sd)
        top2 = dist.topk(2, dim=1, largest=False).values
        slack = 2 * (top2.sqrt().sum(dim=1) * r + r * r)
        sure = top2[:, 1] - top2[:, 0] > slack
        assert torch.equal(ids[b][sure], dist.argmin(dim=1)[sure])
        certain += int(sure.sum())
    assert certain >= 20  # the comparison is not vacuous


def test_decoder_matches_oracle():
    model = perturbed(REDUCED, seed=2)
    sd = model.state_dict()
    ids = torch.randint(0, REDUCED["n_embed"], (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        codebook = model.quantize.embedding.weight
        z = codebook[ids].view(2, 4, 4, -1).permute(0, 3, 1, 2)
        raw = model.decoder(z)
        images = model.decode(ids)
    assert images.shape == (2, 3, 32, 32)
    tol = budget(REDUCED, encoder=False)
    for b in range(2):
        z_ref = vq_oracle._w(sd, "quantize.embedding.weight")[ids[b]].reshape(4, 4, -1).permute(2, 0, 1)
        raw_ref = vq_oracle.decoder(z_ref, sd)
        assert rel_error(raw[b], raw_ref) <= tol
        ref = vq_oracle.decode(ids[b], sd)
        assert 0.05 < (ref == 0).double().mean() + (ref == 1).double().mean() < 0.95  # the clamp matters
        assert (images[b].double() - ref).abs().max().item() <= tol * raw_ref.abs().max().item()


def test_quantizer_nearest_row():
    """quantize(codebook[ids] + small noise) == ids for a codebook of well-separated random rows (rows
    ~ N(0, 1) in 256 dims are about 22 apart; the noise moves a vector by about 0.16); and the rule on
    arbitrary vectors matches the oracle's plain distance loop."""
    with torch.device("meta"):
        model = VQGAN()
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(torch.randn(1024, 256, generator=g))
    ids = torch.randint(0, 1024, (3, 64), generator=g)
    z = model.quantize.embedding.weight[ids] + 0.01 * torch.randn(3, 64, 256, generator=g)
    z = z.view(3, 8, 8, 256).permute(0, 3, 1, 2)
    assert torch.equal(model.quantize(z), ids)
    # row-major order: position (row, col) of the grid is id row * w + col
    z = torch.randn(1, 256, 2, 3, generator=g)
    sd = {"quantize.embedding.weight": model.quantize.embedding.weight}
    assert torch.equal(model.quantize(z)[0], vq_oracle.quantize(z[0], sd))
    # half precision inputs are searched in float32
    assert torch.equal(model.quantize(z.bfloat16()), model.quantize(z.bfloat16().float()))


def test_encode_decode_round_trip_through_the_quantizer():
    """decode then the quantizer on the codebook rows gives the ids back: the decoder's input is exactly
    the rows picked by the ids, in row-major order."""
    model = perturbed(REDUCED, seed=5)
    ids = torch.randint(0, REDUCED["n_embed"], (2, 9))
    rows = model.quantize.embedding.weight[ids].view(2, 3, 3, -1).permute(0, 3, 1, 2)
    assert torch.equal(model.quantize(rows), ids)


# Shapes, dtypes, layout.


@pytest.mark.parametrize(("L", "pixels"), [(256, 256), (1024, 512)])
def test_decode_sizes(L, pixels):
    model = perturbed(TINY_CONFIG, seed=6)
    ids = torch.randint(0, 1024, (1, L))
    with torch.no_grad():
        images = model.decode(ids)
    assert images.shape == (1, 3, pixels, pixels) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert images.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert model.encode(images).shape == (1, L)


def test_half_precision_and_channels_last():
    model = perturbed(REDUCED, seed=7)
    assert model.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    ids = torch.randint(0, REDUCED["n_embed"], (2, 16))
    with torch.no_grad():
        ref = model.decode(ids)
        half = model.to(torch.bfloat16)
        assert half.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        out = half.decode(ids)
        ids_back = half.encode(out.float())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.double() - ref.double()).abs().mean() < 0.05  # bf16 rounding through ~20 layers
    assert ids_back.shape == (2, 16) and ids_back.dtype == torch.int64


def test_decode_reads_nothing_back():
    """decode on the meta device (no values at all) works: no .item(), no data-dependent shapes."""
    with torch.device("meta"):
        model = VQGAN()
        images = model.decode(torch.zeros(4, 1024, dtype=torch.int64))
    assert images.shape == (4, 3, 512, 512)


# FLOPs.


@pytest.mark.parametrize("resolution", [256, 512])
def test_decoder_flops_equal_generation_macs(resolution):
    with torch.device("meta"):
        model = VQGAN()
    ids = torch.zeros(1, (resolution // 16) ** 2, dtype=torch.int64, device="meta")
    with FlopCounterMode(display=False) as counter:
        model.decode(ids)
    added = (enat.flops.generation_macs("ENAT-L", resolution=resolution, vq_decoder=True)
             - enat.flops.generation_macs("ENAT-L", resolution=resolution))
    assert counter.get_total_flops() == 2 * decoder_macs(resolution) == 2 * added
    assert abs(added / {256: 93.3e9, 512: 373.1e9}[resolution] - 1) < 5e-4  # docs/VQ.md's figures
    assert decoder_macs(resolution * 2) == 4 * decoder_macs(resolution)


def test_decoder_macs_of_other_configs():
    model = VQGAN(**TINY_CONFIG)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.decode(torch.zeros(1, 16, dtype=torch.int64))
    assert counter.get_total_flops() == 2 * decoder_macs(64, **TINY_CONFIG)
    with pytest.raises(ValueError, match="multiple of 16"):
        decoder_macs(100)


# Bad input.


def test_bad_inputs():
    model = VQGAN(**REDUCED)  # 8x
    with pytest.raises(TypeError, match="images must be a tensor"):
        model.encode([[0.0]])
    with pytest.raises(TypeError, match="images must be a float"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images must be 4-D"):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="images must have 3 channels"):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 16, 12))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.zeros(0, 3, 16, 16))
    with pytest.raises(ValueError, match="images must be on the module's device"):
        model.encode(torch.zeros(1, 3, 16, 16, device="meta"))
    with pytest.raises(TypeError, match="ids must be a tensor"):
        model.decode([1, 2, 3, 4])
    with pytest.raises(TypeError, match="ids must be an integer"):
        model.decode(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="ids must be 2-D"):
        model.decode(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="square number"):
        model.decode(torch.zeros(1, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="square number"):
        model.decode(torch.zeros(1, 0, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"in \[0, 96\), got values in \[0, 96\]"):
        model.decode(torch.tensor([[0, 1, 2, 96]]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 2\]"):
        model.decode(torch.tensor([[0, 1, 2, -1]]))
    with pytest.raises(ValueError, match="ch must be a multiple of 32"):
        VQGAN(ch=48)
    with pytest.raises(ValueError, match="ch_mult"):
        VQGAN(ch_mult=())


# Loading.


def test_load_vqgan_state_dicts(tmp_path):
    source = perturbed(REDUCED, seed=8)
    sd = source.state_dict()
    ids = torch.randint(0, REDUCED["n_embed"], (1, 16))
    with torch.no_grad():
        want = source.decode(ids)
    weights = {**{"module." + k: v for k, v in sd.items()}, "module.loss.discriminator.w": torch.ones(2)}
    wrapped = {"state_dict": weights, "epoch": 3}
    path = tmp_path / "vq.ckpt"
    torch.save(wrapped, path)
    for where in (sd, {"state_dict": sd}, str(path), path):
        model = load_vqgan(where, **REDUCED)
        assert not model.training
        with torch.no_grad():
            assert torch.equal(model.decode(ids), want)


def test_load_vqgan_mismatch_and_missing_file(tmp_path):
    sd = VQGAN(**REDUCED).state_dict()
    bad = dict(sd)
    del bad["decoder.conv_out.bias"]
    bad["encoder.conv_in.bias"] = torch.zeros(32)
    bad["quantize.embedding.weight"] = torch.zeros(1024, 64)
    with pytest.raises(ValueError) as info:
        load_vqgan(bad, **REDUCED)
    message = str(info.value)
    assert "missing (1): decoder.conv_out.bias" in message
    assert "unexpected (1): encoder.conv_in.bias" in message
    assert "wrong shape (1): quantize.embedding.weight: checkpoint (1024, 64), model (96, 64)" in message
    with pytest.raises(ValueError, match="missing"):
        load_vqgan(sd)  # a reduced checkpoint for the paper's configuration
    with pytest.raises(FileNotFoundError, match="vqgan_jax_strongaug.ckpt.*MAGE"):
        load_vqgan(tmp_path / "nope.ckpt")
    with pytest.raises(TypeError, match="state dict"):
        load_vqgan([1, 2])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read the VQGAN checkpoint"):
        load_vqgan(tmp_path / "junk.ckpt")
