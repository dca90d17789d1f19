import random

import pytest
import torch
import torchvision.models.densenet as tv_densenet
from helpers import (
    assert_untouched,
    attribute,
    conservation_composite,
    crp_heatmap,
    make_input,
    make_model,
    output_relevance,
    randomize_batch_norms,
    relative_error,
    relevant_channel,
    snapshot,
)
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.types import Activation

from canonizers import (
    DenseNetCanonizer,
    ExactMergeBatchNorm,
    LinearMerge,
    PerSampleCut,
    ThresholdReLU,
)
from canonizers.families.densenet import densenet_merges
from canonizers.registry import families_for

TARGET = 3
LAYER = 'features.denseblock2.denselayer3'


def signed_model(name, dtype=torch.float32, bias_free=False):
    '''A model whose batch norms scale some channels by negative factors and some by 0 (make_model's are all
    positive), so that all three cases of the threshold ReLU are exercised.'''
    model = make_model(name, dtype=dtype, bias_free=bias_free)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                draw = torch.rand(module.num_features, generator=generator)
                sign = torch.where(draw < 0.4, -1., 1.).masked_fill(draw > 0.9, 0.)
                module.weight.mul_(sign.to(module.weight))
    return model


def assert_batch_norms_are_identities(model):
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            data = torch.randn(2, module.num_features, 3, 3, generator=generator, dtype=torch.float64).to(
                module.weight)
            assert torch.equal(module(data), data), name


# --- fidelity and restoring ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('name, cut, memory_efficient', [
    ('densenet121', None, False),
    ('densenet121', {'features.denseblock1': 'residual', 'features.denseblock3.*': 'skip', LAYER: 'residual'}, False),
    ('densenet121', None, True),
    ('densenet169', ['features.denseblock4'], False),
])
def test_fidelity_and_bitwise_restore(name, cut, memory_efficient):
    model = signed_model(name)
    for module in model.modules():
        if isinstance(module, tv_densenet._DenseLayer):
            module.memory_efficient = memory_efficient
    data = make_input(2, requires_grad=False)
    reference = model(data)
    before = snapshot(model)

    instances = DenseNetCanonizer(cut=cut).apply(model)
    canonized = model(data)
    assert_batch_norms_are_identities(model)
    # added modules follow the model's mode
    assert not any(module.training for module in model.modules())
    assert sum(isinstance(module, ThresholdReLU) for module in model.modules()) == sum(
        isinstance(module, (tv_densenet._DenseLayer, tv_densenet._Transition)) for module in model.modules()) + 1
    assert relative_error(canonized, reference) <= 1e-5

    random.Random(len(instances)).shuffle(instances)
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)
    # the forwards are the class methods again
    assert not any('forward' in vars(module) for module in model.modules())
    assert torch.equal(model(data), reference)


@pytest.mark.parametrize('seed', [0, 1])
def test_removal_in_reverse_and_random_order(seed):
    model = make_model('densenet121')
    before = snapshot(model)
    instances = DenseNetCanonizer(cut=[LAYER]).apply(model)
    order = list(reversed(instances)) if seed == 0 else random.Random(seed).sample(instances, len(instances))
    for instance in order:
        instance.remove()
    assert_untouched(model, before)


def test_fidelity_float64():
    model = signed_model('densenet121', dtype=torch.float64)
    data = make_input(2, dtype=torch.float64, requires_grad=False)
    reference = model(data)
    with EpsilonPlusFlat(canonizers=[DenseNetCanonizer(cut=[LAYER])]).context(model) as modified:
        assert relative_error(modified(data), reference) <= 1e-10


