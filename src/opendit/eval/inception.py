"""The Inception-v3 network of the FID / Inception Score literature, in plain torch.

FID and IS are defined by one network: TensorFlow's 2015-12-05 Inception graph (1008 classes). Its PyTorch port,
``pt_inception-2015-12-05-6726825d.pth`` (released with pytorch-fid, used by torch-fidelity and torchmetrics), is the
weight file this module loads; the layer names below follow that file. Differences from torchvision's Inception-v3 that
the graph requires: average pools that do not count padding, a max pool in the last block's pool branch, BatchNorm
eps 1e-3, and TensorFlow-1 preprocessing (bilinear resize to 299 without half-pixel centres, then (x - 128) / 128).

    net = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")
    pool, logits = net(images_uint8_nchw)      # (N, 2048) pool3 features, (N, 1008) logits without the fc bias
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, reason
from ..hub import weights_file

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries the start of its SHA-256
NUM_CLASSES = 1008
INPUT_SIZE = 299


class Conv(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU; the weight file calls the parts ``conv`` and ``bn``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # 35x35: 1x1 | 5x5 | double 3x3 | pool
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)


class BlockB(nn.Module):  # 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockC(nn.Module):  # 17x17 with factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = Conv(c7, c7, **row), Conv(c7, 192, **col)
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = Conv(c7, c7, **col), Conv(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = Conv(c7, c7, **col), Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(d)),
            self.branch_pool(_avg3(x)),
        ], 1)


class BlockD(nn.Module):  # 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(b), F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # 8x8 with split 1x3 / 3x1 outputs; the last one pools with max instead of average
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], 1)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's ``resize_bilinear`` (align_corners=False, no half-pixel centres): output pixel i samples the input
    at i * in/out. (N, C, H, W) float -> (N, C, size, size)."""

    def axis(n_in: int):
        pos = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = pos.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (pos - lo).to(x.dtype).to(x.device)

    lo, hi, w = axis(x.shape[-2])
    x = x[..., lo, :] * (1 - w)[:, None] + x[..., hi, :] * w[:, None]
    lo, hi, w = axis(x.shape[-1])
    return x[..., lo] * (1 - w) + x[..., hi] * w


class FIDInceptionV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)
        self.num_features = 2048

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0..255 float) (N, 3, H, W) -> the graph's input: 299x299, (x - 128) / 128."""
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_tf1(x, INPUT_SIZE)
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool3 features (N, 2048), logits without the fc bias (N, 1008): what the IS definition uses)."""
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean(dim=(2, 3))
        return pool, pool @ self.fc.weight.t()


def fetch_weights(path: str | None) -> str:
    """``path`` when given; else the torch hub cache, downloading into it when online (hash-checked)."""
    return weights_file(path, WEIGHTS_NAME, WEIGHTS_URL, flag="--inception", what="FID Inception",
                        hash_prefix=WEIGHTS_SHA256_PREFIX)


def load_fid_inception(path: str | None = None, device="cpu") -> FIDInceptionV3:
    """The FID Inception network with its weights (weights_only load), in eval mode on ``device``."""
    file = fetch_weights(path)
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--inception {file}: not a readable weights file ({reason(e)})") from None
    net = FIDInceptionV3()
    if not isinstance(sd, dict):
        raise UserError(f"--inception {file}: expected a state dict")
    sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
    own = net.state_dict()
    wrong = [k for k, v in sd.items() if k in own and (not torch.is_tensor(v) or v.shape != own[k].shape)]
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")] + wrong
    unexpected = [k for k in sd if k not in own]
    if not (missing or unexpected):
        net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"--inception {file} is not the FID Inception network ({len(missing)} missing or misshapen keys, e.g. "
                        f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]})")
    return net.eval().to(device)
