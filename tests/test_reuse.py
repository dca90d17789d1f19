'''Reusing the forward pass's outputs where zennit's rules compute a linear layer again (canonizers.core.reuse): the
oracle is zennit's own recomputation (``reuse_forward=False``), under rules that modify nothing (reused) and rules
that modify parameters or inputs (computed again); the reused output's backward against autograd's; removal.'''
import inspect

import pytest
import torch
from helpers import assert_untouched, conservation_composite, output_relevance, snapshot
from test_transformers import Tokens, data, randomized, vit
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat, LayerMapComposite
from zennit.core import Composite
from zennit.rules import AlphaBeta, Epsilon, Pass
from zennit.types import Activation

from canonizers import GraphCanonizer, ReuseForward
from canonizers.core.attention import ConstantWeighting
from canonizers.core.reuse import LinearRecord, RuledCall, WeightingRecord, rulable

TARGET = 3

COMPOSITES = {
    'epsilon (conservation)': lambda canonizers: conservation_composite(canonizers, epsilon=1e-10),
    'EpsilonPlusFlat': lambda canonizers: EpsilonPlusFlat(canonizers=canonizers),
    # zennit's own composites give linear layers (Dense) the epsilon rule
    'alpha-beta on linear layers': lambda canonizers: LayerMapComposite(
        [(Activation, Pass()), (torch.nn.Linear, AlphaBeta(2, 1))], canonizers=canonizers),
}

MODELS = {
    'torchvision vit (2 layers)': (vit, 32),
    'own, nn.MultiheadAttention': (lambda: Tokens('module'), 8),
}


def records(model, kind=LinearRecord):
    return {name: module.forward for name, module in model.named_modules()
            if isinstance(vars(module).get('forward'), kind)}


def ruled(model):
    '''Per layer served by a :py:class:`RuledCall`: its class, whether a zennit rule is attached to it (a forward
    pre-hook), and how many of its input gradients were left to the rule.'''
    return {name: (type(record.module).__name__, bool(record.module._forward_pre_hooks), record.replaced)
            for name, record in records(model, RuledCall).items()}


def relevance(model, size, composite, reuse, batch=2):
    canonizer = GraphCanonizer(reuse_forward=reuse)
    with Gradient(model, COMPOSITES[composite]([canonizer])) as attributor:
        _, result = attributor(data(size, batch).requires_grad_(), lambda output: output_relevance(output, TARGET))
        hits = {name: (record.hits, record.replaced) for name, record in records(model).items()}
        calls = ruled(model)
        weightings = [record.hits for record in records(model, WeightingRecord).values()]
    if not reuse:
        assert calls == {}
    else:
        # every layer other than a linear one that zennit's rules (BasicHook, Pass) replace the input gradient of:
        # the patch embedding, the activations, the normalizations and the attention's weighting of the values
        assert {'ConstantStdLayerNorm', 'ConstantWeighting'} <= {kind for kind, _, _ in calls.values()}, calls
        # a rule replaced the gradient once per hooked layer (one attribution), and none of the others
        assert all(replaced == hooked for _, hooked, replaced in calls.values()), calls
        # the attention weightings (matrix products) are served from the forward pass where the rule modifies
        # nothing: the epsilon rules (alpha-beta modifies the input)
        assert weightings and max(weightings) == (0 if composite == 'alpha-beta on linear layers' else 1)
        assert min(weightings) == max(weightings)
    return result, hits