def test_memory_efficient_model_never_checkpoints(monkeypatch):
    model = make_model('densenet121', dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    expected = attribute(model, data, EpsilonPlusFlat(canonizers=[DenseNetCanonizer(cut=[LAYER])]))
    for module in model.modules():
        if isinstance(module, tv_densenet._DenseLayer):
            module.memory_efficient = True

    def checkpoint(*args, **kwargs):
        raise AssertionError('checkpointing runs the layers, and the hooks on them, twice')

    monkeypatch.setattr(tv_densenet.cp, 'checkpoint', checkpoint)
    with pytest.raises(AssertionError, match='checkpointing'):
        model(data)
    relevance = attribute(model, data, EpsilonPlusFlat(canonizers=[DenseNetCanonizer(cut=[LAYER])]))
    assert torch.equal(relevance, expected)


# --- the threshold ReLU and merging across it ----------------------------------------------------------------------
def test_threshold_relu_splits_relu_of_an_affine_map():
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.5, -0.7, 0., 0., 2.], dtype=torch.float64)
    shift = torch.tensor([0.3, 0.4, 0.5, -0.5, -1.], dtype=torch.float64)
    data = torch.randn(4, 5, 6, 6, generator=generator, dtype=torch.float64)
    from canonizers.core.merging import threshold_relu
    module, factor, offset = threshold_relu(scale, shift, data)
    shape = (-1, 1, 1)
    expected = torch.relu(data * scale.reshape(shape) + shift.reshape(shape))
    assert torch.allclose(module(data) * factor.reshape(shape) + offset.reshape(shape), expected, atol=1e-14)
    # a channel with scale 0 is constant: the shift carries ReLU(b), the following weight gets factor 0
    assert factor[2:4].tolist() == [0., 0.] and offset[2:4].tolist() == [0.5, 0.]
    assert module.direction.tolist() == [1., -1., 1., 1., 1.]
    assert torch.equal(module.threshold, torch.cat([-shift[:2] / scale[:2], torch.zeros(2), -shift[4:] / scale[4:]]))
    # the threshold ReLU returns x or t bitwise
    assert bool(((module(data) == data) | (module(data) == module.threshold.reshape(shape))).all())
    # one-sided where no channel keeps the values below its threshold
    assert ThresholdReLU(torch.zeros(3), torch.tensor([1., 0., 1.])).upper is None


def test_threshold_relu_is_an_activation_for_zennit_composites():
    module = ThresholdReLU(torch.zeros(3), torch.ones(3))
    assert isinstance(module, Activation)
    data = -torch.rand(1, 3, 2, 2).requires_grad_()
    # composites attach Pass to activations: relevance passes even where the threshold cuts the gradient
    with EpsilonPlusFlat().context(torch.nn.Sequential(module)) as modified:
        gradient, = torch.autograd.grad(modified(data).sum(), data)
    assert torch.equal(gradient, torch.ones_like(data))
    plain, = torch.autograd.grad(module(data).sum(), data)
    assert torch.equal(plain, torch.zeros_like(data))


@pytest.mark.parametrize('layer, shape', [
    (torch.nn.Linear(6, 5), (3, 6)),
    (torch.nn.Conv2d(6, 10, 1, groups=2, bias=False), (3, 6, 5, 5)),
    (torch.nn.Conv2d(6, 4, 3, stride=2), (3, 6, 7, 7)),
])
def test_merge_across_relu_into_any_unpadded_linear_layer(layer, shape):
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(6) if len(shape) == 4 else torch.nn.BatchNorm1d(6)
    after = type(norm)(layer.weight.shape[0])
    model = torch.nn.Sequential(norm, torch.nn.ReLU(), layer, after).double()
    randomize_batch_norms(model)
    with torch.no_grad():
        norm.weight.mul_(torch.tensor([1., -1., 0., 1., 0., -1.], dtype=torch.float64))
    data = torch.randn(*shape, dtype=torch.float64)
    reference = model(data)
    before = snapshot(model)
    merges = [LinearMerge(model[2], before=model[0], relu=(model, '1'), after=model[3])]
    instances = ExactMergeBatchNorm(lambda root: merges).apply(model)
    assert isinstance(model[1], ThresholdReLU)
    assert relative_error(model(data), reference) < 1e-13
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)


