"""FID and Inception Score as the ENAT paper measures them, from running sums (memory independent of N).

    import enat.evaluation
    inception = enat.evaluation.load_inception("pt_inception-2015-12-05-6726825d.pth").to(device)
    stats = enat.evaluation.FeatureStats(50000, device=device)
    for start in range(0, 50000, 125):                         # any order, any process (all_reduce merges)
        images = vqgan.decode(enat.sample(model, labels[start:start + 125]))  # (B, 3, H, W) in [0, 1]
        stats.update(*inception(images), start=start)
    mu, sigma = stats.mean_cov()
    fid = enat.evaluation.frechet_distance(mu, sigma, *enat.evaluation.load_reference("fid_stats.npz"))
    is_mean, is_std = stats.inception_score()

The network is pytorch-fid's InceptionV3 (the TF FID Inception of 2015-12-05 ported to PyTorch; images
resized bilinearly to 299 px and scaled to [-1, 1]), the one the paper's evaluation runs, built from a
weights file, never downloaded. FID (the paper's code, from the 2048 pool features):
|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2). IS (improved-GAN's inception_score.py): the
softmax of the same network's 1008 logits (pool features times its fc weight; that code takes the
logits before the bias), exp(mean over x of KL(p(y|x) || p(y))) in each of 10 splits of contiguous
sample indices (split k: indices [k N // 10, (k + 1) N // 10); N splits of one sample below 10), mean
and standard deviation over the splits. Only sums are kept, in float64: of the features and of their
outer products, and per split of p(y|x) and of sum_y p log p.
"""

import contextlib
import os

import numpy as np
import torch
from torch import nn

from .checkpoint import load_strict, state_dict_of

FEATURES = 2048  # pool features (FID)
LOGITS = 1008  # the TF graph's classes (IS)
IS_SPLITS = 10
INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SOURCE = ("pytorch-fid's port of the TF FID Inception, released with pytorch-fid at "
                    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS)
REFERENCE_SOURCE = ("an .npz with mu (2048,) and sigma (2048, 2048): the paper's FID-stats files (e.g. "
                    "fid_stats_imagenet256_guided_diffusion.npz), or python -m enat.evaluate stats")


def _torchvision_inception():
    """torchvision's Inception3 with 1008 classes and no aux head: the parameter names and shapes of
    pytorch-fid's FID Inception, whose blocks subclass torchvision's."""
    import torchvision

    return torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=LOGITS, init_weights=False)