@pytest.mark.parametrize('composite', list(COMPOSITES))
@pytest.mark.parametrize('name', list(MODELS))
def test_relevance_equals_zennits_recomputation(name, composite):
    build, size = MODELS[name]
    model = randomized(build())
    before = snapshot(model)
    reused, hits = relevance(model, size, composite, True)
    assert_untouched(model, before)
    computed, none = relevance(model, size, composite, False)
    assert none == {}
    assert computed.abs().max() > 1e-6  # a relevance that is there
    assert (reused - computed).abs().max() <= 1e-12 * computed.abs().max()
    assert hits
    served = {layer: counts[0] for layer, counts in hits.items()}
    # every rule here is zennit's BasicHook: it replaces the input gradient of every linear layer that relevance
    # reaches, which is left to it (the first layer's input is the model's input, a leaf: zennit hooks it too)
    assert min(counts[1] for counts in hits.values()) == 1
    if composite == 'epsilon (conservation)':
        # every linear layer is served from the forward pass: the value projections, the attention's output, the
        # MLP and the head (under CP-LRP, queries and keys are computed without gradients, and are no layers then)
        assert min(served.values()) == 1
        assert any('mlp' in layer for layer in hits) and any('head' in layer for layer in hits)
    elif composite == 'alpha-beta on linear layers':
        # alpha-beta modifies the weights: nothing is served
        assert max(served.values()) == 0


@pytest.mark.skipif('create_graph' not in inspect.signature(Gradient).parameters,
                    reason='zennit 0.4.6 cannot differentiate relevance (no create_graph)')
