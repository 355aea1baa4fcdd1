"""Multiply-accumulates of an ENAT generation, counted the way the paper counts them.

The paper's "GFLOPs" are MACs of the linear layers and of both attention matmuls (q k^T and p v) for
the whole T-step generation of one image, both classifier-free-guidance passes included; the system
tables add the VQ decoder (counted here from its architecture: enat.vq.decoder_macs). Embeddings,
norms, activations and the sampler cost nothing. The count follows the forward pass of enat.model
exactly, so torch.utils.flop_counter on a real sampling run gives twice these numbers (it counts a
MAC as two FLOPs); the tests check that.
"""

from .config import resolve
from .schedule import mask_schedule
from .vq import decoder_macs


def _blocks_macs(cfg, n_blocks, queries, ctx, self_keys):
    """n_blocks blocks: adaLN modulation, then q, kv.B, proj and MLP on the queries, kv.A on the
    context, both attention matmuls. A block with no query is skipped, its modulation included."""
    if not queries:
        return 0
    d = cfg.width
    per_block = 8 * d * d + 12 * d * d * queries + 2 * d * d * ctx + 2 * queries * (ctx + self_keys) * d
    return n_blocks * per_block


def forward_macs(cfg, n_masked, n_prev_masked=None, *, plain=False):
    """MACs of one forward of one row: n_masked [MASK] tokens now, n_prev_masked in the previous
    step's state (None: no reuse); plain=True counts enat.PlainNAT (every token through every block)."""
    d, L = cfg.width, cfg.seq_len
    macs = L * (d * d + d * cfg.vocab_size)  # mlm_layer.fc and the tied-embedding logits
    if plain:
        return macs + _blocks_macs(cfg, cfg.depth, L, 0, L)
    visible = L - n_masked
    if n_prev_masked is None:  # every visible token is encoded, among visible tokens only
        encoded, ctx = visible, 0
    else:  # only the critical tokens are encoded, over the projected cache
        encoded, ctx = n_prev_masked - n_masked, L - n_prev_masked
        macs += ctx * 8 * d * d  # prev_proj MLP
    macs += _blocks_macs(cfg, cfg.depth_enc, encoded, ctx, encoded)
    return macs + _blocks_macs(cfg, cfg.depth_dec, n_masked, visible, n_masked)


def generation_macs(name_or_cfg, *, resolution=256, steps=8, guidance=True, reuse=True, vq_decoder=False,
                    plain=False):
    """MACs to generate one image with enat.sample (plain=True: with enat.PlainNAT).

    name_or_cfg: "ENAT-S", "ENAT-B", "ENAT-L" (at `resolution`) or an ENATConfig; guidance counts both CFG
    passes; reuse=False counts the disentangled model without feature reuse; vq_decoder adds the VQ
    decoder's convolutions at the config's resolution (enat.vq.decoder_macs, the paper's tokenizer:
    93.27e9 at 256 px, 373.09e9 at 512 px, what torch.utils.flop_counter counts on enat.vq.VQGAN.decode)."""
    cfg = resolve(name_or_cfg, resolution)
    counts = mask_schedule(cfg.seq_len, steps)
    total = 0
    for k in range(steps):
        prev = counts[k - 1] if (reuse and k > 0 and not plain) else None
        total += forward_macs(cfg, counts[k], prev, plain=plain)
    total *= 2 if guidance else 1
    if vq_decoder:
        total += decoder_macs(cfg.resolution)
    return int(total)
