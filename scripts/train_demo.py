"""Train the embedded demo models on synthetic shapes and write ``canonizers/demo/weights.pt`` (the ResNet) or
``canonizers/demo/vit_weights.pt`` (the ViT).

Seeded and CPU-only. With the defaults the ResNet takes roughly 10 minutes on 2 CPU cores, the ViT about 45 (9 epochs
of about 5 minutes with 2 threads on an AMD EPYC; the shipped weights: 97.2% on the 2000 test images)::

    python scripts/train_demo.py
    python scripts/train_demo.py --model vit --threads 2

The ViT learns from the labels and from the shipped ResNet's soft targets (``--distill``), as DeiT learns from a CNN
teacher: from labels alone it learns the shapes far more slowly.

Seeds: training images use ``seed * 1000 + part`` for ``part = 0, 1, ...`` (parts of ``PART_SIZE`` images); the
held-out test set uses ``--test-seed`` (default 10_000), far away from these. Runs with the same arguments, thread
count and hardware give identical weights.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO_ROOT = Path(__file__).resolve().parents[1]
# allow running from a checkout without installing the package
sys.path.insert(0, str(REPO_ROOT))

from canonizers.demo import CLASSES, DemoResNet, DemoViT, load_demo_model, make_dataset, normalize  # noqa: E402

PART_SIZE = 4096
DEFAULT_OUT = REPO_ROOT / 'canonizers' / 'demo' / 'weights.pt'
DEFAULT_VIT_OUT = REPO_ROOT / 'canonizers' / 'demo' / 'vit_weights.pt'
#: the defaults of the options that depend on the model; the ResNet's are those it was trained with before the ViT
DEFAULTS: dict[str, dict[str, object]] = {
    'resnet': {'train_size': 40960, 'epochs': 8, 'batch_size': 128, 'lr': 0.1, 'weight_decay': 5e-4,
               'precision': 'float32', 'distill': 0.},
    'vit': {'train_size': 40960, 'epochs': 9, 'batch_size': 64, 'lr': 1e-3, 'weight_decay': 0.05,
            'precision': 'float32', 'distill': 0.5},
}
#: the temperature of the teacher's and the student's softmax in distillation (Hinton et al., 2015)
TEMPERATURE = 2.


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
    parser.add_argument('--model', choices=sorted(DEFAULTS), default='resnet',
                        help='which demo model to train (default: resnet); the defaults of the options below depend '
                             'on it: ' + '; '.join(
                                 f'{model}: ' + ', '.join(f'{key} {value}' for key, value in defaults.items())
                                 for model, defaults in DEFAULTS.items()))
    parser.add_argument('--train-size', type=int, help='number of training images')
    parser.add_argument('--epochs', type=int)
    parser.add_argument('--batch-size', type=int)
    parser.add_argument('--lr', type=float, help='peak learning rate of the one-cycle schedule')
    parser.add_argument('--weight-decay', type=float)
    parser.add_argument('--precision', choices=('float32', 'bfloat16'),
                        help='precision of the forward pass in training (bfloat16: autocast, float32 weights and '
                             'optimizer; evaluation and the saved weights are float32 either way)')
    parser.add_argument('--distill', type=float,
                        help='weight of the distillation loss from the shipped demo ResNet (soft targets at '
                             f'temperature {TEMPERATURE:g}); the rest of the loss is cross-entropy on the labels. 0 '
                             'trains on the labels alone')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--test-size', type=int, default=2000)
    parser.add_argument('--test-seed', type=int, default=10_000)
    # one thread is the default because two threads on two shared cores were several times slower under contention
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads (at most 2 intended)')
    parser.add_argument('--out', type=Path, help='where to write the state dict (default: canonizers/demo/'
                                                 f'{DEFAULT_OUT.name} or {DEFAULT_VIT_OUT.name})')
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = DEFAULT_OUT if args.model == 'resnet' else DEFAULT_VIT_OUT
    return args


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


@contextlib.contextmanager
def training_precision(precision: str) -> Iterator[None]:
    """Run the training forward pass in ``precision``.

    bfloat16 autocasts the matrix products (fast on CPUs with AMX or AVX-512 BF16) and selects the plain "math"
    attention kernel: on CPU, the flash-attention kernel is slower for the ViT's 65 tokens, and takes no bfloat16
    speed-up. Together they made a ViT training step about 1.6x faster on one thread than float32.

    Parameters
    ----------
    precision : str
        ``'float32'`` (nothing changes) or ``'bfloat16'``.
    """
    if precision == 'float32':
        yield
        return
    with torch.autocast('cpu', dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
        yield


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    memory_format: torch.memory_format = torch.channels_last,
) -> torch.Tensor:
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
    memory_format : torch.memory_format, optional
        Memory format of the input batches (channels-last for the ResNet).

    Returns
    -------
    torch.Tensor
        Predicted labels ``[N]``.
    """
    assert len(images) == len(labels)
    model.eval()
    predictions = [
        model(images[start:start + batch_size].contiguous(memory_format=memory_format)).argmax(1)
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


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Kullback-Leibler divergence of the student's from the teacher's softened class probabilities.

    Parameters
    ----------
    logits : torch.Tensor
        The student's logits ``[N, classes]``.
    teacher_logits : torch.Tensor
        The teacher's logits of the same images.

    Returns
    -------
    torch.Tensor
        The scalar loss, times ``TEMPERATURE ** 2`` so that its gradients keep their scale (Hinton et al., 2015).
    """
    return nn.functional.kl_div(
        (logits / TEMPERATURE).log_softmax(1), (teacher_logits / TEMPERATURE).log_softmax(1), log_target=True,
        reduction='batchmean',
    ) * TEMPERATURE ** 2


def build_training(
    args: argparse.Namespace, steps_per_epoch: int,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Build the model, its optimizer and its one-cycle learning-rate schedule.

    ResNet: SGD with Nesterov momentum. ViT: AdamW, as transformers are usually trained (SGD trains them poorly),
    with the one-cycle schedule as linear warm-up and cosine decay, without cycling Adam's betas.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments (``model``, ``lr``, ``weight_decay``, ``epochs``).
    steps_per_epoch : int
        Optimizer steps per epoch.

    Returns
    -------
    model : torch.nn.Module
        The freshly initialised model (from the global, seeded random generator).
    optimizer : torch.optim.Optimizer
        Its optimizer.
    scheduler : torch.optim.lr_scheduler.LRScheduler
        The learning-rate schedule, stepped once per batch.
    """
    if args.model == 'resnet':
        model = DemoResNet().to(memory_format=torch.channels_last)
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
        return model, optimizer, scheduler

    model = DemoViT()
    # weight decay on the weight matrices only: not on biases, LayerNorms, the class token or position embedding
    decay = [param for name, param in model.named_parameters() if param.dim() > 1 and name.endswith('weight')]
    no_decay = [param for name, param in model.named_parameters() if not (param.dim() > 1 and name.endswith('weight'))]
    optimizer = torch.optim.AdamW(
        [{'params': decay, 'weight_decay': args.weight_decay}, {'params': no_decay, 'weight_decay': 0.}],
        lr=args.lr,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.1,
        anneal_strategy='cos', cycle_momentum=False, div_factor=25., final_div_factor=1e3,
    )
    return model, optimizer, scheduler


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

    model, optimizer, scheduler = build_training(args, math.ceil(len(train_images) / args.batch_size))
    # channels-last convolutions are about 3x faster on CPU for the ResNet's small feature maps; the ViT's one
    # convolution (the patch embedding) gains nothing from it
    memory_format = torch.channels_last if args.model == 'resnet' else torch.contiguous_format
    print(f'{sum(param.numel() for param in model.parameters())} parameters', flush=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    # a ViT learns shapes from few images slowly (no convolutional prior); the trained ResNet's soft targets make
    # up for much of it, as in DeiT (Touvron et al., 2021)
    teacher = load_demo_model().to(memory_format=torch.channels_last).requires_grad_(False) if args.distill else None

    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        total_loss, correct = 0., 0
        for start in range(0, len(order), args.batch_size):
            index = order[start:start + args.batch_size]
            images = normalize(train_images[index].float() / 255.)
            images = augment(images, generator).contiguous(memory_format=memory_format)
            labels = train_labels[index]

            with training_precision(args.precision):
                logits = model(images).float()
            loss = loss_fn(logits, labels)
            if teacher is not None:
                loss = (1. - args.distill) * loss + args.distill * distillation_loss(
                    logits, teacher(images.contiguous(memory_format=torch.channels_last)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.model == 'vit':
                # clipping keeps the early, warm-up steps of the transformer from diverging (a common ViT recipe)
                nn.utils.clip_grad_norm_(model.parameters(), 1.)
            optimizer.step()
            scheduler.step()

            total_loss += loss.item() * len(index)
            correct += (logits.argmax(1) == labels).sum().item()
        predictions = evaluate(model, test_images, test_labels, memory_format=memory_format)
        test_accuracy = (predictions == test_labels).float().mean().item()
        print(
            f'epoch {epoch + 1}/{args.epochs}: train loss {total_loss / len(order):.4f}, '
            f'train accuracy {correct / len(order):.4f}, test accuracy {test_accuracy:.4f}, '
            f'{time.time() - start_time:.0f}s',
            flush=True,
        )

    accuracy = report(evaluate(model, test_images, test_labels, memory_format=memory_format), test_labels)

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
