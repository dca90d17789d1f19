"""Train the embedded demo model on synthetic shapes and write ``canonizers/demo/weights.pt``.

Seeded and CPU-only. With the defaults it takes roughly 10 minutes on 2 CPU cores::

    python scripts/train_demo.py

Seeds: training images use ``seed * 1000 + part`` for ``part = 0, 1, ...`` (parts of ``PART_SIZE`` images); the
held-out test set uses ``--test-seed`` (default 10_000), far away from these. Runs with the same arguments, thread
count and hardware give identical weights.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
# allow running from a checkout without installing the package
sys.path.insert(0, str(REPO_ROOT))

from canonizers.demo import CLASSES, DemoResNet, make_dataset, normalize  # noqa: E402

PART_SIZE = 4096
DEFAULT_OUT = REPO_ROOT / 'canonizers' / 'demo' / 'weights.pt'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments.

    Parameters
    ----------
    argv : list of str, optional
        Arguments; ``sys.argv[1:]`` if None.

    Returns
    -------
    argparse.Namespace
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--train-size', type=int, default=40960, help='number of training images')
    parser.add_argument('--epochs', type=int, default=8)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--lr', type=float, default=0.1, help='peak learning rate of the one-cycle schedule')
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--test-size', type=int, default=2000)
    parser.add_argument('--test-seed', type=int, default=10_000)
    # one thread is the default because two threads on two shared cores were several times slower under contention
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads (at most 2 intended)')
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT, help='where to write the state dict')
    return parser.parse_args(argv)


def generate_training_set(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate the training images as uint8 RGB to keep memory low (4x less than float32).

    Parameters
    ----------
    size : int
        Number of images.
    seed : int
        Base seed; part ``i`` uses ``seed * 1000 + i``.

    Returns
    -------
    images : torch.Tensor
        Uint8 tensor of shape ``[size, 3, 64, 64]``.
    labels : torch.Tensor
        Int64 tensor of shape ``[size]``.
    """
    images, labels = [], []
    for part, start in enumerate(range(0, size, PART_SIZE)):
        count = min(PART_SIZE, size - start)
        rgb, label = make_dataset(count, seed * 1000 + part, normalized=False)
        images.append((rgb * 255.).round().to(torch.uint8))
        labels.append(label)
    return torch.cat(images), torch.cat(labels)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply random flips and transposes, which preserve every class (shapes and textures are rotated anyway).

    Parameters
    ----------
    images : torch.Tensor
        Batch of shape ``[N, 3, H, W]`` with ``H == W``.
    generator : torch.Generator
        Source of randomness.

    Returns
    -------
    torch.Tensor
        Augmented batch.
    """
    flags = torch.rand(3, len(images), generator=generator) < 0.5
    images = torch.where(flags[0, :, None, None, None], images.flip(-1), images)
    images = torch.where(flags[1, :, None, None, None], images.flip(-2), images)
    return torch.where(flags[2, :, None, None, None], images.transpose(-1, -2), images)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predict the classes of normalised images with the model in eval mode.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier.
    images : torch.Tensor
        Normalised images ``[N, 3, H, W]``.
    labels : torch.Tensor
        True labels ``[N]``, only used for their length check.
    batch_size : int, optional
        Evaluation batch size.

    Returns
    -------
    torch.Tensor
        Predicted labels ``[N]``.
    """
    assert len(images) == len(labels)
    model.eval()
    predictions = [
        model(images[start:start + batch_size].contiguous(memory_format=torch.channels_last)).argmax(1)
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(predictions)


def report(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Print overall and per-class accuracy.

    Parameters
    ----------
    predictions : torch.Tensor
        Predicted labels.
    labels : torch.Tensor
        True labels.

    Returns
    -------
    float
        Overall accuracy.
    """
    accuracy = (predictions == labels).float().mean().item()
    per_class = ', '.join(
        f'{name} {(predictions[labels == index] == index).float().mean().item():.3f}'
        for index, name in enumerate(CLASSES)
    )
    print(f'test accuracy {accuracy:.4f} on {len(labels)} images ({per_class})', flush=True)
    return accuracy


def main(argv: list[str] | None = None) -> float:
    """Train, evaluate and save the demo model.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments.

    Returns
    -------
    float
        Test accuracy of the saved model.
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start_time = time.time()

    train_images, train_labels = generate_training_set(args.train_size, args.seed)
    test_images, test_labels = make_dataset(args.test_size, args.test_seed)
    print(f'generated {len(train_images)} training and {len(test_images)} test images '
          f'in {time.time() - start_time:.0f}s', flush=True)

    model = DemoResNet()
    # channels-last convolutions are about 3x faster on CPU for these small feature maps
    model = model.to(memory_format=torch.channels_last)
    print(f'{sum(param.numel() for param in model.parameters())} parameters', flush=True)

    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    # no weight decay on batch-norm and bias parameters, as is common for ResNets
    decay = [param for param in model.parameters() if param.dim() > 1]
    no_decay = [param for param in model.parameters() if param.dim() <= 1]
    optimizer = torch.optim.SGD(
        [{'params': decay, 'weight_decay': args.weight_decay}, {'params': no_decay, 'weight_decay': 0.}],
        lr=args.lr,
        momentum=0.9,
        nesterov=True,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.2,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)

    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        total_loss, correct = 0., 0
        for start in range(0, len(order), args.batch_size):
            index = order[start:start + args.batch_size]
            images = normalize(train_images[index].float() / 255.)
            images = augment(images, generator).contiguous(memory_format=torch.channels_last)
            labels = train_labels[index]

            logits = model(images)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

            total_loss += loss.item() * len(index)
            correct += (logits.argmax(1) == labels).sum().item()
        predictions = evaluate(model, test_images, test_labels)
        test_accuracy = (predictions == test_labels).float().mean().item()
        print(
            f'epoch {epoch + 1}/{args.epochs}: train loss {total_loss / len(order):.4f}, '
            f'train accuracy {correct / len(order):.4f}, test accuracy {test_accuracy:.4f}, '
            f'{time.time() - start_time:.0f}s',
            flush=True,
        )

    accuracy = report(evaluate(model, test_images, test_labels), test_labels)

    model = model.to(memory_format=torch.contiguous_format)
    state_dict = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # write to a temporary file first so an interrupted save never leaves a truncated weights file behind
    tmp_path = args.out.with_suffix('.tmp')
    torch.save(state_dict, tmp_path)
    tmp_path.replace(args.out)
    print(f'wrote {args.out} ({args.out.stat().st_size / 2 ** 20:.2f} MiB) after {time.time() - start_time:.0f}s',
          flush=True)
    return accuracy


if __name__ == '__main__':
    main()
