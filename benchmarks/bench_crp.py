'''Isolated CRP conditional heatmaps of 8 conditions on 8 different layers of resnet50: one
``IsolatingCondAttribution`` call against CRP's ``CondAttribution(exclude_parallel=True)`` and the two-pass
difference.

Run: ``python benchmarks/bench_crp.py [--device cuda] [--size 224] [--repeats 3] [--dtype float32]``. Times are
medians of interleaved runs; ratios are against CRP's ``exclude_parallel=True`` measured in the same run. Forward
passes are counted with a hook on the model; the heatmaps of the three methods are checked to agree.

- ``IsolatingCondAttribution``: the 8 conditions in one batch, each with its own cuts: 1 forward and backward pass.
- ``CondAttribution(exclude_parallel=True)``: one partial backward pass per group of conditions with the same
  layers, here 8 passes of one sample.
- two-pass difference: ``exclude_parallel=False`` with the conditions, minus with no concept of the conditioned
  layer (all 8 conditions batched in each): 2 passes of 8 samples.
'''
import argparse
import sys
from pathlib import Path

import torch
import torchvision
from crp.attribution import CondAttribution
from zennit.composites import EpsilonPlusFlat

sys.path.insert(0, str(Path(__file__).parent))
from timing import interleaved, median, table  # noqa: E402

from canonizers import ResNetCanonizer  # noqa: E402
from canonizers.crp import IsolatingCondAttribution  # noqa: E402
from canonizers.evaluation import randomize_batch_norms  # noqa: E402

LAYERS = [
    'layer1.0.conv2',
    'layer1.2.conv3',
    'layer2.0.downsample.0',
    'layer2.3.conv1',
    'layer3.1.conv2',
    'layer3.5.conv3',
    'layer4.0.conv1',
    'layer4.2.conv2',
]
TARGET = 3


def make_model(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    # fresh batch norms are the identity: statistics and affine parameters as a trained model has them
    return randomize_batch_norms(torchvision.models.resnet50()).requires_grad_(False).to(device=device, dtype=dtype)


def relevant_conditions(model: torch.nn.Module, data: torch.Tensor) -> list:
    '''One condition per layer, on the channel with the most relevance (random networks leave many without any).'''
    result = CondAttribution(model)(data, [{'y': [TARGET]}], EpsilonPlusFlat(canonizers=[ResNetCanonizer()]),
                                    record_layer=LAYERS, exclude_parallel=False)
    return [{layer: [int(result.relevances[layer][0].flatten(1).sum(1).abs().argmax())], 'y': [TARGET]}
            for layer in LAYERS]


def methods(model: torch.nn.Module, data: torch.Tensor, conditions: list) -> dict:
    '''The three ways to the isolated heatmaps, each returning them in condition order.'''
    isolating = IsolatingCondAttribution(model)
    crp = CondAttribution(model)
    ours_composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    crp_composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    # a condition with no concept of its layer: everything but the layer's relevance
    rest = [{**{layer: [] for layer in condition if layer != 'y'}, 'y': condition['y']} for condition in conditions]

    def two_pass():
        full = crp(data, conditions, crp_composite, exclude_parallel=False).heatmap
        return full - crp(data, rest, crp_composite, exclude_parallel=False).heatmap

    return {
        'IsolatingCondAttribution': lambda: isolating(data, conditions, ours_composite).heatmap,
        'CondAttribution(exclude_parallel=True)': lambda: crp(data, conditions, crp_composite).heatmap,
        'two-pass difference': two_pass,
    }


def count_forwards(model: torch.nn.Module, function) -> tuple:
    '''The result of ``function`` and the batch sizes of the forward passes it ran.'''
    sizes = []
    handle = model.register_forward_hook(lambda module, input, output: sizes.append(len(input[0])))
    try:
        return function(), sizes
    finally:
        handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float64'])
    parser.add_argument('--warmup', type=int, default=None,
                        help='untimed rounds first (default: 1 on GPUs, 0 on CPUs, where medians absorb the first)')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (default: torch\'s choice)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = make_model(device, dtype)
    data = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(
        device=device, dtype=dtype).requires_grad_()
    conditions = relevant_conditions(model, data)
    functions = methods(model, data, conditions)
    reference = 'CondAttribution(exclude_parallel=True)'

    # every run counts its forward passes; the first run's heatmaps are checked to agree
    results, passes = {}, {}

    def recorded(label, function):
        def run():
            result, sizes = count_forwards(model, function)
            results.setdefault(label, result)
            passes.setdefault(label, sizes)
        return run

    warmup = args.warmup if args.warmup is not None else int(device.type == 'cuda')
    times = interleaved({label: recorded(label, function) for label, function in functions.items()}, args.repeats,
                        device, warmup=warmup)
    # CRP returns its groups in the order of their first condition, which here is the condition order
    scale = results[reference].abs().flatten(1).amax(1).view(-1, 1, 1)
    errors = {label: ((result - results[reference]).abs() / scale).max().item() for label, result in results.items()}

    rows = []
    for label in functions:
        rows.append([label, f'{median(times[label]):.3f}', f'{median(times[label]) / median(times[reference]):.2f}',
                     f'{len(passes[label])} x {passes[label][0]}', f'{errors[label]:.1e}'])
    threads = torch.get_num_threads() if device.type == 'cpu' else '-'
    print(f'resnet50, {args.size}x{args.size}, {len(conditions)} conditions on {len(LAYERS)} different layers, '
          f'EpsilonPlusFlat, {args.dtype}, device {args.device} ({threads} threads), torch {torch.__version__}, '
          f'{args.repeats} interleaved repeats (medians), {warmup} warm-up')
    print(table(['method', 'seconds', 'ratio', 'forward passes x samples', 'max rel. deviation'], rows))


if __name__ == '__main__':
    main()
