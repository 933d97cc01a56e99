"""Baseline for the benchmarks: the browsing-minutes task trained by a plain PyTorch loop.

It generates exactly the rows ``data=browsing`` generates (same formula, same seeded streams),
trains the same network with the same optimizer, batch size and epochs, keeps the weights of
the epoch with the lowest validation loss, and prints one JSON line with its figures.

    python benchmarks/plain_train.py                     # the default config's recipe
    python benchmarks/plain_train.py --hidden 5 --epochs 200 --no-scale   # the seed recipe
"""

import argparse
import copy
import json
import time

import numpy as np
import torch
from torch import nn


def browsing_rows(n: int, seed: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng([seed, split])
    minutes = np.clip(rng.exponential(10.0, n), 0.5, 120.0)
    purchase = 0.1 * minutes - 2.0 + rng.normal(0.0, 0.5, n) > 0
    return (
        torch.tensor(minutes, dtype=torch.float32).unsqueeze(1),
        torch.tensor(purchase, dtype=torch.float32),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="*", default=[16, 16])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_x, train_y = browsing_rows(args.n_train, 0, 0)
    val_x, val_y = browsing_rows(200, 0, 1)
    test_x, test_y = browsing_rows(10_000, 0, 2)
    if not args.no_scale:
        mean, std = train_x.mean(), train_x.std(unbiased=False)
        train_x, val_x, test_x = ((x - mean) / std for x in (train_x, val_x, test_x))

    layers, width = [], 1
    for hidden in args.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    net = nn.Sequential(*layers, nn.Linear(width, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    loss_fn = nn.BCEWithLogitsLoss()

    started = time.perf_counter()
    best_loss, best_state = float("inf"), None
    for _ in range(args.epochs):
        net.train()
        order = torch.randperm(len(train_x))
        for start in range(0, len(order), args.batch_size):
            rows = order[start : start + args.batch_size]
            loss = loss_fn(net(train_x[rows]).squeeze(1), train_y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            val_loss = loss_fn(net(val_x).squeeze(1), val_y).item()
        if val_loss < best_loss:
            best_loss, best_state = val_loss, copy.deepcopy(net.state_dict())
    fit_seconds = time.perf_counter() - started

    net.load_state_dict(best_state)
    with torch.no_grad():
        test_acc = ((net(test_x).squeeze(1) > 0).float() == test_y).float().mean().item()
    print(json.dumps({"fit_seconds": fit_seconds, "test_acc": test_acc}))


if __name__ == "__main__":
    main()
