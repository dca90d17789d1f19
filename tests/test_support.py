'''Never silent: every operation on the relevance path without a conserving rule is named (a warning per kind, and
``canonizers.check``), measured against the conservation of a bias-free float64 copy; the report on models of
different kinds; models that set their own forward, call a layer at several places, or hold attention modules.'''
import copy
import warnings

import pytest
import timm
import torch
import torchvision
from helpers import (
    assert_untouched,
    conservation_composite,
    output_relevance,
    randomize_batch_norms,
    relative_error,
    snapshot,
)
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat

from canonizers import GraphCanonizer, NotConservedWarning, SupportReport, check
from canonizers.evaluation import conservation
from canonizers.graph.modules import FoldSum
from canonizers.support import bias_free

TARGET = 3


def wrapped_scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2.


torch.fx.wrap('wrapped_scale')


class Residual(torch.nn.Module):
    '''A residual block whose branch is ``layer``.'''
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(self.conv(x))


class Net(torch.nn.Module):
    '''stem, a residual block around ``layer``, head.'''
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.block = Residual(layer)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.block(torch.relu(self.stem(x)))).flatten(1))


class Softmax(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(1)


class Product(torch.nn.Module):
    '''A matrix product with a weight: a linear map without a rule (as SwiftFormer's ``query @ w_g``).'''
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.transpose(1, -1) @ self.weight).transpose(1, -1)


class TwoSignals(torch.nn.Module):
    '''A product of two signals that is no gate: the uniform rule.'''
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(x)


