"""enat.demo: the pattern-grid data set and its checker (which must be able to fail: it rejects random
and shuffled grids and accepts real ones, and no grid can pass for two classes), and a smoke run of
the demo's training and sampling."""

import numpy as np
import torch

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
    model = demo.train(steps=3, batch=16, data=demo.make_dataset(n_per_class=8), progress=False, log=None)
    results = demo.evaluate(model, per_class=2)
    for grids, labels, judged in results.values():
        assert grids.shape == (16, 64) and grids.min() >= 0 and grids.max() < demo.VOCAB and judged.dtype == bool
    demo.render(None, tmp_path / "grid.png", rows_of=[grids[:4], grids[4:8]])
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (4 * (96 + 4) + 4, 2 * (96 + 4) + 4)


def test_demo_command_prints_scores_and_the_goal(tmp_path, capsys):
    scores = demo.main(["--steps", "2", "--batch", "8", "--per-class", "2", "--no-progress", "--reuse-steps", "2",
                        "--out", str(tmp_path / "demo.png")])
    out = capsys.readouterr().out
    assert set(scores) == {"reuse", "no reuse"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert "generated, reuse:" in out and "generated, no reuse:" in out
    assert ("goal (at least 90% with reuse, at most 3 points below no reuse): " in out) and (tmp_path / "demo.png").exists()
