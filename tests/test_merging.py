import random

import pytest
import torch
from helpers import assert_untouched, make_input, make_model, relative_error, snapshot
from zennit.canonizers import SequentialMergeBatchNorm

from canonizers import ExactMergeBatchNorm, ResNetCanonizer
from canonizers.core.compat import RULES_ASSIGN_PARAMETERS


@pytest.mark.parametrize('dtype, tolerance', [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_exact_merge_where_zennit_is_off(dtype, tolerance):
    model = make_model('resnet50', dtype=dtype)
    data = make_input(2, dtype=dtype, requires_grad=False)
    reference = model(data)
    # against exact (float64) arithmetic, not against the float32 original, whose own rounding error (0.8e-6 to
    # 1.7e-6 here, depending on the CPU and the thread count) would add to the merged model's: within the tolerance,
    # or 4x the original's own error where that is larger (the merged model's is another draw of the same rounding,
    # measured up to 1.5e-6); in float64 the original is the exact reference
    exact = make_model('resnet50', dtype=torch.float64)(data.double())
    bound = max(tolerance, 4 * relative_error(reference, exact))

    instances = SequentialMergeBatchNorm().apply(model)
    zennit_error = relative_error(model(data), exact)
    for instance in instances:
        instance.remove()

    instances = ExactMergeBatchNorm().apply(model)
    error = relative_error(model(data), exact)
    for instance in instances:
        instance.remove()

    assert error <= bound
    if RULES_ASSIGN_PARAMETERS:
        # zennit 1.0 sets the merged batch norms' eps to 0 as well: exact to rounding, as ours
        assert zennit_error <= bound
    else:
        # zennit 0.4.6 and 0.5.1 keep eps in the merged batch norm: an error far above rounding in both dtypes
        assert zennit_error > 1e-5


def test_batch_norms_are_the_identity_while_merged():
    model = make_model('resnet18')
    instances = ExactMergeBatchNorm().apply(model)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            data = torch.randn(2, module.num_features, 4, 4)
            assert torch.equal(module(data), data)
    for instance in instances:
        instance.remove()


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_removal_in_any_order_restores_bitwise(seed):
    model = make_model('resnet18')
    before = snapshot(model)
    instances = ResNetCanonizer(cut={'layer2.0': 'residual'}).apply(model)
    random.Random(seed).shuffle(instances)
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)


def test_parameters_stay_parameters_and_objects():
    model = make_model('resnet18')
    weights = {name: parameter for name, parameter in model.named_parameters()}
    instances = ExactMergeBatchNorm().apply(model)
    for name, parameter in model.named_parameters():
        assert isinstance(parameter, torch.nn.Parameter)
        if name in weights:
            assert parameter is weights[name]
    # the convolutions got a bias while merged; zennit 0.4.6 and 0.5.1 rules need it to be a Parameter, zennit 1.0's a
    # registered one (they load parameters with load_state_dict), while the layer computes with the merged tensor
    assert isinstance(model.conv1._parameters['bias'], torch.nn.Parameter)
    assert torch.equal(model.conv1._parameters['bias'], model.conv1.bias)
    if RULES_ASSIGN_PARAMETERS:
        assert model.conv1.weight is not weights['conv1.weight']
    else:
        assert model.conv1.weight is weights['conv1.weight']
    for instance in instances:
        instance.remove()
    assert model.conv1.bias is None and model.conv1.weight is weights['conv1.weight']
    assert 'weight' not in vars(model.conv1) and 'bias' not in vars(model.conv1)


@pytest.mark.parametrize('layer', [
    torch.nn.Linear(6, 5),
    torch.nn.Conv1d(4, 5, 3),
    torch.nn.Conv2d(4, 10, 3, groups=2, bias=False),
    torch.nn.ConvTranspose2d(4, 10, 3, groups=2),
])
def test_merge_into_any_linear_layer(layer):
    torch.manual_seed(0)
    features = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
    norm = torch.nn.BatchNorm2d(features) if layer.weight.ndim == 4 else torch.nn.BatchNorm1d(features)
    model = torch.nn.Sequential(layer, norm).double()
    from helpers import randomize_batch_norms
    randomize_batch_norms(model)
    shape = {2: (3, 6), 3: (3, 4, 7), 4: (3, 4, 7, 7)}[layer.weight.ndim]
    data = torch.randn(*shape, dtype=torch.float64)
    reference = model(data)
    before = snapshot(model)
    instances = ExactMergeBatchNorm().apply(model)
    assert relative_error(model(data), reference) < 1e-13
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)


def test_mismatched_shapes_are_never_paired():
    # a batch norm of another width after a linear layer (e.g. after a concatenation) must not be merged
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(8)).eval()
    assert ExactMergeBatchNorm().apply(model) == []


def test_training_mode_is_refused():
    model = make_model('resnet18').train()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r'model\.eval\(\)'):
        ExactMergeBatchNorm().apply(model)
    assert_untouched(model, before)


def test_merging_twice_is_refused():
    model = make_model('resnet18')
    instances = ExactMergeBatchNorm().apply(model)
    merged = snapshot(model)
    with pytest.raises(RuntimeError, match='still registered'):
        ExactMergeBatchNorm().apply(model)
    assert_untouched(model, merged)
    for instance in instances:
        instance.remove()
