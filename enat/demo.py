"""A demo that shows ENAT learning, on a CPU in about ten minutes: `python -m enat.demo` (`make demo`).

The data: "pattern grids", a class-conditional token dataset the package makes itself (no download,
deterministic): 8 x 8 grids (resolution 128) over a palette of 8 colours (vocab_size 8), 8 classes:

    0 h-stripes   rows alternate between two colours          4 frame   a one-cell border of one colour around another
    1 v-stripes   columns alternate between two colours       5 blocks  a checkerboard of 2 x 2 blocks
    2 checker     a two-colour checkerboard                   6 bands   horizontal bands two rows thick, two colours
    3 diagonal    three colours cycling along the diagonals   7 rings   concentric square rings of two colours

Each sample draws its colours (distinct, in order) and, for the stripes, its phase (the pattern
shifted by a row or column). 4096 grids, 512 per class. (make_dataset can add noise, one cell set to
another colour with probability noise_prob; the demo trains without it.)

The checker: `judge(grids, labels)` says whether each grid is a member of its class: within
`TOLERANCE` cells (1) of a clean grid of that class. It enumerates every clean
grid of a class from the class's rule (code written apart from the generator's drawing code) and
measures the Hamming distance to the nearest one; it knows nothing of the model. Clean grids of two
different classes are at least 2 * TOLERANCE + 1 cells apart (tested), so a grid is judged a member
of at most one class. Uniformly random grids and shuffled real grids fail it.

The run: a tiny ENAT (4 encoder blocks + 2 decoder blocks, width 64, 4 heads; 0.6M parameters)
trained with enat.training (the paper's recipe, with reuse on half of the batches, the EMA model
giving the previous step's features, in chains of up to REUSE_STEPS previous steps) on the CPU
backends (the C++ forward kernels, the reference for the rest) for 5000 steps of 64 grids, then 12-step sampling from the EMA model (decay 0.99,
warmed up: enat.training.EMA) with and without reuse, with the sampler settings of DEMO_CONFIG
(cfg_scale 2, mask_temp 1, samp_temp 0.25; --cfg-scale, --mask-temp and --samp-temp override them);
the checker's score for each, and a PNG of real and generated grids (--out, by default docs/demo.png of
the repository). The run draws from its own generators and a forked torch RNG and restores torch's thread
count: the caller's random state and threads are as they were when it returns.
"""

import argparse
import itertools
import os
import time

import numpy as np
import torch

from .cli import add_old_spelling
from .config import ENATConfig
from .model import ENAT
from .sampler import sample, settings as sampler_settings
from . import training

GRID = 8
VOCAB = 8
CLASSES = ["h-stripes", "v-stripes", "checker", "diagonal", "frame", "blocks", "bands", "rings"]
NOISE_PROB = 0.0
TOLERANCE = 1
STEPS = 5000
LR = 3e-3
# The official initialisation draws the position embeddings from N(0, 0.02), like the word
# embeddings; a tiny model on a short run finds the grid's positional structure (which cell copies
# which) several times sooner when they start larger, so the demo draws them from N(0, 0.5).
POSITION_STD = 0.5
# The sampler projects a cached feature again at every later step (up to 10 times in 12 steps); the
# paper's recipe (reuse_steps=1) trains the projection on features projected once, which left samples
# with reuse up to 13 points below those without in some seeds of this short run. Chains of up to 4
# previous steps (enat.training, "Chained previous steps") train on repeated projections.
REUSE_STEPS = 4
GOAL_SCORE, GOAL_GAP = 0.90, 0.03  # samples with reuse: judged members at this rate, within this of no reuse
PALETTE = np.array([  # token id -> RGB
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (40, 40, 40),
], dtype=np.uint8)

DEMO_CONFIG = ENATConfig("demo", depth_enc=4, depth_dec=2, width=64, heads=4, resolution=16 * GRID,
                         cfg_scale=2.0, mask_temp=1.0, samp_temp=0.25, vocab_size=VOCAB, num_classes=len(CLASSES))
SAMPLE_STEPS = 12
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "demo.png")


# The data set: drawing samples.

