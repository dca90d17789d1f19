'''Linear maps the forward calls as functions on the model's own tensors (``F.conv2d`` on a weight parameter, TResNet's
blur ``F.conv2d`` on a buffer, Swin V2's and DINOv3's ``F.linear`` with a bias computed as a ``cat`` of parameters)
become layers while canonized: zennit's rules of linear layers apply, and the relevance equals that of the same model
written with modules.'''
import copy

import torch
import torch.nn.functional as F
from helpers import assert_untouched, conservation_composite, output_relevance, relative_error, snapshot
from zennit.attribution import Gradient
from zennit.composites import EpsilonAlpha2Beta1

from canonizers import GraphCanonizer, check

TARGET = 1


class Functional(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(6) * 0.1)
        self.register_buffer('blur', torch.rand(6, 1, 3, 3))
        self.w = torch.nn.Parameter(torch.randn(9, 6) * 0.3)
        self.q_bias = torch.nn.Parameter(torch.randn(3) * 0.1)
        self.v_bias = torch.nn.Parameter(torch.randn(3) * 0.1)
        self.register_buffer('k_bias', torch.zeros(3), persistent=False)
        self.head = torch.nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(F.conv2d(x, self.weight, self.bias, padding=1))
        x = F.conv2d(x, self.blur, stride=2, padding=1, groups=6)
        x = F.linear(x.mean((2, 3)), self.w, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        return self.head(torch.relu(x))


class Modules(torch.nn.Module):
    '''The same function, written with modules.'''
    def __init__(self, functional: Functional) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.blur = torch.nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False)
        self.linear = torch.nn.Linear(6, 9)
        self.head = functional.head
        with torch.no_grad():
            self.conv.weight.copy_(functional.weight)
            self.conv.bias.copy_(functional.bias)
            self.blur.weight.copy_(functional.blur)
            self.linear.weight.copy_(functional.w)
            self.linear.bias.copy_(torch.cat((functional.q_bias, functional.k_bias, functional.v_bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blur(torch.relu(self.conv(x)))
        return self.head(torch.relu(self.linear(x.mean((2, 3)))))


def make() -> Functional:
    torch.manual_seed(0)
    return Functional().double().eval().requires_grad_(False)


def data() -> torch.Tensor:
    return torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def relevance(model, composite):
    with Gradient(model, composite) as attributor:
        output, result = attributor(data().requires_grad_(), lambda output: output_relevance(output, TARGET))
    return output, result


def test_functional_layers_are_layers_and_the_model_is_supported():
    model = make()
    report = check(model, data())
    assert report.status == 'supported' and report.operations == [], report.verdict
    assert abs(report.conservation - 1) <= 1e-9 and report.forward_float64 <= 1e-12


def test_relevance_equals_the_model_written_with_modules():
    model = make()
    before = snapshot(model)
    reference = Modules(model).double().eval()
    # with biases, the computed one absorbing its share; zennit's own rules on the modules are the oracle
    for composite in (lambda canonizers: conservation_composite(canonizers),
                      lambda canonizers: EpsilonAlpha2Beta1(canonizers=canonizers)):
        _, expected = relevance(reference, composite([GraphCanonizer()]))
        _, result = relevance(model, composite([GraphCanonizer()]))
        # the computed bias is a constant added after the layer rather than the layer's own: equal up to the
        # stabilizing epsilons of the two rules (1.1e-6 measured)
        assert relative_error(result, expected) <= 1e-5
        # the oracle is sharp: uncanonized, the functional maps pass the gradient (on a copy: zennit 1.0's rules
        # leave new parameter objects behind where no canonizer of this package puts the model's own back)
        _, leaky = relevance(copy.deepcopy(model), composite([]))
        assert relative_error(leaky, expected) > 1e-3
    assert_untouched(model, before)
