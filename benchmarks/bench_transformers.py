'''Speed of LRP on torchvision's vit_b_16 (224x224, batch 1): an attribution with ``GraphCanonizer`` (CP-LRP) under a
zennit composite, against LXT 2.1's CP-LRP (the same rules) and a plain gradient, and the time to apply and remove
the canonizer after the first trace.

Run: ``python benchmarks/bench_transformers.py [--device cpu|cuda] [--rounds 10] [--threads 2] [--lxt .lxt]``.

LXT patches torchvision's classes for the whole process, so it runs in a worker process of its own (this file with
``--worker``, LXT's folder first on its path), and the rounds take turns: one attribution here, then one there (this
process waits for it, so the two never share the cores), then the plain gradients, so that drifts of the machine hit
all alike. Medians over the rounds; the ratios are medians of the per-round ratios. Random weights (nothing
downloaded; the head, which torchvision initializes to zero, drawn at random too); all compute input relevance or
the gradient of the logit of class 3.

zennit's attributor asks for the input's gradient alone (``torch.autograd.grad``); LXT's documented use,
``y.backward()`` and ``x * x.grad``, also computes every parameter's gradient. Both are timed, and so is the plain
gradient both ways: the like-for-like ratios are those of the input gradient alone. The input gradient of the
canonized model without any rules (the canonizer applied, no composite) tells the canonizer's cost from that of
zennit's rules. The composite is ``canonizers.evaluation.conservation_composite``: zennit's epsilon, norm and pass
rules, whose division by the stabilized output is computed in fewer passes over memory, to the same bits
(``StabilizedQuotient``); a row gives the same rules with zennit's own division.
'''
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Union

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from timing import median, synchronize, table  # noqa: E402

TARGET = 3
# OpenMP's threads spin a while after their work (libgomp's default: up to 300,000 spins) before they sleep: each
# process waits this long before its turn, so that the other one's threads are asleep. (OMP_WAIT_POLICY=PASSIVE would
# do without the wait, but it slows every parallel region of both, the more the more operations: not the default a
# user runs under.)
SETTLE = 0.05


def build(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model.to(device)


def input_gradient(model: torch.nn.Module, data: torch.Tensor, parameters: bool) -> torch.Tensor:
    '''The gradient of the logit of class TARGET at ``data``; by ``backward()`` (also every parameter's gradient) if
    ``parameters``, else by ``torch.autograd.grad`` for the input alone.'''
    input = data.clone().requires_grad_()
    logit = model(input)[0, TARGET]
    if parameters:
        logit.backward()
        model.zero_grad(set_to_none=True)
        return input.grad
    return torch.autograd.grad(logit, input)[0]


def worker(device: torch.device) -> None:
    '''Serve LXT attributions: one per line read (``input`` or ``backward``, see :py:func:`input_gradient`), its time
    written back.'''
    import warnings

    # LXT's optional zennit patches (for gamma rules) do not load with zennit 0.4.6; its ViT rules do not need them
    warnings.filterwarnings('ignore', message="'zennit' library is not available")
    from lxt.efficient import monkey_patch
    from torchvision.models import vision_transformer

    monkey_patch(vision_transformer)
    model = build(device)
    data = torch.randn(1, 3, 224, 224, device=device)
    for line in sys.stdin:
        synchronize(device)
        start = time.perf_counter()
        (data * input_gradient(model, data, line.strip() == 'backward')).sum().item()
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
    from zennit.composites import LayerMapComposite
    from zennit.core import stabilize
    from zennit.layer import Sum
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.types import Activation, AvgPool, Linear

    from canonizers import GraphCanonizer
    from canonizers.evaluation import conservation_composite, output_relevance

    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([args.lxt, str(Path(__file__).parent.parent)]))
    lxt = subprocess.Popen([sys.executable, __file__, '--worker', '--device', args.device, '--threads',
                            str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env=environment)
    model = build(device)
    data = torch.randn(1, 3, 224, 224, device=device)
    # the rules LXT applies: a vanishing epsilon on linear layers and sums, relevance passed through activations
    composites = {reuse: conservation_composite([GraphCanonizer(reuse_forward=reuse)], epsilon=1e-10)
                  for reuse in (True, False)}
    # the same rules with zennit's own division by the stabilized output (conservation_composite's is bitwise the
    # same, in fewer passes over memory: canonizers.evaluation.StabilizedQuotient)
    norm = Norm()
    norm.gradient_mapper = lambda out_grad, outputs: out_grad / stabilize(outputs[0], 1e-10)
    composites['stock'] = LayerMapComposite(
        layer_map=[(Activation, Pass()), (Sum, norm), (AvgPool, norm), (Linear, Epsilon(epsilon=1e-10))],
        canonizers=[GraphCanonizer()])

    def ours(reuse: Union[bool, str] = True) -> None:
        with Gradient(model, composites[reuse]) as attributor:
            _, relevance = attributor(data.clone().requires_grad_(), lambda out: output_relevance(out, TARGET))
        relevance.sum().item()

    def gradient(parameters: bool) -> Callable[[], None]:
        return lambda: input_gradient(model, data, parameters).sum().item()

    def apply_remove() -> None:
        for instance in GraphCanonizer().apply(model):
            instance.remove()

    def canonized_gradient() -> None:
        # the canonized model without rules: what the canonizer costs, apart from the rules of zennit's composite
        instances = GraphCanonizer().apply(model)
        try:
            input_gradient(model, data, False).sum().item()
        finally:
            for instance in instances:
                instance.remove()

    def timed(function) -> float:
        synchronize(device)
        time.sleep(SETTLE)
        start = time.perf_counter()
        function()
        synchronize(device)
        return time.perf_counter() - start

    def lxt_time(mode: str) -> float:
        # the worker's answer is awaited before anything else runs: the two processes never share the cores
        time.sleep(SETTLE)
        lxt.stdin.write(mode + '\n')
        lxt.stdin.flush()
        return float(lxt.stdout.readline())

    first_trace = timed(apply_remove)
    labels = ['GraphCanonizer + composite', "the same, zennit's own stabilized division",
              'the same, reuse_forward=False', 'LXT 2.1 (cp-LRP), input gradient',
              'LXT 2.1 (cp-LRP), backward()', 'plain gradient, input', 'plain gradient, backward()',
              'GraphCanonizer, no rules: gradient, input', 'apply + remove']
    times = {label: [] for label in labels}
    for round_ in range(args.rounds + 1):
        figures = [timed(ours), timed(lambda: ours('stock')), timed(lambda: ours(False)), lxt_time('input'),
                   lxt_time('backward'),
                   timed(gradient(False)), timed(gradient(True)), timed(canonized_gradient), timed(apply_remove)]
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
