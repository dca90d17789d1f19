'''Models already written for zennit: residual blocks that stack their paths into a ``zennit.layer.Sum`` (as zennit's
documentation writes them). GraphCanonizer keeps the model's own ``Sum`` modules, so the composite's sum rule applies
to them, masks the stacked paths so that they can be cut, and ``cuts_for`` finds them.

The oracle: zennit itself on a float64 copy whose batch norms are folded into the convolutions by hand (exact
merging), with every merge written as a ``Sum``.'''
import pytest
import torch
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
from zennit.composites import EpsilonPlus
from zennit.layer import Sum

from canonizers import GraphCanonizer
from canonizers.crp import IsolatingCondAttribution, cuts_for

TARGET = 3


class Block(torch.nn.Module):
    '''A residual block; ``zennit_sum`` chooses ``Sum()(torch.stack([identity, out], -1))`` or ``identity + out``.'''
    def __init__(self, channels: int, zennit_sum: bool) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)
        self.zennit_sum = zennit_sum
        if zennit_sum:
            self.sum = Sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.zennit_sum:
            return torch.relu(self.sum(torch.stack([x, out], dim=-1)))
        return torch.relu(x + out)


class Net(torch.nn.Module):
    def __init__(self, sums=(True, True)) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.block1 = Block(8, sums[0])
        self.block2 = Block(8, sums[1])
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.pool(self.block2(self.block1(x))).flatten(1))


def make(sums=(True, True), bias_free: bool = False) -> Net:
    torch.manual_seed(0)
    return randomize_batch_norms(Net(sums), bias_free=bias_free).double()


def folded(model: Net) -> Net:
    '''The oracle model: every batch norm folded into the convolution before it, in float64, and every merge a
    zennit ``Sum``: zennit's own canonization with exact batch-norm merging.'''
    reference = make((True, True))
    reference.load_state_dict(model.state_dict(), strict=False)
    for parent in [reference, reference.block1, reference.block2]:
        for conv, norm in (('stem', 'bn'), ('conv1', 'bn1'), ('conv2', 'bn2')):
            if not hasattr(parent, conv):
                continue
            convolution, batch_norm = getattr(parent, conv), getattr(parent, norm)
            scale = batch_norm.weight / (batch_norm.running_var + batch_norm.eps).sqrt()
            with torch.no_grad():
                convolution.weight.mul_(scale[:, None, None, None])
                convolution.bias = torch.nn.Parameter(batch_norm.bias - batch_norm.running_mean * scale)
            setattr(parent, norm, torch.nn.Identity())
    return reference.eval()


def data() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def relevance(model: torch.nn.Module, canonizers=()) -> torch.Tensor:
    with Gradient(model, EpsilonPlus(canonizers=list(canonizers))) as attributor:
        _, result = attributor(data().requires_grad_(), lambda output: output_relevance(output, TARGET))
    return result


@pytest.mark.parametrize('sums', [(True, True), (True, False)], ids=['sum-sum', 'sum-plus'])
def test_relevance_equals_zennit_with_exact_merging(sums):
    model = make(sums)
    reference = folded(model)
    assert relative_error(reference(data()), model(data())) < 1e-12
    expected = relevance(reference)
    before = snapshot(model)
    ours = relevance(model, [GraphCanonizer()])
    assert_untouched(model, before)
    # before, the stack was traced through and each summand got the whole relevance of the sum (deviation 1.1)
    assert relative_error(ours, expected) < 1e-9


def test_zennit_sums_conserve_and_the_composite_rule_applies_to_the_model_s_own_sum():
    model = make((True, False), bias_free=True)
    calls = []
    model.block1.sum.register_forward_hook(lambda module, input, output: calls.append(module))
    with Gradient(model, conservation_composite([GraphCanonizer()])) as attributor:
        # the canonized forward calls the model's own Sum module, so the composite's sum rule applies to it
        output, result = attributor(data()[:1].requires_grad_(), lambda output: output_relevance(output, TARGET))
    assert calls == [model.block1.sum]
    assert abs(result.sum().item() / output[0, TARGET].item() - 1) < 1e-9


@pytest.mark.parametrize('sums', [(True, True), (True, False)], ids=['sum-sum', 'sum-plus'])
def test_sums_are_cut_like_any_other_and_cuts_for_finds_them(sums):
    model = make(sums)
    assert GraphCanonizer().blocks(model) == {
        'block1': ('skip', 'residual', '0', '1'), 'block2': ('skip', 'residual', '0', '1')}
    conditions = [{'block1.conv2': [2], 'y': [TARGET]}, {'block2.conv1': [5], 'y': [TARGET]}]
    assert cuts_for(model, conditions) == [{'block1': 'skip'}, {'block2': 'skip'}]
    composite = EpsilonPlus(canonizers=[GraphCanonizer()])
    excluded = crp_heatmap(model, data()[:1].requires_grad_(), conditions[:1], composite, True)
    cut = EpsilonPlus(canonizers=[GraphCanonizer(cut=cuts_for(model, conditions[:1])[0])])
    isolated = crp_heatmap(model, data()[:1].requires_grad_(), conditions[:1], cut, False)
    assert relative_error(isolated, excluded) < 1e-9
    engine = IsolatingCondAttribution(model)(data()[:1].requires_grad_(), conditions[:1], composite).heatmap
    assert relative_error(engine, excluded) < 1e-9
    leaky = crp_heatmap(model, data()[:1].requires_grad_(), conditions[:1], composite, False)
    assert relative_error(leaky, excluded) > 1e-2
