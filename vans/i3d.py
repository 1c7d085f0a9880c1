"""Inception-3D (Carreira & Zisserman, 2017) for FVD features, and the Fréchet distance.

The network is the standard Kinetics I3D: a 7×7×7 stem with stride 2, two spatial max pools, 1×1×1 and
3×3×3 convolutions, nine Inception blocks (Mixed_3b … Mixed_5c, four branches each: 1×1×1; 1×1×1 → 3×3×3;
1×1×1 → 3×3×3; 3×3×3 max pool → 1×1×1), every convolution followed by batch norm (eps 1e-3) and ReLU,
TensorFlow "SAME" padding, then average pooling and a 1×1×1 convolution to the class logits.

Weights: a safetensors file in the common PyTorch I3D key layout (``Conv3d_1a_7x7.conv3d.weight``,
``….bn.{weight,bias,running_mean,running_var}``, ``Mixed_3b.b0``/``b1a``/``b1b``/``b2a``/``b2b``/``b3b``,
``logits.conv3d.{weight,bias}``). The user provides it (the usual FVD I3D is the Kinetics-400 one); channel
widths, kernel sizes and the class count are read from the tensor shapes, so a tiny test network in the
same layout loads through the same code.

Features (``I3D.features``): frames resized to 224×224 (bilinear), scaled to [−1, 1], and the 400 class
logits before softmax averaged over time, the layer the FVD paper (Unterthiner et al. 2018) uses;
``layer="pool"`` gives the 1024-d pooled features instead. Spatial pooling averages the whole map (exactly
the 7×7 average at 224×224); temporal pooling averages windows of 2 and then their mean (the reference
network's ``AvgPool3d((2, 7, 7))`` followed by the time average).

``frechet_distance`` computes ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½) in float64 through symmetric
eigendecompositions: tr (Σ₁Σ₂)^½ = Σ √λᵢ(Σ₁^½ Σ₂ Σ₁^½), which stays real and needs no matrix square root
of a non-symmetric product.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_state_dict, strip_prefix
from .errors import InputError, ModelFileError

BN_EPS = 1e-3
INCEPTION_BLOCKS = ("Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
                    "Mixed_5b", "Mixed_5c")
BRANCHES = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")
# Output widths of the standard network: stem convolutions, then per block (b0, b1a, b1b, b2a, b2b, b3b).
STANDARD_WIDTHS = {
    "Conv3d_1a_7x7": 64, "Conv3d_2b_1x1": 64, "Conv3d_2c_3x3": 192,
    "Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
STEM_KERNELS = {"Conv3d_1a_7x7": 7, "Conv3d_2b_1x1": 1, "Conv3d_2c_3x3": 3}
BRANCH_KERNELS = {"b0": 1, "b1a": 1, "b1b": 3, "b2a": 1, "b2b": 3, "b3b": 1}
# Max pools before these units: (kernel, stride) as (t, h, w).
POOLS = {"Conv3d_2b_1x1": ((1, 3, 3), (1, 2, 2)), "Mixed_3b": ((1, 3, 3), (1, 2, 2)),
         "Mixed_4b": ((3, 3, 3), (2, 2, 2)), "Mixed_5b": ((2, 2, 2), (2, 2, 2))}
_PREFIXES = ("module.", "i3d.")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME padding (before, after) of one axis: output size ceil(size / stride)."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    pads = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):  # F.pad wants the last axis first
        pads.extend(same_padding(size, k, s))
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Conv3d (SAME padding) → batch norm → ReLU; the logits unit has a bias and neither of the others."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, *, logits: bool = False):
        super().__init__()
        self.kernel, self.stride = (kernel,) * 3, (stride,) * 3
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=logits)
        self.bn = None if logits else nn.BatchNorm3d(cout, eps=BN_EPS, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        return x if self.bn is None else F.relu(self.bn(x))


def _max_pool_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    # Zero padding is the same as -inf padding here: the inputs are ReLU outputs (≥ 0).
    return F.max_pool3d(_pad_same(x, kernel, stride), kernel, stride)


class Inception(nn.Module):
    def __init__(self, cin: int, widths):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(cin, w0, 1)
        self.b1a, self.b1b = Unit3D(cin, w1a, 1), Unit3D(w1a, w1b, 3)
        self.b2a, self.b2b = Unit3D(cin, w2a, 1), Unit3D(w2a, w2b, 3)
        self.b3b = Unit3D(cin, w3b, 1)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = _max_pool_same(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], dim=1)


class I3D(nn.Module):
    """The Inception-3D classifier; ``widths`` as ``STANDARD_WIDTHS`` (default), ``num_classes`` logits."""

    def __init__(self, widths: dict | None = None, num_classes: int = 400, stem_kernels: dict | None = None):
        super().__init__()
        widths = widths or STANDARD_WIDTHS
        kernels = stem_kernels or STEM_KERNELS
        cin = 3
        for name, stride in (("Conv3d_1a_7x7", 2), ("Conv3d_2b_1x1", 1), ("Conv3d_2c_3x3", 1)):
            setattr(self, name, Unit3D(cin, widths[name], kernels[name], stride))
            cin = widths[name]
        for name in INCEPTION_BLOCKS:
            block = Inception(cin, widths[name])
            setattr(self, name, block)
            cin = block.out_channels
        self.feature_dim = cin
        self.logits = Unit3D(cin, num_classes, 1, logits=True)
        self.order = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3") + INCEPTION_BLOCKS

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [−1, 1] → pooled features [B, C, T'] (spatial mean, temporal windows of 2)."""
        for name in self.order:
            if name in POOLS:
                x = _max_pool_same(x, *POOLS[name])
            x = getattr(self, name)(x)
        x = x.mean(dim=(3, 4))
        return F.avg_pool1d(x, min(2, x.shape[2]), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits averaged over time, [B, num_classes]."""
        pooled = self.pooled(x)
        return self.logits(pooled[..., None, None]).mean(dim=(2, 3, 4))

    @torch.no_grad()
    def features(self, videos, *, layer: str = "logits", size: int = 224, batch_size: int = 4) -> torch.Tensor:
        """FVD features of videos (each float ``[T, H, W, 3]`` in 0..1, T ≥ 1) → float64 ``[N, D]``."""
        if layer not in ("logits", "pool"):
            raise InputError(f"I3D layer must be 'logits' or 'pool' (got {layer!r})")
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(videos), batch_size):
            clips = [_prepare(v, size) for v in videos[start:start + batch_size]]
            if len({c.shape for c in clips}) != 1:
                raise InputError("I3D videos in one batch need the same frame count; resample them first")
            x = torch.stack(clips).to(device)
            out.append((self(x) if layer == "logits" else self.pooled(x).mean(dim=2)).double().cpu())
        return torch.cat(out)


def _prepare(frames: torch.Tensor, size: int) -> torch.Tensor:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError("I3D wants each video as a float tensor [T, H, W, 3] in 0..1")
    x = frames.float().permute(0, 3, 1, 2)  # T, C, H, W
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x * 2 - 1).permute(1, 0, 2, 3)  # C, T, H, W in [-1, 1]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def config_from_state_dict(sd: dict[str, torch.Tensor], path: Path) -> tuple[dict, int, dict]:
    """(widths, num_classes, stem kernels) read from the tensor shapes."""
    def shape(key):
        if key not in sd:
            raise ModelFileError(f"I3D file {path.name} has no tensor {key}; expected the PyTorch I3D key layout "
                                 "(Conv3d_1a_7x7.conv3d.weight, Mixed_3b.b0.conv3d.weight, …, logits.conv3d.weight)")
        return tuple(sd[key].shape)

    widths, kernels = {}, {}
    for name in STEM_KERNELS:
        s = shape(f"{name}.conv3d.weight")
        widths[name], kernels[name] = s[0], s[2]
    for name in INCEPTION_BLOCKS:
        widths[name] = tuple(shape(f"{name}.{b}.conv3d.weight")[0] for b in BRANCHES)
    return widths, shape("logits.conv3d.weight")[0], kernels


def load_i3d(path: str | Path, *, device: str | torch.device = "cpu", allow_pickle: bool = False) -> I3D:
    """An ``I3D`` filled from the user's weight file (safetensors; sizes from its shapes), in eval mode."""
    path = Path(path)
    sd = strip_prefix(load_state_dict(path, what="I3D", allow_pickle=allow_pickle), _PREFIXES)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    widths, classes, kernels = config_from_state_dict(sd, path)
    model = I3D(widths, classes, kernels)
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelFileError(f"I3D file {path.name} does not fit the Inception-3D network (missing "
                             f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
                             "use an I3D state dict in the PyTorch I3D key layout")
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (N − 1) of features ``[N, D]``, float64; N ≥ 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"a Fréchet distance needs at least 2 feature vectors [N, D] (got shape {x.shape})")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sym_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½, by the eigenvalue route (see the module doc)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise InputError(f"Fréchet distance of mismatched statistics: means {mu1.shape}/{mu2.shape}, "
                         f"covariances {sigma1.shape}/{sigma2.shape}")
    root1 = _sym_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt, 0.0))


def fvd_from_features(gen_features, gt_features) -> float:
    """FVD of two feature sets ``[N, D]`` (generated vs ground truth)."""
    return frechet_distance(*feature_stats(gen_features), *feature_stats(gt_features))
