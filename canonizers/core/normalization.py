'''Normalizations with their normalizing factor held constant: affine maps that zennit's linear-layer rules attach to.

A LayerNorm computes ``(x - mean(x)) / std(x) * weight + bias``. zennit has no rule for it, and the gradient through
it does not conserve relevance. Held constant in the backward pass, the standard deviation is a scalar per sample
(per token, per group) and what remains is an affine map of ``x``: centring (a linear map), a diagonal scaling and
the bias. The rule of a linear layer applies to that map as a whole; with zennit's Epsilon rule this is the
treatment of LXT (Achtibat et al., ICML 2024; Ali et al., ICML 2022): the identity rule on the division by the standard
deviation (it is one input and one output per element) and the epsilon rule on the centring and the affine part.
Biases (and the shift of a batch norm) absorb relevance, as every bias does.

Each module here subclasses :py:obj:`torch.nn.Linear`, so that every zennit composite (they map
``torch.nn.Linear`` to the Epsilon rule) treats it as the linear layer it is in the backward pass; it holds the
normalization's own parameter objects, so gradients reach them. The forward value is the normalization's, to rounding.
'''
from typing import Optional, Sequence, Tuple, Union

import torch

from .engine import as_view, engine_needs


class ConstantScaleNorm(torch.nn.Linear):
    '''Base of the normalizations with a constant normalizing factor; holds ``weight`` and ``bias`` (or None).

    Not built by ``torch.nn.Linear.__init__``: it has no weight matrix, only the normalization's elementwise
    parameters.

    Parameters
    ----------
    weight, bias: :py:obj:`torch.nn.Parameter` or :py:obj:`torch.Tensor`, optional
        The elementwise scale and shift of the normalization (the objects, not copies).
    eps: float
        The epsilon added to the variance.
    '''
    def __init__(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> None:
        torch.nn.Module.__init__(self)
        for name, value in (('weight', weight), ('bias', bias)):
            if isinstance(value, torch.nn.Parameter) or value is None:
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value, persistent=False)
        self.eps = eps

    def affine(self, normalized: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
        '''``normalized * weight + bias``, the parameters viewed as ``shape``.'''
        if self.weight is not None:
            normalized = normalized * self.weight.view(shape)
        if self.bias is not None:
            normalized = normalized + self.bias.view(shape)
        return normalized

    def extra_repr(self) -> str:
        return f'eps={self.eps}'


class ConstantStdLayerNormFunction(torch.autograd.Function):
    '''A LayerNorm over the last ``dims`` dimensions in one kernel (``torch.native_layer_norm``), its backward pass
    that of a constant standard deviation: the centring, then the scaling.

    The same map as the composition of its steps with the standard deviation detached, to rounding, at a fraction of
    the kernels in either pass: a transformer runs it twice per LayerNorm and attribution (the forward and a rule's
    second forward). Its backward pass is built from differentiable operations, so it can be differentiated again.
    '''
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, input: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], dims: int, eps: float) -> torch.Tensor:
        output, _, rstd = torch.native_layer_norm(input, input.shape[input.dim() - dims:], weight, bias, eps)
        ctx.save_for_backward(input, weight, rstd)
        ctx.dims = dims
        # the edges of the parameters among the tensor inputs (an absent one has none)
        ctx.edges = (1 if weight is not None else None,
                     1 + (weight is not None) if bias is not None else None)
        return output

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        input, weight, rstd = ctx.saved_tensors
        axes = tuple(range(-ctx.dims, 0))
        leading = tuple(range(grad.dim() - ctx.dims))
        grad_input = grad_weight = grad_bias = None
        if engine_needs(ctx, 0):
            scaled = (grad if weight is None else grad * weight) * rstd
            # the adjoint of the centring (a symmetric projection) is the centring
            grad_input = scaled - scaled.mean(axes, keepdim=True)
        weight_edge, bias_edge = ctx.edges
        if weight_edge is not None and engine_needs(ctx, weight_edge):
            grad_weight = (grad * ((input - input.mean(axes, keepdim=True)) * rstd)).sum(leading)
        if bias_edge is not None and engine_needs(ctx, bias_edge):
            grad_bias = grad.sum(leading)
        return grad_input, grad_weight, grad_bias, None, None