def _draw(label, rng):
    """One clean grid of class `label` with random colours and placement."""
    g = np.empty((GRID, GRID), dtype=np.int64)
    a, b, c = rng.choice(VOCAB, size=3, replace=False)
    for i in range(GRID):
        for j in range(GRID):
            g[i, j] = a
    name = CLASSES[label]
    if name == "h-stripes":
        s = rng.integers(2)
        for i in range(GRID):
            if (i + s) % 2:
                g[i, :] = b
    elif name == "v-stripes":
        s = rng.integers(2)
        for j in range(GRID):
            if (j + s) % 2:
                g[:, j] = b
    elif name == "checker":
        for i in range(GRID):
            for j in range(GRID):
                if (i + j) % 2:
                    g[i, j] = b
    elif name == "diagonal":
        colours = (a, b, c)
        for i in range(GRID):
            for j in range(GRID):
                g[i, j] = colours[(i + j) % 3]
    elif name == "frame":
        g[0, :] = g[-1, :] = g[:, 0] = g[:, -1] = b
    elif name == "blocks":
        for i in range(GRID):
            for j in range(GRID):
                if (i // 2 + j // 2) % 2:
                    g[i, j] = b
    elif name == "bands":
        for i in range(GRID):
            if (i // 2) % 2:
                g[i, :] = b
    elif name == "rings":
        for i in range(GRID):
            for j in range(GRID):
                if min(i, j, GRID - 1 - i, GRID - 1 - j) % 2:
                    g[i, j] = b
    return g


def make_dataset(n_per_class=512, seed=0, noise_prob=NOISE_PROB):
    """The pattern-grid token rows, (n_per_class * 8, 1 + 64) int64: label then the 64 ids in row-major
    order (the layout enat.training.TokenDataset reads), classes interleaved. Deterministic in seed."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_per_class):
        for label in range(len(CLASSES)):
            g = _draw(label, rng).reshape(-1)
            if rng.random() < noise_prob:
                cell = rng.integers(g.size)
                g[cell] = (g[cell] + rng.integers(1, VOCAB)) % VOCAB
            rows.append(np.concatenate([[label], g]))
    return np.stack(rows)


# The checker: every clean grid of each class, enumerated from the class rules.

def _two_colour(pattern):
    """Every grid painting the True cells of each (GRID, GRID) bool pattern with colour b and the rest a, a != b."""
    out = []
    for p in pattern:
        for a, b in itertools.permutations(range(VOCAB), 2):
            out.append(np.where(p, b, a))
    return np.stack(out)


def _class_templates(name):
    i, j = np.indices((GRID, GRID))
    if name == "h-stripes":
        return _two_colour([i % 2 == 0])  # the phase is the colour order
    if name == "v-stripes":
        return _two_colour([j % 2 == 0])
    if name == "checker":
        return _two_colour([(i + j) % 2 == 0])
    if name == "diagonal":
        return np.stack([np.choose((i + j) % 3, colours) for colours in itertools.permutations(range(VOCAB), 3)])
    if name == "frame":
        return _two_colour([(i == 0) | (j == 0) | (i == GRID - 1) | (j == GRID - 1)])
    if name == "blocks":
        return _two_colour([(i % 4 < 2) == (j % 4 < 2)])
    if name == "bands":
        return _two_colour([i // 2 % 2 == 0])
    if name == "rings":
        return _two_colour([np.minimum(np.minimum(i, j), np.minimum(GRID - 1 - i, GRID - 1 - j)) % 2 == 0])
    raise ValueError(name)


_TEMPLATES = {}


def templates(label):
    """(T, 64) uint8: every clean grid of class `label`."""
    if label not in _TEMPLATES:
        _TEMPLATES[label] = _class_templates(CLASSES[label]).reshape(-1, GRID * GRID).astype(np.uint8)
    return _TEMPLATES[label]


def distance(grids, labels):
    """(N,) the number of cells in which each grid (N, 64) differs from the nearest clean grid of its class."""
    grids, labels = np.asarray(grids), np.asarray(labels)
    out = np.empty(len(grids), dtype=np.int64)
    for label in np.unique(labels):
        sel = labels == label
        t = templates(int(label))
        out[sel] = (grids[sel][:, None, :].astype(np.uint8) != t[None]).sum(-1).min(-1)
    return out


def judge(grids, labels, tolerance=TOLERANCE):
    """(N,) bool: each grid (N, 64) is a member of its class (within `tolerance` cells of a clean grid)."""
    return distance(grids, labels) <= tolerance


# Pictures.

def render(grids, path, *, rows_of=None, cell=12, gap=4, palette=PALETTE):
    """Write grids (N, 64) (or a list of rows of grids) as a PNG: each token a cell x cell square of its
    palette colour, grids `gap` pixels apart on a white background."""
    from PIL import Image

    rows = [np.asarray(grids)] if rows_of is None else [np.asarray(r) for r in rows_of]
    side = int(round(rows[0].shape[1] ** 0.5))
    ncols = max(len(r) for r in rows)
    size = side * cell
    img = np.full((len(rows) * (size + gap) + gap, ncols * (size + gap) + gap, 3), 255, dtype=np.uint8)
    for ri, r in enumerate(rows):
        for ci, g in enumerate(r):
            tile = palette[np.asarray(g).reshape(side, side) % len(palette)].repeat(cell, 0).repeat(cell, 1)
            y, x = gap + ri * (size + gap), gap + ci * (size + gap)
            img[y:y + size, x:x + size] = tile
    Image.fromarray(img).save(path)


# The run.

def _print(*args):
    print(*args, flush=True)


def _new_model(cfg, pos_std):
    """ENAT(cfg) in training mode, its position embeddings drawn from N(0, pos_std) (see POSITION_STD),
    from torch's global RNG (the model's initialisation takes no generator)."""
    model = ENAT(cfg).train()
    if pos_std is not None:
        torch.nn.init.normal_(model.x_embedder.position_embeddings.weight, std=pos_std)
    return model


def init_model(cfg=DEMO_CONFIG, *, seed=0, pos_std=POSITION_STD):
    """The untrained model `train` starts from (deterministic in seed), in training mode; torch's global
    RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _new_model(cfg, pos_std)


def train(cfg=DEMO_CONFIG, *, steps=STEPS, batch=64, lr=LR, warmup=100, ema_decay=0.99, ema_warmup=True,
          reuse_prob=0.5, reuse_steps=REUSE_STEPS, seed=0, pos_std=POSITION_STD, data=None, progress=True,
          log=_print, on_step=None):
    """Train init_model(cfg, seed=seed, pos_std=pos_std) on the pattern grids (`data`, rows as
    make_dataset's) with enat.training; on_step(model), if given, runs after every step's EMA update.
    Returns (the model, its enat.training.EMA). The initialisation and the model's dropout draw from
    torch's global RNG, seeded with `seed` in a fork of it: the caller's state is left as it was."""
    from tqdm.auto import tqdm

    data = make_dataset() if data is None else data
    ids_all = torch.from_numpy(data[:, 1:].astype(np.int64))
    labels_all = torch.from_numpy(data[:, 0].astype(np.int64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _new_model(cfg, pos_std)
        ema = training.EMA(model, ema_decay, warmup=ema_warmup)
        opt, sched = training.optimizer(model, lr=lr, warmup=warmup)
        gen = torch.Generator().manual_seed(seed)
        running, t0 = None, time.time()
        bar = tqdm(range(steps), desc="enat.demo train", unit="step", disable=not progress)
        for step in bar:
            rows = training.shard_indices(len(data), step, batch, seed=seed)
            loss = training.loss(model, ids_all[rows], labels_all[rows], prev_model=ema.model, reuse_prob=reuse_prob,
                                 reuse_steps=reuse_steps, generator=gen)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)
            if on_step is not None:
                on_step(model)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
            if log and (step + 1) % 250 == 0:
                log(f"step {step + 1}/{steps}: loss {running:.3f}, "
                    f"{(step + 1) * batch / (time.time() - t0):.0f} grids/s")
    return model, ema


def evaluate(model, *, per_class=256, seed=0, modes=("reuse", "no reuse"), steps=SAMPLE_STEPS, cfg_scale=None,
             mask_temp=None, samp_temp=None):
    """Sample per_class grids of every class with reuse and without (`modes`); cfg_scale, mask_temp
    and samp_temp None are model.cfg's. Returns {mode: (grids, labels, judged)}."""
    labels = torch.arange(model.cfg.num_classes).repeat_interleave(per_class)
    out = {}
    for mode in modes:
        ids = sample(model, labels, steps=steps, cfg_scale=cfg_scale, mask_temp=mask_temp, samp_temp=samp_temp,
                     reuse={"reuse": True, "no reuse": False}[mode], generator=torch.Generator().manual_seed(seed))
        grids, lab = ids.numpy(), labels.numpy()
        out[mode] = (grids, lab, judge(grids, lab))
    return out


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m enat.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=64, help="grids per training step (default: %(default)s)")
    add_old_spelling(parser, "--batch", "--batch-size", "batch_size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-steps", type=int, default=REUSE_STEPS,
                        help="longest chain of previous steps in reuse batches (1: the paper's recipe)")
    parser.add_argument("--per-class", type=int, default=256,
                        help="generated grids per class for the scores (256: 2048 grids, a standard error of about "
                             "0.7 points at 90%%)")
    parser.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS, help="sampling steps")
    for name in ("cfg-scale", "mask-temp", "samp-temp"):
        parser.add_argument(f"--{name}", type=float, default=None,
                            help=f"the sampler's {name.replace('-', '_')} (default: the demo config's)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="the PNG of real and generated grids ('': none; default: the repository's docs/demo.png)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads during the run (default: torch's); restored at the end")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--save-model", default=None, help="write the EMA model's state dict here")
    parser.add_argument("--load-model", default=None, help="skip training: sample from this saved state dict")
    return parser


