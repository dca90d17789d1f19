import pytest
import torch
from helpers import (
    assert_untouched,
    conservation_composite,
    crp_heatmap,
    make_input,
    make_model,
    output_relevance,
    relative_error,
    relevant_channel,
    snapshot,
    two_pass_heatmap,
)
from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer as ZennitResNetCanonizer

from canonizers import PerSampleCut, ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer, ResNetCanonizer

MODELS = ['resnet18', 'resnet34', 'resnet50', 'resnext50_32x4d', 'wide_resnet50_2']
TARGET = 3


def attribute(model, data, composite, target=TARGET):
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(data, lambda output: output_relevance(output, target))
    return relevance


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('cut', [None, ['layer1.0', 'layer3.*'], {'layer2.0': 'residual', 'layer4.1': 'skip'}])
def test_fidelity_and_bitwise_restore(name, cut):
    model = make_model(name)
    data = make_input(2, requires_grad=False)
    reference = model(data)
    # float32 rounding level: measured against exact (float64) arithmetic, the canonized model is within 2e-6, or no
    # further off than the original float32 model itself is (2.5e-6 on the resnet34 here)
    exact = make_model(name, dtype=torch.float64)(data.double())
    own_rounding = relative_error(reference.double(), exact)
    before = snapshot(model)
    instances = ResNetCanonizer(cut=cut).apply(model)
    canonized = model(data)
    assert relative_error(canonized.double(), exact) <= max(2e-6, 1.1 * own_rounding)
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)
    assert torch.equal(model(data), reference)


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_fidelity_float64(name):
    model = make_model(name, dtype=torch.float64)
    data = make_input(2, dtype=torch.float64, requires_grad=False)
    reference = model(data)
    with EpsilonPlusFlat(canonizers=[ResNetCanonizer(cut=['layer2.1'])]).context(model) as modified:
        assert relative_error(modified(data), reference) <= 1e-12


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_drop_in_for_zennit(name):
    # equal up to zennit's batch-norm epsilon error, which is ~1e-4 relative on the output
    model = make_model(name, dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    ours = attribute(model, data, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]))
    theirs = attribute(model, data, EpsilonPlusFlat(canonizers=[ZennitResNetCanonizer()]))
    assert relative_error(ours, theirs) < 1e-2
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.999


# (model, conditioned layer, cut): layers in residual branches cut the skip, layers in the downsample path the residual
ISOLATION_CASES = [
    ('resnet18', 'layer3.0.conv1', {'layer3.0': 'skip'}),
    ('resnet18', 'layer2.1.conv2', {'layer2.1': 'skip'}),
    ('resnet18', 'layer3.0.downsample.0', {'layer3.0': 'residual'}),
    ('resnet50', 'layer2.0.conv3', {'layer2.0': 'skip'}),
    ('resnet50', 'layer4.0.downsample.0', {'layer4.0': 'residual'}),
    ('resnext50_32x4d', 'layer3.2.conv2', {'layer3.2': 'skip'}),
]


@pytest.mark.parametrize('name, layer, cut', ISOLATION_CASES)
def test_isolation_equals_crp_exclude_parallel_and_two_pass(name, layer, cut):
    model = make_model(name, dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    plain = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    channel = relevant_channel(model, data, layer, TARGET, plain)
    conditions = [{layer: [channel], 'y': [TARGET]}]

    isolated = crp_heatmap(model, data, conditions, EpsilonPlusFlat(canonizers=[ResNetCanonizer(cut=cut)]), False)
    excluded = crp_heatmap(model, data, conditions, plain, True)
    difference = two_pass_heatmap(model, data, layer, [channel], TARGET, plain)
    leaky = crp_heatmap(model, data, conditions, plain, False)

    assert relative_error(isolated, excluded) < 1e-9
    assert relative_error(isolated, difference) < 1e-9
    # the oracle is not trivially met: without the cut the heatmap differs
    assert relative_error(leaky, excluded) > 1e-2


@pytest.mark.parametrize('name, blocks', [('resnet18', ['layer1.0', 'layer3.0', 'layer4.1']),
                                          ('resnet50', ['layer2.0', 'layer3.3'])])
def test_linearity_full_is_skip_cut_plus_residual_cut(name, blocks):
    model = make_model(name, dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    full = attribute(model, data, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]))
    for block in blocks:
        skip = attribute(model, data, EpsilonPlusFlat(canonizers=[ResNetCanonizer(cut={block: 'skip'})]))
        residual = attribute(model, data, EpsilonPlusFlat(canonizers=[ResNetCanonizer(cut={block: 'residual'})]))
        assert relative_error(skip + residual, full) < 1e-9
        assert relative_error(skip, full) > 1e-3