def test_gradients_of_relevance_equal_zennits_recomputation():
    # training with explanations differentiates the rules' backward pass: through a served output too
    model = randomized(vit())
    results = []
    for reuse in (True, False):
        composite = conservation_composite([GraphCanonizer(reuse_forward=reuse)], epsilon=1e-6)
        with Gradient(model, composite, create_graph=True) as attributor:
            _, result = attributor(data(32, 2).requires_grad_(), lambda output: output_relevance(output, TARGET))
        (result ** 2).sum().backward()
        results.append({name: parameter.grad for name, parameter in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    reused, computed = results
    assert reused.keys() == computed.keys() and any(grad is not None for grad in computed.values())
    for name, grad in computed.items():
        assert (reused[name] is None) == (grad is None), name
        if grad is not None:
            assert (reused[name] - grad).abs().max() <= 1e-12 * grad.abs().max(), name


def backward_gradients(model, composite, reuse):
    '''The input's and every parameter's gradient of ``y.backward()`` under ``composite`` (LXT's usage), and how many
    input gradients were left to the rules.'''
    input = data(32, 2).requires_grad_()
    with COMPOSITES[composite]([GraphCanonizer(reuse_forward=reuse)]).context(model):
        output = model(input)
        output.backward(output_relevance(output, TARGET))
        replaced = sum(record.replaced for record in records(model).values())
    grads = {name: parameter.grad for name, parameter in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return input.grad, grads, replaced


@pytest.mark.parametrize('composite', ['epsilon (conservation)', 'alpha-beta on linear layers'])
def test_parameter_gradients_of_backward_are_zennits(composite):
    # backward() computes every parameter's gradient too: those of the forward pass's linear maps stay exact where
    # their input gradient is left to the rule
    model = randomized(vit())
    relevance, grads, replaced = backward_gradients(model, composite, True)
    expected, expected_grads, none = backward_gradients(model, composite, False)
    assert replaced > 0 and none == 0
    assert (relevance - expected).abs().max() <= 1e-12 * expected.abs().max()
    assert grads.keys() == expected_grads.keys()
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert any(expected_grads[f'{name}.weight'] is not None for name in linear)
    for name, grad in expected_grads.items():
        assert (grads[name] is None) == (grad is None), name
        if grad is not None:
            assert (grads[name] - grad).abs().max() <= 1e-12 * grad.abs().max(), name


class Doubling(Epsilon):
    '''A rule of its own backward, which reads the gradient it replaces.'''
    def backward(self, module, grad_input, grad_output):
        return tuple(None if grad is None else 2 * grad for grad in grad_input)

    def copy(self):
        # zennit 0.4.6's BasicHook.copy makes a BasicHook, not one of this class
        return Doubling()


def test_rules_that_read_the_input_gradient_get_it():
    model = randomized(vit())
    results = []
    for reuse in (True, False):
        composite = LayerMapComposite([(Activation, Pass()), (torch.nn.Linear, Doubling())],
                                      canonizers=[GraphCanonizer(reuse_forward=reuse)])
        with Gradient(model, composite) as attributor:
            _, result = attributor(data(32, 2).requires_grad_(), lambda output: output_relevance(output, TARGET))
            assert sum(record.replaced for record in records(model).values()) == 0
        results.append(result)
    assert results[1].abs().max() > 0
    assert (results[0] - results[1]).abs().max() <= 1e-12 * results[1].abs().max()


class Scaling(torch.nn.Module):
    def forward(self, input):
        return 3 * input


def test_another_forward_pre_hook_after_the_rules_gets_the_input_gradient():
    model = linear_model()
    input = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    composite = conservation_composite([ReuseForward()], epsilon=1e-10)
    results = []
    for hooked in (True, False):
        with composite.context(model):
            # the input the layer sees is not the rule's copy of it: its gradient is not left to the rule
            handle = model[2].register_forward_pre_hook(lambda module, args: (3 * args[0],)) if hooked else None
            output = model(input)
            gradient, = torch.autograd.grad(output, input, output_relevance(output, TARGET))
            replaced = [module.forward.replaced for module in (model[0], model[2])]
            if handle is not None:
                handle.remove()
        results.append((gradient, replaced))
    (hooked, hooked_counts), (plain, plain_counts) = results
    assert hooked_counts == [1, 0] and plain_counts == [1, 1]
    with conservation_composite([], epsilon=1e-10).context(model):
        handle = model[2].register_forward_pre_hook(lambda module, args: (3 * args[0],))
        output = model(input)
        expected, = torch.autograd.grad(output, input, output_relevance(output, TARGET))
        handle.remove()
    assert (hooked - expected).abs().max() <= 1e-12 * expected.abs().max()
    # a layer's forward called directly (no hooks run, no copy of the rule's) while its rule is registered
    with composite.context(model):
        model(input * 2)  # the rules hold what they stored of a forward with their hooks
        hidden = torch.relu(model[0](input))
        direct, = torch.autograd.grad(model[2].forward(hidden).sum(), input)
        assert model[2].forward.replaced == 0
    with conservation_composite([], epsilon=1e-10).context(model):
        model(input * 2)
        hidden = torch.relu(model[0](input))
        expected, = torch.autograd.grad(model[2].forward(hidden).sum(), input)
    assert (direct - expected).abs().max() <= 1e-12 * expected.abs().max()


@pytest.mark.skipif(not hasattr(Composite, 'inactive'), reason='zennit 0.4.6 has no inactive rules')
def test_inactive_or_removed_rules_leave_the_exact_gradient():
    # zennit 0.5.1 and 1.0: an inactive rule (Composite.inactive) and a removed one do not replace the input
    # gradient, which must then be the forward's own
    model = randomized(vit())
    results = []
    for reuse in (True, False):
        composite = conservation_composite([GraphCanonizer(reuse_forward=reuse)], epsilon=1e-10)
        with composite.context(model):
            input = data(32, 2).requires_grad_()
            output = model(input)
            with composite.inactive():
                inactive, = torch.autograd.grad(output, input, output_relevance(output, TARGET))
            # the last one, after the rules' removal
            output = model(input)
        removed, = torch.autograd.grad(output, input, output_relevance(output, TARGET))
        results.append((inactive, removed))
    (inactive, removed), (expected_inactive, expected_removed) = results
    for result, expected in ((inactive, expected_inactive), (removed, expected_removed)):
        assert expected.abs().max() > 0
        assert (result - expected).abs().max() <= 1e-12 * expected.abs().max()


def linear_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4)).double()


def gradients(model, input):
    input = input.clone().requires_grad_()
    output = model(input)
    output.backward(torch.arange(output.numel(), dtype=output.dtype).reshape(output.shape))
    grads = [input.grad] + [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    return output.detach(), grads


def test_a_reused_output_has_the_backward_of_the_linear_map():
    model = linear_model()
    input = torch.randn(3, 2, 6, dtype=torch.float64)
    expected_output, expected = gradients(model, input)
    before = snapshot(model)
    instances = ReuseForward().apply(model)
    gradients(model, input)
    # the second forward on the same values is served from the first
    output, grads = gradients(model, input)
    assert [record.hits for record in records(model).values()] == [1, 1]
    assert torch.equal(output, expected_output)
    for grad, oracle in zip(grads, expected):
        assert (grad - oracle).abs().max() <= 1e-12 * oracle.abs().max()
    # torch.autograd.grad for the input alone gets the same input gradient
    served = model(input.clone().requires_grad_())
    assert torch.equal(served, expected_output)
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)


def test_changed_parameters_or_inputs_are_computed_again():
    model = linear_model()
    input = torch.randn(3, 6, dtype=torch.float64)
    instances = ReuseForward().apply(model)
    layer = model[0]
    record = layer.forward
    model(input.requires_grad_())
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: its version counter tells
    assert torch.equal(model(input), torch.nn.functional.linear(
        torch.relu(torch.nn.functional.linear(input, layer.weight, layer.bias)), model[2].weight, model[2].bias))
    assert record.hits == 0
    other = input.detach().clone()
    other[0, 0] += 1
    model(other)
    assert record.hits == 0
    modified = torch.nn.Parameter(layer.weight.detach().clamp(min=0))
    original = layer.weight
    layer.weight = modified  # a rule's modified copy: elsewhere in memory
    assert torch.equal(layer(other), torch.nn.functional.linear(other, modified, layer.bias))
    assert record.hits == 0
    layer.weight = original
    # the very input tensor, changed in place after its forward pass: its version counter tells
    changed = other * 2
    layer(changed)
    with torch.no_grad():
        changed.add_(1)
    assert torch.equal(layer(changed), torch.nn.functional.linear(changed, layer.weight, layer.bias))
    assert record.hits == 0
    assert torch.equal(layer(changed), torch.nn.functional.linear(changed, layer.weight, layer.bias))
    assert record.hits == 1
    for instance in instances:
        instance.remove()


class DoubleInPlace(torch.nn.Module):
    def forward(self, input):
        return input.mul_(2)


def test_an_output_changed_in_place_is_computed_again():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), DoubleInPlace(), torch.nn.Linear(5, 4)).double()
    input = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = model(input)
    instances = ReuseForward().apply(model)
    model(input)
    # the first layer's kept output was doubled in place: served, it would be doubled twice
    assert torch.equal(model(input), expected)
    assert model[0].forward.hits == 0
    for instance in instances:
        instance.remove()