def main(argv=None):
    """The demo: train (or --load-model), sample, score, write --out. Returns {mode: score}; torch's
    thread count and global RNG state are as they were."""
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    """main's run, once the threads are set: {mode: score}."""
    t0 = time.time()
    data = make_dataset()
    real_ok = judge(data[:, 1:], data[:, 0]).mean()
    _print(f"pattern grids: {len(data)} grids of {GRID} x {GRID} tokens, {VOCAB} colours, {len(CLASSES)} classes "
          f"({', '.join(CLASSES)}); the checker accepts {real_ok:.1%} of them")
    rng = np.random.default_rng(1)
    random_grids = rng.integers(0, VOCAB, (1024, GRID * GRID))
    _print(f"checker on uniformly random grids: {judge(random_grids, np.arange(1024) % len(CLASSES)).mean():.1%} accepted")
    if args.load_model:
        model = ENAT(DEMO_CONFIG).eval()
        model.load_state_dict(torch.load(args.load_model, weights_only=True))
    else:
        model = train(steps=args.steps, batch=args.batch_size, reuse_steps=args.reuse_steps, seed=args.seed,
                      data=data, progress=not args.no_progress)[1].model
    if args.save_model:
        torch.save(model.state_dict(), args.save_model)
    train_s = time.time() - t0
    settings = {"steps": args.sample_steps, **sampler_settings(model, args.cfg_scale, args.mask_temp, args.samp_temp)}
    _print("sampler settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    results = evaluate(model, per_class=args.per_class, seed=args.seed, **settings)
    scores = _report(results)
    if args.out:
        _picture(data, results, args.out)
    _print(f"total time {time.time() - t0:.0f} s (training {train_s:.0f} s)")
    return scores


def _report(results):
    """Print each mode's score (overall and per class) and whether the goal is met; {mode: score}."""
    scores = {}
    for mode, (grids, labels, ok) in results.items():
        per_class = " ".join(f"{name} {ok[labels == c].mean():.0%}" for c, name in enumerate(CLASSES))
        scores[mode] = ok.mean()
        _print(f"generated, {mode}: {ok.mean():.1%} judged members of their class ({per_class})")
    gap = scores["no reuse"] - scores["reuse"]
    met = scores["reuse"] >= GOAL_SCORE and gap <= GOAL_GAP
    _print(f"goal (at least {GOAL_SCORE:.0%} with reuse, at most {GOAL_GAP * 100:.0f} points below no reuse): "
           f"{'met' if met else 'missed'} (reuse {scores['reuse']:.1%}, {abs(gap) * 100:.1f} points "
           f"{'below' if gap > 0 else 'above'} no reuse)")
    return scores


def _picture(data, results, path):
    """Write the PNG: one row per class, 4 real grids, 4 generated with reuse, 4 without."""
    picture_rows = []
    for c in range(len(CLASSES)):
        real = data[data[:, 0] == c][:4, 1:]
        gen_r = results["reuse"][0][results["reuse"][1] == c][:4]
        gen_n = results["no reuse"][0][results["no reuse"][1] == c][:4]
        picture_rows.append(np.concatenate([real, gen_r, gen_n]))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    render(None, path, rows_of=picture_rows)
    _print(f"wrote {path}: one row per class ({', '.join(CLASSES)}); 4 real grids, 4 generated with reuse, "
           f"4 generated without")


if __name__ == "__main__":
    main()
