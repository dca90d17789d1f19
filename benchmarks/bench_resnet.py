'''Attribution time, apply+remove time and peak memory of the ResNet canonizers against zennit's.

Run: ``python benchmarks/bench_resnet.py [--device cuda] [--repeats N]``. Times are medians of interleaved runs;
ratios are medians of the per-round ratios against ``zennit.torchvision.ResNetCanonizer`` measured in the same run.
Peak memory is the resident-set peak of one attribution in a fresh process (median of 3), with glibc returning freed
blocks at once so that it follows the live tensors.
'''
import argparse
import sys
from pathlib import Path

import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer as ZennitResNetCanonizer

sys.path.insert(0, str(Path(__file__).parent))
from timing import fresh_process_peak, interleaved, median, peak_of, table  # noqa: E402

from canonizers import ResNetCanonizer  # noqa: E402
from canonizers.evaluation import randomize_batch_norms  # noqa: E402

CUT = ['layer1.0', 'layer2.*', 'layer3.2', 'layer4.0']
VARIANTS = {
    'zennit ResNetCanonizer()': lambda: ZennitResNetCanonizer(),
    'ResNetCanonizer()': lambda: ResNetCanonizer(),
    f'ResNetCanonizer(cut={len(CUT)} names/patterns)': lambda: ResNetCanonizer(cut=CUT),
}


def make_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    # fresh batch norms are the identity: statistics and affine parameters as a trained model has them
    return randomize_batch_norms(torchvision.models.resnet50()).requires_grad_(False).to(device)


def attribute(model, data, variant):
    with Gradient(model, EpsilonPlusFlat(canonizers=[VARIANTS[variant]()])) as attributor:
        attributor(data, torch.eye(1000, device=data.device)[[3] * len(data)])


def apply_remove(model, variant):
    instances = VARIANTS[variant]().apply(model)
    for instance in instances[::-1]:
        instance.remove()


def peak_memory(variant: str, args) -> float:
    '''Peak memory in MiB added by one attribution, measured in a fresh process so that earlier runs do not count.'''
    return fresh_process_peak([sys.executable, __file__, '--peak-of', variant, '--device', args.device,
                               '--size', str(args.size), '--batch', str(args.batch)])


def peak_memories(args, rounds: int = 3) -> dict:
    '''Median peak memory per variant over interleaved fresh processes (resident-set peaks vary by a few percent).'''
    peaks = {variant: [] for variant in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            peaks[variant].append(peak_memory(variant, args))
    return {variant: median(values) for variant, values in peaks.items()}


def measure_peak(args) -> None:
    device = torch.device(args.device)
    model = make_model(device)
    data = torch.randn(args.batch, 3, args.size, args.size, device=device, requires_grad=True)
    print(peak_of(lambda: attribute(model, data, args.peak_of), device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=9)
    parser.add_argument('--peak-of', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:
        measure_peak(args)
        return

    device = torch.device(args.device)
    model = make_model(device)
    data = torch.randn(args.batch, 3, args.size, args.size, device=device, requires_grad=True)
    reference = next(iter(VARIANTS))

    attribution = interleaved({variant: (lambda v=variant: attribute(model, data, v)) for variant in VARIANTS},
                              args.repeats, device)
    lifecycle = interleaved({variant: (lambda v=variant: apply_remove(model, v)) for variant in VARIANTS},
                            args.repeats * 4, device)
    peaks = peak_memories(args)

    rows = []
    for variant in VARIANTS:
        # the median of the per-round ratios: drifts of a shared machine hit both sides of each round alike
        time_ratio = median([mine / theirs for mine, theirs in zip(attribution[variant], attribution[reference])])
        life_ratio = median([mine / theirs for mine, theirs in zip(lifecycle[variant], lifecycle[reference])])
        rows.append([variant, f'{median(attribution[variant]) * 1e3:.0f}', f'{time_ratio:.3f}',
                     f'{median(lifecycle[variant]) * 1e3:.1f}', f'{life_ratio:.2f}',
                     f'{peaks[variant]:.0f}', f'{peaks[variant] / peaks[reference]:.2f}'])
    print(f'resnet50, {args.size}x{args.size}, batch {args.batch}, EpsilonPlusFlat, device {args.device}, '
          f'torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats (medians)')
    print(table(['canonizer', 'attribution ms', 'ratio', 'apply+remove ms', 'ratio', 'peak MiB', 'ratio'], rows))


if __name__ == '__main__':
    main()
