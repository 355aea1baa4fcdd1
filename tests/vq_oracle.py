"""An independent float64 VQGAN written from docs/VQ.md, for checking enat.vq.

It shares no code with enat/vq.py: one image (C, H, W) at a time, weights read from a state dict by key
name (the network's depth is discovered from the keys), functional ops only, group norm, swish, pooling,
upsampling and the nearest-row search written out by hand. Also the expected parameter names and shapes
of a configuration, derived from the text of docs/VQ.md.
"""

import torch
import torch.nn.functional as F

GROUPS, EPS = 32, 1e-6


def _w(sd, key):
    return sd[key].detach().to("cpu", torch.float64).contiguous()


def group_norm(x, sd, prefix):
    C, H, W = x.shape
    g = x.reshape(GROUPS, C // GROUPS * H * W)
    mean = g.mean(dim=1, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=1, keepdim=True)  # biased variance
    y = ((g - mean) / torch.sqrt(var + EPS)).reshape(C, H, W)
    return y * _w(sd, prefix + ".weight")[:, None, None] + _w(sd, prefix + ".bias")[:, None, None]


def swish(x):
    return x / (1 + torch.exp(-x))


def conv(x, sd, prefix, bias):
    weight = _w(sd, prefix + ".weight")
    b = _w(sd, prefix + ".bias") if bias else None
    assert (prefix + ".bias" in sd) == bias, f"{prefix}: bias {'expected' if bias else 'not expected'}"
    k = weight.shape[-1]
    return F.conv2d(x[None], weight, b, padding=k // 2)[0]


def resnet_block(x, sd, prefix):
    h = conv(swish(group_norm(x, sd, prefix + ".norm1")), sd, prefix + ".conv1", bias=False)
    h = conv(swish(group_norm(h, sd, prefix + ".norm2")), sd, prefix + ".conv2", bias=False)
    if prefix + ".nin_shortcut.weight" in sd:
        return conv(h, sd, prefix + ".nin_shortcut", bias=False) + h  # on h, not x (docs/VQ.md)
    assert x.shape == h.shape
    return x + h


def avg_pool(x):
    C, H, W = x.shape
    return x.reshape(C, H // 2, 2, W // 2, 2).mean(dim=(2, 4))


def upsample_nearest(x):
    return x.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)


def _count(sd, prefix):
    n = 0
    while any(k.startswith(f"{prefix}.{n}.") for k in sd):
        n += 1
    return n


def encoder(image, sd):
    """image (3, H, W) float64 in [0, 1] -> z (z_channels, H/f, W/f)."""
    levels = _count(sd, "encoder.down")
    h = conv(image.double(), sd, "encoder.conv_in", bias=False)
    for i in range(levels):
        for j in range(_count(sd, f"encoder.down.{i}.block")):
            h = resnet_block(h, sd, f"encoder.down.{i}.block.{j}")
        if i < levels - 1:
            h = avg_pool(h)
    h = resnet_block(h, sd, "encoder.mid.block_1")
    h = resnet_block(h, sd, "encoder.mid.block_2")
    return conv(swish(group_norm(h, sd, "encoder.norm_out")), sd, "encoder.conv_out", bias=True)


def decoder(z, sd):
    """z (z_channels, h, w) -> image (3, h f, w f), not clamped."""
    levels = _count(sd, "decoder.up")
    h = conv(z.double(), sd, "decoder.conv_in", bias=True)
    h = resnet_block(h, sd, "decoder.mid.block_1")
    h = resnet_block(h, sd, "decoder.mid.block_2")
    for i in range(levels - 1, -1, -1):  # up.{levels-1} first
        for j in range(_count(sd, f"decoder.up.{i}.block")):
            h = resnet_block(h, sd, f"decoder.up.{i}.block.{j}")
        if i > 0:
            h = conv(upsample_nearest(h), sd, f"decoder.up.{i}.upsample.conv", bias=True)
    return conv(swish(group_norm(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", bias=True)


def distances(z, sd):
    """z (C, h, w) -> squared distances (h*w, n_embed) to every codebook row, row-major positions."""
    codebook = _w(sd, "quantize.embedding.weight")
    vectors = z.double().reshape(z.shape[0], -1).t()  # (h*w, C), position p = row * w + col
    return torch.stack([((codebook - v) ** 2).sum(dim=1) for v in vectors])


def quantize(z, sd):
    return distances(z, sd).argmin(dim=1)


def encode(image, sd):
    return quantize(encoder(image, sd), sd)


def decode(ids, sd):
    """ids (L,) -> image (3, H, W) clamped to [0, 1]."""
    side = int(round(len(ids) ** 0.5))
    codebook = _w(sd, "quantize.embedding.weight")
    z = torch.stack([codebook[int(i)] for i in ids]).reshape(side, side, -1).permute(2, 0, 1)
    return decoder(z, sd).clamp(0, 1)


def expected_shapes(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, n_embed=1024):
    """The parameter names and shapes docs/VQ.md lists for a configuration (defaults: the paper's)."""
    shapes = {}

    def norm(p, c):
        shapes[p + ".weight"] = (c,)
        shapes[p + ".bias"] = (c,)

    def conv_(p, cin, cout, k, bias):
        shapes[p + ".weight"] = (cout, cin, k, k)
        if bias:
            shapes[p + ".bias"] = (cout,)

    def block(p, cin, cout):
        norm(p + ".norm1", cin)
        conv_(p + ".conv1", cin, cout, 3, False)
        norm(p + ".norm2", cout)
        conv_(p + ".conv2", cout, cout, 3, False)
        if cin != cout:
            conv_(p + ".nin_shortcut", cout, cout, 1, False)

    widths = [ch * m for m in ch_mult]
    top = widths[-1]
    conv_("encoder.conv_in", 3, ch, 3, False)
    prev = ch
    for i, c in enumerate(widths):
        for j in range(num_res_blocks):
            block(f"encoder.down.{i}.block.{j}", prev, c)
            prev = c
    block("encoder.mid.block_1", top, top)
    block("encoder.mid.block_2", top, top)
    norm("encoder.norm_out", top)
    conv_("encoder.conv_out", top, z_channels, 1, True)
    conv_("decoder.conv_in", z_channels, top, 3, True)
    block("decoder.mid.block_1", top, top)
    block("decoder.mid.block_2", top, top)
    prev = top
    for i in reversed(range(len(widths))):
        for j in range(num_res_blocks):
            block(f"decoder.up.{i}.block.{j}", prev, widths[i])
            prev = widths[i]
        if i > 0:
            conv_(f"decoder.up.{i}.upsample.conv", widths[i], widths[i], 3, True)
    norm("decoder.norm_out", widths[0])
    conv_("decoder.conv_out", widths[0], 3, 3, True)
    shapes["quantize.embedding.weight"] = (n_embed, z_channels)
    return shapes