class Wrapped(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wrapped_scale(x)


class Recurrent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(4, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        out, _ = self.rnn(x.flatten(2).transpose(1, 2))
        return out.transpose(1, 2).reshape(batch, channels, height, width)


class Fold(torch.nn.Module):
    '''Overlapping patches summed back (VOLO's outlook attention): the sum rule (FoldSum).'''
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = torch.nn.functional.unfold(x, 3, padding=1)
        return torch.nn.functional.fold(patches, (8, 8), 3, padding=1)


class Detached(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


#: layers without a conserving rule, the kind they are reported as, and their place
NOT_CONSERVING = {
    'softmax': (Softmax, 'softmax', 'block.layer'),
    'product': (Product, 'product', 'block.layer'),
    'wrapped function': (Wrapped, 'leaf function', 'block.layer'),
    'recurrent': (Recurrent, 'recurrent', 'block.layer.rnn'),
    'detached': (Detached, 'detached', 'block.layer'),
}


def data(size: int = 8, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def make(layer: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    return Net(layer).double().eval()


@pytest.mark.parametrize('case', list(NOT_CONSERVING))
def test_every_operation_without_a_conserving_rule_is_named_and_measured(case):
    build, kind, place = NOT_CONSERVING[case]
    model = make(build())
    with pytest.warns(NotConservedWarning, match=f"{place}'") as caught:
        instances = GraphCanonizer().apply(model)
    for instance in instances:
        instance.remove()
    assert len(caught) == 1
    before = snapshot(model)
    report = check(model, data())
    assert_untouched(model, before)
    assert report.status == 'not conservative' and report.exit_code == 1
    assert [(operation.kind, operation.place.startswith(place.rsplit('.', 1)[0])) for operation in
            report.operations] == [(kind, True)]
    assert report.verdict.startswith('exact, relevance not conserved at 1 place of ' + kind)
    # the oracle: the measured conservation of the bias-free copy is off indeed
    assert abs(report.conservation - 1) > 1e-6
    assert report.forward_float64 < 1e-12


def assert_supported(model: torch.nn.Module) -> None:
    '''``check`` finds ``model`` exact and conservative, names no operation and warns about none.'''
    with warnings.catch_warnings():
        warnings.simplefilter('error', NotConservedWarning)
        report = check(model, data())
    assert report.status == 'supported' and report.operations == [], report
    assert abs(report.conservation - 1) < 1e-9, report


@pytest.mark.parametrize('layer', [TwoSignals, lambda: Difference(), lambda: Fold()])
def test_products_and_differences_of_two_signals_conserve(layer):
    model = make(layer())
    with warnings.catch_warnings():
        warnings.simplefilter('error', NotConservedWarning)
        report = check(model, data())
    assert report.status == 'supported' and abs(report.conservation - 1) < 1e-9, report
    # the oracle is sharp: the same model without the canonizer does not conserve
    model = bias_free(model)
    input = data().requires_grad_()
    with Gradient(model, conservation_composite([])) as attributor:
        output, relevance = attributor(input, torch.eye(10, dtype=torch.float64)[[3]])
    assert abs(relevance.sum().item() / output[0, 3].item() - 1) > 1e-3


def test_fold_gives_each_summand_its_share_of_the_sum():
    '''FoldSum's relevance is the sum rule's, ``x_i * R_j / y_j``, written out with unfold; the sums conserve it.'''
    patches = (torch.rand(1, 2 * 9, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + .1)
    patches.requires_grad_()
    output = FoldSum(3, padding=1)(patches, (4, 4))
    assert torch.equal(output, torch.nn.functional.fold(patches, (4, 4), 3, padding=1))
    relevance = torch.rand_like(output)
    result, = torch.autograd.grad(output, patches, relevance)
    expected = patches * torch.nn.functional.unfold(relevance / output, 3, padding=1)
    assert relative_error(result, expected) < 1e-12
    assert abs(result.sum().item() / relevance.sum().item() - 1) < 1e-12


class Difference(torch.nn.Module):
    '''``pool(x) - x`` (PoolFormer's token mixer).'''
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - 2 * x


class RmsNorm(torch.nn.Module):
    '''An RMS norm written out over channels (timm's ``rms_norm2d``): ``x * rsqrt(mean(x^2) + eps) * weight``.'''
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(4) + .5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(torch.mean(x.pow(2), dim=1, keepdim=True) + 1e-5)
        return x * self.weight.reshape(1, -1, 1, 1)


class SimpleNorm(torch.nn.Module):
    '''timm's ``simple_norm``, channels last: ``x * rsqrt(var(x) + eps)``; and a norm through ``x.norm()``.'''
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = x * torch.rsqrt(torch.var(x, dim=(-1,), keepdim=True) + 1e-5)
        x = x * (1 / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return x.permute(0, 3, 1, 2)


#: norms written out as functions, each with its oracle: the same function with its normalizing factor detached
WRITTEN_OUT_NORMS = {
    RmsNorm: lambda module, x: x * torch.rsqrt(torch.mean(x.pow(2), dim=1, keepdim=True) + 1e-5).detach() * (
        module.weight.reshape(1, -1, 1, 1)),
    SimpleNorm: lambda module, x: SimpleNorm.detached(x),
}


def _simple_norm_detached(x: torch.Tensor) -> torch.Tensor:
    x = x.permute(0, 2, 3, 1)
    x = x * torch.rsqrt(torch.var(x, dim=(-1,), keepdim=True) + 1e-5).detach()
    x = x * (1 / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)).detach()
    return x.permute(0, 3, 1, 2)


SimpleNorm.detached = staticmethod(_simple_norm_detached)


@pytest.mark.parametrize('norm', list(WRITTEN_OUT_NORMS), ids=lambda norm: norm.__name__)
def test_norms_written_out_hold_their_normalizing_factor_constant(norm):
    '''A norm written out (timm's SimpleNorm2d and RmsNorm2d) is no product of two signals: its normalizing factor is
    a gate, constant in the backward pass, as LayerNorm's standard deviation is; relevance is conserved, and equals
    that of the same model with the factor detached by hand.'''
    model = make(norm())
    assert_supported(model)
    # the oracle: the gradient (times the input) of the model with the factor detached, under a vanishing epsilon
    model = bias_free(model)
    oracle = copy.deepcopy(model)
    oracle.block.layer.forward = lambda x: WRITTEN_OUT_NORMS[norm](oracle.block.layer, x)
    input = data().requires_grad_()
    target = oracle(input)[0, TARGET]
    grad, = torch.autograd.grad(target, input)
    with Gradient(model, conservation_composite([GraphCanonizer()])) as attributor:
        output, relevance = attributor(input, torch.eye(10, dtype=torch.float64)[[TARGET]])
    # the relevance of the output is 1
    expected = grad * input / target
    assert relative_error(relevance, expected) < 1e-9
    # the oracle is sharp: the plain gradient of the norm is another
    plain, = torch.autograd.grad(model(input)[0, TARGET], input)
    assert relative_error(plain * input / target, expected) > 1e-3


class ChannelMax(torch.nn.Module):
    '''The maximum over channels, of ``amax`` and of ``max`` (Hiera's and VOLO's pooling of tokens).'''
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(1, keepdim=True).expand_as(x) + torch.max(x, dim=1, keepdim=True)[0] * 0.5


@pytest.mark.parametrize('layer', [ChannelMax, lambda: timm.layers.pool2d_same.MaxPool2dSame(3, 1)],
                         ids=['amax and max', 'MaxPool2dSame'])
def test_maxima_conserve_and_are_not_reported(layer):
    '''A maximum over a dimension and a max pool kept whole (timm's MaxPool2dSame, not traceable) move relevance to
    the maximum whole: nothing is reported, and relevance is conserved.'''
    model = make(layer())
    assert_supported(model)


def test_a_conserving_model_is_reported_so_and_not_warned_about():
    model = make(torch.nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        instances = GraphCanonizer().apply(model)
    for instance in instances:
        instance.remove()
    report = check(model, data())
    assert isinstance(report, SupportReport)
    assert report.status == 'supported' and report.exit_code == 0 and report.verdict == 'exact and conservative'
    assert report.operations == [] and abs(report.conservation - 1) < 1e-12
    assert [(merge.name, merge.kind, merge.cuttable) for merge in report.merges] == [('block', 'sum', True)]
    assert 'verdict: exact and conservative' in str(report)


def test_an_untraceable_model_is_refused_with_the_reason():
    class Dynamic(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = make(Dynamic())
    before = snapshot(model)
    report = check(model, data())
    assert_untouched(model, before)
    assert report.status == 'refused' and report.exit_code == 2 and not report.traced
    assert 'torch.fx cannot trace' in report.reason and report.verdict.startswith('refused because ')


def test_check_rejects_bad_arguments():
    with pytest.raises(TypeError, match='model must be a torch.nn.Module, not str'):
        check('resnet18', data())
    with pytest.raises(TypeError, match='example_input must be a floating-point tensor'):
        check(make(torch.nn.ReLU()), torch.zeros(1, 3, 8, 8, dtype=torch.long))


def timm_model(name: str, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def torchvision_model(name: str, **kwargs):
    return lambda: getattr(torchvision.models, name)(num_classes=10, **kwargs)


def vit():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


#: models of different kinds, their input size, the expected status, and the kinds of operations expected
ZOO = {
    'resnet18': (torchvision_model('resnet18'), 32, 'supported', set()),
    'googlenet': (torchvision_model('googlenet', aux_logits=False, init_weights=False), 32, 'supported', set()),
    # selective-kernel and split attention: softmax gates over branches, constant like squeeze-and-excitation
    'timm:skresnet18': (timm_model('skresnet18'), 32, 'supported', set()),
    'timm:resnest14d': (timm_model('resnest14d'), 32, 'supported', set()),
    # sets its own forward in __init__ (self.forward = self.forward_split_cat)
    'timm:fasternet_t0': (timm_model('fasternet_t0'), 32, 'supported', set()),
    'timm:convnext_atto': (timm_model('convnext_atto'), 32, 'supported', set()),
    'vit_b_16 (2 layers)': (vit, 32, 'supported', set()),
    'timm:sequencer2d_s': (timm_model('sequencer2d_s'), 32, 'not conservative', {'recurrent'}),
    # pre-activation BatchNormAct2d that cannot be merged: a frozen batch norm, then its dropout and activation
    'timm:resnetv2_18': (timm_model('resnetv2_18'), 32, 'supported', set()),
    # merged BatchNormAct2d whose activation is timm's GELU (zennit knows no such activation)
    'timm:efficientformerv2_s0': (timm_model('efficientformerv2_s0', img_size=64), 64, 'supported', set()),
    # products of two signals that are no gate: the uniform rule (gMLP's spatial gating, StarNet's x1 * x2)
    'timm:gmlp_ti16_224': (timm_model('gmlp_ti16_224', img_size=32), 32, 'supported', set()),
    'timm:starnet_s050': (timm_model('starnet_s050'), 32, 'supported', set()),
    # pool(x) - x, a difference of two paths (a signed sum), and StarReLU, an activation kept whole
    'timm:poolformerv2_s12': (timm_model('poolformerv2_s12'), 32, 'supported', set()),
}


@pytest.mark.parametrize('name', list(ZOO))
def test_check_on_models_of_different_kinds(name):
    build, size, status, kinds = ZOO[name]
    torch.manual_seed(0)
    model = randomize_batch_norms(build())
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1 and parameter.abs().max() == 0:
                # timm starts some heads at zero, which leaves no relevance to measure
                parameter.normal_(0, 0.02)
    report = check(model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)))
    assert report.status == status, report.verdict
    assert {operation.kind for operation in report.operations} == kinds
    assert report.forward_float64 < 1e-12 and report.forward_float32 < 1e-4
    if status == 'supported':
        assert abs(report.conservation - 1) < 1e-9
    else:
        assert abs(report.conservation - 1) > 1e-6


class Shared(torch.nn.Module):
    '''One convolution called at two places, on inputs of different sizes (as CoaT's position encodings).'''
    def __init__(self, shared: bool = True) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.other = self.conv if shared else copy.deepcopy(self.conv)
        self.pool = torch.nn.AvgPool2d(2)
        self.relu1, self.relu2, self.relu3 = torch.nn.ReLU(), torch.nn.ReLU(), torch.nn.ReLU()
        self.head = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(4, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv(self.relu1(self.stem(x))))
        x = self.relu3(self.other(self.pool(x)))
        return self.fc(self.head(x).flatten(1))


@pytest.mark.parametrize('size', [8, 9], ids=['same-shapes', 'other-shapes'])
def test_a_layer_called_at_several_places_gets_a_rule_per_call(size):
    torch.manual_seed(0)
    model = Shared().double().eval()
    # the oracle: zennit on the same function with a module per call (zennit alone fails or is wrong on the shared one)
    separate = Shared(shared=False).double().eval()
    separate.load_state_dict(model.state_dict(), strict=False)
    separate.other.load_state_dict(model.conv.state_dict())
    inputs = data(size)
    composite = EpsilonPlusFlat
    with Gradient(separate, composite()) as attributor:
        _, expected = attributor(inputs.clone().requires_grad_(), lambda out: output_relevance(out, TARGET))
    before = snapshot(model)
    with Gradient(model, composite(canonizers=[GraphCanonizer()])) as attributor:
        _, ours = attributor(inputs.clone().requires_grad_(), lambda out: output_relevance(out, TARGET))
    assert_untouched(model, before)
    assert torch.allclose(ours, expected, rtol=1e-10, atol=1e-14)
    assert conservation(model, inputs, TARGET, [GraphCanonizer()]) == pytest.approx(1, abs=1e-9)


def test_multi_head_attention_is_attributed_without_zennit_s_pass_rule_and_conserves():
    # zennit counts MultiheadAttention as an activation and attaches Pass, which fails on its several outputs: the
    # canonized forward no longer calls the module, but its projections and the weighting of the values
    model = vit()
    model = bias_free(randomize_batch_norms(model)).double()
    with warnings.catch_warnings():
        warnings.simplefilter('error', NotConservedWarning)
        with Gradient(model, conservation_composite([GraphCanonizer()])) as attributor:
            output, relevance = attributor(data(32).requires_grad_(), lambda out: output_relevance(out, TARGET))
    assert abs(relevance.sum().item() / output[0, TARGET].item() - 1) < 1e-9


class Cached(torch.nn.Module):
    '''Fills a cache in its forward, as LeViT's attention biases do in eval mode.'''
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.scale = torch.nn.Parameter(torch.rand(3, 1, 1) + .5)
        self.cache = {}

    def forward(self, x: torch.Tensor, mask: 'torch.Tensor | None' = None) -> torch.Tensor:
        if 'scale' not in self.cache:
            self.cache['scale'] = self.scale * 1.
        if mask is not None:
            # the branch a call model(x) never takes: traced with mask as an input, it would be the canonized forward
            x = x * mask
        return self.conv(x) * self.cache['scale'] + x


def test_tracing_fills_no_cache_of_the_model_and_takes_optional_arguments_at_their_defaults():
    torch.manual_seed(0)
    model = Cached().double().eval()
    before = snapshot(model)
    reference = model(data())
    model.cache.clear()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        instances = GraphCanonizer().apply(model)
    # the cache holds no proxy of the trace: the model still runs, copies and is canonized exactly
    assert torch.equal(model(data()), reference)
    for instance in instances:
        instance.remove()
    assert all(isinstance(value, torch.Tensor) for value in model.cache.values())
    model.cache.clear()
    assert_untouched(model, before)
    assert torch.equal(copy.deepcopy(model)(data()), reference)
    assert check(model, data()).status == 'supported'



def test_conservation_lost_to_cancellation_is_told_apart():
    # TinyViT with random weights: its relevances grow about tenfold per block backwards, with alternating signs,
    # while adding up to the output: float64 keeps no digit of the sum at the input (R_in / R_out about -2e4)
    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model('tiny_vit_5m_224', pretrained=False, num_classes=10))
    report = check(model, torch.randn(1, 3, 64, 64))
    assert report.operations == [] and report.forward_float64 <= 1e-12
    assert report.cancellation > 1e15 and abs(report.conservation - 1) > 1
    assert report.cancels and report.status == 'not conservative' and 'relevance cancels' in report.verdict


def test_an_error_that_rounding_cannot_explain_is_still_reported():
    # rounding of relevances 10 times their sum explains an error of 1e-12, not 0.5: that is reported as lost
    for ratio, cancellation, cancels in ((1.5, 10., False), (1. + 1e-12, 10., False), (1. + 1e-7, 1e3, False),
                                         (-15., 1e18, True), (1. + 1e-5, 1e9, True)):
        report = SupportReport('Model', traced=True, forward_float64=0., conservation=ratio, cancellation=cancellation)
        assert report.cancels is cancels, (ratio, cancellation)
