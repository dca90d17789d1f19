'''The supported-models table of ``GraphCanonizer``: forward fidelity, relevance conservation and how much a CRP
conditional heatmap leaks without isolation, on torchvision and timm models no family canonizer covers.

Run: ``python benchmarks/bench_graph_models.py [--size 64] [--models NAME,...]`` (timm models as ``timm:NAME``).

- forward: relative max error of the canonized model in float32 against the original in float64 (exact arithmetic
  up to 1e-16), and of the canonized model in float64;
- conservation: input relevance sum over output relevance, bias-free float64 model (learned constants and constant
  shifts zeroed too), Epsilon rule with negligible epsilon (1 is exact);
- leak factor: sum |leaky| / sum |isolated| of the conditional heatmap of the most relevant channel of a layer inside a
  parallel branch (the middle one of the convolutions and linear layers whose isolation needs a cut), CRP's
  ``exclude_parallel=False`` against ``IsolatingCondAttribution`` (equal to CRP's ``exclude_parallel=True``),
  EpsilonPlusFlat with ``GraphCanonizer``; not given for the transformers, whose branches hold token-major layers.
'''
import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torchvision
from crp.attribution import CondAttribution
from zennit.composites import EpsilonPlusFlat

sys.path.insert(0, str(Path(__file__).parent))
from timing import table  # noqa: E402

from canonizers import GraphCanonizer  # noqa: E402
from canonizers.core.attention import zeroed_shifts  # noqa: E402
from canonizers.crp import IsolatingCondAttribution  # noqa: E402
from canonizers.evaluation import conservation, randomize_batch_norms, relative_error  # noqa: E402
from canonizers.graph import graph_cuts_for  # noqa: E402
from canonizers.support import bias_free  # noqa: E402

TARGET = 3
TORCHVISION = ['googlenet', 'inception_v3', 'regnet_y_400mf', 'convnext_tiny', 'shufflenet_v2_x1_0', 'mnasnet0_5',
               'swin_t', 'vit_b_16']
TIMM = ['resnet50d', 'seresnext26d_32x4d', 'efficientnet_b0', 'mobilenetv3_large_100', 'regnety_008', 'densenet121',
        'resnetv2_50', 'convnext_atto']
#: models whose parallel branches hold token-major layers ([batch, ..., features]), where CRP's ChannelConcept takes
#: tokens, not features: no leak factor is given (canonizers.crp.FeatureConcept is the concept for them)
TOKEN_MAJOR = {'convnext_tiny', 'swin_t', 'vit_b_16', 'timm:convnext_atto'}
#: input sizes the models need at least
SIZES = {'inception_v3': 96, 'vit_b_16': 224, 'swin_t': 224}


def builder(name: str) -> Callable[[], torch.nn.Module]:
    if name.startswith('timm:'):
        import timm

        return lambda: timm.create_model(name[len('timm:'):], pretrained=False, num_classes=10)
    options = {'num_classes': 10}
    if name in ('googlenet', 'inception_v3'):
        options.update(aux_logits=False, init_weights=False)

    def build() -> torch.nn.Module:
        model = getattr(torchvision.models, name)(**options)
        if name == 'vit_b_16':
            # torchvision's ViT starts with a head of zeros
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model
    return build


def make(name: str, dtype: torch.dtype, bias_free: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norms(builder(name)(), bias_free=bias_free).requires_grad_(False).to(dtype)


def forward_errors(name: str, data: torch.Tensor) -> Tuple[float, float]:
    model = make(name, torch.float64)
    exact = model(data.double())
    errors = []
    for dtype in (torch.float32, torch.float64):
        model = model.to(dtype)
        canonizer = GraphCanonizer()
        instances = canonizer.apply(model)
        try:
            errors.append(relative_error(model(data.to(dtype)), exact))
        finally:
            for instance in reversed(instances):
                instance.remove()
    return errors[0], errors[1]


def isolated_layer(model: torch.nn.Module) -> str:
    '''A convolution or linear layer inside a parallel branch (its isolation needs a cut): the middle one of those, in
    the model's order.'''
    inside = []
    for layer, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            try:
                cut, = graph_cuts_for(model, [{layer: [0]}])
            except ValueError:
                continue
            if cut:
                inside.append(layer)
    if not inside:
        raise RuntimeError('no layer inside a parallel branch')
    return inside[len(inside) // 2]


def leak_factor(name: str, data: torch.Tensor) -> Tuple[str, float]:
    model = make(name, torch.float64)
    data = data.double().requires_grad_()
    layer = isolated_layer(model)
    composite = EpsilonPlusFlat(canonizers=[GraphCanonizer()])
    relevance = CondAttribution(model)(data, [{'y': [TARGET]}], composite, record_layer=[layer],
                                       exclude_parallel=False).relevances[layer]
    channel = int(relevance[0].flatten(1).sum(1).abs().argmax())
    condition = [{layer: [channel], 'y': [TARGET]}]
    leaky = CondAttribution(model)(data, condition, composite, exclude_parallel=False).heatmap
    isolated = IsolatingCondAttribution(model)(data, condition, composite).heatmap
    return layer, (leaky.abs().sum() / isolated.abs().sum()).item()


def measure(name: str, size: int) -> List[str]:
    size = max(size, SIZES.get(name.split(':')[-1], 0))
    data = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    float32, float64 = forward_errors(name, data)
    # learned constants (position embeddings, class tokens) and constant shifts are zeroed with the biases
    model = bias_free(make(name, torch.float64, bias_free=True))
    with zeroed_shifts():
        conserved = f'{abs(conservation(model, data, TARGET, [GraphCanonizer()]) - 1):.1e}'
    if name in TOKEN_MAJOR:
        return [name, f'{size}', f'{float32:.1e}', f'{float64:.1e}', conserved,
                'not given: token-major layers (FeatureConcept)']
    layer, factor = leak_factor(name, data)
    return [name, f'{size}', f'{float32:.1e}', f'{float64:.1e}', conserved, f'{factor:.1f}x ({layer})']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--models', default=','.join(TORCHVISION + [f'timm:{name}' for name in TIMM]))
    args = parser.parse_args()
    rows: Dict[str, List[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for name in args.models.split(','):
            rows[name] = measure(name, args.size)
            print(' | '.join(rows[name]), file=sys.stderr, flush=True)
    print(f'GraphCanonizer, random weights and batch norms, torch {torch.__version__}, {torch.get_num_threads()} '
          'threads')
    print(table(['model', 'input', 'forward float32', 'forward float64', '|conservation - 1|',
                 'leak factor (layer)'], list(rows.values())))


if __name__ == '__main__':
    main()
