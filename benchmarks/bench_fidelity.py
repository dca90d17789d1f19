'''Fidelity of canonized models, for zennit's canonizers and ours, on every zennit version at hand: the model as a
function of its input (relative max abs deviation of the logits from the original model, float32 and float64) and of
its parameters (largest relative deviation, over all parameters, of the gradient of a logit w.r.t. the parameter,
float64; ours hold squeeze-and-excitation gates constant by design, so their reference has the gates detached), on
torchvision models with randomised batch-norm statistics.

Each zennit version runs in its own process: the installed one, and each ``--zennit DIR`` (a ``pip install --target``
directory, as ``make test`` makes: ``.zennit051``, ``.zennit100``) put first on ``PYTHONPATH``.

Run: ``python benchmarks/bench_fidelity.py [--size 224] [--zennit .zennit051 .zennit100]``.
'''
import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from timing import table  # noqa: E402

MODELS = ['resnet50', 'densenet121', 'efficientnet_b0', 'mobilenet_v3_small']
ROOT = Path(__file__).parent.parent


def canonizers_for(name):
    '''(zennit's canonizer, ours) for the model ``name``.'''
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer as ZennitResNetCanonizer

    from canonizers import DenseNetCanonizer, EfficientNetCanonizer, MobileNetCanonizer, ResNetCanonizer
    return {
        'resnet50': (ZennitResNetCanonizer, ResNetCanonizer),
        'densenet121': (SequentialMergeBatchNorm, DenseNetCanonizer),
        'efficientnet_b0': (SequentialMergeBatchNorm, EfficientNetCanonizer),
        'mobilenet_v3_small': (SequentialMergeBatchNorm, MobileNetCanonizer),
    }[name]


def make_model(name: str) -> torch.nn.Module:
    from canonizers.evaluation import randomize_batch_norms

    torch.manual_seed(0)
    return randomize_batch_norms(getattr(torchvision.models, name)()).requires_grad_(False)


def guarded(function, *args):
    '''``function(*args)``, or what went wrong (zennit's merge crashes on DenseNet).'''
    try:
        return function(*args)
    except Exception as error:
        return f'fails ({type(error).__name__})'


def canonized_output(model, data, canonizer):
    instances = canonizer.apply(model)
    try:
        return model(data)
    finally:
        for instance in instances[::-1]:
            instance.remove()


def measure(size: int) -> dict:
    '''Every figure of this process's zennit version, by model.'''
    from canonizers.evaluation import constant_gates, gradient_errors, parameter_gradients, relative_error

    figures = {}
    for name in MODELS:
        theirs, ours = canonizers_for(name)
        data = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        exact = make_model(name).double()(data.double())
        cells = {'canonizer': theirs.__name__}
        for dtype in (torch.float32, torch.float64):
            key = str(dtype).replace('torch.', '')
            original = make_model(name).to(dtype)(data.to(dtype))
            if dtype == torch.float32:
                cells['own'] = relative_error(original, exact)
            for label, canonizer in (('zennit', theirs), ('ours', ours)):
                # a fresh model each: zennit's merge fails half-way on DenseNet and leaves the model broken
                output = guarded(canonized_output, make_model(name).to(dtype), data.to(dtype), canonizer())
                cells[f'{label} {key}'] = output if isinstance(output, str) else relative_error(output, original)

        model = make_model(name).double().requires_grad_(True)
        small = data[:, :, :64, :64].double()
        # ours hold squeeze-and-excitation gates constant by design, zennit's merge does not: each against its model
        plain = parameter_gradients(model, small, 3)
        with constant_gates(model):
            constant = parameter_gradients(model, small, 3)
        for label, canonizer, reference in (('zennit', theirs, plain), ('ours', ours, constant)):
            gradients = guarded(parameter_gradients, copy.deepcopy(model), small, 3, [canonizer()])
            cells[f'{label} gradient'] = gradients if isinstance(gradients, str) else max(
                gradient_errors(gradients, reference).values())
        figures[name] = cells
    return figures


def zennit_version() -> str:
    # the distribution found first on sys.path, as the import: a --target directory carries its own metadata
    from importlib.metadata import version
    return version('zennit')


def cell(value) -> str:
    return value if isinstance(value, str) else f'{value:.1e}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--zennit', nargs='*', default=['.zennit051', '.zennit100'],
                        help='pip --target directories of other zennit versions (missing ones are left out)')
    parser.add_argument('--json', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.json:
        print(json.dumps({'zennit': zennit_version(), 'figures': measure(args.size)}))
        return

    runs = []
    for directory in [None] + [path for path in args.zennit if (ROOT / path).is_dir()]:
        environment = dict(os.environ)
        if directory is not None:
            environment['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT / directory),
                                                                      environment.get('PYTHONPATH')]))
        output = subprocess.run([sys.executable, __file__, '--json', '--size', str(args.size)], env=environment,
                                check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.splitlines()[-1]))

    rows, gradient_rows = [], []
    for name in MODELS:
        for dtype in ('float32', 'float64'):
            for run in runs:
                cells = run['figures'][name]
                rows.append([name, dtype, run['zennit'], cells['canonizer'], cell(cells[f'zennit {dtype}']),
                             cell(cells[f'ours {dtype}']), cell(cells['own']) if dtype == 'float32' else '-'])
        for run in runs:
            cells = run['figures'][name]
            gradient_rows.append([name, run['zennit'], cells['canonizer'], cell(cells['zennit gradient']),
                                  cell(cells['ours gradient'])])
    print(f'relative max abs deviation of the logits from the original model, {args.size}x{args.size}, batch 2, '
          f'torch {torch.__version__}')
    print(table(['model', 'dtype', 'zennit', 'zennit canonizer', 'theirs', 'ours', 'original float32 vs float64'],
                rows))
    print('\nlargest relative deviation of d(logit)/d(parameter) over all parameters, canonizer alone, float64, '
          '64x64, batch 2 (reference: the plain model; for ours with squeeze-and-excitation gates detached)')
    print(table(['model', 'zennit', 'zennit canonizer', 'theirs', 'ours'], gradient_rows))


if __name__ == '__main__':
    main()
