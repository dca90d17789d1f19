import pytest
import torch
from zennit.layer import Sum

from canonizers import MaskedSum


def stacked(batch=3, requires_grad=True, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 5, 2, generator=generator).to(dtype).requires_grad_(requires_grad)


def gradient(module, input):
    output = module(input)
    weights = torch.arange(output.numel(), dtype=output.dtype).reshape(output.shape)
    grad, = torch.autograd.grad(output, input, weights)
    return output, grad, weights


def test_is_a_zennit_sum():
    assert isinstance(MaskedSum(), Sum)


@pytest.mark.parametrize('mask', [None, torch.tensor([1., 1.]), torch.tensor([0., 1.]), torch.tensor([[1., 0.]] * 3)])
def test_forward_is_the_plain_sum(mask):
    module = MaskedSum()
    module.mask = mask
    input = stacked()
    assert torch.equal(module(input), input.sum(-1))


def test_mask_stops_gradient_into_masked_summands():
    module = MaskedSum()
    module.mask = torch.tensor([0., 1.])
    input = stacked()
    _, grad, weights = gradient(module, input)
    assert torch.equal(grad[..., 0], torch.zeros_like(weights))
    assert torch.equal(grad[..., 1], weights)


def test_per_sample_mask_acts_per_sample():
    module = MaskedSum()
    module.mask = torch.tensor([[0., 1.], [1., 0.], [1., 1.]])
    input = stacked()
    _, grad, weights = gradient(module, input)
    assert torch.equal(grad[0, ..., 0], torch.zeros_like(weights[0]))
    assert torch.equal(grad[0, ..., 1], weights[0])
    assert torch.equal(grad[1, ..., 0], weights[1])
    assert torch.equal(grad[1, ..., 1], torch.zeros_like(weights[1]))
    assert torch.equal(grad[2], torch.stack([weights[2]] * 2, -1))


def test_per_sample_mask_must_match_batch():
    module = MaskedSum()
    module.mask = torch.tensor([[0., 1.], [1., 0.]])
    with pytest.raises(ValueError, match='2 samples.*3 samples'):
        module(stacked(batch=3))


def test_mask_must_fit_summands():
    module = MaskedSum()
    module.mask = torch.tensor([0., 1., 1.])
    with pytest.raises(ValueError, match='does not fit 2 summands'):
        module(stacked())


def test_all_ones_mask_costs_nothing():
    module = MaskedSum()
    module.mask = torch.ones(2)
    assert module.mask is None
    output = module(stacked())
    # no masking function in the graph: the sum's backward node sees the input directly
    assert type(output.grad_fn).__name__.startswith('Sum')
    assert output.grad_fn.next_functions[0][0].variable is not None


def test_masked_input_is_a_view_not_a_copy():
    module = MaskedSum()
    module.mask = torch.tensor([0., 1.])
    input = stacked()
    seen = []
    original_sum = torch.sum

    def spy(tensor, *args, **kwargs):
        seen.append(tensor)
        return original_sum(tensor, *args, **kwargs)

    torch.sum = spy
    try:
        module(input)
    finally:
        torch.sum = original_sum
    assert seen[0].data_ptr() == input.data_ptr()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_mask_follows_input_dtype(dtype):
    module = MaskedSum()
    module.mask = torch.tensor([1., 0.], dtype=torch.float16)
    input = stacked(dtype=dtype)
    _, grad, weights = gradient(module, input)
    assert grad.dtype == dtype
    assert torch.equal(grad[..., 1], torch.zeros_like(weights))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_mask_follows_input_device():
    module = MaskedSum()
    module.mask = torch.tensor([0., 1.])
    input = stacked().detach().cuda().requires_grad_()
    _, grad, weights = gradient(module, input)
    assert grad.device == input.device
    assert torch.equal(grad[..., 0], torch.zeros_like(weights))


def test_invalid_masks_are_refused():
    module = MaskedSum()
    with pytest.raises(ValueError, match=r'\[n\] or \[batch, n\]'):
        module.mask = torch.ones(2, 2, 2)
    with pytest.raises(TypeError):
        module.mask = [0, 1]


def test_summands_after_the_batch_dimension_and_of_scalars():
    # dim=1: summands stacked after the batch dimension, a per-sample mask per sample; stacked scalars: dimension 0
    module = MaskedSum(dim=1)
    module.mask = torch.tensor([[0., 1.], [1., 0.], [1., 1.]])
    input = stacked().movedim(-1, 1)
    output, grad, weights = gradient(module, input)
    assert torch.equal(output, input.sum(1))
    assert torch.equal(grad[0, 0], torch.zeros_like(weights[0])) and torch.equal(grad[0, 1], weights[0])
    assert torch.equal(grad[1, 1], torch.zeros_like(weights[1])) and torch.equal(grad[2, 0], weights[2])
    module.mask = torch.tensor([0., 1., 1.])
    scalars = torch.tensor([1., 2., 4.], requires_grad=True)
    output = module(scalars)
    grad, = torch.autograd.grad(output, scalars, torch.tensor(3.))
    assert output.shape == () and output == 7 and torch.equal(grad, torch.tensor([0., 3., 3.]))
