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
from zennit.composites import EpsilonPlusFlat, LayerMapComposite
from zennit.core import stabilize
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass
from zennit.types import Activation, AvgPool, Linear

sys.path.insert(0, str(Path(__file__).parent))
from timing import interleaved, median, table  # noqa: E402

from canonizers import DenseNetCanonizer  # noqa: E402

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
    model = torchvision.models.densenet121()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(.5, 2.)
                module.weight.uniform_(.5, 1.5)
                if bias_free:
                    module.running_mean.zero_()
                    module.bias.zero_()
                else:
                    module.running_mean.uniform_(-.5, .5)
                    module.bias.uniform_(-.5, .5)
            elif bias_free and isinstance(module, torch.nn.Linear):
                module.bias.zero_()
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


def attribute(model: torch.nn.Module, data: torch.Tensor, composite) -> tuple:
    '''Attribute the logit of class ``TARGET`` (the output relevance is the logit there, 0 elsewhere).'''
    with Gradient(model, composite) as attributor:
        output, relevance = attributor(data, lambda output: torch.eye(1000).to(output)[[TARGET] * len(output)] * output)
    return output, relevance


def sum_rule() -> Norm:
    '''zennit's Norm rule with negligible stabilizer, in zennit 0.4.6 (fixed 1e-6) and 0.5.1 alike.'''
    try:
        return Norm(stabilizer=1e-30)
    except TypeError:
        rule = Norm()
        rule.gradient_mapper = lambda out_grad, outputs: out_grad / stabilize(outputs[0], 1e-30)
        return rule


def conservation(canonizers, args) -> float:
    '''Input relevance sum over output relevance, bias-free float64 model, Epsilon rule with epsilon 1e-30.'''
    device = torch.device(args.device)
    model = make_model(device, torch.float64, bias_free=True)
    data = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    composite = LayerMapComposite(
        layer_map=[(Activation, Pass()), (Sum, sum_rule()), (AvgPool, sum_rule()), (Linear, Epsilon(epsilon=1e-30))],
        canonizers=canonizers,
    )
    output, relevance = attribute(model, data.to(device).requires_grad_(), composite)
    return relevance.sum().item() / output[0, TARGET].item()


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
        ['zennit alone (no canonizer)', f'{conservation([], args):.6g}'],
        ['DenseNetCanonizer()', f'{conservation([DenseNetCanonizer()], args):.12f}'],
    ]))


if __name__ == '__main__':
    main()
