'''EfficientNet and MobileNet canonizers: residual sums, constant squeeze-and-excitation gates, exact merging, cuts.'''
import random

import pytest
import torch
import torchvision
from helpers import (
    assert_untouched,
    attribute,
    conservation_composite,
    crp_heatmap,
    make_input,
    make_model,
    output_relevance,
    relative_error,
    relevant_channel,
    snapshot,
)
from torchvision.ops.misc import SqueezeExcitation
from zennit.attribution import Gradient, IntegratedGradients
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
from zennit.types import BatchNorm

from canonizers import (
    EfficientNetCanonizer,
    ExactMergeBatchNorm,
    MBConvCanonizer,
    MobileNetCanonizer,
    MobileNetV2InvertedResidualCanonizer,
    MobileNetV3InvertedResidualCanonizer,
    PerSampleCut,
    SqueezeExcitationCanonizer,
)
from canonizers.core.family import FamilyCanonizer
from canonizers.core.masked_sum import MaskedSum
from canonizers.registry import families_for

TARGET = 3

# batch-norm weights per model that keep the activations of the random networks from vanishing or exploding (logits
# of order 1 to 100 on the test input): with vanishing activations, the epsilon of the LRP rules would dominate
MODELS = {
    'efficientnet_b0': (EfficientNetCanonizer, (2.5, 4.)),
    'efficientnet_v2_s': (EfficientNetCanonizer, (1., 2.)),
    'mobilenet_v2': (MobileNetCanonizer, (2., 4.)),
    'mobilenet_v3_small': (MobileNetCanonizer, (2., 4.)),
}
# a cut for each model that exercises names, patterns and both branches
CUTS = {
    'efficientnet_b0': {'features.3.1': 'skip', 'features.6.*': 'residual'},
    'efficientnet_v2_s': {'features.1.0': 'skip', 'features.5.*': 'skip', 'features.2.2': 'residual'},
    'mobilenet_v2': {'features.3': 'residual', 'features.1?': 'skip'},
    'mobilenet_v3_small': {'features.5': 'skip', 'features.1?': 'residual'},
}


def make_lively_model(name, dtype=torch.float64, bias_free=False):
    '''A fresh torchvision model with random weights and randomised batch norms that keep activations alive.'''
    return make_model(name, dtype=dtype, bias_free=bias_free, weight=MODELS[name][1])


def canonizer(name, cut=None):
    return MODELS[name][0](cut=cut)


def residual_blocks(model):
    return {name: module for name, module in model.named_modules() if getattr(module, 'use_res_connect', None)}


# --- fidelity, exact merging and bitwise restore ---------------------------------------------------------------------
# every removal order on the smaller models; the largest one takes a shuffled order only, to save time
@pytest.mark.parametrize('name, order', [
    (name, order) for name in MODELS for order in ('forward', 'reverse', 'shuffled')
    if name != 'efficientnet_v2_s' or order == 'shuffled'
])
def test_fidelity_merging_and_bitwise_restore(name, order):
    # the standard randomisation of the test suite: on the lively models, the float32 efficientnet_v2_s itself is off
    # from exact arithmetic by up to 1.4e-5, so no float32 computation could be held to 1e-5 there; here the float32
    # originals are within 9e-7 of it, the canonized models within 1.5e-6 (measured at 1 and 2 threads and with other
    # CPU kernels). Float32 rounding level: within 1e-5, or 4x the original's own rounding error where that is larger;
    # exactness itself is proven in float64 below
    model = make_model(name)
    data = make_input(2, requires_grad=False)
    reference = model(data)
    exact = make_model(name, dtype=torch.float64)(data.double())
    own = relative_error(reference.double(), exact)
    batch_norms = {key: module for key, module in model.named_modules() if isinstance(module, BatchNorm)}
    before = snapshot(model)

    instances = canonizer(name, CUTS[name]).apply(model)
    canonized = model(data)
    assert relative_error(canonized.double(), exact) <= max(1e-5, 4 * own)
    assert relative_error(canonized, reference) <= max(1e-5, 5 * own)

    # every batch norm is the exact identity while registered, also those outside a Conv2dNormActivation
    for key, batch_norm in batch_norms.items():
        probe = torch.randn(2, batch_norm.num_features, 3, 3)
        assert torch.equal(batch_norm(probe), probe), key
    if name == 'mobilenet_v2':
        assert isinstance(model.features[3].conv[3], torch.nn.BatchNorm2d)
        assert 'features.3.conv.3' in batch_norms

    # blocks with a residual connection add through a masked sum, blocks without one are left alone
    residual = residual_blocks(model)
    blocks = [(key, module) for key, module in model.named_modules() if hasattr(module, 'use_res_connect')]
    assert residual and len(residual) < len(blocks)
    for key, module in blocks:
        assert ('forward' in vars(module)) == (key in residual), key
        assert isinstance(getattr(module, 'canonizer_sum', None), MaskedSum) == (key in residual), key
    for key, module in model.named_modules():
        if isinstance(module, SqueezeExcitation):
            assert 'forward' in vars(module) and 'canonizer_gate' in module._modules, key

    if order == 'reverse':
        instances = instances[::-1]
    elif order == 'shuffled':
        random.Random(0).shuffle(instances)
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)
    assert torch.equal(model(data), reference)


