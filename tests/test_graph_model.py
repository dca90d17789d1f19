'''GraphCanonizer on a model of its own: a three-way sum, ``+=``, ``torch.add``, a functional ReLU, a gate, a
concatenation of convolutions with a batch norm after it, and a pre-activation head; cuts, per-sample cuts, cut
changes, hooks, refusals, warnings and rollback.'''
import operator
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_untouched,
    conservation_composite,
    crp_heatmap,
    output_relevance,
    randomize_batch_norms,
    relative_error,
    snapshot,
)
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat

from canonizers import ConstantGate, MaskedSum, PerSampleCut, ThresholdReLU
from canonizers.graph import GraphCanonizer, graph_cuts_for
from canonizers.graph import program as graph_program
from canonizers.graph import tracer as graph_tracer
from canonizers.support import bias_free as without_biases

TARGET = 3


class Gate(torch.nn.Module):
    '''A squeeze-and-excitation gate written with functional operations.'''
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class Block(torch.nn.Module):
    '''A residual block whose shortcut is the identity.'''
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        # a shape-only use of the convolution's output does not keep its batch norm from being merged into it
        out = self.bn(out).reshape(out.shape)
        out += x
        return F.relu(out)


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = torch.nn.BatchNorm2d(8)
        self.b = torch.nn.Conv2d(8, 8, 1)
        self.c = torch.nn.Conv2d(8, 8, 1)
        self.block = Block(8)
        self.gate = Gate(8)
        self.left = torch.nn.Conv2d(8, 4, 1)
        self.right = torch.nn.Conv2d(8, 4, 1)
        self.bn_cat = torch.nn.BatchNorm2d(8)
        self.norm = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        y = self.bn_a(self.a(x))
        z = x + F.relu(y) + self.b(x)
        z += self.c(z)
        z = self.gate(self.block(z))
        z = torch.add(z, self.bn_cat(torch.cat([self.left(z), self.right(z)], 1)))
        z = F.relu(self.norm(z))
        return self.head(z.mean((2, 3)))


def make(dtype=torch.float64, bias_free=False) -> Model:
    torch.manual_seed(0)
    return randomize_batch_norms(Model(), 0, bias_free).to(dtype).requires_grad_(False)


