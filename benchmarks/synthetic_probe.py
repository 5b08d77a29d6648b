"""Is the synthetic set learnable, and not trivially? A small CNN vs a linear probe vs chance.

Trains a randomly initialised timm ResNet-18 on the synthetic train split for a fixed number
of epochs and reports its test accuracy, next to a multinomial logistic regression on
raw pixels (L2 strength chosen on the val split) and chance. The synthetic set is meant
to be learnable by the CNN well above chance while the linear probe stays far below it.

Defaults: 10 classes, 200 training images per class (the generator is free, so the probe
uses more than the data module's default 60), 80 px crops of the 128 px images, 5 epochs.
That is about 9000 image-steps, a few minutes on 2 idle CPU cores (more when the
machine is shared). Usage::

    PYTHONPATH=src python benchmarks/synthetic_probe.py
    PYTHONPATH=src python benchmarks/synthetic_probe.py --samples-per-class 60 --epochs 15
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from crasmra.data.synthetic import SyntheticFGVC
from crasmra.data.transforms import build_transforms, default_resize_size


def _render(split: str, args: argparse.Namespace):
    ds = SyntheticFGVC(
        split,
        num_classes=args.num_classes,
        samples_per_class=args.samples_per_class,
        test_samples_per_class=args.test_samples_per_class,
        image_size=args.native_size,
        seed=args.seed,
        clutter=args.clutter,
        max_rotation=args.max_rotation,
    )
    return [ds[i][0] for i in range(len(ds))], torch.tensor(ds.targets)


def _stack(images, transform) -> torch.Tensor:
    return torch.stack([transform(im) for im in images])


def train_cnn(train_imgs, y_train, x_test, y_test, args) -> dict:
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    aug = build_transforms(
        True,
        image_size=args.image_size,
        resize_size=default_resize_size(args.image_size),
        random_crop=True,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    n = len(train_imgs)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    start = time.perf_counter()
    step = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(n)
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            x = torch.stack([aug(train_imgs[i]) for i in idx.tolist()])
            # One warm-up epoch, then cosine decay to zero.
            warm = min(1.0, (step + 1) / steps_per_epoch)
            for g in opt.param_groups:
                g["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        print(
            f"  cnn epoch {epoch}/{args.epochs}: loss {loss.item():.3f}, "
            f"{time.perf_counter() - start:.0f}s",
            flush=True,
        )
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(x_test[i : i + 64]).argmax(1) for i in range(0, len(x_test), 64)])
    return {
        "test_acc": (preds == y_test).float().mean().item(),
        "epochs": args.epochs,
        "train_s": round(time.perf_counter() - start, 1),
    }


def linear_probe(x_tr, y_tr, x_val, y_val, x_te, y_te, num_classes: int) -> dict:
    """Multinomial logistic regression on standardised raw pixels, L2 chosen on val.

    With an L2 penalty the optimal weights lie in the span of the training images
    (W = X^T A), so the problem is solved exactly in the n x n Gram matrix, which is far
    cheaper than optimising n_pixels x classes weights directly.
    """
    x_tr, x_val, x_te = (x.flatten(1).double() for x in (x_tr, x_val, x_te))
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_val, x_te = ((x - mu) / sd for x in (x_tr, x_val, x_te))
    scale = x_tr.shape[1]
    gram = x_tr @ x_tr.T / scale
    k_val, k_te = x_val @ x_tr.T / scale, x_te @ x_tr.T / scale

    def fit(l2: float) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.zeros(len(x_tr), num_classes, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [a, b], lr=1, max_iter=500, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(gram @ a + b, y_tr) + l2 * (a * (gram @ a)).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return a.detach(), b.detach()

    def acc(params: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, y: torch.Tensor) -> float:
        a, b = params
        return ((k @ a + b).argmax(1) == y).double().mean().item()

    fits = [(l2, fit(l2)) for l2 in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)]
    l2, params = max(fits, key=lambda t: acc(t[1], k_val, y_val))
    return {
        "test_acc": acc(params, k_te, y_te),
        "train_acc": acc(params, gram, y_tr),
        "val_acc": acc(params, k_val, y_val),
        "l2": l2,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument(
        "--samples-per-class", type=int, default=200, help="train stream (val carved out)"
    )
    p.add_argument("--test-samples-per-class", type=int, default=20)
    p.add_argument("--native-size", type=int, default=128, help="generated image side")
    p.add_argument("--image-size", type=int, default=80, help="network input (crop) side")
    p.add_argument("--clutter", type=int, default=8, help="background distractor shapes")
    p.add_argument("--max-rotation", type=float, default=30.0, help="degrees")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    train_imgs, y_train = _render("train", args)
    val_imgs, y_val = _render("val", args)
    test_imgs, y_test = _render("test", args)
    evaluate = build_transforms(
        False, image_size=args.image_size, resize_size=default_resize_size(args.image_size)
    )
    x_train, x_val, x_test = (_stack(ims, evaluate) for ims in (train_imgs, val_imgs, test_imgs))
    print(
        f"rendered {len(train_imgs)}/{len(val_imgs)}/{len(test_imgs)} images in "
        f"{time.perf_counter() - t0:.1f}s",
        flush=True,
    )

    lin = linear_probe(x_train, y_train, x_val, y_val, x_test, y_test, args.num_classes)
    print(
        f"linear probe: test {lin['test_acc']:.3f} (train {lin['train_acc']:.3f}, l2 {lin['l2']})",
        flush=True,
    )
    cnn = train_cnn(train_imgs, y_train, x_test, y_test, args)
    chance = 1.0 / args.num_classes
    result = {
        "config": vars(args),
        "chance": chance,
        "linear_pixels": lin,
        "cnn": cnn,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    print(
        f"\n| model | test accuracy |\n|---|---|\n| chance | {chance:.3f} |\n"
        f"| linear on raw pixels | {lin['test_acc']:.3f} |\n"
        f"| {args.model} (random init, {cnn['epochs']} epochs, {cnn['train_s']}s) "
        f"| {cnn['test_acc']:.3f} |"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