@pytest.mark.parametrize('name', MODELS)
def test_fidelity_float64_inside_a_composite(name):
    model = make_lively_model(name)
    data = make_input(2, dtype=torch.float64, requires_grad=False)
    reference = model(data)
    before = snapshot(model)
    with EpsilonPlusFlat(canonizers=[canonizer(name, CUTS[name])]).context(model) as modified:
        assert relative_error(modified(data), reference) <= 1e-10
    assert_untouched(model, before)


def test_stochastic_depth_as_in_eval_mode():
    model = make_lively_model('efficientnet_b0', dtype=torch.float32)
    data = make_input(4, requires_grad=False)
    instances = EfficientNetCanonizer().apply(model)
    expected = model(data)
    depths = [module for module in model.modules() if isinstance(module, torchvision.ops.StochasticDepth)]
    assert any(depth.p > 0 for depth in depths)
    for depth in depths:
        depth.train()
    torch.manual_seed(0)
    assert torch.equal(model(data), expected)
    for instance in instances:
        instance.remove()


# --- the squeeze-and-excitation gate ---------------------------------------------------------------------------------
def squeeze_excitation(gate):
    torch.manual_seed(0)
    module = SqueezeExcitation(16, 8, activation=torch.nn.SiLU, scale_activation=gate).double().eval()
    with torch.no_grad():
        # a wide spread of gate values: the hard sigmoid saturates at 0 and 1 in some channels
        module.fc2.weight.mul_(4.)
        module.fc2.bias.copy_(torch.linspace(-6., 6., 16))
    return module


