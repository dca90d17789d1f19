'''The graph canonizer against the family canonizers on their models, and on models no family covers: the cost of
applying and removing it (traced once per model, then cached), attribution time, and relevance conservation.

Run: ``python benchmarks/bench_graph.py [--device cuda] [--size 224] [--repeats 5]``. Times are medians of
interleaved runs. Conservation is the input relevance sum over the output relevance of a bias-free float64 model
under the Epsilon rule with negligible epsilon (1 is exact).
'''
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer as ZennitResNetCanonizer

sys.path.insert(0, str(Path(__file__).parent))
from timing import interleaved, median, table  # noqa: E402

from canonizers import DenseNetCanonizer, EfficientNetCanonizer, GraphCanonizer, ResNetCanonizer  # noqa: E402
from canonizers.evaluation import conservation, randomize_batch_norms  # noqa: E402
from canonizers.graph import clear_cache  # noqa: E402

TARGET = 3
#: model name, builder, the family canonizer that fits it (if any)
MODELS = [
    ('resnet50', lambda: torchvision.models.resnet50(), ResNetCanonizer),
    ('densenet121', lambda: torchvision.models.densenet121(), DenseNetCanonizer),
    ('efficientnet_b0', lambda: torchvision.models.efficientnet_b0(), EfficientNetCanonizer),
    ('googlenet', lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False), None),
    ('regnet_y_400mf', lambda: torchvision.models.regnet_y_400mf(), None),
]


def make_model(build, device: torch.device, dtype: torch.dtype = torch.float32, bias_free: bool = False):
    '''The model with random weights and random batch-norm statistics (fresh batch norms are the identity).'''
    torch.manual_seed(0)
    return randomize_batch_norms(build(), bias_free=bias_free).requires_grad_(False).to(device=device, dtype=dtype)


def attribute(model: torch.nn.Module, data: torch.Tensor, canonizers) -> None:
    with Gradient(model, EpsilonPlusFlat(canonizers=canonizers)) as attributor:
        attributor(data, lambda output: torch.eye(output.shape[1]).to(output)[[TARGET] * len(output)] * output)


def apply_and_remove(model: torch.nn.Module, canonizer) -> None:
    for instance in canonizer.apply(model):
        instance.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(1)

    rows = []
    for name, build, family in MODELS:
        model = make_model(build, device)
        data = torch.randn(1, 3, args.size, args.size, generator=generator).to(device).requires_grad_()
        clear_cache(model)
        start = time.perf_counter()
        apply_and_remove(model, GraphCanonizer())
        first = time.perf_counter() - start
        variants = {'graph': GraphCanonizer}
        if family is not None:
            variants['family'] = family
        # the bound for applying: at most 3x zennit's own ResNetCanonizer
        zennit_variant = {'zennit': ZennitResNetCanonizer} if family is ResNetCanonizer else {}
        applying = interleaved({label: (lambda make=make, model=model: apply_and_remove(model, make()))
                                for label, make in {**variants, **zennit_variant}.items()}, args.repeats * 4, device)
        attributing = interleaved({label: (lambda make=make, model=model, data=data: attribute(model, data, [make()]))
                                   for label, make in variants.items()}, args.repeats, device)
        ratio = statistics.median(graph / other for graph, other in zip(attributing['graph'], attributing['family'])
                                  ) if family is not None else None
        exact = make_model(build, device, torch.float64, bias_free=True)
        exact_data = torch.randn(1, 3, args.size, args.size, generator=generator, dtype=torch.float64).to(device)
        rows.append([
            name, f'{first * 1e3:.0f}', f'{median(applying["graph"]) * 1e3:.1f}',
            f'{median(applying["family"]) * 1e3:.1f}' if family is not None else '-',
            f'{median(applying["zennit"]) * 1e3:.1f} ({median(applying["graph"]) / median(applying["zennit"]):.2f}x)'
            if zennit_variant else '-',
            f'{median(attributing["graph"]) * 1e3:.0f}', f'{ratio:.3f}' if ratio is not None else '-',
            f'{conservation(exact, exact_data, TARGET, [GraphCanonizer()]):.12f}',
        ])
    print(f'{args.size}x{args.size}, batch 1, EpsilonPlusFlat, device {args.device}, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, {args.repeats} interleaved repeats (medians)')
    print(table(['model', 'first apply ms (traced)', 'apply+remove ms', 'family apply+remove ms',
                 'zennit ResNetCanonizer apply+remove ms (graph / zennit)', 'attribution ms',
                 'attribution / family', 'conservation'], rows))


if __name__ == '__main__':
    main()
