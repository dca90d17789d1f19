'''Forward fidelity of canonized models: relative max abs deviation of the logits from the original model, for
zennit's canonizers and ours, in float32 and float64, on torchvision models with randomised batch-norm statistics.

Run: ``python benchmarks/bench_fidelity.py [--size 224]``.
'''
import argparse
import sys
from pathlib import Path

import torch
import torchvision
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.torchvision import ResNetCanonizer as ZennitResNetCanonizer

sys.path.insert(0, str(Path(__file__).parent))
from timing import table  # noqa: E402

from canonizers import DenseNetCanonizer, EfficientNetCanonizer, MobileNetCanonizer, ResNetCanonizer  # noqa: E402
from canonizers.evaluation import randomize_batch_norms, relative_error  # noqa: E402

MODELS = {
    'resnet50': (ZennitResNetCanonizer, ResNetCanonizer),
    'densenet121': (SequentialMergeBatchNorm, DenseNetCanonizer),
    'efficientnet_b0': (SequentialMergeBatchNorm, EfficientNetCanonizer),
    'mobilenet_v3_small': (SequentialMergeBatchNorm, MobileNetCanonizer),
}


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norms(getattr(torchvision.models, name)()).requires_grad_(False)


def canonized_output(model, data, canonizer):
    try:
        instances = canonizer.apply(model)
    except Exception as error:  # zennit's merge crashes on DenseNet: report it as such
        return f'fails ({type(error).__name__})'
    try:
        return model(data)
    finally:
        for instance in instances[::-1]:
            instance.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=224)
    args = parser.parse_args()

    rows = []
    for name, (theirs, ours) in MODELS.items():
        base = make_model(name)
        data = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
        exact = base.double()(data.double())
        for dtype in (torch.float32, torch.float64):
            original = make_model(name).to(dtype)(data.to(dtype))
            cells = []
            for canonizer in (theirs(), ours()):
                # a fresh model each: zennit's merge fails half-way on DenseNet and leaves the model broken
                output = canonized_output(make_model(name).to(dtype), data.to(dtype), canonizer)
                cells.append(output if isinstance(output, str) else f'{relative_error(output, original):.1e}')
            own = relative_error(original, exact) if dtype == torch.float32 else 0.
            rows.append([name, str(dtype).replace('torch.', ''), type(theirs()).__name__, *cells,
                         f'{own:.1e}' if dtype == torch.float32 else '-'])
    print(f'relative max abs deviation of the logits from the original model, {args.size}x{args.size}, batch 2, '
          f'torch {torch.__version__}')
    print(table(['model', 'dtype', 'zennit canonizer', 'zennit', 'ours', 'original float32 vs float64'], rows))


if __name__ == '__main__':
    main()
