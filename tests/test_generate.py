"""The commands `python -m enat.generate` and `python -m enat.tokenize` (docs/VQ.md for the token file),
run with --random-weights and the tiny ENAT / VQGAN configurations on a CPU, and with checkpoints of the
paper's layout and of enat.train."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import enat
import enat.train
from enat import cli, generate, tokenize, vq
from enat.checkpoint import state_dict_of
from helpers import run_python

TINY = ["--random-weights", "--model", "tiny", "--vq-config", "tiny", "--resolution", "64", "--device", "cpu",
        "--no-progress"]


def _grid_size(n, nrow, side=64, pad=2):
    rows = -(-n // nrow)
    return nrow * (side + pad) + pad, rows * (side + pad) + pad  # PIL's (width, height)


# enat.generate


def test_generate_writes_a_grid_and_one_png_per_image(tmp_path):
    grid, out_dir = tmp_path / "grid.png", tmp_path / "images"
    result = run_python(["-m", "enat.generate", *TINY, "--labels", "3", "1", "4", "--batch-size", "2",
                         "--grid", str(grid), "--out-dir", str(out_dir)])
    assert result.returncode == 0, result.stderr
    with Image.open(grid) as im:
        assert im.mode == "RGB" and im.size == _grid_size(3, 2)
    names = sorted(os.listdir(out_dir))
    assert names == ["00000_class3.png", "00001_class1.png", "00002_class4.png"]
    with Image.open(out_dir / names[0]) as im:
        assert im.size == (64, 64)
        first = np.asarray(im)
    assert np.array_equal(np.asarray(Image.open(grid))[2:66, 2:66], first)  # grid cell 0 is image 0
    assert "transformer (enat.sample)" in result.stdout and "VQ decoder" in result.stdout
    assert result.stdout.count("images/s") == 3


def test_generate_under_torchrun_matches_one_process(tmp_path):
    """2 processes (gloo on CPU): batches go round-robin, rank 0 gathers; the grid equals a one-process
    run's (up to 1/255 where thread counts change float rounding)."""
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    common = [*TINY, "--num-classes", "5", "--batch-size", "2", "--seed", "3"]
    single = run_python(["-m", "enat.generate", *common, "--grid", str(one)])
    assert single.returncode == 0, single.stderr
    multi = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "enat.generate",
                        *common, "--grid", str(two)], timeout=180)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "2 processes" in multi.stdout and multi.stdout.count("wrote") == 1
    a, b = (np.asarray(Image.open(p)).astype(int) for p in (one, two))
    assert a.shape == b.shape == _grid_size(5, 3)[::-1] + (3,)
    assert np.abs(a - b).max() <= 1


def test_split_work():
    for n, batch, world in [(0, 4, 2), (1, 4, 3), (10, 3, 1), (10, 3, 2), (10, 3, 4), (7, 7, 2), (9, 2, 8)]:
        parts = cli.split_work(n, batch, world)
        assert len(parts) == world
        flat = sorted(b for part in parts for b in part)
        assert flat == cli.split_work(n, batch, 1)[0]  # the same batches for any world size
        covered = [i for _, start, stop in flat for i in range(start, stop)]
        assert covered == list(range(n))
        assert all(stop - start <= batch for _, start, stop in flat)
        for r, part in enumerate(parts):  # round-robin
            assert [j for j, _, _ in part] == list(range(r, len(flat), world))
    with pytest.raises(ValueError):
        cli.split_work(4, 0, 1)


def test_make_grid():
    images = np.arange(5 * 4 * 6 * 3, dtype=np.uint8).reshape(5, 4, 6, 3)
    grid = generate.make_grid(images, nrow=2, padding=1)
    assert grid.shape == (3 * 5 + 1, 2 * 7 + 1, 3)
    assert np.array_equal(grid[1 + 5:1 + 5 + 4, 1 + 7:1 + 7 + 6], images[3])
    assert grid[0].max() == 0 and grid[-1].max() == 0


