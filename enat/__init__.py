"""enat: the ENAT model (ENAT-S/B/L), its reuse sampler and FLOP counter, composed from enat_kernels.ops.

The package holds no model code yet; the ops it is built from are in enat_kernels.ops.
"""