def make_data(batch=1, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 16, 16, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()


def heatmap(model, data, cut=None):
    with Gradient(model, EpsilonPlusFlat(canonizers=[GraphCanonizer(cut=cut)])) as attributor:
        _, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
    return relevance


def test_structure_exact_forward_and_bitwise_restore():
    model = make(torch.float32)
    data = make_data(2, torch.float32).detach()
    reference = model(data)
    exact = make()(data.double())
    before = snapshot(model)
    canonizer = GraphCanonizer()
    instances = canonizer.apply(model)
    modules = dict(model.named_modules())
    # one three-way sum (a + b + c), one +=, one torch.add, and the block's +=, all through masked sums
    sums = {name: module for name, module in modules.items() if isinstance(module, MaskedSum)}
    assert sorted(sums) == ['block.canonizer_sum', 'canonizer_sum', 'canonizer_sum_1', 'canonizer_sum_2']
    assert isinstance(modules['gate.canonizer_gate'], ConstantGate)
    # the pre-activation batch norm's functional ReLU became a threshold ReLU, the other functional ReLUs modules
    assert [name for name, module in modules.items() if isinstance(module, ThresholdReLU)] == ['canonizer_relu_2']
    assert type(modules['canonizer_relu']) is type(modules['block.canonizer_relu']) is torch.nn.ReLU
    assert all(module.eps == 0. for module in modules.values() if isinstance(module, torch.nn.BatchNorm2d))
    assert dict(canonizer._instances[0].compiled.catalog.blocks) == {
        ':0': ('0', '1', '2'), ':1': ('skip', 'residual', '0', '1'), ':2': ('0', '1'),
        ':3': ('skip', 'residual', '0', '1'),
        'block': ('skip', 'residual', '0', '1')}
    canonized = model(data)
    random.Random(0).shuffle(instances)
    for instance in instances:
        instance.remove()
    assert relative_error(canonized.double(), exact) < 1e-5
    assert_untouched(model, before)
    assert torch.equal(model(data), reference)


def test_conservation_and_gate_constant():
    model = make(bias_free=True)
    data = make_data()
    with Gradient(model, conservation_composite([GraphCanonizer()])) as attributor:
        output, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
    assert abs(relevance.sum().item() / output[0, TARGET].item() - 1.) < 1e-9
    # without the canonizer, the gate and the functional operations lose relevance
    with Gradient(model, conservation_composite([])) as attributor:
        output, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
    assert abs(relevance.sum().item() / output[0, TARGET].item() - 1.) > 1e-3


def test_cuts_are_linear_in_the_inputs_of_a_sum():
    model = make()
    data = make_data()
    full = heatmap(model, data)
    parts = [heatmap(model, data, {':0': tuple(str(other) for other in range(3) if other != index)})
             for index in range(3)]
    assert relative_error(sum(parts), full) < 1e-9
    assert all(relative_error(part, full) > 1e-3 for part in parts)
    skip, residual = (heatmap(model, data, {'block': branch}) for branch in ('skip', 'residual'))
    assert relative_error(skip + residual, full) < 1e-9
    # a concatenation's inputs are cut alike (it is one input of a sum: cutting both leaves the other)
    left, right, neither = (heatmap(model, data, {':2': index}) for index in ('1', '0', ('0', '1')))
    assert relative_error(left + right - neither, full) < 1e-9 and relative_error(left, full) > 1e-3


def test_per_sample_cuts_equal_each_sample_alone():
    model = make()
    data = make_data(3)
    specs = [{'block': 'skip'}, {':0': ('0', '2'), ':2': '1'}, None]
    batched = heatmap(model, data, PerSampleCut(specs))
    for index, spec in enumerate(specs):
        alone = heatmap(model, data[index:index + 1].detach().requires_grad_(), spec)
        assert relative_error(batched[index:index + 1], alone) < 1e-12
    with pytest.raises(ValueError, match='one cut per sample'):
        heatmap(model, make_data(2), PerSampleCut(specs))


def test_cut_can_change_while_registered_and_bad_cuts_change_nothing():
    model = make()
    data = make_data()
    expected = heatmap(model, data, {'block': 'residual'})
    canonizer = GraphCanonizer()
    with Gradient(model, EpsilonPlusFlat(canonizers=[canonizer])) as attributor:
        _, uncut = attributor(data, lambda output: output_relevance(output, TARGET))
        canonizer.cut = {'block': 'residual'}
        _, changed = attributor(data, lambda output: output_relevance(output, TARGET))
        for bad, message in [(['no.such'], 'not a module'), ({'block': 'other'}, "'other' for 'block' is not valid"),
                             ({':0': '3'}, 'not valid'), (['gate'], 'only a gate')]:
            with pytest.raises(ValueError, match=message):
                canonizer.cut = bad
        _, still = attributor(data, lambda output: output_relevance(output, TARGET))
    assert canonizer.cut == {'block': 'residual'}
    assert relative_error(changed, expected) < 1e-12
    assert torch.equal(still, changed)
    assert relative_error(uncut, expected) > 1e-3


@pytest.mark.parametrize('layer, cut', [
    ('a', {':0': ('0', '2')}),
    ('block.conv', {'block': 'skip'}),
    ('left', {':2': '1', ':3': 'skip'}),
    ('block', {}),
])
def test_isolation_equals_crp_exclude_parallel(layer, cut):
    model = make()
    data = make_data()
    conditions = [{layer: [1], 'y': [TARGET]}]
    assert graph_cuts_for(model, conditions) == [cut]
    plain = EpsilonPlusFlat(canonizers=[GraphCanonizer()])
    isolated = crp_heatmap(model, data, conditions, EpsilonPlusFlat(canonizers=[GraphCanonizer(cut=cut)]), False)
    excluded = crp_heatmap(model, data, conditions, plain, True)
    assert isolated.abs().max() > 0
    assert relative_error(isolated, excluded) < 1e-12
    if cut:
        assert relative_error(crp_heatmap(model, data, conditions, plain, False), excluded) > 1e-3


@pytest.mark.parametrize('conditions, message', [
    ([{'gate.fc': [0], 'y': [1]}], 'computes the gate'),
    ([{'a': [0], 'b': [0], 'y': [1]}], "'a' and 'b' lie in parallel paths"),
    ([{'stme': [0]}], "closest: 'stem'"),
])
def test_graph_cuts_for_refuses_with_the_reason(conditions, message):
    with pytest.raises(ValueError, match=message):
        graph_cuts_for(make(), conditions)


def test_two_layers_in_sequence_cut_both():
    cut, = graph_cuts_for(make(), [{'a': [0], 'block.conv': [1], 'y': [1]}])
    assert cut == {':0': ('0', '2'), 'block': 'skip'}


def test_hooks_before_apply_are_not_traced_and_block_hooks_fire():
    model = make()
    data = make_data().detach()
    calls = []
    # a hook registered before apply sees tensors, never the tracer's proxies
    handle = model.block.register_forward_hook(lambda module, input, output: calls.append(type(output)))
    instances = GraphCanonizer().apply(model)
    assert calls == []
    model(data)
    assert calls == [torch.Tensor]
    # a hook may replace the block's output, as in the eager forward
    handle.remove()
    handle = model.block.register_forward_hook(lambda module, input, output: output * 0)
    replaced = model(data)
    for instance in instances:
        instance.remove()
    assert relative_error(replaced, model(data)) < 1e-12
    handle.remove()
    assert relative_error(replaced, model(data)) > 1e-3


def test_untraceable_model_is_refused_untouched():
    class Branching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x) + x
            return x

    model = Branching().eval()
    before = snapshot(model)
    message = r'torch.fx cannot trace Branching \(TraceError: .*control flow.*ResNetCanonizer'
    with pytest.raises(ValueError, match=message):
        GraphCanonizer().apply(model)
    assert_untouched(model, before)