def test_generate_clear_errors(tmp_path, capsys):
    assert generate.main(["--model", "ENAT-S", "--labels", "1", "--device", "cpu"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    missing = str(tmp_path / "nnet_ema.pth")
    assert generate.main(["--model", "ENAT-S", "--checkpoint", missing, "--labels", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "ENAT checkpoint not found" in err and missing in err and "released with the paper" in err
    ckpt = tmp_path / "enat.pth"
    torch.save(enat.ENAT(cli.tiny_config(64)).state_dict(), ckpt)
    missing_vq = str(tmp_path / "vq.ckpt")
    assert generate.main(["--model", "tiny", "--resolution", "64", "--checkpoint", str(ckpt), "--vq-checkpoint",
                          missing_vq, "--labels", "1", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "VQGAN checkpoint not found" in err and missing_vq in err and "vqgan_jax_strongaug.ckpt" in err
    assert generate.main([*TINY, "--labels", "1000"]) == 2
    assert "--labels must be class ids in [0, 1000)" in capsys.readouterr().err
    assert generate.main(["--model", "ENAT-S", "--resolution", "320", "--random-weights", "--labels", "1"]) == 2
    assert "resolution must be one of" in capsys.readouterr().err


def test_generate_loads_checkpoints(tmp_path, capsys):
    """With checkpoint files (here: a tiny ENAT's and a tiny VQGAN's state dicts) the same pipeline runs."""
    ckpt, vq_ckpt = tmp_path / "enat.pth", tmp_path / "vq.ckpt"
    torch.save(enat.ENAT(cli.tiny_config(64)).state_dict(), ckpt)
    torch.save({"state_dict": vq.VQGAN(**vq.TINY_CONFIG).state_dict()}, vq_ckpt)
    grid = tmp_path / "g.png"
    args = ["--model", "tiny", "--resolution", "64", "--checkpoint", str(ckpt), "--vq-checkpoint", str(vq_ckpt),
            "--vq-config", "tiny", "--labels", "5", "6", "--steps", "4", "--device", "cpu", "--grid", str(grid),
            "--no-progress"]
    assert generate.main(args) == 0
    with Image.open(grid) as im:
        assert im.size == _grid_size(2, 2)


def _training_run(tmp_path):
    """checkpoints/latest.pt of one enat.train step of a model of 8 codes and 8 classes (no VQGAN decodes it)."""
    from enat.demo import make_dataset

    data = tmp_path / "tokens.npy"
    np.save(data, make_dataset(n_per_class=1))
    enat.train.main(["--depth-enc", "1", "--depth-dec", "1", "--width", "32", "--heads", "2", "--resolution", "128",
                     "--vocab-size", "8", "--num-classes", "8", "--batch-size", "8", "--warmup", "1", "--ema", "0.5",
                     "--steps", "1", "--ckpt-every", "1", "--sample-every", "0", "--no-progress", "--data", str(data),
                     "--out", str(tmp_path / "run"), "--device", "cpu"])
    return tmp_path / "run" / "checkpoints" / "latest.pt"


def test_generate_from_a_training_checkpoint_saves_ids(tmp_path, capsys, monkeypatch):
    """enat.train's checkpoint: its config and EMA weights, no size flags; --save-ids alone needs no VQGAN."""
    monkeypatch.setenv("ENAT_KERNELS_BACKEND", "reference")
    latest = _training_run(tmp_path)
    ids_path = tmp_path / "ids.npy"
    common = ["--checkpoint", str(latest), "--num-classes", "3", "--steps", "2", "--device", "cpu", "--no-progress"]
    assert generate.main([*common, "--save-ids", str(ids_path)]) == 0
    assert "wrote" in capsys.readouterr().out and not (tmp_path / "samples.png").exists()
    rows = np.load(ids_path)
    state = torch.load(latest, weights_only=True)
    cfg = enat.ENATConfig(**state["config"])
    ema = state_dict_of(state["ema"])  # the EMA weights, possibly under "state_dict"
    model = enat.load_official(ema, cfg)
    labels = torch.randint(0, 8, (3,), generator=torch.Generator().manual_seed(0))
    want = enat.sample(model, labels, steps=2, cfg_scale=cfg.cfg_scale, mask_temp=cfg.mask_temp,
                       samp_temp=cfg.samp_temp, generator=torch.Generator().manual_seed(cli.batch_seed(0, 0)))
    assert rows.dtype == np.int64 and rows.shape == (3, 1 + 64)
    assert np.array_equal(rows[:, 0], labels.numpy()) and np.array_equal(rows[:, 1:], want.numpy())
    assert not all(torch.equal(ema[k], state["model"][k]) for k in state["model"])  # the EMA, not "model"

    bad = [(["--model", "ENAT-S", "--save-ids", str(tmp_path / "x.npy")], "--model ENAT-S's depth_enc 15, the "
            "checkpoint's 1"),
           (["--resolution", "256", "--save-ids", str(tmp_path / "x.npy")], "--resolution 256, the checkpoint's 128"),
           (["--grid", str(tmp_path / "x.png"), "--vq-checkpoint", str(tmp_path / "vq.ckpt")],
            "vocabulary has 8 codes, the VQGAN tokenizer's 1024"),
           (["--save-ids", str(tmp_path / "x.npy"), "--vq-checkpoint", str(tmp_path / "vq.ckpt")],
            "--vq-checkpoint is not used with --save-ids alone"),
           (["--random-weights", "--model", "tiny", "--resolution", "64", "--save-ids", str(tmp_path / "x.npy")],
            "--checkpoint and --random-weights exclude each other")]
    for extra, message in bad:
        assert generate.main([*common, *extra]) == 2, message
        assert message in capsys.readouterr().err, message
        assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.png").exists()
    assert generate.main([*TINY, "--labels", "1", "--vq-checkpoint", str(latest)]) == 2
    assert "--vq-checkpoint and --random-weights exclude each other" in capsys.readouterr().err


# enat.tokenize


def _image_folder(root):
    rng = np.random.default_rng(0)
    (root / "n02_dog").mkdir(parents=True)
    (root / "n01_cat").mkdir()
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(root / "n01_cat" / "a.png")
    Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8)).save(root / "n01_cat" / "b.jpg")  # grey
    Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(root / "n02_dog" / "c.png")
    (root / "n02_dog" / "broken.jpg").write_bytes(b"not an image")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "n02_dog" / "d.png")


def _tiny_vqgan():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return vq.VQGAN(**vq.TINY_CONFIG).eval()  # what --random-weights builds


@pytest.mark.parametrize("flip", [False, True])
def test_tokenize_layout_flips_and_unreadable_files(tmp_path, capsys, flip):
    root = tmp_path / "images"
    _image_folder(root)
    out = tmp_path / "tokens.npy"
    args = [str(root), str(out), "--random-weights", "--vq-config", "tiny", "--resolution", "64",
            "--batch-size", "2", "--workers", "0", "--device", "cpu", "--no-progress"] + (["--flip"] if flip else [])
    assert tokenize.main(args) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable files" in captured.err and "broken.jpg" in captured.err
    assert (tmp_path / "tokens.unreadable.txt").read_text().startswith(str(root / "n02_dog" / "broken.jpg"))
    assert (tmp_path / "tokens.classes.txt").read_text() == "n01_cat\nn02_dog\n"
    rows = np.load(out)
    per = 2 if flip else 1
    assert rows.dtype == np.int64 and rows.shape == (4 * per, 1 + 16)
    assert rows[:, 0].tolist() == [x for x in (0, 0, 1, 1) for _ in range(per)]
    assert ((rows[:, 1:] >= 0) & (rows[:, 1:] < 1024)).all()
    # row layout: the label, then the ids of the preprocessed image (and of its mirror) in row-major order
    model = _tiny_vqgan()
    with Image.open(root / "n02_dog" / "c.png") as im:
        pixels = torch.from_numpy(cli.center_crop_arr(im, 64).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        want = model.encode(pixels)[0].numpy()
        want_flip = model.encode(pixels.flip(-1))[0].numpy()
    assert np.array_equal(rows[2 * per, 1:], want)
    if flip:
        assert np.array_equal(rows[2 * per + 1, 1:], want_flip)


def test_center_crop_arr():
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))  # halved once, then resized
    assert cli.center_crop_arr(big, 64).shape == (64, 64, 3)
    grey = Image.fromarray(rng.integers(0, 256, (40, 90), dtype=np.uint8))  # upscaled, converted to RGB
    assert cli.center_crop_arr(grey, 64).shape == (64, 64, 3)
    # a wide image keeps its centre: a 64 x 128 image whose middle 64 columns are white
    arr = np.zeros((64, 128, 3), dtype=np.uint8)
    arr[:, 32:96] = 255
    assert (cli.center_crop_arr(Image.fromarray(arr), 64) == 255).all()


def test_tokenize_errors(tmp_path, capsys):
    assert tokenize.main([str(tmp_path / "none"), str(tmp_path / "t.npy"), "--random-weights", "--vq-config",
                          "tiny", "--device", "cpu"]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert tokenize.main([str(tmp_path), str(tmp_path / "t.npy"), "--vq-checkpoint", str(tmp_path / "v.ckpt"),
                          "--device", "cpu"]) == 2
    assert "VQGAN checkpoint not found" in capsys.readouterr().err
