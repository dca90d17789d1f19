'''Shared tools of the test suite: models with randomised batch norms, bitwise snapshots, and oracles.'''
import copy
import functools

import pytest
import torch
import torchvision

from canonizers.evaluation import (  # noqa: F401 (shared with the test modules through this file)
    conservation_composite,
    output_relevance,
    randomize_batch_norms,
    relative_error,
    sum_rule,
)

HOOK_DICTS = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks')


@functools.cache
def _built(name, seed, bias_free, num_classes, weight=(0.5, 1.5)):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=num_classes)
    # parameter gradients are never needed here and cost time
    return randomize_batch_norms(model, seed, bias_free, weight=weight).requires_grad_(False)


def make_model(name, seed=0, bias_free=False, dtype=torch.float32, num_classes=10, weight=(0.5, 1.5)):
    '''A fresh torchvision model with random weights and randomised batch norms, in eval mode; ``weight`` is the range
    of the batch-norm weights (larger ones keep the activations of deep random networks alive).'''
    return copy.deepcopy(_built(name, seed, bias_free, num_classes, weight)).to(dtype)


def attribute(model, data, composite, target=3):
    '''The relevance of the input for the logit of ``target``, under ``composite``.'''
    from zennit.attribution import Gradient

    with Gradient(model, composite) as attributor:
        _, relevance = attributor(data, lambda output: output_relevance(output, target))
    return relevance


def make_input(batch=1, size=64, dtype=torch.float32, seed=1, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(
        requires_grad)


def snapshot(model):
    '''Everything that removal must restore: values, dtypes, object identities, attributes, submodules and hooks.'''
    return {
        'state': {key: (value.detach().clone(), value.dtype) for key, value in model.state_dict().items()},
        'ids': {key: id(value) for key, value in list(model.named_parameters()) + list(model.named_buffers())},
        'requires_grad': {key: value.requires_grad for key, value in model.named_parameters()},
        'modules': [(name, type(module), id(module)) for name, module in model.named_modules()],
        'attributes': {name: sorted(vars(module)) for name, module in model.named_modules()},
        'plain': {
            name: {key: value for key, value in vars(module).items() if isinstance(value, (int, float, bool, str))}
            for name, module in model.named_modules()
        },
        'hooks': {
            name: [len(getattr(module, key, {})) for key in HOOK_DICTS] for name, module in model.named_modules()
        },
        'forward': {name: 'forward' in vars(module) for name, module in model.named_modules()},
    }


def assert_untouched(model, before):
    '''Assert that ``model`` is bitwise what it was when ``before`` was taken.'''
    after = snapshot(model)
    assert after['modules'] == before['modules']
    assert after['ids'] == before['ids']
    assert after['attributes'] == before['attributes']
    assert after['plain'] == before['plain']
    assert after['hooks'] == before['hooks']
    assert after['forward'] == before['forward']
    assert after['requires_grad'] == before['requires_grad']
    assert after['state'].keys() == before['state'].keys()
    for key, (value, dtype) in before['state'].items():
        assert after['state'][key][1] == dtype, key
        assert torch.equal(after['state'][key][0], value), key


def crp_heatmap(model, data, conditions, composite, exclude_parallel):
    '''CRP conditional heatmaps.'''
    from crp.attribution import CondAttribution

    attribution = CondAttribution(model, no_param_grad=False)
    return attribution(data, conditions, composite, exclude_parallel=exclude_parallel).heatmap


def two_pass_heatmap(model, data, layer, concepts, target, composite):
    '''The two-pass difference of the seed issue: with the concepts minus with none of the layer's concepts.'''
    full = crp_heatmap(model, data, [{layer: concepts, 'y': [target]}], composite, False)
    rest = crp_heatmap(model, data, [{layer: [], 'y': [target]}], composite, False)
    return full - rest


def relevant_channel(model, data, layer, target, composite):
    '''The channel of ``layer`` with the most relevance (random networks leave many channels without any).'''
    from crp.attribution import CondAttribution

    attribution = CondAttribution(model, no_param_grad=False)
    result = attribution(data, [{'y': [target]}], composite, record_layer=[layer], exclude_parallel=False)
    return int(result.relevances[layer][0].flatten(1).sum(1).abs().argmax())


#: the seed of fresh demo images: training used seeds 0..9 and the script's test set seed 10_000
FRESH_SEED = 31_337


def accuracy(model, count, seed):
    '''The share of ``count`` freshly generated shape images (``seed``) that ``model`` classifies correctly.'''
    from canonizers.demo import make_dataset

    images, labels = make_dataset(count, seed)
    with torch.no_grad():
        predictions = model(images).argmax(1)
    return (predictions == labels).float().mean().item()


def first_per_model(cases, pinned_only=()):
    '''``cases`` (tuples that start with a model's name) as parameter sets, all but the first of each model marked
    ``once``, and every case of the models in ``pinned_only``: every zennit version runs each other model, the pinned
    one runs every layer.'''
    seen = set(pinned_only)
    marked = []
    for case in cases:
        marked.append(pytest.param(*case, marks=pytest.mark.once) if case[0] in seen else case)
        seen.add(case[0])
    return marked
