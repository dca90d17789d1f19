'''Isolated CRP conditional heatmaps: ``IsolatingCondAttribution`` against CRP's
``CondAttribution(exclude_parallel=True)`` measured in the same run, on the cases of issue 11.

Run: ``python benchmarks/bench_crp.py [--device cuda] [--size 224] [--repeats 3] [--threads 2] [--cases NAME,...]
[--no-memory]``.

Times are medians of interleaved rounds; the ratio is the median of the per-round ratios (drifts of a shared machine
hit both sides of a round alike). Forward passes are counted with a hook on the model, and the heatmaps of both are
checked to agree. Peak memory (case ``resnet50-8-layers``) is that of one call in a fresh process, median of 3.

- ``IsolatingCondAttribution``: one forward pass, one backward pass from the output to all conditioned layers, and
  per condition the backward pass below its layer (conditions on the same layer in one batched pass).
- ``CondAttribution(exclude_parallel=True)``: one forward and partial backward pass per group of conditions with the
  same layers (``generate`` needs one call per group).
'''
import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torchvision
from crp.attribution import CondAttribution
from zennit.composites import EpsilonPlusFlat

sys.path.insert(0, str(Path(__file__).parent))
from timing import fresh_process_peak, interleaved, median, peak_of, table  # noqa: E402

from canonizers import DenseNetCanonizer, EfficientNetCanonizer, ResNetCanonizer  # noqa: E402
from canonizers.crp import IsolatingCondAttribution  # noqa: E402
from canonizers.evaluation import randomize_batch_norms  # noqa: E402

TARGET = 3
CANONIZERS = {'resnet50': ResNetCanonizer, 'densenet121': DenseNetCanonizer, 'efficientnet_b0': EfficientNetCanonizer}
RESNET50_LAYERS = [
    'layer1.0.conv2', 'layer1.2.conv3', 'layer2.0.downsample.0', 'layer2.3.conv1',
    'layer3.1.conv2', 'layer3.5.conv3', 'layer4.0.conv1', 'layer4.2.conv2',
]
RESNET50_16_LAYERS = RESNET50_LAYERS + [
    'layer1.1.conv1', 'layer2.1.conv2', 'layer2.2.conv3', 'layer3.0.conv1',
    'layer3.0.downsample.0', 'layer3.3.conv2', 'layer3.4.conv1', 'layer4.1.conv3',
]


class Case(NamedTuple):
    '''One benchmark case: the model, the conditions' layer sets (a tuple per condition; several conditions on one
    layer set take its most relevant channels in turn), the target ratio, and the batch size of ``generate`` (None:
    one call).'''
    model: str
    description: str
    layer_sets: List[Tuple[str, ...]]
    target: float
    generate: Optional[int] = None


CASES = {
    'resnet50-8-layers': Case('resnet50', '8 conditions on 8 different layers',
                              [(layer,) for layer in RESNET50_LAYERS], 0.5),
    'resnet50-1-condition': Case('resnet50', '1 condition', [('layer3.1.conv2',)], 1.05),
    'resnet50-one-layer': Case('resnet50', '8 conditions on one layer', [('layer3.1.conv2',)] * 8, 1.0),
    'resnet50-generate': Case('resnet50', '64 conditions on 16 layers, generate(batch_size=16)',
                              [(layer,) for layer in RESNET50_16_LAYERS for _ in range(4)], 0.5, generate=16),
    'densenet121-mixed': Case('densenet121', '8 mixed conditions', [
        ('features.denseblock1.denselayer2.conv1',), ('features.denseblock1.denselayer5.conv2',),
        ('features.transition1.conv',), ('features.denseblock2.denselayer7.conv1',),
        ('features.denseblock3.denselayer10',), ('features.denseblock3.denselayer20.conv2',),
        ('features.denseblock4.denselayer8.conv1',),
        ('features.denseblock4.denselayer3.conv1', 'features.denseblock2.denselayer3.conv2'),
    ], 0.6),
    'efficientnet_b0-mixed': Case('efficientnet_b0', '8 mixed conditions', [
        ('features.1.0.block.2.0',), ('features.2.1.block.0.0',), ('features.3.0.block.3.0',),
        ('features.4.2.block.1.0',), ('features.5.1',), ('features.6.1.block.0.0',), ('features.7.0.block.3.0',),
        ('features.6.2.block.3.0', 'features.4.1.block.0.0'),
    ], 0.6),
}
MEMORY_CASE = 'resnet50-8-layers'