class ConstantStdLayerNorm(ConstantScaleNorm):
    '''A LayerNorm over the last ``dims`` dimensions (or over dimension 1, channels first, as ConvNeXt's LayerNorm2d),
    with its standard deviation constant in the backward pass.

    Parameters
    ----------
    dims: int
        How many dimensions are normalized together (``len(normalized_shape)``).
    channels_first: bool
        Normalize over dimension 1 instead (one normalized dimension).
    '''
    def __init__(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float, dims: int = 1,
                 channels_first: bool = False) -> None:
        super().__init__(weight, bias, eps)
        self.dims = dims
        self.channels_first = channels_first

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.channels_first:
            return ConstantStdLayerNormFunction.apply(
                as_view(input), as_view(self.weight), as_view(self.bias), self.dims, self.eps)
        axes = (1,)
        mean = input.mean(axes, keepdim=True)
        centred = input - mean
        scale = torch.rsqrt(centred.pow(2).mean(axes, keepdim=True) + self.eps).detach()
        return self.affine(centred * scale, (-1,) + (1,) * (input.dim() - 2))

    def extra_repr(self) -> str:
        return f'dims={self.dims}, eps={self.eps}' + (', channels_first=True' if self.channels_first else '')


class ConstantStdGroupNorm(ConstantScaleNorm):
    '''A GroupNorm (channels on dimension 1), with the standard deviation of each group constant in the backward
    pass.'''
    def __init__(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float, groups: int) -> None:
        super().__init__(weight, bias, eps)
        self.groups = groups

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        grouped = input.reshape(input.shape[0], self.groups, -1)
        centred = grouped - grouped.mean(-1, keepdim=True)
        scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps).detach()
        normalized = (centred * scale).reshape(input.shape)
        return self.affine(normalized, (-1,) + (1,) * (input.dim() - 2))

    def extra_repr(self) -> str:
        return f'groups={self.groups}, eps={self.eps}'


class ConstantRMSNorm(ConstantScaleNorm):
    '''An RMSNorm over the last ``dims`` dimensions (or over dimension 1, channels first), with its root mean square
    constant in the backward pass: then it is a diagonal linear map (no centring).'''
    def __init__(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: Optional[float],
                 dims: int = 1, channels_first: bool = False) -> None:
        super().__init__(weight, bias, eps)
        self.dims = dims
        self.channels_first = channels_first

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        axes = (1,) if self.channels_first else tuple(range(-self.dims, 0))
        eps = torch.finfo(input.dtype).eps if self.eps is None else self.eps
        scale = torch.rsqrt(input.pow(2).mean(axes, keepdim=True) + eps).detach()
        shape = (-1,) + (1,) * (input.dim() - 2) if self.channels_first else tuple(input.shape[-self.dims:])
        return self.affine(input * scale, shape)

    def extra_repr(self) -> str:
        return f'dims={self.dims}, eps={self.eps}' + (', channels_first=True' if self.channels_first else '')


class FrozenBatchNorm(ConstantScaleNorm):
    '''A batch norm in eval mode that could not be merged into a linear layer: with its running statistics it is an
    affine map already, ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel (dimension 1).'''
    def __init__(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                 running_mean: torch.Tensor, running_var: torch.Tensor) -> None:
        super().__init__(weight, bias, eps)
        self.register_buffer('running_mean', running_mean, persistent=False)
        self.register_buffer('running_var', running_var, persistent=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (input.dim() - 2)
        normalized = (input - self.running_mean.view(shape)) * torch.rsqrt(self.running_var + self.eps).view(shape)
        return self.affine(normalized, shape)


def normalized_dims(shape: Union[int, Sequence[int]]) -> int:
    '''The number of dimensions a ``normalized_shape`` covers.'''
    return 1 if isinstance(shape, int) else len(tuple(shape))
