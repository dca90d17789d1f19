'''Speed of LRP on torchvision's vit_b_16 (224x224, batch 1): an attribution with ``GraphCanonizer`` (CP-LRP) under a
zennit composite, against LXT 2.1's CP-LRP (the same rules) and a plain gradient, and the time to apply and remove
the canonizer after the first trace.

Run: ``python benchmarks/bench_transformers.py [--device cpu|cuda] [--rounds 10] [--threads 2] [--lxt .lxt]``.

LXT patches torchvision's classes for the whole process, so it runs in a worker process of its own (this file with
``--worker``, LXT's folder first on its path), and the rounds take turns: one attribution here, one there, one plain
gradient, so that drifts of the machine hit all alike. Medians over the rounds; the ratios are medians of the
per-round ratios. Random weights (nothing downloaded); the three compute the same kind of result (input relevance
or gradient of the logit of class 3).
'''
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# two processes take turns: threads that spin after their work (OpenMP's default) would slow the other one's turn
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch  # noqa: E402
import torchvision  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from timing import median, synchronize, table  # noqa: E402

TARGET = 3


def build(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vit_b_16().eval().to(device)


def worker(device: torch.device) -> None:
    '''Serve LXT attributions: one per line read, its time written back.'''
    import warnings

    # LXT's optional zennit patches (for gamma rules) do not load with zennit 0.4.6; its ViT rules do not need them
    warnings.filterwarnings('ignore', message="'zennit' library is not available")
    from lxt.efficient import monkey_patch
    from torchvision.models import vision_transformer

    monkey_patch(vision_transformer)
    model = build(device)
    data = torch.randn(1, 3, 224, 224, device=device)
    for _ in sys.stdin:
        synchronize(device)
        start = time.perf_counter()
        input = data.clone().requires_grad_()
        model(input)[0, TARGET].backward()
        (input * input.grad).sum().item()
        synchronize(device)
        print(time.perf_counter() - start, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--lxt', default=str(Path(__file__).parent.parent / '.lxt'),
                        help="LXT 2.1's folder (pip install --target DIR 'transformers<5' and then lxt==2.1)")
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        return worker(device)

    from zennit.attribution import Gradient

    from canonizers import GraphCanonizer
    from canonizers.evaluation import conservation_composite, output_relevance

    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([args.lxt, str(Path(__file__).parent.parent)]))
    lxt = subprocess.Popen([sys.executable, __file__, '--worker', '--device', args.device, '--threads',
                            str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env=environment)
    model = build(device)
    data = torch.randn(1, 3, 224, 224, device=device)
    # the rules LXT applies: a vanishing epsilon on linear layers and sums, relevance passed through activations
    composite = conservation_composite([GraphCanonizer()], epsilon=1e-10)

    def ours() -> None:
        with Gradient(model, composite) as attributor:
            _, relevance = attributor(data.clone().requires_grad_(), lambda out: output_relevance(out, TARGET))
        relevance.sum().item()

    def gradient() -> None:
        input = data.clone().requires_grad_()
        model(input)[0, TARGET].backward()
        input.grad.sum().item()

    def apply_remove() -> None:
        for instance in GraphCanonizer().apply(model):
            instance.remove()

    def timed(function) -> float:
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        return time.perf_counter() - start

    first_trace = timed(apply_remove)
    times = {'GraphCanonizer + composite': [], 'LXT 2.1 (cp-LRP)': [], 'plain gradient': [], 'apply + remove': []}
    for round_ in range(args.rounds + 1):
        lxt.stdin.write('run\n')
        lxt.stdin.flush()
        figures = [timed(ours), float(lxt.stdout.readline()), timed(gradient), timed(apply_remove)]
        if round_ > 0:  # the first round warms up
            for label, figure in zip(times, figures):
                times[label].append(figure)
    lxt.stdin.close()
    lxt.wait()
    ours_times = times['GraphCanonizer + composite']
    rows = []
    for label, values in times.items():
        ratios = [mine / other for mine, other in zip(ours_times, values)]
        ratio = '' if label == 'apply + remove' else f'{median(ratios):.2f}'
        rows.append([label, f'{median(values) * 1e3:.1f}', ratio])
    print(f'vit_b_16, 224x224, batch 1, {args.device}, {args.threads} threads, {args.rounds} rounds; torch '
          f'{torch.__version__}; first trace and compile (apply + remove): {first_trace * 1e3:.0f} ms')
    print(table(['', 'median (ms)', 'GraphCanonizer / this'], rows))


if __name__ == '__main__':
    main()
