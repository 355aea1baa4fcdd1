"""The cosine reveal schedule shared by the sampler and the FLOP counter."""

import math


def mask_schedule(seq_len, steps):
    """[n_0, ..., n_T]: [MASK] tokens before step k (n_0 = L) and after the last step (n_T = 0).

    n_{k+1} = floor(L * cos(pi/2 * (k+1)/T)); step k reveals n_k - n_{k+1} tokens."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    counts = [seq_len] + [math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / steps)) for k in range(steps)]
    counts[-1] = 0  # cos(pi/2) is 6e-17, not 0
    return counts
