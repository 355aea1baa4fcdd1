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


def attention_shapes(seq_len, steps):
    """[(role, Lq, Lc, Ls)]: the attention calls of one generation with feature reuse, deduplicated
    (roles joined by '+'), in the order they run. Step k's decoder attends its n_k [MASK] queries over
    the L - n_k visible keys and themselves; at reuse steps k >= 1 the encoder attends the
    n_{k-1} - n_k critical tokens over the L - n_{k-1} cached ones and themselves."""
    n = mask_schedule(seq_len, steps)
    shapes = {}
    for k in range(steps):
        critical = n[k - 1] - n[k] if k else 0
        if critical:  # reuse encoder: critical tokens over the cache of the previous step's visible ones
            shapes.setdefault((critical, seq_len - n[k - 1], critical), []).append(f"enc k{k}")
        if n[k]:  # decoder: [MASK] tokens over the visible ones and themselves
            shapes.setdefault((n[k], seq_len - n[k], n[k]), []).append(f"dec k{k}")
    return [("+".join(roles), *s) for s, roles in shapes.items()]
