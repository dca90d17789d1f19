'''The rules of canonizers.evaluation against zennit's own: StabilizedQuotient is zennit's stabilized division, bit
for bit, and the conservation composite gives the relevance of zennit's stock rules, bit for bit.'''
import pytest
import torch
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite
from zennit.core import stabilize
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass
from zennit.types import Activation, AvgPool, Linear

from canonizers import GraphCanonizer
from canonizers.evaluation import StabilizedQuotient, conservation_composite, output_relevance

EPSILONS = (0.0, 1e-40, 1e-30, 1e-10, 1e-6, 0.25)


def zennit_quotient(out_grad, output, epsilon):
    return out_grad / stabilize(output, epsilon)


def outputs(dtype):
    '''Outputs a division by which is delicate: zeros of both signs, NaN, infinities, subnormal and huge values.'''
    generator = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float('nan'), float('inf'), -float('inf'), 1e-42, -1e-42, 1e-39, -3e38, 3e38,
                            1e-30, -1e-30, 1e-10, -1e-10], dtype=dtype)
    return torch.cat([special, torch.randn(1000, generator=generator, dtype=dtype)])


def bits(tensor):
    '''The bit patterns of ``tensor``, NaNs as one pattern (their payloads may differ).'''
    integer = {torch.float32: torch.int32, torch.float64: torch.int64}[tensor.dtype]
    return torch.where(tensor.isnan(), torch.nan, tensor).view(integer)


@pytest.mark.parametrize('grad', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('epsilon', EPSILONS)
def test_stabilized_quotient_is_zennits_bit_for_bit(dtype, epsilon, grad):
    '''In a backward pass (no graph: the quotient overwrites the denominator) and under create_graph.'''
    output = outputs(dtype)
    out_grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out_grad[:2] = torch.tensor([1.0, -1.0], dtype=dtype)
    expected = zennit_quotient(out_grad, output, epsilon)
    original = output.clone()
    with torch.set_grad_enabled(grad):
        result = StabilizedQuotient(epsilon)(out_grad, [output])
    assert torch.equal(bits(result), bits(expected))
    # the output is read, never written
    assert torch.equal(bits(output), bits(original))


def test_stabilized_quotient_has_the_memory_layout_of_zennits():
    '''The layout decides the bits of the matrix products the quotient enters: that of zennit's quotient, also where
    the output is laid out otherwise than its gradient.'''
    output = torch.randn(30, 20).T
    for out_grad in (torch.randn(20, 30), torch.randn(30, 20).T):
        with torch.no_grad():
            result = StabilizedQuotient(1e-6)(out_grad, [output])
        expected = zennit_quotient(out_grad, output, 1e-6)
        assert result.stride() == expected.stride()
        assert torch.equal(bits(result), bits(expected))


def test_stabilized_quotient_broadcasts_as_the_division_does():
    output = outputs(torch.float32)[None].expand(3, -1)
    out_grad = torch.randn(3, output.shape[1], dtype=torch.float64)
    with torch.no_grad():
        # another type, and a gradient larger than the output
        result = StabilizedQuotient(1e-6)(out_grad, [output])
        broadcast = StabilizedQuotient(1e-6)(out_grad.float(), [output[:1]])
    assert result.dtype == torch.float64
    assert torch.equal(bits(result), bits(zennit_quotient(out_grad, output, 1e-6)))
    assert torch.equal(bits(broadcast), bits(zennit_quotient(out_grad.float(), output[:1], 1e-6)))


def test_stabilized_quotient_is_differentiable_as_zennits():
    '''Under create_graph zennit's rules differentiate the quotient again: the same graph as zennit's.'''
    output = torch.randn(200, dtype=torch.float64, requires_grad=True)
    out_grad = torch.randn(200, dtype=torch.float64, requires_grad=True)
    mine = StabilizedQuotient(0.1)(out_grad, [output])
    theirs = zennit_quotient(out_grad, output, 0.1)
    assert torch.equal(mine, theirs)
    weights = torch.randn(200, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(mine, (output, out_grad), weights),
                                                  torch.autograd.grad(theirs, (output, out_grad), weights)))


def stock_composite(canonizers, epsilon):
    '''The conservation composite with zennit's own gradient mappers.'''
    norm = Norm()
    norm.gradient_mapper = lambda out_grad, outputs: out_grad / stabilize(outputs[0], epsilon)
    return LayerMapComposite(layer_map=[(Activation, Pass()), (Sum, norm), (AvgPool, norm),
                                        (Linear, Epsilon(epsilon=epsilon))], canonizers=canonizers)


@pytest.mark.parametrize('epsilon', [1e-30, 0.5])
def test_the_conservation_composite_gives_the_relevance_of_zennits_stock_rules(epsilon, small_vit):
    model, data = small_vit
    relevances = []
    for composite in (conservation_composite([GraphCanonizer()], epsilon=epsilon),
                      stock_composite([GraphCanonizer()], epsilon)):
        with Gradient(model, composite) as attributor:
            relevances.append(attributor(data.clone(), lambda out: output_relevance(out, 3))[1])
    assert relevances[0].abs().sum() > 0
    assert torch.equal(bits(relevances[0]), bits(relevances[1]))


@pytest.fixture(scope='module')
def small_vit():
    '''torchvision's ViT, small, random (its residual connections are sums to the sum rule).'''
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=5).eval()
    for parameter in vit.parameters():
        parameter.requires_grad_(False)
        torch.nn.init.normal_(parameter, std=0.3)
    return vit, torch.randn(2, 3, 32, 32)