def make_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    # fresh batch norms are the identity: statistics and affine parameters as a trained model has them
    model = randomize_batch_norms(getattr(torchvision.models, name)())
    return model.requires_grad_(False).to(device=device, dtype=dtype)


def composite(case: Case) -> EpsilonPlusFlat:
    return EpsilonPlusFlat(canonizers=[CANONIZERS[case.model]()])


def conditions_of(case: Case, model: torch.nn.Module, data: torch.Tensor) -> List[Dict[str, List[int]]]:
    '''Per layer set, conditions on its layers' most relevant channels (random networks leave many without any),
    the layers in CRP's order (nearest the output first, as its partial backward pass needs).'''
    position = {name: index for index, (name, _) in enumerate(model.named_modules())}
    layers = sorted({layer for layer_set in case.layer_sets for layer in layer_set})
    relevances = CondAttribution(model)(data, [{'y': [TARGET]}], composite(case), record_layer=layers,
                                        exclude_parallel=False).relevances
    ranked = {layer: relevances[layer][0].flatten(1).sum(1).abs().argsort(descending=True).tolist()
              for layer in layers}
    taken: Dict[Tuple[str, ...], int] = {}
    conditions = []
    for layer_set in case.layer_sets:
        turn = taken[layer_set] = taken.get(layer_set, -1) + 1
        ordered = sorted(layer_set, key=lambda layer: -position[layer])
        conditions.append({**{layer: [ranked[layer][turn]] for layer in ordered}, 'y': [TARGET]})
    return conditions


def methods(case: Case, model: torch.nn.Module, data: torch.Tensor,
            conditions: List[Dict[str, List[int]]]) -> Dict[str, Callable[[], torch.Tensor]]:
    '''Both ways to the isolated heatmaps, each returning them in condition order.'''
    isolating, crp = IsolatingCondAttribution(model), CondAttribution(model)
    ours, theirs = composite(case), composite(case)
    if case.generate is None:
        return {
            'IsolatingCondAttribution': lambda: isolating(data, conditions, ours).heatmap,
            'CondAttribution(exclude_parallel=True)': lambda: crp(data, conditions, theirs).heatmap,
        }
    # CRP's generate isolates only conditions with the same layers: one call per group (the conditions are grouped)
    groups: Dict[frozenset, List[Dict[str, List[int]]]] = {}
    for condition in conditions:
        groups.setdefault(frozenset(condition), []).append(condition)

    def crp_generate() -> torch.Tensor:
        return torch.cat([result.heatmap for group in groups.values()
                          for result in crp.generate(data, group, theirs, batch_size=case.generate, verbose=False)])

    def our_generate() -> torch.Tensor:
        return torch.cat([result.heatmap for result in
                          isolating.generate(data, conditions, ours, batch_size=case.generate, verbose=False)])
    return {'IsolatingCondAttribution': our_generate, 'CondAttribution(exclude_parallel=True)': crp_generate}


