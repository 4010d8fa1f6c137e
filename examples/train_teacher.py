"""Train the digits teacher that examples/train_student.py and deploy/ expect.

Trains ``teacher_server.zoo:mlp`` (64 -> 256 -> 256 -> 10) on scikit-learn's
handwritten digits (shipped with scikit-learn, nothing is downloaded) and
saves it as a TorchScript file with its input signature embedded, ready for
``edistill teacher serve --model teacher.pt`` or the compose volume
(``deploy/models/teacher.pt``)::

    python examples/train_teacher.py --out deploy/models/teacher.pt

``--state-dict`` also writes the weights alone, for
``--model teacher_server.zoo:mlp --model-kwargs '{"hidden": 256}' --checkpoint FILE``.
"""

from __future__ import annotations

import argparse
import logging
import pathlib

import torch
import torch.nn.functional as F

from teacher_server import save_torchscript
from teacher_server.zoo import mlp

log = logging.getLogger("train_teacher")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="teacher.pt", help="TorchScript output path (default: teacher.pt)")
    parser.add_argument("--state-dict", default=None, metavar="PATH", help="also save the state dict here")
    parser.add_argument("--hidden", type=int, default=256, help="hidden width (default: 256)")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs (default: 60)")
    parser.add_argument("--noise-std", type=float, default=0.1, help="input noise augmentation (default: 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)  # (1797, 64), pixels 0..16 -> 0..1
    y = torch.tensor(y)
    # The same split as the demo and examples/train_student.py (random_state=0).
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.3, random_state=0, stratify=y.numpy())
    xtr, ytr, xte, yte = x[idx_train], y[idx_train], x[idx_test], y[idx_test]

    torch.manual_seed(args.seed)
    model = mlp(hidden=args.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(xtr)).split(64):
            xb = xtr[batch] + args.noise_std * torch.randn(len(batch), xtr.shape[1])
            loss = F.cross_entropy(model(xb), ytr[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.inference_mode():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    log.info("teacher test accuracy %.1f%% after %d epochs", acc * 100, args.epochs)

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_torchscript(model, out, inputs=model.edistill_inputs)
    log.info("saved TorchScript teacher to %s (serve: edistill teacher serve --model %s)", out, out)
    if args.state_dict:
        torch.save(model.state_dict(), args.state_dict)
        log.info("saved state dict to %s", args.state_dict)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