@pytest.mark.parametrize('gate', [torch.nn.Sigmoid, torch.nn.Hardsigmoid])
def test_gate_is_a_constant_for_the_plain_gradient(gate):
    module = squeeze_excitation(gate)
    data = torch.randn(3, 16, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad_output = torch.randn(3, 16, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    reference = module(data)
    scale = module._scale(data)
    if gate is torch.nn.Hardsigmoid:
        assert (scale == 0).any() and (scale == 1).any()
    input = data.clone().requires_grad_()
    true_gradient, = torch.autograd.grad(module(input), input, grad_output)

    before = snapshot(module)
    instances = SqueezeExcitationCanonizer().apply(module)
    gate_outputs = []
    handle = module.fc1.register_forward_hook(lambda _, __, output: gate_outputs.append(output))
    output = module(input)
    handle.remove()
    assert torch.equal(output, reference)
    gradient, into_gate = torch.autograd.grad(output, [input, gate_outputs[0]], grad_output, allow_unused=True)
    assert torch.equal(gradient, scale * grad_output)
    assert into_gate is None
    # the gate branch does contribute to the true gradient: the test above is not trivially met
    assert relative_error(gradient, true_gradient) > 1e-2
    for instance in instances:
        instance.remove()
    assert_untouched(module, before)


@pytest.mark.parametrize('gate', [torch.nn.Sigmoid, torch.nn.Hardsigmoid])
@pytest.mark.parametrize('make_composite', [
    lambda canonizers: EpsilonPlusFlat(canonizers=canonizers),
    lambda canonizers: EpsilonGammaBox(low=-3., high=3., canonizers=canonizers),
    lambda canonizers: EpsilonAlpha2Beta1(canonizers=canonizers),
    conservation_composite,
], ids=['EpsilonPlusFlat', 'EpsilonGammaBox', 'EpsilonAlpha2Beta1', 'conservation'])
def test_gate_passes_relevance_unchanged_under_composites(gate, make_composite):
    # LRP of y = s * x with a constant gate s: R_x = x * s * R_y / (x * s) = R_y, and nothing for the gate branch
    module = squeeze_excitation(gate)
    data = torch.randn(3, 16, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    relevance = torch.randn(3, 16, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = snapshot(module)
    input = data.clone().requires_grad_()
    with make_composite([SqueezeExcitationCanonizer()]).context(module) as modified:
        output = modified(input)
        assert torch.equal(output, squeeze_excitation(gate)(data))
        passed, = torch.autograd.grad(output, input, relevance)
    assert torch.equal(passed, relevance)
    assert_untouched(module, before)

    # without the canonizer, zennit scales the relevance by the gate and sends more into the gate branch
    with make_composite([]).context(module) as modified:
        scaled, = torch.autograd.grad(modified(input), input, relevance)
    assert relative_error(scaled, relevance) > 1e-2


# --- conservation -----------------------------------------------------------------------------------------------------
def conservation_error(model, canonizers, data):
    with Gradient(model, conservation_composite(canonizers)) as attributor:
        output, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
    # the activations are alive: the negligible epsilon of the rules plays no role
    assert output[0].abs().max() > 1e-2
    return abs(relevance.sum().item() / output[0, TARGET].item() - 1.)


@pytest.mark.parametrize('parts', [
    lambda: [ExactMergeBatchNorm(), MBConvCanonizer()],
    lambda: [ExactMergeBatchNorm(), SqueezeExcitationCanonizer()],
], ids=['without-gates', 'without-residual-sums'])
def test_conservation_needs_every_part(parts):
    model = make_lively_model('efficientnet_b0', bias_free=True)
    data = make_input(dtype=torch.float64)
    assert conservation_error(model, [FamilyCanonizer(parts=parts())], data) > 1e-2


# --- cuts: isolation, linearity, layers outside residual blocks ------------------------------------------------------


# (model, layer in a block without residual connection)
NO_CUT_CASES = [
    ('efficientnet_b0', 'features.2.0.block.1.0'),
    ('mobilenet_v2', 'features.4.conv.1.0'),
    ('mobilenet_v3_small', 'features.4.block.0.0'),
]


@pytest.mark.parametrize('name, layer', NO_CUT_CASES)
def test_layer_in_block_without_residual_needs_no_cut(name, layer):
    model = make_lively_model(name)
    data = make_input(dtype=torch.float64)
    plain = EpsilonPlusFlat(canonizers=[canonizer(name)])
    assert canonizer(name).layer_cuts(model, [layer]) == {}
    channel = relevant_channel(model, data, layer, TARGET, plain)
    conditions = [{layer: [channel], 'y': [TARGET]}]
    heatmap = crp_heatmap(model, data, conditions, plain, False)
    assert heatmap.abs().max() > 0
    assert relative_error(heatmap, crp_heatmap(model, data, conditions, plain, True)) < 1e-9


def test_layer_cuts():
    model = make_lively_model('efficientnet_b0', dtype=torch.float32)
    family = EfficientNetCanonizer()
    assert family.layer_cuts(model, ['features.2.1.block.0.0', 'features.2.1.block.3.1']) == {'features.2.1': 'skip'}
    # layers of a gate receive no relevance by construction: a condition on them is refused with the reason
    with pytest.raises(ValueError, match=r"features\.4\.2\.block\.2\.fc1 computes the gate .* no relevance flows"):
        family.layer_cuts(model, ['features.4.2.block.2.fc1'])
    assert family.layer_cuts(model, ['features.4.2.block.2']) == {'features.4.2': 'skip'}
    assert family.layer_cuts(model, ['features.2.0.block.0.0', 'features.2.1', 'features.0.0']) == {}
    model = make_lively_model('mobilenet_v2', dtype=torch.float32)
    assert MobileNetCanonizer().layer_cuts(model, ['features.3.conv.2', 'features.4.conv.2']) == {'features.3': 'skip'}


# --- zennit interplay -------------------------------------------------------------------------------------------------
def test_families_are_told_apart():
    # both families treat squeeze-and-excitation gates, which must not make EfficientNet claim MobileNetV3
    for name, (family, _) in MODELS.items():
        assert [type(part) for part in families_for(make_lively_model(name))] == [family], name


def test_block_level_canonizers_rewrite_only_their_blocks():
    model = make_lively_model('mobilenet_v3_small', dtype=torch.float32)
    before = snapshot(model)
    assert MobileNetV2InvertedResidualCanonizer().apply(model) == []
    assert MBConvCanonizer().apply(model) == []
    instances = MobileNetV3InvertedResidualCanonizer(cut=['features.3']).apply(model)
    assert len(instances) == 11
    assert model.features[3].canonizer_sum.mask is not None and model.features[5].canonizer_sum.mask is None
    assert sum(isinstance(module, MaskedSum) for module in model.modules()) == 6
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)


@pytest.mark.parametrize('name', ['efficientnet_b0', 'mobilenet_v3_small'])
def test_params_requiring_grad_gamma_rules_and_attributors(name):
    # zennit 0.4.6 swaps parameters by setattr and needs them to stay Parameters, also the added biases
    model = make_lively_model(name, dtype=torch.float32).requires_grad_(True)
    before = snapshot(model)
    data = make_input()
    results = []
    for cut in (None, CUTS[name]):
        composite = EpsilonGammaBox(low=-3., high=3., canonizers=[canonizer(name, cut)])
        with IntegratedGradients(model, composite, n_iter=2) as attributor:
            _, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
        assert relevance.dtype == torch.float32 and torch.isfinite(relevance).all()
        results.append(relevance)
    assert not torch.allclose(*results)
    assert_untouched(model, before)


# --- bad input ------------------------------------------------------------------------------------------------------
BAD_CUTS = [
    ('efficientnet_b0', ['features.2.0'], ValueError,
     r"block 'features\.2\.0' \(MBConv\) has no residual connection"),
    ('efficientnet_b0', PerSampleCut([None, {'features.4.0': 'residual'}]), ValueError,
     r"'features\.4\.0' .*has no residual connection"),
    ('efficientnet_b0', ['features.2.1.block.0.0'], ValueError, r"is a layer inside block 'features\.2\.1'"),
    ('efficientnet_b0', ['features.2.0.block.2.fc1'], ValueError,
     r"'features\.2\.0\.block\.2\.fc1' is a layer inside block 'features\.2\.0', which has no residual connection"),
    ('efficientnet_b0', ['features.4.2.block.2'], ValueError, r"is a layer inside block 'features\.4\.2'"),
    ('efficientnet_b0', ['features.9.*'], ValueError, r"pattern 'features\.9\.\*' matches no cuttable block"),
    ('efficientnet_b0', ['features.1.*'], ValueError, r"pattern 'features\.1\.\*' matches no cuttable block"),
    ('efficientnet_b0', {'features.2.1': 'gate'}, ValueError, r"branch 'gate' for 'features\.2\.1' is not valid"),
    ('efficientnet_v2_s', ['features.3.0'], ValueError,
     r"block 'features\.3\.0' \(FusedMBConv\) has no residual connection"),
    ('mobilenet_v2', ['features.2'], ValueError, r"block 'features\.2' \(InvertedResidual\) has no residual"),
    ('mobilenet_v2', ['features.3.conv.3'], ValueError, r"is a layer inside block 'features\.3'"),
    ('mobilenet_v3_small', ['features.9'], ValueError, r"block 'features\.9' \(InvertedResidual\) has no residual"),
    ('mobilenet_v3_small', ['features.12'], ValueError, r"'features\.12' is not a cuttable block; closest block"),
    ('mobilenet_v3_small', [5], TypeError, 'must be strings'),
]


@pytest.mark.parametrize('name, cut, error, message', BAD_CUTS)
def test_bad_cut_is_refused_and_model_untouched(name, cut, error, message):
    model = make_lively_model(name, dtype=torch.float32)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        canonizer(name, cut).apply(model)
    assert_untouched(model, before)
    # also when given inside a composite
    composite = None
    with pytest.raises(error, match=message):
        composite = EpsilonPlusFlat(canonizers=[canonizer(name, cut)])
        with composite.context(model):
            pass
    if composite is not None:
        composite.remove()
    assert_untouched(model, before)


@pytest.mark.parametrize('name, first', [
    ('efficientnet_b0', EfficientNetCanonizer),
    ('efficientnet_b0', SqueezeExcitationCanonizer),
    ('mobilenet_v3_small', MobileNetCanonizer),
    ('mobilenet_v3_small', SqueezeExcitationCanonizer),
    ('mobilenet_v3_small', EfficientNetCanonizer),
    ('mobilenet_v2', MobileNetCanonizer),
])
def test_nested_application_is_refused(name, first):
    model = make_lively_model(name, dtype=torch.float32)
    instances = first().apply(model)
    registered = snapshot(model)
    with pytest.raises(RuntimeError, match='still registered'):
        canonizer(name).apply(model)
    assert_untouched(model, registered)
    for instance in instances:
        instance.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('name', ['efficientnet_b0', 'mobilenet_v3_small'])
def test_cuda(name):
    cut = PerSampleCut([CUTS[name], None])
    data = make_input(2, dtype=torch.float64)
    on_cpu = attribute(make_lively_model(name), data, EpsilonPlusFlat(canonizers=[canonizer(name, cut)]))
    model = make_lively_model(name).cuda()
    on_gpu = attribute(model, data.detach().cuda().requires_grad_(), EpsilonPlusFlat(canonizers=[canonizer(name, cut)]))
    assert relative_error(on_gpu.cpu(), on_cpu) < 1e-10
