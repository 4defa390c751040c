"""Makes the TorchScript module the example federates: any torch.nn.Module works, as long as
it maps a [batch, 784] float tensor (a Fashion-MNIST image, pixels / 255, row-major) to
[batch, 10] logits and is scriptable.

    .venv/bin/python examples/torchscript/make_model.py model.pt [SEED]
"""
import sys

import torch
import torch.nn as nn


class Net(nn.Module):
    """A small CNN: one 5x5 convolution of 8 channels, 2x2 max pooling, dense 32, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 5, padding=2)
        self.fc1 = nn.Linear(8 * 14 * 14, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 28, 28)
        x = torch.max_pool2d(torch.relu(self.conv(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


if __name__ == "__main__":
    torch.manual_seed(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    torch.jit.script(Net()).save(sys.argv[1] if len(sys.argv) > 1 else "model.pt")