def test_nothing_is_kept_without_gradients():
    model = linear_model()
    instances = ReuseForward().apply(model)
    with torch.no_grad():
        model(torch.randn(2, 6, dtype=torch.float64))
    model.requires_grad_(False)
    model(torch.randn(2, 6, dtype=torch.float64))  # neither the input nor the output needs a gradient
    assert all(record.entry is None for record in records(model).values())
    for instance in instances:
        instance.remove()
    assert records(model) == {}


@pytest.mark.parametrize('value', [1, 'yes', None])
def test_reuse_forward_must_be_a_bool(value):
    with pytest.raises(ValueError, match=f'reuse_forward={value!r}: must be True or False'):
        GraphCanonizer(reuse_forward=value)


def test_reuse_forward_is_copied_and_shown():
    canonizer = GraphCanonizer(reuse_forward=False)
    assert canonizer.copy().reuse_forward is False
    assert 'reuse_forward=False' in repr(canonizer)
    assert 'reuse_forward' not in repr(GraphCanonizer())


class Convolutions(torch.nn.Module):
    '''Convolutions with a batch norm, activations in place and not, and a shortcut.'''
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(6)
        self.relu = torch.nn.ReLU()
        self.inner = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.inplace = torch.nn.ReLU(inplace=True)
        self.gelu = torch.nn.GELU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Linear(6, 10)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        hidden = self.relu(self.norm(self.conv(input)))
        hidden = self.gelu(self.inplace(self.inner(hidden)) + hidden)
        return self.head(self.pool(hidden).flatten(1))