def test_training_mode_and_nested_application_are_refused():
    model = make().train()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r'call model\.eval\(\)'):
        GraphCanonizer().apply(model)
    assert_untouched(model, before)
    model.eval()
    before = snapshot(model)
    instances = GraphCanonizer().apply(model)
    registered = snapshot(model)
    with pytest.raises(RuntimeError, match='still registered'):
        GraphCanonizer().apply(model)
    assert_untouched(model, registered)
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)


def test_unmergeable_batch_norm_is_warned_about_by_name():
    class Unmergeable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(4)
            self.after = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            x = self.conv(x)
            # the batch norm's input is used twice, and the padded convolution after it cannot absorb it exactly
            return self.after(torch.relu(self.norm(x))) + x

    model = randomize_batch_norms(Unmergeable())
    message = "cannot merge 1 batch norm of Unmergeable, .*: batch norm 'norm': .*pads its input"
    with pytest.warns(UserWarning, match=message):
        instances = GraphCanonizer().apply(model)
    for instance in instances:
        instance.remove()


def test_failure_half_way_is_rolled_back(monkeypatch):
    model = make(torch.float32)
    before = snapshot(model)
    original = graph_program.Slot.build
    calls = []

    def failing(self):
        calls.append(self)
        if len(calls) == 3:
            raise RuntimeError('injected failure')
        return original(self)

    monkeypatch.setattr(graph_program.Slot, 'build', failing)
    with pytest.raises(RuntimeError, match='injected failure'):
        GraphCanonizer(cut={'block': 'skip'}).apply(model)
    assert len(calls) == 3
    assert_untouched(model, before)


