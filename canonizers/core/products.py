'''Products of two signals and the softmax under the rules of AttnLRP (Achtibat et al., ICML 2024), as modules whose
backward pass carries relevance.

zennit passes relevance backwards as if it were the gradient: a module with a rule turns the relevance of its output
into that of its input, and anything without a rule hands it on through its Jacobian. That is wrong for a product of
two signals (the Jacobian scales the relevance by the other factor) and for a softmax. zennit's rules attach to
modules of one input, so these modules compute their rule in the backward pass of their own
:py:class:`torch.autograd.Function`, whatever the composite:

- **The uniform rule** (:py:class:`UniformProduct`, AttnLRP's Eq. 7): a product ``z = f(a, b)`` that is linear in
  each factor (``a * b``, ``a @ b``, ``einsum``) is epsilon-LRP in each factor with the other held fixed, each factor
  taking half: ``R_a = a * J_a^T (R / z) / 2``. The two halves sum to the relevance of the product (conservative).
- **The softmax rule** (:py:class:`SoftmaxRule`, AttnLRP's Eq. 13): ``R_x = x * (R - s * sum(R))``, gradient times
  input at the logits. It is not conservative by design: the relevance of the linearisation's bias term is absorbed,
  as a bias absorbs it.
- **Constant scales** (:func:`pass_relevance`): ``x * c`` with ``c`` constant hands relevance on unchanged (the z-rule
  of a diagonal map), as the graph canonizer's scale modules do under zennit's pass-through rule.

The backward pass of these modules is relevance, not the gradient: a canonized model that holds them computes LRP,
and no longer the gradient, through them (as attention weights and gates held constant change it).
'''
from typing import Optional, Tuple, Union

import torch

#: the stabilizer of the uniform rule's division by the product (zennit's ``stabilize``: away from 0, by sign)
EPSILON = 1e-12
#: the operations :py:class:`UniformProduct` computes
OPERATIONS = ('mul', 'matmul', 'bmm', 'einsum')


def stabilize(input: torch.Tensor, epsilon: float = EPSILON) -> torch.Tensor:
    '''``input`` moved ``epsilon`` away from 0 (0 goes to ``+epsilon``), as zennit stabilizes its divisions.'''
    return input + ((input == 0).to(input.dtype) + input.sign()) * epsilon


