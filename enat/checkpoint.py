"""Loading the checkpoints released with the paper (official key names, strict key checking)."""

import os

import torch

from .config import resolve
from .model import ENAT

UNUSED_PREFIXES = ("prev_embedder.",)  # in the official checkpoints, never used by the forward pass


def state_dict_of(state_dict_or_path, drop_prefixes=UNUSED_PREFIXES, read=None):
    """The state dict (name -> tensor) in `state_dict_or_path`, or in the file it names (read with
    `read`, default torch.load with weights_only=True); weights under a "state_dict" entry are taken,
    a DistributedDataParallel `module.` prefix is stripped and keys under `drop_prefixes` dropped."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state = (read or _read)(state_dict_or_path)
    else:
        state = state_dict_or_path
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning / taming format
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError("state_dict_or_path must be a state dict (parameter name -> tensor, possibly under "
                        f"'state_dict') or the path of one, got {type(state).__name__}")
    prefix = "module."  # saved from a DistributedDataParallel wrapper
    if state and all(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items()}
    return {key: value for key, value in state.items() if not key.startswith(tuple(drop_prefixes))}


def _read(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def load_strict(model, state, what):
    """`model` in eval mode holding `state`, whose keys and shapes must match its own exactly; else a
    ValueError titled "the checkpoint does not match {what}" listing the missing, unexpected and
    wrongly shaped keys."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [f"{key}: checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
                   for key in sorted(expected.keys() & state.keys()) if state[key].shape != expected[key].shape]
    if missing or unexpected or wrong_shape:
        lines = [f"the checkpoint does not match {what}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else ""))
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_official(state_dict_or_path, name, resolution=256):
    """An enat.ENAT in eval mode holding the weights of an official checkpoint (a state dict or the path
    of one) for `name` ("ENAT-S", "ENAT-B", "ENAT-L" or an ENATConfig) at `resolution` px. Keys are
    checked strictly; the unused prev_embedder.* keys are dropped."""
    cfg = resolve(name, resolution)
    what = (f"{cfg.name} at {cfg.resolution} px (width {cfg.width}, {cfg.depth} blocks, {cfg.seq_len} tokens, "
            f"vocabulary {cfg.vocab_size}, {cfg.num_classes} classes)")
    return load_strict(ENAT(cfg), state_dict_of(state_dict_or_path), what)
