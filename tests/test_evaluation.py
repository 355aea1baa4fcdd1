"""enat.evaluation (FID and IS from running sums, pytorch-fid's Inception) and `python -m enat.evaluate`,
checked against pytorch-fid, scipy and numpy on random Inception weights; the command runs the tiny ENAT
and VQGAN with --random-weights on a CPU, in one process and under torchrun (gloo)."""

import json
import os
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pytorch_fid", reason="the eval extra (pytorch-fid, scipy) is not installed")
scipy_linalg = pytest.importorskip("scipy.linalg", reason="the eval extra (pytorch-fid, scipy) is not installed")

import enat  # noqa: E402
from enat import cli, evaluate, vq  # noqa: E402
from enat import evaluation as E  # noqa: E402
from helpers import run_python  # noqa: E402

EPS64 = np.finfo(np.float64).eps
TINY = ["--random-weights", "--model", "tiny", "--vq-config", "tiny", "--resolution", "64", "--device", "cpu",
        "--no-progress"]
# 8 samples of 4 classes in batches of 3, 3 and 2 (the last batch short)
N, RUN = 8, ["--num-samples", "8", "--classes", "4", "--batch-size", "3", "--seed", "3"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights file with pytorch-fid's names and shapes and random values (the real file cannot be fetched)."""
    path = tmp_path_factory.mktemp("inception") / E.INCEPTION_WEIGHTS
    torch.save(E.random_inception_state(seed=1), path)
    return str(path)


@pytest.fixture(scope="module")
def inception(weights):
    return E.load_inception(weights)


def _pytorch_fid_inception(weights, full=False):
    """pytorch-fid's own InceptionV3 (or, full=True, its fid_inception_v3 with the fc), its download
    replaced by the weights file."""
    from pytorch_fid import inception as fid

    with mock.patch.object(fid, "load_state_dict_from_url", return_value=torch.load(weights)):
        net = fid.fid_inception_v3() if full else fid.InceptionV3([3])
    return net.eval()


def _moment_tolerance(features):
    """float64 rounding of sums over n rows of products of values up to m in size: n * eps * m^2, with a
    factor 8 for the subtraction of n mu mu^T and the division."""
    f = np.asarray(features, dtype=np.float64)
    return 8 * len(f) * EPS64 * max(1.0, float(np.abs(f).max())) ** 2


def _numpy_inception_score(logits, splits=10):
    """improved-GAN's inception_score.py on logits, float64."""
    logits = np.asarray(logits, dtype=np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = len(p)
    scores = []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return np.mean(scores), np.std(scores)


# The network


def test_features_and_logits_are_pytorch_fids(weights, inception):
    """Pool features: pytorch-fid's InceptionV3 forward (the same network on the same kernels, so equal).
    Logits: the fc of pytorch-fid's full fid_inception_v3 on them, less its bias."""
    images = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    features, logits = inception(images)
    theirs = _pytorch_fid_inception(weights)(images)[0]
    assert theirs.shape == (2, E.FEATURES, 1, 1)
    assert torch.equal(features, theirs.flatten(1))
    fc = _pytorch_fid_inception(weights, full=True).fc  # the fc of pytorch-fid's full FID Inception
    with torch.no_grad():
        want = fc(theirs.flatten(1)) - fc.bias
    # fp32 dot products of 2048 terms, the bias added and taken off: 2048 eps32 of the summed magnitudes
    budget = 2048 * torch.finfo(torch.float32).eps * (features.abs() @ fc.weight.abs().T + fc.bias.abs())
    assert logits.shape == (2, E.LOGITS) and ((logits - want).abs() <= budget).all()
    assert logits.std() > 1  # the random fc gives peaked, not uniform, class probabilities


def test_load_inception_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*mseitzer/pytorch-fid"):
        E.load_inception(str(tmp_path / "none.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="does not match pytorch-fid's FID Inception"):
        E.load_inception(str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not the FID Inception's weights"):
        E.load_inception(str(garbage))


# Statistics, FID and IS


def test_streamed_mean_and_covariance_equal_numpy():
    rng = np.random.default_rng(0)
    n, d = 37, 16
    features = 5 + rng.normal(size=(n, d)) * rng.uniform(0.1, 2, size=d)  # a mean far from 0
    stats = E.FeatureStats(n, features=d, classes=3)
    for start, stop in [(20, 37), (0, 7), (7, 20)]:  # any order
        stats.update(torch.from_numpy(features[start:stop]).float(), torch.zeros(stop - start, 3), start)
    mu, sigma = stats.mean_cov()
    f32 = features.astype(np.float32).astype(np.float64)  # what was added
    tol = _moment_tolerance(f32)
    assert np.abs(mu - f32.mean(0)).max() <= tol
    assert np.abs(sigma - np.cov(f32, rowvar=False)).max() <= tol
    with pytest.raises(ValueError, match="not among"):
        stats.update(torch.zeros(2, d), torch.zeros(2, 3), 36)


def test_inception_score_equals_numpy():
    rng = np.random.default_rng(1)
    n, classes = 53, 20
    logits = rng.normal(size=(n, classes)) * 3
    stats = E.FeatureStats(n, features=4, classes=classes)
    order = [(40, 53), (0, 11), (11, 40)]
    for start, stop in order:
        stats.update(torch.zeros(stop - start, 4), torch.from_numpy(logits[start:stop]), start)
    mean, std = stats.inception_score()
    want_mean, want_std = _numpy_inception_score(logits)
    assert mean > 1.5 and std > 0  # not a degenerate case
    assert mean == pytest.approx(want_mean, rel=1e-12) and std == pytest.approx(want_std, rel=1e-9, abs=1e-12)
    incomplete = E.FeatureStats(n, features=4, classes=classes)
    incomplete.update(torch.zeros(3, 4), torch.zeros(3, classes), 0)
    with pytest.raises(ValueError, match="3 of the 53 samples"):
        incomplete.inception_score()


def _covariance(rng, d, rank):
    a = rng.normal(size=(d, rank))
    return a @ a.T / rank


@pytest.mark.parametrize("rank", [300, 12])  # full rank; and singular, as the covariance of few samples
def test_frechet_distance_equals_scipy_eigvals_and_pytorch_fid(rank):
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(2)
    d = 256
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.5
    s1, s2 = _covariance(rng, d, rank), _covariance(rng, d, 400)
    fid = E.frechet_distance(mu1, s1, mu2, s2)
    base = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2)
    eig = base - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()  # the paper's code
    scale = np.trace(s1) + np.trace(s2)
    if rank >= d:
        sqrtm = base - 2 * np.trace(scipy_linalg.sqrtm(s1 @ s2)).real  # pytorch-fid's formula, written out
        # float64 eigenproblems of condition ~1e3: errors far below 1e-9 of the traces
        tol = 1e-9 * scale
        for want in (eig, sqrtm, calculate_frechet_distance(mu1, s1, mu2, s2)):
            assert abs(fid - want) <= tol
    else:
        # the zero eigenvalues come out as +-delta, delta ~ d eps |s1| |s2|, and count sqrt(delta) each
        delta = d * EPS64 * np.linalg.norm(s1, 2) * max(np.linalg.norm(s1, 2), np.linalg.norm(s2, 2))
        tol = 2 * d * np.sqrt(delta) + 1e-9 * scale
        assert abs(fid - eig) <= tol
    assert abs(E.frechet_distance(mu1, s1, mu1, s1)) <= tol
    with pytest.raises(ValueError, match="mu"):
        E.frechet_distance(mu1, s1, mu2[:-1], s2)


def test_class_balanced_labels():
    labels = E.class_balanced_labels(50, 10)
    assert np.bincount(labels.numpy()).tolist() == [5] * 10
    assert all(np.bincount(part.numpy(), minlength=10).tolist() == [1] * 10 for part in labels.split(10))


# python -m enat.evaluate stats


def _image_folder(root, n=6, size=64):
    rng = np.random.default_rng(3)
    (root / "sub").mkdir(parents=True)
    paths = []
    for i in range(n):
        path = root / ("sub" if i % 2 else "") / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (root / "notes.txt").write_text("not an image, not picked")
    return sorted(paths)


def test_stats_command_equals_pytorch_fids_statistics(tmp_path, weights):
    """Images already at the resolution (the ADM crop leaves them as they are): pytorch-fid's activations
    of the same files, and their mean and covariance as its calculate_activation_statistics takes them."""
    from pytorch_fid.fid_score import get_activations

    files = _image_folder(tmp_path / "images", n=4)
    out = tmp_path / "ref.npz"
    assert evaluate.main(["stats", "--images", str(tmp_path / "images"), "--out", str(out), "--resolution", "64",
                          "--inception-weights", weights, "--batch-size", "4", "--workers", "0", "--device", "cpu",
                          "--no-progress"]) == 0
    mu, sigma = E.load_reference(str(out))
    activations = get_activations(files, _pytorch_fid_inception(weights), batch_size=3, device="cpu", num_workers=0)
    tol = _moment_tolerance(activations)
    assert np.abs(mu - np.mean(activations, axis=0)).max() <= tol
    assert np.abs(sigma - np.cov(activations, rowvar=False)).max() <= tol


def test_stats_command_errors(tmp_path, capsys, weights):
    root = tmp_path / "images"
    _image_folder(root, n=3)
    (root / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "ref.npz"
    common = ["--out", str(out), "--resolution", "64", "--inception-weights", weights, "--workers", "0",
              "--device", "cpu", "--no-progress"]
    assert evaluate.main(["stats", "--images", str(root), *common]) == 2
    err = capsys.readouterr().err
    assert "--images: 1 of 4 image files cannot be read" in err and "broken.png" in err
    assert not out.exists() and not os.path.exists(f"{out}.tmp")
    assert evaluate.main(["stats", "--images", str(tmp_path / "none"), *common]) == 2
    assert "--images: folder not found" in capsys.readouterr().err
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    assert evaluate.main(["stats", "--images", str(tmp_path / "one"), *common]) == 2
    assert "holds 1 image files" in capsys.readouterr().err


# python -m enat.evaluate


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Statistics of the FID Inception's size (synthetic: any mu and covariance serve)."""
    rng = np.random.default_rng(4)
    path = tmp_path_factory.mktemp("reference") / "ref.npz"
    a = rng.normal(size=(E.FEATURES, 64)) * 0.1
    np.savez(path, mu=rng.normal(size=E.FEATURES) * 0.1 + 0.3, sigma=a @ a.T)
    return str(path)


def _outputs(d):
    return ["--json", str(d / "eval.json"), "--save-npz", str(d / "samples.npz"), "--save-stats", str(d / "stats.npz"),
            "--state-dir", str(d / "state")]


def _results(d):
    with open(d / "eval.json") as f:
        record = json.load(f)
    with np.load(d / "stats.npz") as s, np.load(d / "samples.npz") as n:
        return record, s["mu"], s["sigma"], n["arr_0"], n["arr_1"]


def _recomputed(weights, num=N, classes=4, batch=3, seed=3):
    """Features and logits of the run's samples, recomputed here from the parts: the tiny ENAT and VQGAN
    as --random-weights builds them, class i mod C, batch j from seed * 1000003 + j."""
    torch.manual_seed(seed)
    model = enat.ENAT(cli.tiny_config(64)).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vqgan = vq.VQGAN(**vq.TINY_CONFIG).eval()
    inception = E.load_inception(weights)
    features, logits = [], []
    cfg = model.cfg
    for j, start in enumerate(range(0, num, batch)):
        labels = torch.arange(start, min(start + batch, num)) % classes
        ids = enat.sample(model, labels, steps=8, cfg_scale=cfg.cfg_scale, mask_temp=cfg.mask_temp,
                          samp_temp=cfg.samp_temp, generator=torch.Generator().manual_seed(cli.batch_seed(seed, j)))
        with torch.no_grad():
            f, lg = inception(vqgan.decode(ids))
        features.append(f.double().numpy())
        logits.append(lg.double().numpy())
    return np.concatenate(features), np.concatenate(logits)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, weights, reference):
    """An uninterrupted run in this process (the reference backend, as the command's processes use)."""
    d = tmp_path_factory.mktemp("baseline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENAT_KERNELS_BACKEND", "reference")
        assert evaluate.main([*TINY, *RUN, "--inception-weights", weights, "--reference", reference,
                              *_outputs(d)]) == 0
    return d


def test_evaluate_end_to_end(baseline, weights, reference, monkeypatch):
    record, mu, sigma, images, labels = _results(baseline)
    monkeypatch.setenv("ENAT_KERNELS_BACKEND", "reference")
    features, logits = _recomputed(weights)
    tol = _moment_tolerance(features)
    assert np.abs(mu - features.mean(0)).max() <= tol
    assert np.abs(sigma - np.cov(features, rowvar=False)).max() <= tol
    assert (record["is_mean"], record["is_std"]) == pytest.approx(_numpy_inception_score(logits, N), rel=1e-9)
    assert record["fid"] == E.frechet_distance(mu, sigma, *E.load_reference(reference))
    assert record["num"] == N and record["is_splits"] == N
    assert record["settings"]["num"] == N and record["resolved"]["sampler"]["cfg_scale"] == 2.5
    assert record["sha256"]["inception_weights"] == cli.sha256(weights) and record["sha256"]["checkpoint"] is None
    assert record["sha256"]["reference"] == cli.sha256(reference)
    assert record["versions"]["pytorch-fid"] and record["versions"]["torch"] == torch.__version__.split("+")[0]
    assert set(record["images_per_s"]) == {"transformer", "decoder", "inception", "total"}
    assert images.dtype == np.uint8 and images.shape == (N, 64, 64, 3)
    assert labels.tolist() == [i % 4 for i in range(N)]
    assert not (baseline / "state").exists() and not (baseline / "samples.npz.partial.npy").exists()


def test_torchrun_two_processes_equal_one(tmp_path):
    """One process and two (gloo), with no file but the outputs (random Inception, no reference): the same
    samples and, up to float64 rounding, the same statistics."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_python(["-m", "enat.evaluate", *TINY, *RUN, *_outputs(one)], timeout=180)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "FID not computed (no --reference)" in single.stdout and single.stdout.count("images/s") == 4
    multi = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "enat.evaluate",
                        *TINY, *RUN, *_outputs(two)], timeout=240)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "2 processes" in multi.stdout and multi.stdout.count("IS ") == 1
    (r1, mu1, s1, x1, _), (r2, mu2, s2, x2, _) = _results(one), _results(two)
    assert np.array_equal(x1, x2)
    # the sums differ in the order of float64 additions only; max f^2 <= (n - 1) max sigma_ii + n max mu_i^2
    largest = np.sqrt((N - 1) * np.diag(s1).max() + N * (mu1 ** 2).max())
    tol = _moment_tolerance(np.full((N, 1), largest))
    assert np.abs(mu1 - mu2).max() <= tol and np.abs(s1 - s2).max() <= tol
    assert r1["fid"] is None
    assert (r1["is_mean"], r1["is_std"]) == pytest.approx((r2["is_mean"], r2["is_std"]), rel=1e-12)
    assert r2["resolved"]["processes"] == 2 and not (two / "state").exists()


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, baseline, weights, reference, monkeypatch, capsys):
    monkeypatch.setenv("ENAT_KERNELS_BACKEND", "reference")
    args = [*TINY, *RUN, "--inception-weights", weights, "--reference", reference, "--save-every", "1",
            *_outputs(tmp_path)]
    update, calls = E.FeatureStats.update, []

    def interrupted(self, *a, **k):  # the run dies while measuring the third batch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return update(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(E.FeatureStats, "update", interrupted)
        with pytest.raises(KeyboardInterrupt):
            evaluate.main(args)
    state = tmp_path / "state"
    assert torch.load(state / "rank0.pt", weights_only=True)["done"] == 2
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "samples.npz").exists()
    (state / "rank0.pt.tmp").write_bytes(b"half a file")  # a save cut short is never read
    other = [a if a != "3" else "4" for a in args]  # --seed 4
    assert evaluate.main(other) == 2
    err = capsys.readouterr().err
    assert "--state-dir" in err and "seed: 3, now 4" in err
    assert evaluate.main(args) == 0
    for got, want in zip(_results(tmp_path)[1:], _results(baseline)[1:]):
        assert np.array_equal(got, want)  # the same sums in the same order: equal bits
    got, want = _results(tmp_path)[0], _results(baseline)[0]
    assert (got["fid"], got["is_mean"], got["is_std"]) == (want["fid"], want["is_mean"], want["is_std"])


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_evaluate_bad_input(tmp_path, capsys, weights, reference):
    rng = np.random.default_rng(5)
    cases = [
        (["--inception-weights", str(tmp_path / "none.pth")], "--inception-weights: Inception weights not found"),
        ([], "--inception-weights is required"),
        (["--inception-weights", weights, "--reference", str(tmp_path / "none.npz")], "--reference: reference "
         "statistics not found"),
        (["--inception-weights", weights, "--reference", _write_npz(tmp_path / "keys.npz", mean=np.zeros(3))],
         "not mu and sigma"),
        (["--inception-weights", weights, "--reference", _write_npz(tmp_path / "dim.npz", mu=np.zeros(64),
                                                                    sigma=np.eye(64))], "statistics of other features"),
        (["--inception-weights", weights, "--num", "1"], "--num-samples must be >= 2"),
        (["--inception-weights", weights, "--classes", "1001"], "--classes must be in [1, 1000]"),
        (["--inception-weights", weights, "--checkpoint", weights], "--checkpoint and --random-weights exclude"),
        (["--inception-weights", weights, "--vq-checkpoint", weights], "--vq-checkpoint and --random-weights"),
    ]
    np.save(tmp_path / "single.npy", rng.normal(size=3))
    cases.append((["--inception-weights", weights, "--reference", str(tmp_path / "single.npy")], "single array"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3)}, wrong)
    cases.append((["--inception-weights", str(wrong)], "does not match pytorch-fid's FID Inception"))
    for extra, message in cases:
        no_random = extra == []  # --inception-weights is required without --random-weights
        base = [a for a in TINY if not (no_random and a == "--random-weights")]
        assert evaluate.main([*base, "--num", "12", *extra, *_outputs(tmp_path)]) == 2, message
        err = capsys.readouterr().err
        assert message in err, (message, err)
        assert not any((tmp_path / name).exists() for name in ("eval.json", "samples.npz", "stats.npz", "state",
                                                               "samples.npz.partial.npy")), message