def test_zennit_pairs_mismatched_layers_ours_never():
    # the crash of the issue: zennit pairs a dense layer's conv2 with the next layer's norm1 (and leaves the model
    # half merged)
    with pytest.raises(RuntimeError, match='must match the size'):
        SequentialMergeBatchNorm().apply(make_model('densenet121'))
    model = make_model('densenet121')
    before = snapshot(model)
    merges = densenet_merges(model)
    assert len(merges) == 58 + 3 + 1
    for merge in merges:
        assert merge.after is None or merge.after.num_features == merge.linear.out_channels
        assert merge.before is None or merge.before.num_features == merge.linear.in_channels
    layer = model.features.denseblock1.denselayer1
    following = model.features.denseblock1.denselayer2
    bad = [
        (LinearMerge(layer.conv2, before=following.norm1, relu=(following, 'relu1')), 'numbers of channels differ'),
        (LinearMerge(layer.conv2, after=following.norm1), 'numbers of channels differ'),
        # conv2 is padded: merging norm2 into it across relu2 would not be exact at the borders
        (LinearMerge(layer.conv2, before=layer.norm2, relu=(layer, 'relu2')), 'pads its input'),
        (LinearMerge(layer.conv1, before=layer.norm1, relu=(layer, 'norm1')), 'expected a ReLU'),
    ]
    for merge, message in bad:
        with pytest.raises(ValueError, match=message):
            ExactMergeBatchNorm(lambda root, merge=merge: [merge]).apply(model)
    assert_untouched(model, before)


# --- relevance -------------------------------------------------------------------------------------------------------
def test_conservation_on_bias_free_model():
    model = signed_model('densenet121', dtype=torch.float64, bias_free=True)
    data = make_input(dtype=torch.float64)
    ratios = []
    for canonizers in ([DenseNetCanonizer()], []):
        with Gradient(model, conservation_composite(canonizers)) as attributor:
            output, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
        ratios.append(relevance.sum().item() / output[0, TARGET].item())
    ours, zennit_alone = ratios
    assert abs(ours - 1.) < 1e-6
    # without it, batch norms after concatenations scale relevance
    assert abs(zennit_alone - 1.) > 1.


def cut_for(model, layer):
    return DenseNetCanonizer().layer_cuts(model, [layer])