def random_inception_state(seed=0):
    """A state dict for the FID Inception with random weights from `seed`: He-normal convolutions (their
    activations keep their scale through the ReLUs, so the features neither vanish nor blow up), identity
    batch norms, an N(0, 0.1^2) fc (logits of a few units, so p(y|x) is not nearly uniform)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _torchvision_inception()
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.normal_(net.fc.weight, std=0.1)
    return net.state_dict()


@contextlib.contextmanager
def _serving(state):
    """pytorch_fid.inception builds its network and then loads load_state_dict_from_url(FID_WEIGHTS_URL), a
    download; inside this block that call returns `state` instead."""
    from pytorch_fid import inception as fid

    original = fid.load_state_dict_from_url
    fid.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        yield
    finally:
        fid.load_state_dict_from_url = original


class FIDInception(nn.Module):
    """pytorch-fid's InceptionV3 (`net`, pool features) and the fc weight of the same network (`fc`, no bias),
    built from a state dict of the weights file's names. forward(images (B, 3, H, W) float in [0, 1]) ->
    (features (B, 2048), logits (B, 1008)), float32. Runs in the dtype and memory format of its weights
    (module.to(dtype, memory_format=torch.channels_last) for a GPU)."""

    def __init__(self, state):
        from pytorch_fid.inception import InceptionV3

        super().__init__()
        with _serving(state):
            self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FEATURES]])
        self.fc = nn.Linear(FEATURES, LOGITS, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(state["fc.weight"])
        self.eval().requires_grad_(False)

    def forward(self, images):
        first = self.net.blocks[0][0].conv.weight
        layout = torch.channels_last if not first.is_contiguous() else torch.contiguous_format
        x = images.to(first.dtype).contiguous(memory_format=layout)
        with torch.no_grad():
            pool = self.net(x)[0].flatten(1)  # (B, 2048): the pool is 1 x 1 at 299 px
            logits = self.fc(pool)
        return pool.float(), logits.float()


def load_inception(path=None, seed=0):
    """FIDInception (CPU, float32, eval mode) with the weights of `path` (pytorch-fid's
    pt_inception-2015-12-05-6726825d.pth, names and shapes checked strictly), or random weights
    (random_inception_state(seed)) when path is None. Raises FileNotFoundError naming the file that is
    needed, ValueError for a file that is not those weights."""
    if path is None:
        return FIDInception(random_inception_state(seed))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found: {path!r}. They are {INCEPTION_WEIGHTS}, "
                                f"{INCEPTION_SOURCE}")
    try:
        state = state_dict_of(path, drop_prefixes=())
    except Exception as e:  # not a torch file, or no state dict in it
        raise ValueError(f"{path!r} is not the FID Inception's weights ({INCEPTION_WEIGHTS}): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        return FIDInception(state)
    except RuntimeError:  # pytorch-fid's strict load_state_dict: say which names and shapes differ
        with torch.device("meta"):  # names and shapes only
            template = _torchvision_inception()
        try:
            load_strict(template, state, f"pytorch-fid's FID Inception ({INCEPTION_WEIGHTS})")
        except ValueError as e:
            raise ValueError(f"{path!r}: {e}") from None
        raise


def load_reference(path):
    """(mu (2048,), sigma (2048, 2048)) float64 from an .npz with keys mu and sigma (the paper's FID-stats
    files load as they are). FileNotFoundError or ValueError, naming the file, for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics not found: {path!r}. They are {REFERENCE_SOURCE}")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # not an .npy / .npz, or pickled objects
        raise ValueError(f"{path!r} cannot be read as an .npz: {type(e).__name__}: {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} is a single array, not an .npz of mu and sigma ({REFERENCE_SOURCE})")
    with npz:
        if not {"mu", "sigma"} <= set(npz.files):
            raise ValueError(f"{path!r} holds the keys {sorted(npz.files)}, not mu and sigma ({REFERENCE_SOURCE})")
        try:
            mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
        except Exception as e:  # truncated, or not numbers
            raise ValueError(f"{path!r}: mu and sigma cannot be read as numbers: {type(e).__name__}: {e}") from None
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        raise ValueError(f"{path!r} holds mu {mu.shape} and sigma {sigma.shape}: statistics of other features; "
                         f"the FID Inception's are mu ({FEATURES},) and sigma ({FEATURES}, {FEATURES})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path!r}: mu and sigma must be finite")
    return mu, sigma


