'''The canonized model as a function of its parameters, and the model after zennit's rules ran, on every zennit
version: zennit 1.0 rules swap parameter objects (``ParamMod``), which a merge must survive.'''
import copy
import inspect

import pytest
import torch
from helpers import assert_untouched, make_input, make_model, output_relevance, relative_error, snapshot
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer as ZennitResNetCanonizer
from zennit.types import BatchNorm

from canonizers import (
    DenseNetCanonizer,
    EfficientNetCanonizer,
    ExactMergeBatchNorm,
    MobileNetCanonizer,
    ResNetCanonizer,
)
from canonizers.core.compat import RULES_ASSIGN_PARAMETERS, RestoreSwappedParameters
from canonizers.evaluation import constant_gates, gradient_errors, parameter_gradients

TARGET = 3
FAMILIES = {
    'resnet18': ResNetCanonizer,
    'resnet50': ResNetCanonizer,
    'densenet121': DenseNetCanonizer,
    'efficientnet_b0': EfficientNetCanonizer,
    'mobilenet_v2': MobileNetCanonizer,
    'mobilenet_v3_small': MobileNetCanonizer,
}
only_assigning = pytest.mark.skipif(
    not RULES_ASSIGN_PARAMETERS, reason='zennit 0.4.6 and 0.5.1 need merged parameters to stay Parameters')
only_setattr = pytest.mark.skipif(RULES_ASSIGN_PARAMETERS, reason='zennit 0.4.6 and 0.5.1 only')


def lively_model(name):
    return make_model(name, dtype=torch.float64).requires_grad_(True)


@only_assigning
@pytest.mark.parametrize('name, canonizer', [
    *FAMILIES.items(),
    ('resnet18', ExactMergeBatchNorm),
])
def test_same_function_of_the_parameters(name, canonizer):
    # every parameter, batch-norm weights and biases included (they reach the output through the merged layers and,
    # in DenseNet, the threshold ReLUs); the gates are constant by design, so the reference detaches them
    model = lively_model(name)
    data = make_input(2, dtype=torch.float64, requires_grad=False)
    with constant_gates(model):
        reference = parameter_gradients(model, data, TARGET)
    gradients = parameter_gradients(model, data, TARGET, [canonizer()])
    errors = gradient_errors(gradients, reference)
    assert max(errors.values()) <= 1e-9, max(errors, key=errors.get)
    # the test has teeth: the batch norms' parameters do get gradients
    batch_norms = [f'{name}.{key}' for name, module in model.named_modules() if isinstance(module, BatchNorm)
                   for key, _ in module.named_parameters(recurse=False)]
    assert batch_norms and all(reference[key].abs().max() > 0 for key in batch_norms)


@only_setattr
@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v2'])
def test_parameter_gradients_where_parameters_must_stay_parameters(name):
    # zennit 0.4.6 and 0.5.1 need the merged parameters to stay Parameters, so the merge replaces their data, as
    # zennit's own merge does: the output is exact, and so are the gradients of the parameters no merge touches (the
    # classifier), but not those of the merged layers and batch norms, as the README says
    model = lively_model(name)
    data = make_input(2, dtype=torch.float64, requires_grad=False)
    reference = parameter_gradients(model, data, TARGET)
    errors = gradient_errors(parameter_gradients(model, data, TARGET, [FAMILIES[name]()]), reference)
    classifier = [key for key in errors if key.startswith(('fc.', 'classifier.'))]
    assert classifier and max(errors[key] for key in classifier) <= 1e-9
    assert max(errors.values()) > 0.1


@only_assigning
@pytest.mark.parametrize('composite', [
    EpsilonPlusFlat, lambda canonizers: EpsilonGammaBox(low=-3., high=3., canonizers=canonizers)])