def count_forwards(model: torch.nn.Module, function: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
    '''The result of ``function`` and the batch sizes of the forward passes it ran.'''
    sizes: List[int] = []
    handle = model.register_forward_hook(lambda module, input, output: sizes.append(len(input[0])))
    try:
        return function(), sizes
    finally:
        handle.remove()


def setup(name: str, args) -> Tuple[Case, Dict[str, Callable[[], torch.Tensor]], torch.nn.Module]:
    case = CASES[name]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = make_model(case.model, device, dtype)
    data = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(
        device=device, dtype=dtype).requires_grad_()
    return case, methods(case, model, data, conditions_of(case, model, data)), model


def passes(sizes: List[int]) -> str:
    '''Forward passes as "count x samples".'''
    counts: Dict[int, int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return ' + '.join(f'{count} x {size}' for size, count in counts.items())


def run_case(name: str, args) -> List[str]:
    case, functions, model = setup(name, args)
    ours, reference = list(functions)
    results, forwards = {}, {}

    def recorded(label: str) -> Callable[[], None]:
        def run() -> None:
            result, sizes = count_forwards(model, functions[label])
            results.setdefault(label, result)
            forwards.setdefault(label, sizes)
        return run

    device = torch.device(args.device)
    warmup = args.warmup if args.warmup is not None else int(device.type == 'cuda')
    times = interleaved({label: recorded(label) for label in functions}, args.repeats, device, warmup=warmup)
    scale = results[reference].abs().flatten(1).amax(1).clamp(min=1e-30).view(-1, 1, 1)
    deviation = ((results[ours] - results[reference]).abs() / scale).max().item()
    ratio = median([mine / theirs for mine, theirs in zip(times[ours], times[reference])])
    memory = '-'
    if name == MEMORY_CASE and args.memory:
        peaks = {label: median([peak_memory(name, label, args) for _ in range(3)]) for label in functions}
        memory = f'{peaks[ours]:.0f} / {peaks[reference]:.0f} = {peaks[ours] / peaks[reference]:.2f}'
    return [f'{case.model}: {case.description}', f'{median(times[ours]):.2f}', f'{median(times[reference]):.2f}',
            f'{ratio:.2f}', f'<= {case.target}', 'yes' if ratio <= case.target else 'NO',
            f'{passes(forwards[ours])} / {passes(forwards[reference])}', f'{deviation:.1e}', memory]


def peak_memory(name: str, label: str, args) -> float:
    return fresh_process_peak([sys.executable, __file__, '--peak-of', f'{name}:{label}', '--device', args.device,
                               '--size', str(args.size), '--dtype', args.dtype, '--threads', str(args.threads)])


def measure_peak(args) -> None:
    name, label = args.peak_of.split(':', 1)
    _, functions, _ = setup(name, args)
    print(peak_of(functions[label], torch.device(args.device)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float64'])
    parser.add_argument('--warmup', type=int, default=None,
                        help='untimed rounds first (default: 1 on GPUs, 0 on CPUs, where medians absorb the first)')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (0: torch\'s choice)')
    parser.add_argument('--cases', default=','.join(CASES), help=f'comma-separated, of: {", ".join(CASES)}')
    parser.add_argument('--no-memory', dest='memory', action='store_false', help='skip the peak-memory measurement')
    parser.add_argument('--peak-of', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of:
        measure_peak(args)
        return
    unknown = [name for name in args.cases.split(',') if name not in CASES]
    if unknown:
        parser.error(f'unknown cases {unknown}: choose from {", ".join(CASES)}')

    rows = []
    for name in args.cases.split(','):
        rows.append(run_case(name, args))
        print(' | '.join(rows[-1]), file=sys.stderr, flush=True)
    threads = torch.get_num_threads() if args.device == 'cpu' else '-'
    print(f'{args.size}x{args.size}, EpsilonPlusFlat with the family canonizer, {args.dtype}, device {args.device} '
          f'({threads} threads), torch {torch.__version__}, {args.repeats} interleaved rounds (medians)')
    print(table(['case', 'ours s', 'CRP s', 'ratio', 'target', 'met', 'forward passes ours / CRP',
                 'max rel. deviation', 'peak MiB ours / CRP'], rows))


if __name__ == '__main__':
    main()