def save_reference(path, mu, sigma):
    """Write mu and sigma as an .npz (the FID-stats layout) at `path`, atomically (temporary file, rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:  # a file object: np.savez adds no suffix
        np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    os.replace(tmp, path)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2) in float64 (arrays or tensors; float). The
    eigenvalues of s1 s2, whose square roots the paper's code sums, are those of the symmetric
    s1^1/2 s2 s1^1/2, so two symmetric eigendecompositions give them; rounding's small negative
    eigenvalues of singular covariances count as 0, as the real part of their square roots does there."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(x).to(torch.float64) for x in (mu1, sigma1, mu2, sigma2))
    d = mu1.shape[0] if mu1.dim() == 1 else -1
    if d < 1 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: need mu (D,) and sigma (D, D) twice, got {tuple(mu1.shape)}, "
                         f"{tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}")
    mu2, sigma2 = mu2.to(mu1.device), sigma2.to(mu1.device)
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def class_balanced_labels(num, num_classes):
    """(num,) int64: sample i gets class i mod num_classes, so every class appears num / num_classes times
    when num_classes divides num (else the first num mod num_classes classes once more), and so does every
    IS split of num / 10 samples when num_classes divides that."""
    if num < 1 or num_classes < 1:
        raise ValueError(f"class_balanced_labels: num and num_classes must be >= 1, got {num}, {num_classes}")
    return torch.arange(num, dtype=torch.int64) % num_classes


class FeatureStats:
    """Running sums over the `num` samples 0..num-1 of an evaluation, added in any order by any process:
    their count, the sum of the features and of their outer products, and per IS split (contiguous index
    ranges, min(10, num) of them) the sum of p(y|x) and of sum_y p log p; float64 on `device`.
    all_reduce() adds the sums of all processes; state_dict() / load_state_dict() save and restore them."""

    def __init__(self, num, *, features=FEATURES, classes=LOGITS, splits=IS_SPLITS, device="cpu"):
        if isinstance(num, bool) or not isinstance(num, int) or num < 2:
            raise ValueError(f"num must be an int >= 2 (a covariance needs two samples), got {num!r}")
        self.num, self.splits = num, min(splits, num)
        f64 = dict(dtype=torch.float64, device=device)
        self.bounds = torch.tensor([k * num // self.splits for k in range(1, self.splits)], device=device)
        self.sums = {"count": torch.zeros(self.splits, **f64), "features": torch.zeros(features, **f64),
                     "outer": torch.zeros(features, features, **f64), "p": torch.zeros(self.splits, classes, **f64),
                     "plogp": torch.zeros(self.splits, **f64)}

    @torch.no_grad()
    def update(self, features, logits, start):
        """features (B, D) and logits (B, classes) of the samples start .. start + B - 1."""
        sums = self.sums
        if features.dim() != 2 or features.shape[1] != sums["features"].shape[0] or logits.dim() != 2 \
                or logits.shape != (features.shape[0], sums["p"].shape[1]):
            raise ValueError(f"update: need features (B, {sums['features'].shape[0]}) and logits (B, "
                             f"{sums['p'].shape[1]}), got {tuple(features.shape)} and {tuple(logits.shape)}")
        if not 0 <= start <= self.num - features.shape[0]:
            raise ValueError(f"update: samples {start} .. {start + features.shape[0] - 1} are not among "
                             f"0 .. {self.num - 1}")
        device = sums["outer"].device
        f = features.to(device, torch.float64)
        p = torch.softmax(logits.to(device, torch.float64), dim=1)
        split = torch.bucketize(torch.arange(start, start + f.shape[0], device=device), self.bounds, right=True)
        sums["features"] += f.sum(0)
        sums["outer"].addmm_(f.T, f)
        sums["count"].index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        sums["p"].index_add_(0, split, p)
        sums["plogp"].index_add_(0, split, torch.xlogy(p, p).sum(1))

    @property
    def count(self):
        return int(self.sums["count"].sum().item())

    def all_reduce(self):
        """Sum every process's sums into each (torch.distributed, initialised)."""
        import torch.distributed as dist

        for t in self.sums.values():
            dist.all_reduce(t)

    def mean_cov(self):
        """(mu (D,), sigma (D, D)) float64 numpy: the mean and the unbiased covariance of the features added."""
        n = self.sums["count"].sum()
        if n < 2:
            raise ValueError(f"mean_cov: needs two samples or more, got {int(n)}")
        mu = self.sums["features"] / n
        sigma = (self.sums["outer"] - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), ((sigma + sigma.T) / 2).cpu().numpy()

    def inception_score(self):
        """(mean, std) over the splits of exp(mean KL(p(y|x) || p(y))); every sample must have been added."""
        count = self.sums["count"]
        if self.count != self.num:
            raise ValueError(f"inception_score: {self.count} of the {self.num} samples were added")
        p_y = self.sums["p"] / count[:, None]
        kl = (self.sums["plogp"] - torch.xlogy(self.sums["p"], p_y).sum(1)) / count
        scores = kl.exp().cpu().numpy()
        return float(scores.mean()), float(scores.std())

    def state_dict(self):
        return {"num": self.num, "splits": self.splits, **{k: v.cpu() for k, v in self.sums.items()}}

    def load_state_dict(self, state):
        if state["num"] != self.num or state["splits"] != self.splits:
            raise ValueError(f"load_state_dict: the state is of {state['num']} samples in {state['splits']} splits, "
                             f"these stats of {self.num} in {self.splits}")
        for k, v in self.sums.items():
            v.copy_(state[k])
