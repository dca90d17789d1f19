import pytest
import torch
from helpers import (
    assert_untouched,
    attribute,
    make_input,
    make_model,
    output_relevance,
    relative_error,
    snapshot,
)
from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer as ZennitResNetCanonizer

from canonizers import PerSampleCut, ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer, ResNetCanonizer

# the ResNet variants beyond the contract suite's resnet18 and resnet50: deeper, grouped and wide
MODELS = ['resnet34', 'resnext50_32x4d', 'wide_resnet50_2']
TARGET = 3


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('cut', [None, ['layer1.0', 'layer3.*'], {'layer2.0': 'residual', 'layer4.1': 'skip'}])
def test_fidelity_and_bitwise_restore(name, cut):
    model = make_model(name)
    data = make_input(2, requires_grad=False)
    reference = model(data)
    # float32 rounding level against exact (float64) arithmetic (exactness itself: the float64 test below): within
    # 2e-6, or 4x the original's own rounding error where that is larger. The canonized model is another float32
    # computation of the same function, its error another draw of the same rounding (measured at 1 and 2 threads and
    # with other CPU kernels: 0.6x to 2x the original's). The float32 resnet34 itself is off by 1.9e-6 to 2.9e-6
    # depending on the CPU, the thread count and the input (the canonized one by up to 3.7e-6), so its tolerance is
    # 1e-5, still far below a batch-norm epsilon error (7.5e-5 there)
    exact = make_model(name, dtype=torch.float64)(data.double())
    own_rounding = relative_error(reference.double(), exact)
    before = snapshot(model)
    instances = ResNetCanonizer(cut=cut).apply(model)
    canonized = model(data)
    tolerance = 1e-5 if name == 'resnet34' else 2e-6
    assert relative_error(canonized.double(), exact) <= max(tolerance, 4 * own_rounding)
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)
    assert torch.equal(model(data), reference)


@pytest.mark.parametrize('name', MODELS)
def test_fidelity_float64_inside_a_composite(name):
    # exact in float64 (5.7e-15 measured), whatever the float32 rounding above
    model = make_model(name, dtype=torch.float64)
    data = make_input(2, dtype=torch.float64, requires_grad=False)
    reference = model(data)
    before = snapshot(model)
    cut = {'layer2.0': 'residual', 'layer4.1': 'skip'}
    with EpsilonPlusFlat(canonizers=[ResNetCanonizer(cut=cut)]).context(model) as modified:
        assert relative_error(modified(data), reference) <= 1e-12
    assert_untouched(model, before)


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_drop_in_for_zennit(name):
    # equal up to zennit's batch-norm epsilon error, which is ~1e-4 relative on the output
    model = make_model(name, dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    ours = attribute(model, data, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]))
    theirs = attribute(model, data, EpsilonPlusFlat(canonizers=[ZennitResNetCanonizer()]))
    assert relative_error(ours, theirs) < 1e-2
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.999


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
