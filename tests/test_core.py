'''The core for any block: a merge of three paths, named and cut like the families' two-path blocks.'''
import pytest
import torch

from canonizers import MaskedSum
from canonizers.core.blocks import BlockCanonizer
from canonizers.core.family import FamilyCanonizer


class ThreeWay(torch.nn.Module):
    '''A block whose output is the sum of three paths.'''
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Conv2d(3, 4, 1) for _ in range(3))

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


def three_way_forward(self, x):
    return self.canonizer_sum(torch.stack([self.a(x), self.b(x), self.c(x)], dim=-1))


class ThreeWayCanonizer(BlockCanonizer):
    block_types = (ThreeWay,)

    def branches(self, name, module):
        return ('a', 'b', 'c')

    def branch_of(self, name, module, layer):
        return layer.split('.')[0]

    def rewrite(self, patch, module):
        patch.set_attribute(module, 'forward', three_way_forward.__get__(module))
        patch.set_attribute(module, 'canonizer_sum', MaskedSum(dim=-1))

    def update(self, cut):
        self.module.canonizer_sum.mask = cut.mask([[(self.name, branch)] for branch in 'abc'])


class ThreeWayFamily(FamilyCanonizer):
    parts = (ThreeWayCanonizer,)


def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(ThreeWay(), torch.nn.ReLU()).eval()


def test_a_layer_in_one_of_three_paths_cuts_the_other_two():
    model = make()
    assert ThreeWayFamily().layer_cuts(model, ['0.b']) == {'0': ('a', 'c')}
    assert ThreeWayFamily().layer_cuts(model, ['0']) == {}
    with pytest.raises(ValueError, match="layers '0.a' and '0.b' lie in parallel branches of block '0'"):
        ThreeWayFamily().layer_cuts(model, ['0.a', '0.b'])


def test_cutting_two_of_three_paths_leaves_the_gradient_of_the_third():
    model = make()
    data = torch.randn(2, 3, 5, 5, requires_grad=True)
    reference = model(data)
    # the oracle: the same output, with gradient through path b alone
    block = model[0]
    through_b = torch.relu(block.a(data).detach() + block.b(data) + block.c(data).detach())
    expected, = torch.autograd.grad(through_b.sum(), data)

    canonizer = ThreeWayFamily(cut={'0': ['a', 'c']})
    assert canonizer.cut == {'0': ('a', 'c')}
    instances = canonizer.apply(model)
    output = model(data)
    gradient, = torch.autograd.grad(output.sum(), data)
    for instance in instances:
        instance.remove()
    assert torch.allclose(output, reference, atol=1e-6)
    assert torch.allclose(gradient, expected, atol=1e-6)
    assert 'forward' not in vars(block) and not hasattr(block, 'canonizer_sum')


def test_a_branch_the_block_does_not_have_is_refused_naming_its_branches():
    with pytest.raises(ValueError, match=r"branch 'd' for '0' is not valid: use 'a' or 'b' or 'c'"):
        ThreeWayFamily(cut={'0': 'd'}).apply(make())
    with pytest.raises(TypeError, match='branches in a cut must be strings'):
        ThreeWayFamily(cut={'0': 3})


class TwoSums(torch.nn.Module):
    '''A block with two residual sums in a row, as a transformer block has (attention, then MLP).'''
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        x = x + self.first(x)
        return x + self.second(x)


def two_sums_forward(self, x):
    x = self.canonizer_first(torch.stack([x, self.first(x)], dim=-1))
    return self.canonizer_second(torch.stack([x, self.second(x)], dim=-1))


class TwoSumsCanonizer(BlockCanonizer):
    '''Each sum named by its module and summand: ``first.skip``, ``first.residual``, ``second.skip``, ...'''
    block_types = (TwoSums,)
    SUMMANDS = {'first': ('first.skip', 'first.residual'), 'second': ('second.skip', 'second.residual')}

    def branches(self, name, module):
        return self.SUMMANDS['first'] + self.SUMMANDS['second']

    def branch_of(self, name, module, layer):
        return f'{layer.split(".")[0]}.residual'

    def isolating_cut(self, name, module, layer):
        # relevance reaches a layer in one sum's residual through that sum alone: cut its skip
        return (f'{layer.split(".")[0]}.skip',)

    def rewrite(self, patch, module):
        patch.set_attribute(module, 'forward', two_sums_forward.__get__(module))
        patch.set_attribute(module, 'canonizer_first', MaskedSum(dim=-1))
        patch.set_attribute(module, 'canonizer_second', MaskedSum(dim=-1))

    def update(self, cut):
        for sum_name, summands in self.SUMMANDS.items():
            masked_sum = getattr(self.module, f'canonizer_{sum_name}')
            masked_sum.mask = cut.mask([[(self.name, branch)] for branch in summands])


class TwoSumsFamily(FamilyCanonizer):
    parts = (TwoSumsCanonizer,)


def test_two_sums_in_one_block_are_named_and_cut_each():
    torch.manual_seed(0)
    model = torch.nn.Sequential(TwoSums()).eval()
    data = torch.randn(2, 3, 5, 5, requires_grad=True)
    assert TwoSumsFamily().layer_cuts(model, ['0.second']) == {'0': 'second.skip'}
    block = model[0]
    # the oracle: relevance of the output through the second sum's residual only
    hidden = data + block.first(data)
    expected, = torch.autograd.grad((hidden.detach() + block.second(hidden)).sum(), data)
    instances = TwoSumsFamily(cut={'0': 'second.skip'}).apply(model)
    gradient, = torch.autograd.grad(model(data).sum(), data)
    for instance in instances:
        instance.remove()
    assert torch.allclose(gradient, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"use 'first\.skip' or 'first\.residual' or 'second\.skip'"):
        TwoSumsFamily(cut={'0': 'third.skip'}).apply(model)