@pytest.mark.parametrize('composite', ['epsilon (conservation)', 'EpsilonPlusFlat'])
def test_convolutions_and_activations_leave_their_input_gradient_to_the_rule(composite):
    model = randomized(Convolutions())
    before = snapshot(model)
    results = []
    for reuse in (True, False):
        input = data(12, 2).requires_grad_()
        with COMPOSITES[composite]([GraphCanonizer(reuse_forward=reuse)]).context(model):
            output = model(input)
            output.backward(output_relevance(output, TARGET))
            calls = ruled(model)
        results.append((input.grad, {name: parameter.grad for name, parameter in model.named_parameters()}, calls))
        model.zero_grad(set_to_none=True)
    assert_untouched(model, before)
    (relevance, grads, calls), (expected, expected_grads, none) = results
    assert none == {}
    # the convolutions (the first under Flat in EpsilonPlusFlat) and the activations under Pass; not the ReLU that
    # works in place (its input is the other layer's output)
    assert sorted(calls.values()) == [('Conv2d', True, 1)] * 2 + [('GELU', True, 1), ('ReLU', True, 1)], calls
    assert expected.abs().max() > 1e-6
    assert (relevance - expected).abs().max() <= 1e-12 * expected.abs().max()
    assert grads.keys() == expected_grads.keys()
    assert expected_grads['conv.weight'] is not None and expected_grads['inner.weight'] is not None
    for name, grad in expected_grads.items():
        assert (grads[name] is None) == (grad is None), name
        if grad is not None:
            assert (grads[name] - grad).abs().max() <= 1e-12 * grad.abs().max(), name


class Weighting(torch.nn.Module):
    '''A convolution whose output is changed in place, and values weighted by a constant of the forward through an
    einsum, whose result is a view (of a bmm's).'''
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.values = torch.nn.Linear(4, 4)
        self.weighting = ConstantWeighting(equation='bhij,bhjd->bihd')

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(input).mul_(2)
        weights = torch.softmax(hidden @ hidden.transpose(-1, -2), -1)
        return self.weighting(self.values(hidden), operand=weights.detach()).flatten(1)


def test_served_outputs_can_be_changed_in_place():
    # the convolution's own output is served, the weighting's view as a copy: both can be changed in place
    model = Weighting().double()
    input = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert model.weighting(input, operand=torch.ones(2, 3, 5, 5, dtype=torch.float64))._base is not None
    results = []
    for canonizers in ([ReuseForward()], []):
        with conservation_composite(canonizers, epsilon=1e-10).context(model):
            output = model(input)
            output.mul_(3)
            gradient, = torch.autograd.grad(output, input, output)
            if canonizers:
                assert [model.conv.forward.replaced, model.weighting.forward.replaced] == [1, 1]
        results.append(gradient)
    assert results[1].abs().max() > 0
    assert (results[0] - results[1]).abs().max() <= 1e-12 * results[1].abs().max()


@pytest.mark.skipif(not hasattr(Composite, 'inactive') or 'create_graph' not in inspect.signature(Gradient).parameters,
                    reason='zennit 0.4.6 has no inactive rules')