def test_traced_once_and_tracer_leaves_nothing(monkeypatch):
    class Constant(torch.nn.Module):
        def forward(self, x):
            # a tensor constant: the tracer stores it on the model, which must not keep it
            return x + torch.tensor([1., 2., 3.]).reshape(1, 3, 1, 1) + x

    model = Constant().eval()
    before = snapshot(model)
    traced = []
    original = graph_tracer.LeafTracer.trace
    monkeypatch.setattr(graph_tracer.LeafTracer, 'trace',
                        lambda self, root, **options: traced.append(root) or original(self, root, **options))
    data = torch.randn(1, 3, 4, 4)
    for _ in range(2):
        instances = GraphCanonizer().apply(model)
        assert torch.equal(model(data), data + torch.tensor([1., 2., 3.]).reshape(1, 3, 1, 1) + data)
        for instance in instances:
            instance.remove()
        assert_untouched(model, before)
    assert len(traced) == 1


def test_batch_norm_before_a_convolution_that_pads_itself_is_not_merged():
    from timm.layers import Conv2dSame

    class PreActivation(torch.nn.Module):
        def __init__(self, conv: torch.nn.Module) -> None:
            super().__init__()
            self.norm = torch.nn.BatchNorm2d(3)
            self.conv = conv

        def forward(self, x):
            return self.conv(torch.relu(self.norm(x)))

    # padding=0 as an attribute, but 'same' padding in its forward: merging the batch norm before it is not exact
    model = randomize_batch_norms(PreActivation(Conv2dSame(3, 4, 3))).double()
    message = "cannot merge 1 batch norm of PreActivation, .*: batch norm 'norm': .*pads its input"
    with pytest.warns(UserWarning, match=message):
        GraphCanonizer().apply(model)[0].remove()
    # a 1x1 kernel pads nothing: merged, and exact
    model = randomize_batch_norms(PreActivation(Conv2dSame(3, 4, 1))).double()
    data = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    reference = model(data)
    instances = GraphCanonizer().apply(model)
    assert model.norm.eps == 0.
    assert relative_error(model(data), reference) < 1e-12
    for instance in instances:
        instance.remove()


def test_per_sample_isolating_cuts_give_crp_isolated_heatmaps_in_one_pass():
    model = make()
    data = make_data()
    conditions = [{'a': [1], 'y': [TARGET]}, {'block.conv': [2], 'y': [TARGET]}, {'left': [0], 'y': [TARGET]},
                  {'block': [1], 'y': [TARGET]}]
    composite = EpsilonPlusFlat(canonizers=[GraphCanonizer(cut=PerSampleCut(graph_cuts_for(model, conditions)))])
    batched = crp_heatmap(model, data, conditions, composite, False)
    plain = EpsilonPlusFlat(canonizers=[GraphCanonizer()])
    for index, condition in enumerate(conditions):
        excluded = crp_heatmap(model, data, [condition], plain, True)
        assert relative_error(batched[index:index + 1], excluded) < 1e-12


def test_forward_pre_hooks_of_inlined_blocks_are_warned_about():
    model = make()
    handle = model.block.register_forward_pre_hook(lambda module, input: None)
    with pytest.warns(UserWarning, match="inlines the forward of 'block' of Model: .* pre-hooks do not"):
        instances = GraphCanonizer().apply(model)
    for instance in instances:
        instance.remove()
    handle.remove()


def test_eca_and_hard_sigmoid_gates_are_constant():
    from timm.layers import EcaModule

    class Gated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.eca = EcaModule(8)
            self.fc = torch.nn.Conv2d(8, 8, 1, bias=False)
            self.head = torch.nn.Linear(8, 10, bias=False)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            x = self.eca(x)
            x = x * F.hardsigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))
            return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    model = Gated().double().eval()
    data = make_data()
    reference = model(data)
    instances = GraphCanonizer().apply(model)
    gates = [name for name, module in model.named_modules() if isinstance(module, ConstantGate)]
    assert gates == ['eca.canonizer_gate', 'canonizer_gate']
    assert relative_error(model(data), reference) < 1e-12
    for instance in instances:
        instance.remove()
    with Gradient(model, conservation_composite([GraphCanonizer()])) as attributor:
        output, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
    assert abs(relevance.sum().item() / output[0, TARGET].item() - 1.) < 1e-9
    for layer in ('eca.conv', 'fc'):
        with pytest.raises(ValueError, match='computes the gate'):
            graph_cuts_for(model, [{layer: [0]}])


