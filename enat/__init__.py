"""enat: the ENAT model (ENAT-S/B/L) on the kernels of enat_kernels.ops, its reuse sampler with
classifier-free guidance, a plain-NAT baseline and the paper's FLOP counter.

    import enat
    model = enat.load_official("nnet_ema.pth", "ENAT-L")      # or enat.ENAT(enat.config("ENAT-S"))
    ids = enat.sample(model, labels, steps=8)                  # (B, L) VQ token ids
    ids = enat.GraphedSampler(model, batch=32)(labels, seed=0)  # the same, replayed as one CUDA graph
    enat.flops.generation_macs("ENAT-S")                       # 22.55e9 MACs per image (paper: 22.6 G)
    images = enat.vq.load_vqgan("vqgan_jax_strongaug.ckpt").decode(ids)  # (B, 3, 256, 256) in [0, 1]
    loss = enat.training.loss(model, ids, labels, prev_model=ema.model)  # the paper's recipe (python -m enat.train)
"""

import warnings

from . import flops, paper_style, torch_baseline
from . import vq
from . import training
from .checkpoint import load_official
from . import config as _config
from .config import ENATConfig, config
from .model import ENAT, ENATOutput, PlainNAT
from .sampler import GraphedSampler, sample
from .schedule import mask_schedule

__all__ = ["ENAT", "ENATConfig", "ENATOutput", "GraphedSampler", "PlainNAT", "config", "flops", "load_official",
           "mask_schedule", "sample", "training", "vq"]

# The ImageNet values once exported here; a model's own are model.cfg.mask_id and model.cfg.null_class.
_DEPRECATED = {"MASK_ID": "model.cfg.mask_id", "NULL_CLASS": "model.cfg.null_class"}


def __getattr__(name):
    if name in _DEPRECATED:
        warnings.warn(f"enat.{name} is the ImageNet value ({getattr(_config, name)}) and wrong for other vocabularies "
                      f"or class counts; use {_DEPRECATED[name]}", DeprecationWarning, stacklevel=2)
        return getattr(_config, name)
    raise AttributeError(f"module 'enat' has no attribute {name!r}")