class _Uniform(torch.autograd.Function):
    '''The uniform rule of one product: forward ``f(a, b) * scale``, backward the relevance of ``a`` and ``b``.'''
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, product: 'UniformProduct',
                scale: Union[torch.Tensor, float, None]) -> torch.Tensor:
        output = product.compute(a, b)
        if scale is not None:
            output = output * scale
        ctx.product, ctx.scale = product, scale
        ctx.save_for_backward(a, b, output)
        return output

    @staticmethod
    def backward(ctx, relevance: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        a, b, output = ctx.saved_tensors
        product = ctx.product
        if product.operation == 'mul':
            # elementwise: each factor's share is half of the product's relevance, summed where it was broadcast
            share = relevance * (output / stabilize(output, product.epsilon)) / 2
            return share.sum_to_size(a.shape), share.sum_to_size(b.shape), None, None
        normalized = relevance / stabilize(output, product.epsilon)
        if ctx.scale is not None:
            normalized = normalized * ctx.scale
        grad_a, grad_b = product.vjp(a, b, normalized)
        return a * grad_a / 2, b * grad_b / 2, None, None


class UniformProduct(torch.nn.Module):
    '''A product of two signals, ``a * b``, ``a @ b``, ``torch.bmm`` or a two-operand ``torch.einsum``, under the
    uniform rule: each factor gets half of the product's relevance, in proportion to its contributions (see the
    module's description). The forward is the operation itself.

    Parameters
    ----------
    operation: str
        One of :py:data:`OPERATIONS`.
    equation: str, optional
        The ``einsum`` equation (operation ``"einsum"``).
    epsilon: float
        The stabilizer of the division by the product.
    '''
    def __init__(self, operation: str = 'mul', equation: Optional[str] = None, epsilon: float = EPSILON) -> None:
        super().__init__()
        if operation not in OPERATIONS:
            raise ValueError(f'operation={operation!r}: must be one of {", ".join(map(repr, OPERATIONS))}')
        if (operation == 'einsum') != (equation is not None):
            raise ValueError(f'equation={equation!r}: an einsum needs its equation, and only an einsum has one')
        self.operation, self.equation, self.epsilon = operation, equation, epsilon

    def compute(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        '''The product itself.'''
        if self.operation == 'mul':
            return a * b
        if self.operation == 'matmul':
            return torch.matmul(a, b)
        if self.operation == 'bmm':
            return torch.bmm(a, b)
        return torch.einsum(self.equation, a, b)

    def vjp(self, a: torch.Tensor, b: torch.Tensor, cotangent: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        '''The gradients of ``<cotangent, compute(a, b)>`` with respect to ``a`` and ``b``.'''
        if self.operation in ('matmul', 'bmm') and a.dim() >= 2 and b.dim() >= 2:
            grad_a = torch.matmul(cotangent, b.transpose(-2, -1)).sum_to_size(a.shape)
            grad_b = torch.matmul(a.transpose(-2, -1), cotangent).sum_to_size(b.shape)
            return grad_a, grad_b
        with torch.enable_grad():
            a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
            return torch.autograd.grad(self.compute(a, b), (a, b), cotangent)

    def forward(self, a: torch.Tensor, b: torch.Tensor, *,
                scale: Union[torch.Tensor, float, None] = None) -> torch.Tensor:
        '''The product of ``a`` and ``b`` (times ``scale``, a constant, if given).'''
        if not torch.is_grad_enabled() or not (a.requires_grad or b.requires_grad):
            output = self.compute(a, b)
            return output if scale is None else output * scale
        return _Uniform.apply(a, b, self, scale)

    def extra_repr(self) -> str:
        return repr(self.operation) + ('' if self.equation is None else f', equation={self.equation!r}')


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: torch.Tensor, dim: int, dtype: Optional[torch.dtype]) -> torch.Tensor:
        output = torch.softmax(input, dim, dtype=dtype)
        ctx.dim = dim
        ctx.save_for_backward(input, output)
        return output

    @staticmethod
    def backward(ctx, relevance: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        input, output = ctx.saved_tensors
        relevance = relevance.to(input.dtype)
        result = input * (relevance - output.to(input.dtype) * relevance.sum(ctx.dim, keepdim=True))
        # masked logits (-inf) get no relevance (their weight is 0)
        return torch.where(torch.isfinite(input), result, torch.zeros_like(result)), None, None


class SoftmaxRule(torch.nn.Module):
    '''``softmax(input, dim)`` under AttnLRP's softmax rule, ``R_input = input * (R - softmax(input) * sum(R))``
    (not conservative: see the module's description).

    Parameters
    ----------
    dim: int
        The dimension of the softmax.
    dtype: :py:obj:`torch.dtype`, optional
        The dtype to compute it in, as ``torch.softmax``'s.
    '''
    def __init__(self, dim: int = -1, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.dim, self.dtype = dim, dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not input.requires_grad:
            return torch.softmax(input, self.dim, dtype=self.dtype)
        return _Softmax.apply(input, self.dim, self.dtype)

    def extra_repr(self) -> str:
        return f'dim={self.dim}' + ('' if self.dtype is None else f', dtype={self.dtype}')


class _Pass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: torch.Tensor, factor: Union[torch.Tensor, float]) -> torch.Tensor:
        ctx.shape = input.shape
        return input * factor

    @staticmethod
    def backward(ctx, relevance: torch.Tensor) -> Tuple[Optional[torch.Tensor], None]:
        return relevance.sum_to_size(ctx.shape), None


class _Shift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        output = input + shift
        ctx.save_for_backward(input, output)
        return output

    @staticmethod
    def backward(ctx, relevance: torch.Tensor) -> Tuple[Optional[torch.Tensor], None]:
        input, output = ctx.saved_tensors
        return (relevance * input / stabilize(output)).sum_to_size(input.shape), None


def shift_relevance(input: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    '''``input + shift`` with a constant ``shift`` (detached), which absorbs relevance as a bias does: the input gets
    ``R * input / (input + shift)`` (the epsilon rule of a bias).'''
    shift = shift.detach()
    if not torch.is_grad_enabled() or not input.requires_grad:
        return input + shift
    return _Shift.apply(input, shift)


def pass_relevance(input: torch.Tensor, factor: Union[torch.Tensor, float]) -> torch.Tensor:
    '''``input * factor`` with a constant ``factor`` (detached), through which relevance passes unchanged.'''
    if isinstance(factor, torch.Tensor):
        factor = factor.detach()
    if not torch.is_grad_enabled() or not input.requires_grad:
        return input * factor
    return _Pass.apply(input, factor)
