"""enat.demo: the pattern-grid data set and its checker (which must be able to fail: it rejects random
and shuffled grids and accepts real ones, and no grid can pass for two classes), a smoke run of the
demo's training and sampling, and a short run whose EMA must sample as well as its raw weights."""

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

import enat.training as T
from enat import demo


def test_dataset_is_deterministic_and_in_the_token_file_layout():
    a, b = demo.make_dataset(n_per_class=16), demo.make_dataset(n_per_class=16)
    assert np.array_equal(a, b) and a.shape == (16 * 8, 1 + 64)
    assert set(a[:, 0]) == set(range(8)) and a[:, 1:].min() >= 0 and a[:, 1:].max() < demo.VOCAB
    assert not np.array_equal(a, demo.make_dataset(n_per_class=16, seed=1))
    assert len({row.tobytes() for row in a}) > 0.75 * len(a)  # per-sample variation: colours, phases


def test_checker_accepts_real_grids():
    clean = demo.make_dataset(n_per_class=64)
    assert (demo.distance(clean[:, 1:], clean[:, 0]) == 0).all()
    noisy = demo.make_dataset(n_per_class=64, noise_prob=1.0)  # one cell of every grid changed
    assert (demo.distance(noisy[:, 1:], noisy[:, 0]) == 1).all() and demo.judge(noisy[:, 1:], noisy[:, 0]).all()


def test_checker_rejects_random_shuffled_and_mislabelled_grids():
    rng = np.random.default_rng(0)
    data = demo.make_dataset(n_per_class=32)
    labels = data[:, 0]
    random_grids = rng.integers(0, demo.VOCAB, (len(data), 64))
    assert not demo.judge(random_grids, labels).any()
    shuffled = np.array([rng.permutation(g) for g in data[:, 1:]])
    assert demo.judge(shuffled, labels).mean() < 0.01
    assert not demo.judge(data[:, 1:], (labels + 1) % 8).any()  # a real grid under another class's label
    two_noise = data[:, 1:].copy()  # beyond the tolerance: three cells changed
    for g in two_noise:
        cells = rng.choice(64, 3, replace=False)
        g[cells] = (g[cells] + rng.integers(1, demo.VOCAB, 3)) % demo.VOCAB
    assert demo.judge(two_noise, labels).mean() < 0.2


def test_classes_are_far_apart():
    """Clean grids of two classes differ in more than 2 x TOLERANCE cells, so no grid is judged a member
    of two classes (checked on a sample of each class's clean grids against all of the other's)."""
    rng = np.random.default_rng(0)
    for a in range(8):
        t = demo.templates(a)
        t = t[rng.choice(len(t), min(len(t), 150), replace=False)]
        for b in range(8):
            if a != b:
                assert demo.distance(t, np.full(len(t), b)).min() > 2 * demo.TOLERANCE, (a, b)


def test_demo_training_and_sampling_smoke(tmp_path):
    model, ema = demo.train(steps=3, batch=16, data=demo.make_dataset(n_per_class=8), progress=False, log=None)
    assert model.training and not ema.model.training and ema.updates == 3 and ema.warmup
    results = demo.evaluate(ema.model, per_class=2)
    for grids, labels, judged in results.values():
        assert grids.shape == (16, 64) and grids.min() >= 0 and grids.max() < demo.VOCAB and judged.dtype == bool
    demo.render(None, tmp_path / "grid.png", rows_of=[grids[:4], grids[4:8]])
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (4 * (96 + 4) + 4, 2 * (96 + 4) + 4)


def test_demo_command_prints_scores_and_the_goal(tmp_path, capsys):
    scores = demo.main(["--steps", "2", "--batch-size", "8", "--per-class", "2", "--no-progress", "--reuse-steps", "2",
                        "--out", str(tmp_path / "demo.png")])
    out = capsys.readouterr().out
    assert "sampler settings: steps 12, cfg_scale 2.0, mask_temp 1.0, samp_temp 0.25" in out  # the config's
    assert set(scores) == {"reuse", "no reuse"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert "generated, reuse:" in out and "generated, no reuse:" in out
    assert ("goal (at least 90% with reuse, at most 3 points below no reuse): " in out) and (tmp_path / "demo.png").exists()


def test_demo_sampler_flags_override_the_config(tmp_path, capsys):
    demo.main(["--steps", "1", "--batch-size", "8", "--per-class", "1", "--no-progress", "--sample-steps", "4",
               "--samp-temp", "0.5", "--cfg-scale", "0", "--out", ""])
    assert "sampler settings: steps 4, cfg_scale 0.0, mask_temp 1.0, samp_temp 0.5" in capsys.readouterr().out


def test_demo_leaves_threads_and_random_state_as_they_were(tmp_path, capsys):
    """The demo writes --out (folders made) and sets --threads for its run only; it seeds its own
    generators and a fork of torch's RNG, so the caller's random state is untouched."""
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    out = tmp_path / "pictures" / "grids.png"
    demo.main(["--steps", "1", "--batch-size", "8", "--per-class", "1", "--no-progress", "--threads",
               str(threads + 1), "--out", str(out)])
    assert out.exists() and f"wrote {out}" in capsys.readouterr().out
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), state)
    model = demo.init_model()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), demo.init_model().parameters()))


def test_demo_writes_the_repositorys_picture_by_default():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert demo.build_parser().parse_args([]).out == os.path.join(repo, "docs", "demo.png")


@pytest.fixture
def one_thread():
    """torch on one CPU thread: the demo's tiny model gains nothing from intra-op threads, which cost
    several times the run when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ema_samples_as_well_as_the_raw_weights(one_thread):
    """A short run with the trainer's EMA decay (0.9999): the demo's model, 500 steps of 64 grids of
    three classes (h-stripes, v-stripes, checker), reuse on half of the batches with the EMA's
    features. 192 samples (12 steps, reuse) of the warmed-up EMA score at most 3 binomial standard
    errors (of the difference) below those of the raw weights, while an EMA without the warm-up kept
    over the same steps (0.9999^500: still 95% the initial weights) scores at least 3 below."""
    classes, per_class = 3, 64
    cfg = dataclasses.replace(demo.DEMO_CONFIG, num_classes=classes)
    data = demo.make_dataset()
    data = data[data[:, 0] < classes]
    fixed = T.EMA(demo.init_model(cfg), T.EMA_DECAY, warmup=False)
    model, ema = demo.train(cfg, steps=500, ema_decay=T.EMA_DECAY, reuse_steps=1, data=data, progress=False,
                            log=None, on_step=fixed.update)
    assert ema.updates == fixed.updates == 500
    n = classes * per_class
    scores = {name: float(demo.evaluate(m, per_class=per_class, modes=("reuse",))["reuse"][2].mean())
              for name, m in (("raw", model), ("ema", ema.model), ("no warm-up", fixed.model))}
    print(f"scores of {n} samples each after 500 steps: {scores}")

    def se(*names):  # the binomial standard error of one score, or of the difference of two
        return math.sqrt(sum(scores[k] * (1 - scores[k]) for k in names) / n)

    assert scores["raw"] > 3 * se("raw"), scores  # the short run learned: the checker rejects random grids
    assert scores["ema"] >= scores["raw"] - 3 * se("ema", "raw"), scores
    assert scores["no warm-up"] <= scores["raw"] - 3 * se("no warm-up", "raw"), scores