def test_the_exact_gradient_of_an_inactive_rule_can_be_differentiated():
    # the input gradient computed again where the rule does not replace it is a function of the input and the
    # parameters: differentiated (create_graph) as autograd's own
    model = randomized(Convolutions())
    results = []
    for reuse in (True, False):
        input = data(12, 2).requires_grad_()
        composite = conservation_composite([GraphCanonizer(reuse_forward=reuse)], epsilon=1e-10)
        with composite.context(model):
            output = model(input)
            with composite.inactive():
                gradient, = torch.autograd.grad(output, input, output_relevance(output, TARGET), create_graph=True)
                (gradient ** 2).sum().backward()
        results.append((gradient.detach(), {name: parameter.grad for name, parameter in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (gradient, grads), (expected, expected_grads) = results
    assert (gradient - expected).abs().max() <= 1e-12 * expected.abs().max()
    assert expected_grads['conv.weight'].abs().max() > 0
    for name, grad in expected_grads.items():
        assert (grads[name] - grad).abs().max() <= 1e-12 * grad.abs().max(), name


class OwnForward(torch.nn.GELU):
    def forward(self, input):
        return super().forward(input) * 2


def test_only_known_layers_with_their_class_forward_and_not_in_place_are_served():
    gelu = torch.nn.GELU()
    assert rulable(torch.nn.Conv2d(2, 2, 1)) and rulable(gelu) and rulable(torch.nn.ReLU())
    assert not rulable(torch.nn.ReLU(inplace=True))
    assert not rulable(OwnForward())
    assert not rulable(torch.nn.Dropout()) and not rulable(torch.nn.BatchNorm2d(2))
    gelu.forward = lambda input: input
    assert not rulable(gelu)


def test_a_rule_removed_but_alive_leaves_the_exact_gradient():
    # a rule registered by hand outlives its removal: zennit 0.5.1 and 1.0 remove its hook on the Identity (the
    # gradient is the forward's own), zennit 0.4.6 leaves it (the rule replaces the gradient still); either way the
    # same as without ReuseForward
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 4)).double()
    input = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for reuse in (True, False):
        instances = ReuseForward().apply(model) if reuse else []
        rule = Pass()
        handles = rule.register(model[1])
        output = model(input)
        handles.remove()
        gradient, = torch.autograd.grad(output, input, torch.ones_like(output))
        for instance in instances:
            instance.remove()
        results.append(gradient)
        assert rule.stored_tensors is not None  # alive
    assert results[1].abs().max() > 0
    assert (results[0] - results[1]).abs().max() <= 1e-12 * results[1].abs().max()


@pytest.mark.parametrize('left', [True, False])
def test_a_served_weighting_has_the_backward_of_the_product(left):
    holder = torch.nn.Module()
    holder.weighting = ConstantWeighting(left=left)
    instances = ReuseForward().apply(holder)
    record = vars(holder.weighting)['forward']
    assert isinstance(record, WeightingRecord)
    generator = torch.Generator().manual_seed(0)
    # the values broadcast over the batch of the weight: their gradient sums over it
    weight = torch.randn((2, 3, 5, 5) if left else (2, 3, 4, 4), generator=generator, dtype=torch.float64)
    values = torch.randn(1, 3, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    first = holder.weighting(values * 1, operand=weight)
    # zennit's second forward: a leaf of the same values (elsewhere in memory, as zennit 1.0's copy), no operand
    leaf = (values * 1).detach().requires_grad_()
    served = holder.weighting(leaf)
    assert record.hits == 1
    assert torch.equal(served, first)
    grad = torch.randn(served.shape, generator=generator, dtype=torch.float64)
    got, = torch.autograd.grad(served, leaf, grad)
    other = leaf.detach().requires_grad_()
    expected, = torch.autograd.grad(torch.matmul(weight, other) if left else torch.matmul(other, weight), other, grad)
    assert (got - expected).abs().max() <= 1e-12 * expected.abs().max()
    # the same operand passed again (zennit 1.0) is served too
    holder.weighting(leaf, operand=weight)
    assert record.hits == 2
    # other input values, another operand, the operand or the kept output changed in place: computed again
    changed = (leaf * 2).detach().requires_grad_()
    product = torch.matmul(weight, changed) if left else torch.matmul(changed, weight)
    assert torch.equal(holder.weighting(changed), product)
    assert record.hits == 2
    holder.weighting(values * 1, operand=weight)
    holder.weighting(leaf, operand=weight * 3)
    assert record.hits == 2
    output = holder.weighting(values * 1, operand=weight)
    with torch.no_grad():
        output.add_(1)
    assert torch.equal(holder.weighting(leaf, operand=weight), first)
    assert record.hits == 2
    kept = weight.clone()
    holder.weighting(values * 1, operand=kept)
    with torch.no_grad():
        kept.mul_(2)
    holder.weighting(leaf)
    assert record.hits == 2
    for instance in instances:
        instance.remove()
    assert 'forward' not in vars(holder.weighting)
