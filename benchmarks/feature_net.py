"""A second MNIST feature network, independent of the shipped classifier, so that an FID gain measured in one
feature space can be checked in another (issue: students that reach their teacher).

    python benchmarks/feature_net.py --data-dir ../shared/data      # trains it (about 5 CPU minutes), writes
                                                                   # benchmarks/results/feature_net_b.pt

Another architecture than ``cm_lightning.nets.mnist_classifier.MNISTClassifier`` (residual blocks with group
normalisation and SiLU, strided convolutions, global average pooling, 128 features against 64) and another seed;
the same training data and loop. ``load()`` gives it as a feature extractor for ``callbacks.FID(feature=...)`` and
``fid_function``: images in [-1, 1], (N, 1, 32, 32), to (N, 128).
"""

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from common import ROOT
from cm_lightning.nets.mnist_classifier import accuracy, mnist_tensors, train

WEIGHTS = ROOT / "benchmarks" / "results" / "feature_net_b.pt"


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class FeatureNetB(nn.Module):
    num_features = 128

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), Residual(32),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), Residual(64),  # 16×16
            nn.Conv2d(64, 128, 3, stride=2, padding=1), Residual(128),  # 8×8
            nn.GroupNorm(8, 128), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def forward(self, x: Tensor) -> Tensor:
        """The 128 pooled activations: the FID feature vector."""
        return self.trunk(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self(x))


def load(path: Path = WEIGHTS) -> FeatureNetB:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: train it with python benchmarks/feature_net.py --data-dir ../shared/data")
    model = FeatureNetB()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding MNIST/raw")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    model = train(args.data_dir, args.epochs, args.seed, FeatureNetB())
    print(f"test accuracy: {accuracy(model, *mnist_tensors(args.data_dir, train=False)):.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
