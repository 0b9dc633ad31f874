"""The Inception-v3 network of FID (TensorFlow's 2015-12-05 graph), loaded from a local file.

FID papers report distances in the 2048-dim pool features of the TensorFlow Inception graph of
Heusel et al. (TTUR). pytorch-fid and torch-fidelity port that graph to PyTorch and publish its
weights as `pt_inception-2015-12-05-6726825d.pth` / `weights-inception-2015-12-05-6726825d.pth`
(same tensors, same key names); `FIDInceptionV3` has their architecture and key names, so either
file loads with `load_inception(path)`, and nothing downloads.

The network is written out here instead of imported because both packages (and torchmetrics'
FID, which uses torch-fidelity's network) require torchvision, whose pinned torch would make pip
replace the project's CPU torch wheel with a multi-GB CUDA build. The blocks follow pytorch-fid's
`inception.py` (Apache-2.0, Maximilian Seitzer) and torch-fidelity's `feature_extractor_
inceptionv3.py` (Apache-2.0, Anton Obukhov): torchvision's Inception3 blocks patched to match
TensorFlow (average pools that ignore padding, a max pool in the last block). As in
torch-fidelity and the TensorFlow graph, inputs are uint8 RGB resized to 299 px with TensorFlow
1.x's bilinear resize (no half-pixel centres), then mapped to [-1, 1].
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wadi_train.evaluation.errors import EvaluationError

__all__ = ["FEATURE_DIM", "INPUT_SIZE", "FIDInceptionV3", "load_inception", "tf1_resize_bilinear"]

log = logging.getLogger(__name__)

INPUT_SIZE = 299
FEATURE_DIM = 2048
FLAG = "--inception-weights"
_WEIGHTS_HINT = (
    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth"
)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as TensorFlow) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    # TensorFlow's average pool leaves the zero padding out of the mean.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """The last two blocks; TensorFlow's graph max-pools in the second (`pool="max"`)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def tf1_resize_bilinear(x: Tensor, size: int) -> Tensor:
    """TensorFlow 1.x `resize_bilinear` (align_corners=False, no half-pixel centres).

    Source coordinate of output pixel i is i * in/out; its neighbours floor() and floor() + 1
    (clamped to the edge) are blended linearly. PyTorch's bilinear modes use half-pixel centres
    and differ, which moves FID by a few tenths; this matches the graph papers used.

    Args:
        x: (B, C, H, W) floating point.
        size: output height and width.

    Returns:
        (B, C, size, size), same dtype.
    """
    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)  # (size,)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), (pos - lo).to(x.dtype)

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bottom = x[:, :, ylo], x[:, :, yhi]  # (B, C, size, W)
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * dx
    return top + (bottom - top) * dy[:, None]


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in TensorFlow's FID graph; `forward` returns the 2048-dim pool features.

    Build it, then load weights with `load_inception` (or `load_state_dict`); the constructor
    leaves PyTorch's default initialisation. `fc` (1008 logits) is kept so that the published
    weight files load strictly; FID does not use it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, images: Tensor) -> Tensor:
        """Pool features (B, 2048) float32 of RGB images (B, 3, H, W), uint8 or floats in [0, 255]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise EvaluationError(f"Inception takes RGB images (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.fc.weight.dtype)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = tf1_resize_bilinear(x, INPUT_SIZE)  # (B, 3, 299, 299)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ends at (B, 2048, 8, 8)
        return x.mean(dim=(2, 3)).float()  # (B, 2048)


def _read_state(path: Path) -> dict[str, Tensor]:
    """A state dict from .safetensors, or a torch pickle read with weights_only=True."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        # mmap needs the zip format; pytorch-fid's 2019 file may be in the legacy one.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EvaluationError(f"{path}: not a readable Inception weights file ({first}); pass {FLAG} with {_WEIGHTS_HINT}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EvaluationError(f"{path}: holds a {type(state).__name__}, not a state dict; pass {FLAG} with {_WEIGHTS_HINT}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_inception(path: str | Path | None, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The FID Inception network with weights from a local file, frozen, in eval mode.

    Args:
        path: a `.pth`/`.pt` state dict (pytorch-fid or torch-fidelity) or `.safetensors` with
            the same keys. None is an error that says which flag to pass.
        device: where the network goes.

    Raises:
        EvaluationError: no path, a missing or unreadable file, or keys/shapes that do not match.
    """
    if path is None:
        raise EvaluationError(f"FID needs the Inception-v3 weights: pass {FLAG} PATH ({_WEIGHTS_HINT}) or set inception_weights in --config")
    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"{p}: no such Inception weights file; pass {FLAG} PATH ({_WEIGHTS_HINT})")
    state = _read_state(p)
    model = FIDInceptionV3()
    own = model.state_dict()
    wanted = {k for k in own if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - own.keys())
    wrong = [k for k in wanted & state.keys() if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise EvaluationError(
            f"{p}: not FID Inception-v3 weights ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} wrong-shape keys; first: {(missing + unexpected + wrong)[0]}); pass {FLAG} with {_WEIGHTS_HINT}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)
    log.info("loaded FID Inception-v3 weights from %s", p)
    return model.eval().requires_grad_(False).to(device)