def test_model_canonized_by_a_family_canonizer_is_refused():
    from helpers import make_model

    from canonizers import ResNetCanonizer

    model = make_model('resnet18')
    instances = ResNetCanonizer().apply(model)
    registered = snapshot(model)
    with pytest.raises(RuntimeError, match="'layer1.0' of ResNet already has a rewritten forward"):
        GraphCanonizer().apply(model)
    assert_untouched(model, registered)
    for instance in instances:
        instance.remove()


class TwoPaths(torch.nn.Module):
    '''Two convolutions of one input, joined by ``join``.'''
    def __init__(self, join) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.other = torch.nn.Conv2d(3, 3, 1)
        self.join = join

    def forward(self, x):
        x = torch.relu(x)
        return self.join(self.conv(x), self.other(x))


def test_merge_that_cannot_be_cut_is_warned_about_and_refused_for_isolation():
    model = TwoPaths(torch.maximum).eval()
    message = "leaves 1 operation of parallel paths of TwoPaths as .*: a maximum of 2 paths in 'the forward'"
    with pytest.warns(UserWarning, match=message):
        instances = GraphCanonizer().apply(model)
    for instance in instances:
        instance.remove()
    with pytest.raises(ValueError, match="relevance can go around 'conv' through a maximum of 2 paths"):
        graph_cuts_for(model, [{'conv': [0]}])


def test_difference_of_two_paths_is_a_sum_that_conserves_and_can_be_cut():
    model = TwoPaths(operator.sub).double().eval()
    # positive, so that no pixel is 0 on both paths
    data = torch.rand(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        instances = GraphCanonizer().apply(model)
    for instance in instances:
        instance.remove()
    # the oracle: each path's share is that of its term (the sum rule on a and -b)
    initial = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shares = []
    for cut in ({':0': '1'}, {':0': '0'}):
        with Gradient(without_biases(model), conservation_composite([GraphCanonizer(cut=cut)])) as attributor:
            _, relevance = attributor(data.clone().requires_grad_(), initial)
        shares.append(relevance.sum().item())
    model = without_biases(model)
    first, second = model.conv(torch.relu(data)), -model.other(torch.relu(data))
    expected = [(initial * term / (first + second)).sum().item() for term in (first, second)]
    assert shares == pytest.approx(expected, rel=1e-9)
    assert graph_cuts_for(model, [{'conv': [0]}]) == [{':0': '1'}]


def test_in_place_sum_whose_input_is_read_again_is_left_as_it_is():
    class Aliasing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = torch.relu(x)
            identity = y
            # identity is y, changed in place: a sum that is not in place would change the result (torch.fx traces
            # y += ... as y + ..., so only an explicit in-place call shows it)
            y.add_(self.conv(y))
            return y + identity

    model = Aliasing().eval()
    data = torch.randn(1, 3, 4, 4)
    reference = model(data)
    with pytest.warns(UserWarning, match='in-place add_ whose input is used again after it'):
        instances = GraphCanonizer().apply(model)
    assert torch.equal(model(data), reference)
    for instance in instances:
        instance.remove()


def test_hooks_of_nested_blocks_with_one_output_all_fire():
    from helpers import make_model

    model = make_model('resnet18', dtype=torch.float64)
    data = make_data(1, torch.float64).detach()
    names = ['layer4', 'layer4.1', 'layer4.1.bn2', 'layer3.0.downsample']

    def record():
        outputs = {}
        handles = [model.get_submodule(name).register_forward_hook(
            # a copy: the eager forward changes some outputs in place afterwards (out += identity)
            lambda module, input, output, name=name: outputs.setdefault(name, []).append(output.clone()))
            for name in names]
        return outputs, handles

    expected, handles = record()
    model(data)
    for handle in handles:
        handle.remove()
    instances = GraphCanonizer().apply(model)
    outputs, handles = record()
    model(data)
    for handle in handles:
        handle.remove()
    for instance in instances:
        instance.remove()
    assert sorted(outputs) == sorted(expected) == sorted(names)
    for name in names:
        assert len(outputs[name]) == 1
        assert relative_error(outputs[name][0], expected[name][0]) < 1e-12


def test_pre_activation_through_a_relu_module_called_twice():
    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.other = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(4)
            self.relu = torch.nn.ReLU()
            self.head = torch.nn.Conv2d(4, 2, 1)

        def forward(self, x):
            x = self.relu(self.conv(x)) + self.other(x)
            # the batch norm of a sum merges into the layer after it, across the second call of the shared ReLU
            return self.head(self.relu(self.norm(x)))

    model = randomize_batch_norms(Shared()).double()
    data = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    reference = model(data)
    before = snapshot(model)
    instances = GraphCanonizer().apply(model)
    thresholds = [name for name, module in model.named_modules() if isinstance(module, ThresholdReLU)]
    assert thresholds == ['canonizer_relu'] and type(model.relu) is torch.nn.ReLU
    assert model.norm.eps == 0.
    assert relative_error(model(data), reference) < 1e-12
    with pytest.raises(ValueError, match='called at several places'):
        graph_cuts_for(model, [{'relu': [0]}])
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)


