"""A small MNIST classifier whose penultimate layer is the feature space for MNIST FID.

Trained by ``python -m cm_lightning.nets.mnist_classifier --data-dir ../shared/data``; the weights ship in
``cm_lightning/nets/weights/mnist_classifier.pt``. FID on these features is comparable only with itself,
never with Inception FID.
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.datasets import MNIST

WEIGHTS = Path(__file__).parent / "weights" / "mnist_classifier.pt"


class MNISTClassifier(nn.Module):
    """Three convolutions and two linear layers on 32×32 digits in [-1, 1] (the MNISTDataModule's format)."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.features = nn.Sequential(nn.Linear(64 * 6 * 6, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, 10)

    def forward(self, x: Tensor) -> Tensor:
        """The 64 penultimate activations: the FID feature vector."""
        return self.features(self.conv(x))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self(x))

    @classmethod
    def pretrained(cls) -> "MNISTClassifier":
        with torch.device("meta"):  # no random init: building it must not move the global RNG of a run
            model = cls()
        model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True), assign=True)
        return model.eval().requires_grad_(False)


def mnist_tensors(data_dir: str, train: bool) -> tuple[Tensor, Tensor]:
    """MNIST images padded to 32×32 in [-1, 1] (the MNISTDataModule's format) and their labels."""
    ds = MNIST(data_dir, train=train, download=False)
    return F.pad(ds.data, (2, 2, 2, 2))[:, None].float() / 127.5 - 1, ds.targets


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    predictions = torch.cat([model.logits(chunk).argmax(1) for chunk in images.split(1000)])
    return (predictions == labels).float().mean().item()


def train(data_dir: str, epochs: int, seed: int, model: nn.Module | None = None) -> nn.Module:
    """Trains ``model`` (default: an MNISTClassifier; any module with ``logits``) on the MNIST training set."""
    torch.manual_seed(seed)
    images, labels = mnist_tensors(data_dir, train=True)
    model, start = model or MNISTClassifier(), time.time()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * (len(images) // 128))
    for epoch in range(epochs):
        order = torch.randperm(len(images))
        for batch in order[: len(order) // 128 * 128].split(128):
            x = torch.roll(images[batch], tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(2, 3))  # small shifts
            loss = F.cross_entropy(model.logits(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, {time.time() - start:.0f} s", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding MNIST/raw")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args()
    model = train(args.data_dir, args.epochs, args.seed)
    print(f"test accuracy: {accuracy(model, *mnist_tensors(args.data_dir, train=False)):.4f}")
    torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