def test_transition_needs_no_cut():
    model = make_model('densenet121', dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    layer = 'features.transition2.conv'
    assert cut_for(model, layer) == {}
    plain = EpsilonPlusFlat(canonizers=[DenseNetCanonizer()])
    channel = relevant_channel(model, data, layer, TARGET, plain)
    conditions = [{layer: [channel], 'y': [TARGET]}]
    excluded = crp_heatmap(model, data, conditions, plain, True)
    assert relative_error(crp_heatmap(model, data, conditions, plain, False), excluded) < 1e-9


def test_layer_cuts():
    model = make_model('densenet121')
    canonizer = DenseNetCanonizer()
    assert canonizer.layer_cuts(model, [f'{LAYER}.norm1', 'features.denseblock4.denselayer2.conv2']) == {
        LAYER: 'skip', 'features.denseblock4.denselayer2': 'skip'}
    assert canonizer.layer_cuts(model, [LAYER, f'{LAYER}.conv1']) == {LAYER: 'skip'}
    # on the only path: transitions, the stem, the block outputs and the head need no cut
    assert canonizer.layer_cuts(
        model, ['features.transition1.conv', 'features.conv0', 'features.denseblock2', 'classifier']) == {}
    with pytest.raises(ValueError, match='closest'):
        canonizer.layer_cuts(model, ['features.denseblock2.denselayer3.conv3'])


def test_nothing_cut_costs_nothing():
    model = make_model('densenet121')
    data = make_input()
    with EpsilonPlusFlat(canonizers=[DenseNetCanonizer(cut=[LAYER])]).context(model) as modified:
        masks = {name: module.canonizer_masks.masks for name, module in model.named_modules()
                 if isinstance(module, tv_densenet._DenseBlock)}
        assert all(mask is None for name, block in masks.items() if name != 'features.denseblock2' for mask in block)
        # layers 1 to 3 take in nothing that the skip of layer 3 cuts
        assert masks['features.denseblock2'][:3] == [None] * 3
        assert all(mask is not None for mask in masks['features.denseblock2'][3:])
    with EpsilonPlusFlat(canonizers=[DenseNetCanonizer()]).context(model) as modified:
        output = modified(data)
    nodes, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    assert not any('GradientMask' in type(node).__name__ for node in nodes)


def test_works_with_gamma_rules_and_parameters_requiring_grad():
    # zennit 0.4.6 swaps parameters by setattr and needs them to stay Parameters, also the added biases
    model = make_model('densenet121').requires_grad_(True)
    before = snapshot(model)
    composite = EpsilonGammaBox(low=-3., high=3., canonizers=[DenseNetCanonizer(cut=['features.denseblock2.*'])])
    relevance = attribute(model, make_input(), composite)
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert_untouched(model, before)


# --- bad input ---------------------------------------------------------------------------------------------------
BAD_CUTS = [
    (['features.denseblock5'], ValueError,
     r"'features\.denseblock5' is not a module of this model; closest block names: 'features\.denseblock[1-4]'"),
    ([f'{LAYER}.conv1'], ValueError, r"'features\.denseblock2\.denselayer3\.conv1' is a layer inside block "
                                     r"'features\.denseblock2\.denselayer3'"),
    (['features.transition1'], ValueError, r"'features\.transition1' is a transition between dense blocks"),
    (['features.norm5'], ValueError, r"'features\.norm5' is not a cuttable block; closest block names"),
    ([''], ValueError, 'is the DenseNet itself'),
    (['features.denseblock9.*'], ValueError, r"pattern 'features\.denseblock9\.\*' matches no cuttable block"),
    ({'features.denseblock1': 'shortcut'}, ValueError, "branch 'shortcut' for 'features.denseblock1' is not valid"),
    (PerSampleCut([None, ['features.transition3.conv']]), ValueError, r"'features\.transition3\.conv' is not a "),
]


@pytest.mark.parametrize('cut, error, message', BAD_CUTS)
def test_bad_cut_is_refused_and_model_untouched(cut, error, message):
    model = make_model('densenet121')
    before = snapshot(model)
    with pytest.raises(error, match=message):
        DenseNetCanonizer(cut=cut).apply(model)
    with pytest.raises(error, match=message):
        with EpsilonPlusFlat(canonizers=[DenseNetCanonizer(cut=cut)]).context(model):
            pass
    assert_untouched(model, before)


def test_is_the_family_for_densenets_only():
    assert [type(family) for family in families_for(make_model('densenet121'))] == [DenseNetCanonizer]
    assert DenseNetCanonizer not in [type(family) for family in families_for(make_model('resnet18'))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda():
    model = make_model('densenet121', dtype=torch.float64).cuda()
    data = make_input(2, dtype=torch.float64).detach().cuda().requires_grad_()
    cpu = make_model('densenet121', dtype=torch.float64)
    cut = PerSampleCut([[LAYER], {'features.denseblock3': 'residual'}])
    on_gpu = attribute(model, data, EpsilonPlusFlat(canonizers=[DenseNetCanonizer(cut=cut)]))
    on_cpu = attribute(cpu, data.detach().cpu().requires_grad_(),
                       EpsilonPlusFlat(canonizers=[DenseNetCanonizer(cut=cut)]))
    assert relative_error(on_gpu.cpu(), on_cpu) < 1e-10


def test_threshold_relu_gradient_at_a_tie_is_the_relu_gradient():
    # ReLU(a * x + b) has gradient 0 where a * x + b = 0; g must send none into x at x = t either
    relu = ThresholdReLU(torch.tensor([0.5, -1.0]), torch.tensor([1.0, -1.0]))
    data = torch.tensor([[0.5, -1.0], [1.0, -2.0]]).reshape(2, 2, 1, 1).requires_grad_()
    relu(data).sum().backward()
    assert torch.equal(data.grad.flatten(), torch.tensor([0., 0., 1., 1.]))