def test_gate_computed_from_the_block_input_is_constant():
    class InputGate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
            self.fc = torch.nn.Conv2d(3, 3, 1, bias=False)

        def forward(self, x):
            # the branch is gated by a squeeze of the block input, not of the branch itself
            return self.conv(x) * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))

    model = InputGate().double().eval()
    instances = GraphCanonizer().apply(model)
    assert isinstance(model.canonizer_gate, ConstantGate)
    for instance in instances:
        instance.remove()


def conservation_with_and_without(model, data):
    '''Input over output relevance of the bias-free model with the graph canonizer, and without any.'''
    ratios = []
    for canonizers in ([GraphCanonizer()], []):
        with Gradient(model, conservation_composite(canonizers)) as attributor:
            output, relevance = attributor(data, lambda output: output_relevance(output, TARGET))
        ratios.append(relevance.sum().item() / output[0, TARGET].item())
    return ratios


def test_swish_written_out_becomes_a_silu_module_and_conserves():
    class Swish(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.head = torch.nn.Linear(4, 10, bias=False)

        def forward(self, x):
            x = self.conv(x)
            x = x * torch.sigmoid(x)
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Swish().double().eval()
    data = make_data()
    reference = model(data)
    instances = GraphCanonizer().apply(model)
    assert type(model.canonizer_silu) is torch.nn.SiLU
    assert relative_error(model(data), reference) < 1e-15
    for instance in instances:
        instance.remove()
    ratios = conservation_with_and_without(model, data)
    assert abs(ratios[0] - 1.) < 1e-9 and abs(ratios[1] - 1.) > 1e-3


def test_scaling_by_a_factor_without_signal_passes_relevance():
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.gamma = torch.nn.Parameter(torch.rand(4, 1, 1) + .5)
            self.head = torch.nn.Linear(4, 10, bias=False)

        def forward(self, x):
            # a layer scale, a constant and a quotient: each multiplies the relevance when left to autograd
            x = self.gamma * torch.relu(self.conv(x)) * 3.
            return self.head((x / 7.).mean((2, 3)))

    torch.manual_seed(0)
    model = Scaled().double().eval()
    data = make_data()
    reference = model(data)
    instances = GraphCanonizer().apply(model)
    scales = [name for name, module in model.named_modules() if type(module).__name__ == 'Scale']
    assert scales == ['canonizer_scale', 'canonizer_scale_1', 'canonizer_scale_2']
    assert torch.equal(model(data), reference)
    # the factor still gets its gradient (a layer scale stays trainable)
    model(data).sum().backward()
    assert model.gamma.grad is not None and model.gamma.grad.abs().max() > 0
    for instance in instances:
        instance.remove()
    ratios = conservation_with_and_without(model, data)
    assert abs(ratios[0] - 1.) < 1e-9 and abs(ratios[1] - 1.) > 1e-3
