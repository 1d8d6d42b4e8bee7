"""The PyTorch model of ../shared/seed (two stacked RNNs, two linear layers), trained with
torch.nn.RNN and again after ``fastrnn.convert``: same losses, same weights, less time.

    python examples/seed_pytorch.py [--dtype float64] [--epochs 3]
"""

import argparse
import copy
import time

import torch
from torch import nn

import fastrnn


class Seed(nn.Module):
    """The seed's PyTorch model: two stacked RNNs, then two linear layers; class probabilities."""

    def __init__(self, input_size=20, hidden_size=64, num_classes=5):
        super().__init__()
        self.rnn1 = nn.RNN(input_size, hidden_size, batch_first=True)
        self.rnn2 = nn.RNN(hidden_size, 32, batch_first=True)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x):
        h0 = torch.zeros(1, x.size(0), self.rnn1.hidden_size, dtype=x.dtype, device=x.device)
        out, _ = self.rnn1(x, h0)
        out, _ = self.rnn2(out)
        out = torch.relu(self.fc1(out[:, -1, :]))
        return torch.softmax(self.fc2(out), dim=1)


def train(model, data, labels, epochs, batch_size=32):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    start = time.perf_counter()
    for _ in range(epochs):
        for i in range(0, len(data), batch_size):
            probabilities = model(data[i : i + batch_size])
            loss = nn.functional.nll_loss(torch.log(probabilities), labels[i : i + batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, (time.perf_counter() - start) / epochs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1024)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    data = torch.randn(args.samples, 10, 20, dtype=dtype)
    labels = torch.randint(0, 5, (args.samples,))
    stock = Seed().to(dtype)
    fused = fastrnn.convert(copy.deepcopy(stock))
    train(copy.deepcopy(fused), data[:64], labels[:64], 1)  # warm-up: loads the compiled kernels
    stock_losses, stock_s = train(stock, data, labels, args.epochs)
    fused_losses, fused_s = train(fused, data, labels, args.epochs)
    drift = max(abs(a - b) for a, b in zip(stock_losses, fused_losses))
    weights = max((p - q).abs().max().item() for p, q in zip(stock.parameters(), fused.parameters()))
    print(f"torch.nn.RNN : {stock_s * 1e3:8.1f} ms/epoch  final loss {stock_losses[-1]:.6f}")
    print(f"fastrnn      : {fused_s * 1e3:8.1f} ms/epoch  final loss {fused_losses[-1]:.6f}")
    print(f"speedup {stock_s / fused_s:.2f}x; max loss difference {drift:.2e}; max weight difference {weights:.2e}")


if __name__ == "__main__":
    main()
