'''Attribution time of the DenseNet canonizer against a plain zennit composite, and relevance conservation.

Run: ``python benchmarks/bench_densenet.py [--device cuda] [--size 224] [--batch 1] [--repeats 5]``. Times are
medians of interleaved runs; ratios are medians of the per-round ratios against ``EpsilonPlusFlat`` without a
canonizer (zennit has none for DenseNet) measured in the same run. Conservation is the input relevance sum over the
output relevance on a bias-free float64 densenet121, under the Epsilon rule with negligible epsilon.
'''
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat

sys.path.insert(0, str(Path(__file__).parent))
from timing import interleaved, median, table  # noqa: E402

from canonizers import DenseNetCanonizer  # noqa: E402
from canonizers.evaluation import conservation, randomize_batch_norms  # noqa: E402

CUT = {'features.denseblock2.denselayer3': 'skip', 'features.denseblock3.*': 'residual'}
VARIANTS = {
    'EpsilonPlusFlat, no canonizer': lambda: [],
    'DenseNetCanonizer()': lambda: [DenseNetCanonizer()],
    'DenseNetCanonizer(cut=1 layer + 24 by pattern)': lambda: [DenseNetCanonizer(cut=CUT)],
}
TARGET = 3


def make_model(device: torch.device, dtype: torch.dtype = torch.float32, bias_free: bool = False) -> torch.nn.Module:
    '''densenet121 with random weights and random batch-norm statistics (fresh batch norms are the identity).'''
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision.models.densenet121(), bias_free=bias_free)
    return model.requires_grad_(False).to(device=device, dtype=dtype)


def attribute(model: torch.nn.Module, data: torch.Tensor, composite) -> tuple:
    '''Attribute the logit of class ``TARGET`` (the output relevance is the logit there, 0 elsewhere).'''
    with Gradient(model, composite) as attributor:
        output, relevance = attributor(data, lambda output: torch.eye(1000).to(output)[[TARGET] * len(output)] * output)
    return output, relevance


def conservation_ratio(canonizers, args) -> float:
    '''Input relevance sum over output relevance, bias-free float64 model, Epsilon rule with epsilon 1e-30.'''
    device = torch.device(args.device)
    model = make_model(device, torch.float64, bias_free=True)
    data = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return conservation(model, data.to(device), TARGET, canonizers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()

    device = torch.device(args.device)
    model = make_model(device)
    data = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(device)
    data.requires_grad_()
    reference = next(iter(VARIANTS))
    times = interleaved(
        {variant: (lambda v=variant: attribute(model, data, EpsilonPlusFlat(canonizers=VARIANTS[v]())))
         for variant in VARIANTS},
        args.repeats, device)

    rows = []
    for variant in VARIANTS:
        ratio = statistics.median(mine / theirs for mine, theirs in zip(times[variant], times[reference]))
        rows.append([variant, f'{median(times[variant]) * 1e3:.0f}', f'{ratio:.3f}'])
    print(f'densenet121, {args.size}x{args.size}, batch {args.batch}, EpsilonPlusFlat, device {args.device}, '
          f'torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats (medians)')
    print(table(['canonizer', 'attribution ms', 'ratio'], rows))

    print(f'\nconservation, bias-free float64 densenet121, {args.size}x{args.size}, Epsilon(1e-30) everywhere: '
          'input relevance sum / output relevance (1 is exact)')
    print(table(['canonizer', 'ratio'], [
        ['zennit alone (no canonizer)', f'{conservation_ratio([], args):.6g}'],
        ['DenseNetCanonizer()', f'{conservation_ratio([DenseNetCanonizer()], args):.12f}'],
    ]))


if __name__ == '__main__':
    main()
