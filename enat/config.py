"""ENATConfig: the shape of an ENAT model (paper Table 7) and the sampler defaults of its resolution."""

import dataclasses

VOCAB = 1024  # VQ codebook size
MASK_ID = 1024  # the [MASK] token id (word embeddings hold VOCAB + 1 rows)
NUM_CLASSES = 1000
NULL_CLASS = 1000  # label of the unconditional CFG branch (label table holds NUM_CLASSES + 1 rows)
VQ_DOWNSAMPLE = 16  # pixels per token side


@dataclasses.dataclass(frozen=True)
class ENATConfig:
    """depth_enc encoder and depth_dec decoder blocks of width `width` with `heads` heads over a
    (resolution / 16)^2 token grid of ids in [0, vocab_size) ([MASK] = vocab_size), conditioned on
    num_classes classes (the null class = num_classes). The sampler defaults are the paper's for the
    resolution; vocab_size and num_classes default to the paper's (1024 VQ codes, 1000 classes)."""

    name: str
    depth_enc: int
    depth_dec: int
    width: int
    heads: int
    resolution: int = 256
    cfg_scale: float = 2.5
    mask_temp: float = 1.5
    samp_temp: float = 6.0
    vocab_size: int = VOCAB
    num_classes: int = NUM_CLASSES

    def __post_init__(self):
        for field in ("depth_enc", "depth_dec", "width", "heads", "resolution", "vocab_size", "num_classes"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ENATConfig.{field} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"ENATConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.resolution % VQ_DOWNSAMPLE:
            raise ValueError(f"ENATConfig.resolution ({self.resolution}) must be a multiple of {VQ_DOWNSAMPLE}")

    @property
    def depth(self):
        return self.depth_enc + self.depth_dec

    @property
    def head_dim(self):
        return self.width // self.heads

    @property
    def mask_id(self):
        """The [MASK] token id: vocab_size (word embeddings hold vocab_size + 1 rows)."""
        return self.vocab_size

    @property
    def null_class(self):
        """The null class of classifier-free guidance: num_classes (the label table holds num_classes + 1 rows)."""
        return self.num_classes

    @property
    def seq_len(self):
        """Tokens per image, L."""
        return (self.resolution // VQ_DOWNSAMPLE) ** 2


_SIZES = {  # name: (depth_enc, depth_dec, width, heads)
    "ENAT-S": (15, 1, 366, 6),
    "ENAT-B": (15, 1, 768, 8),
    "ENAT-L": (22, 2, 1024, 16),
}
_SAMPLER_DEFAULTS = {256: (2.5, 1.5, 6.0), 512: (3.5, 1.5, 4.0)}  # cfg_scale, mask_temp, samp_temp


def config(name, resolution=256):
    """The ENATConfig of "ENAT-S", "ENAT-B" or "ENAT-L" at 256 or 512 px."""
    if name not in _SIZES:
        raise ValueError(f"config: name must be one of {sorted(_SIZES)}, got {name!r}")
    if resolution not in _SAMPLER_DEFAULTS:
        raise ValueError(f"config: resolution must be one of {sorted(_SAMPLER_DEFAULTS)}, got {resolution!r}")
    cfg_scale, mask_temp, samp_temp = _SAMPLER_DEFAULTS[resolution]
    return ENATConfig(name, *_SIZES[name], resolution=resolution, cfg_scale=cfg_scale, mask_temp=mask_temp,
                      samp_temp=samp_temp)


def resolve(name_or_cfg, resolution=256):
    """An ENATConfig from a config or a name."""
    if isinstance(name_or_cfg, ENATConfig):
        return name_or_cfg
    return config(name_or_cfg, resolution)
