'''Conservation and cost of the EfficientNet and MobileNet canonizers, against zennit alone.

For efficientnet_b0 and mobilenet_v3_small (random weights, randomised batch norms), it prints

* the conservation figure: the relevance summed over the input, divided by the explained logit, on the bias-free
  model in float64 with the Epsilon rule and negligible epsilon everywhere (1.0 is exact conservation), for zennit
  alone (no canonizer, and ``SequentialMergeBatchNorm``) and for this package's family canonizer;
* the attribution time (registering the composite, forward, backward, removing it) with ``EpsilonPlusFlat`` and each
  canonizer, and its ratio to the plain composite without canonizer. Runs are interleaved and the ratio is the median
  of the per-round ratios, so that drifting machine load cancels out.

Run ``python benchmarks/bench_efficientnet.py --help`` for the options; the defaults finish in well under two minutes
on one CPU core.
'''
import argparse
import statistics
import time
from importlib.metadata import version
from typing import Callable, Dict, List, Tuple

import torch
import torchvision
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat

from canonizers import EfficientNetCanonizer, MobileNetCanonizer
from canonizers.evaluation import conservation, output_relevance, randomize_batch_norms

TARGET = 3
# batch-norm weights that keep the activations of the random networks alive (logits of order 1 to 100): with
# vanishing activations, any epsilon would dominate
MODELS: Dict[str, Tuple[Callable[[], object], Tuple[float, float]]] = {
    'efficientnet_b0': (EfficientNetCanonizer, (2.5, 4.)),
    'mobilenet_v3_small': (MobileNetCanonizer, (2., 4.)),
}
CANONIZERS: List[Tuple[str, Callable[[str], list]]] = [
    ('none (plain composite)', lambda name: []),
    ('zennit SequentialMergeBatchNorm', lambda name: [SequentialMergeBatchNorm()]),
    ('ours ({})', lambda name: [MODELS[name][0]()]),
]


def build(name: str, bias_free: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
    '''A torchvision model with random weights and randomised batch-norm statistics, in eval mode.'''
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    model = randomize_batch_norms(model, seed=0, bias_free=bias_free, weight=MODELS[name][1])
    return model.requires_grad_(False).to(device=device, dtype=dtype)


def conservation_ratio(name: str, canonizers: list, size: int, device: str) -> float:
    '''Input relevance divided by the explained logit; 1.0 is exact conservation.'''
    model = build(name, True, torch.float64, device)
    data = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return conservation(model, data.to(device), TARGET, canonizers)


def attribution_seconds(model: torch.nn.Module, canonizers: list, data: torch.Tensor, device: str) -> float:
    '''Wall time of one attribution with EpsilonPlusFlat, including registering and removing the composite.'''
    if device == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    with Gradient(model, EpsilonPlusFlat(canonizers=canonizers)) as attributor:
        _, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
    relevance.sum().item()
    if device == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--size', type=int, default=64, help='input height and width (default: 64)')
    parser.add_argument('--repeats', type=int, default=7, help='interleaved timing rounds (default: 7)')
    parser.add_argument('--batch', type=int, default=1, help='batch size of the timed attributions (default: 1)')
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda, but CUDA is not available')

    rows = []
    for name in MODELS:
        labels = [label.format(MODELS[name][0].__name__) for label, _ in CANONIZERS]
        figures = [conservation_ratio(name, make(name), args.size, args.device) for _, make in CANONIZERS]

        model = build(name, False, torch.float32, args.device)
        data = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
        data = data.to(args.device).requires_grad_()
        # one untimed round: first calls pay for allocations and lazy initialisation
        for _, make in CANONIZERS:
            attribution_seconds(model, make(name), data, args.device)
        times: List[List[float]] = [[] for _ in CANONIZERS]
        for _ in range(args.repeats):
            for index, (_, make) in enumerate(CANONIZERS):
                times[index].append(attribution_seconds(model, make(name), data, args.device))
        for index, label in enumerate(labels):
            ratio = statistics.median(mine / plain for mine, plain in zip(times[index], times[0]))
            rows.append((name, label, figures[index], statistics.median(times[index]) * 1e3, ratio))

    print(f'device={args.device} size={args.size} batch={args.batch} repeats={args.repeats} '
          f'torch={torch.__version__} zennit={version("zennit")}')
    header = ('model', 'canonizer', 'relevance sum / logit', '|sum / logit - 1|', 'time [ms]', 'time / plain')
    widths = (18, 36, 21, 17, 9, 12)
    print('  '.join(title.ljust(width) for title, width in zip(header, widths)))
    for name, label, figure, milliseconds, ratio in rows:
        cells = (name, label, f'{figure:.4g}', f'{abs(figure - 1.):.1e}', f'{milliseconds:.1f}', f'{ratio:.2f}')
        print('  '.join(cell.ljust(width) for cell, width in zip(cells, widths)))


if __name__ == '__main__':
    main()