@pytest.mark.parametrize('name', MODELS)
def test_conservation_on_bias_free_model(name):
    model = make_model(name, bias_free=True, dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    with Gradient(model, conservation_composite([ResNetCanonizer()])) as attributor:
        output, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
    assert abs(relevance.sum().item() / output[0, TARGET].item() - 1.) < 1e-6


def test_per_sample_cuts_equal_each_sample_alone():
    model = make_model('resnet18', dtype=torch.float64)
    data = make_input(3, dtype=torch.float64)
    specs = [{'layer1.0': 'skip'}, {'layer3.1': 'residual', 'layer2.*': 'skip'}, None]
    canonizer = ResNetCanonizer(cut=PerSampleCut(specs))
    batched = attribute(model, data, EpsilonPlusFlat(canonizers=[canonizer]))
    for index, spec in enumerate(specs):
        alone = attribute(model, data[index:index + 1].detach().requires_grad_(),
                          EpsilonPlusFlat(canonizers=[ResNetCanonizer(cut=spec)]))
        assert relative_error(batched[index:index + 1], alone) < 1e-12


def test_per_sample_cut_needs_one_spec_per_sample():
    model = make_model('resnet18')
    canonizer = ResNetCanonizer(cut=PerSampleCut([['layer1.0'], None]))
    with pytest.raises(ValueError, match='one cut per sample'):
        attribute(model, make_input(3), EpsilonPlusFlat(canonizers=[canonizer]))


def test_cut_can_change_while_registered():
    model = make_model('resnet18', dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    expected = attribute(model, data, EpsilonPlusFlat(canonizers=[ResNetCanonizer(cut={'layer2.0': 'residual'})]))
    canonizer = ResNetCanonizer()
    composite = EpsilonPlusFlat(canonizers=[canonizer])
    with Gradient(model, composite) as attributor:
        _, uncut = attributor(data, lambda output: output_relevance(output, TARGET))
        canonizer.cut = {'layer2.0': 'residual'}
        _, changed = attributor(data, lambda output: output_relevance(output, TARGET))
        assert canonizer.cut == {'layer2.0': 'residual'}
        with pytest.raises(ValueError, match='layer9'):
            canonizer.cut = ['layer9.0']
        # a refused cut changes nothing
        _, still = attributor(data, lambda output: output_relevance(output, TARGET))
    assert relative_error(changed, expected) < 1e-12
    assert torch.equal(still, changed)
    assert relative_error(uncut, expected) > 1e-3


def test_block_level_canonizers_rewrite_only_their_blocks():
    model = make_model('resnet50')
    instances = ResNetBasicBlockCanonizer().apply(model)
    assert instances == []
    instances = ResNetBottleneckCanonizer(cut=['layer1.0']).apply(model)
    assert len(instances) == 16
    assert model.layer1[0].canonizer_sum.mask is not None
    for instance in instances:
        instance.remove()


@pytest.mark.parametrize('attributor_type, kwargs', [
    (Gradient, {}),
    (SmoothGrad, {'noise_level': 0.1, 'n_iter': 3}),
    (IntegratedGradients, {'n_iter': 3}),
])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_works_with_zennit_attributors(attributor_type, kwargs, dtype):
    model = make_model('resnet18', dtype=dtype)
    data = make_input(dtype=dtype)
    results = []
    for cut in (None, {'layer4.1': 'skip'}):
        composite = EpsilonGammaBox(low=-3., high=3., canonizers=[ResNetCanonizer(cut=cut)])
        torch.manual_seed(0)
        with attributor_type(model, composite, **kwargs) as attributor:
            _, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
        assert relevance.dtype == dtype and torch.isfinite(relevance).all()
        results.append(relevance)
    assert not torch.allclose(*results)


def test_params_requiring_grad_and_gamma_rules():
    # zennit 0.4.6 swaps parameters by setattr and needs them to stay Parameters, also the added bias
    torch.manual_seed(0)
    model = make_model('resnet18').requires_grad_(True)
    before = snapshot(model)
    data = make_input()
    composite = EpsilonGammaBox(low=-3., high=3., canonizers=[ResNetCanonizer(cut=['layer1.*'])])
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
    assert torch.isfinite(relevance).all()
    assert_untouched(model, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda():
    model = make_model('resnet18', dtype=torch.float64).cuda()
    data = make_input(2, dtype=torch.float64).detach().cuda().requires_grad_()
    cpu = make_model('resnet18', dtype=torch.float64)
    cut = PerSampleCut([['layer2.0'], {'layer3.0': 'residual'}])
    on_gpu = attribute(model, data, EpsilonPlusFlat(canonizers=[ResNetCanonizer(cut=cut)]))
    data_cpu = data.detach().cpu().requires_grad_()
    on_cpu = attribute(cpu, data_cpu, EpsilonPlusFlat(canonizers=[ResNetCanonizer(cut=cut)]))
    assert relative_error(on_gpu.cpu(), on_cpu) < 1e-10