def test_relevance_gradients_as_zennit_resnet_canonizer(composite):
    # training with explanations: d(relevance)/d(parameters) through the rules, as zennit 1.0's own canonizer gives
    base = lively_model('resnet18')
    data = make_input(dtype=torch.float64)
    weights = torch.linspace(-1., 1., data.numel(), dtype=torch.float64).reshape(data.shape)

    def relevance_gradients(canonizer):
        model = copy.deepcopy(base)
        parameters = dict(model.named_parameters())
        with Gradient(model, composite(canonizers=[canonizer]), create_graph=True) as attributor:
            _, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
        gradients = torch.autograd.grad((relevance * weights).sum(), list(parameters.values()), allow_unused=True)
        return {key: torch.zeros_like(value) if gradient is None else gradient
                for (key, value), gradient in zip(parameters.items(), gradients)}

    reference = relevance_gradients(ZennitResNetCanonizer())
    errors = gradient_errors(relevance_gradients(ResNetCanonizer()), reference)
    assert max(errors.values()) <= 1e-6, max(errors, key=errors.get)
    assert reference['bn1.weight'].abs().max() > 0


@pytest.mark.parametrize('name', ['resnet18', 'densenet121', 'efficientnet_b0', 'mobilenet_v3_small'])
def test_rules_do_not_leave_merged_values_behind(name):
    # zennit 1.0's rules put new parameter objects over the values they found: with merges that change the parameters'
    # data, the model kept the merged values after removal and the next attribution merged them again
    model = make_model(name, dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    reference = model(data)
    parameters = dict(model.named_parameters())
    values = {key: value.detach().clone() for key, value in parameters.items()}
    instances = FAMILIES[name]().apply(model)
    # the parameters that a merge changed, by the values their modules compute with
    merged = {key: value for key, value in parameters.items() if not torch.equal(
        getattr(model.get_submodule(key.rpartition('.')[0]), key.rpartition('.')[2]), values[key])}
    for instance in instances:
        instance.remove()
    before = snapshot(model)
    for _ in range(2):
        with Gradient(model, EpsilonPlusFlat(canonizers=[FAMILIES[name]()])) as attributor:
            output, _ = attributor(data, lambda output: output_relevance(output, TARGET))
        assert relative_error(output, reference) <= 1e-10
    assert torch.equal(model(data), reference)
    # the layers this package merged hold their own parameter objects again, and so does every other layer (zennit
    # 1.0's rules leave new ones there)
    assert merged and all(dict(model.named_parameters())[key] is value for key, value in merged.items())
    assert_untouched(model, before)


@pytest.mark.skipif('create_graph' not in inspect.signature(Gradient).parameters,
                    reason='zennit 0.4.6 cannot differentiate relevance (no create_graph)')
def test_training_with_explanations_updates_every_parameter():
    # a penalty on the relevance, as in training with explanations: every step reaches every parameter the optimizer
    # holds, also after zennit 1.0's rules swapped parameter objects in the previous step
    model = lively_model('resnet18').to(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = make_input(2)
    for _ in range(2):
        values = {key: value.detach().clone() for key, value in model.named_parameters()}
        optimizer.zero_grad()
        with Gradient(model, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]), create_graph=True) as attributor:
            output, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
        (output[:, TARGET].sum() + relevance.abs().sum()).backward()
        optimizer.step()
        unchanged = [key for key, value in model.named_parameters() if torch.equal(value, values[key])]
        assert not unchanged


def test_only_parameters_over_the_same_data_are_put_back():
    # zennit 1.0's swap (a new Parameter over the very data) is undone; a parameter assigned with other data is not
    model = make_model('resnet18')
    weight, bias = model.fc.weight, model.fc.bias
    guard = RestoreSwappedParameters()
    guard.register(model)
    model.fc.weight = torch.nn.Parameter(weight.data)
    model.fc.bias = torch.nn.Parameter(bias.data.clone())
    replacement = model.fc.bias
    guard.remove()
    assert model.fc.weight is weight and model.fc.bias is replacement
    # only zennit 1.0 swaps parameters: there alone the family canonizers register it
    assert len(RestoreSwappedParameters().apply(model)) == (1 if RULES_ASSIGN_PARAMETERS else 0)
