'''Summation whose summands can be cut off from the gradient, and with it from the relevance.'''
from typing import Dict, List, Optional, Tuple

import torch
from zennit.layer import Sum


class _GradientMask(torch.autograd.Function):
    '''Identity in the forward pass; multiplies the incoming gradient by a broadcastable mask.'''
    @staticmethod
    def forward(ctx, input, mask):
        ctx.save_for_backward(mask)
        # a view, not a copy: the stacked summands may be large
        return input.view_as(input)

    @staticmethod
    def backward(ctx, grad_output):
        mask, = ctx.saved_tensors
        return grad_output * mask, None


def mask_gradient(input: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    '''Return ``input`` unchanged, but let only ``mask * gradient`` flow back into it.

    Parameters
    ----------
    input: :py:obj:`torch.Tensor`
        Tensor whose gradient to mask.
    mask: :py:obj:`torch.Tensor`
        Mask broadcastable to ``input``, of the same dtype and device.

    Returns
    -------
    :py:obj:`torch.Tensor`
        A view of ``input``.
    '''
    if not (torch.is_grad_enabled() and input.requires_grad):
        return input
    return _GradientMask.apply(input, mask)


def mask_columns(
    mask: torch.Tensor, like: torch.Tensor, cache: Dict[tuple, List[Optional[torch.Tensor]]], key: tuple = ()
) -> List[Optional[torch.Tensor]]:
    '''Per input of a concatenation, its gradient mask as inputs like ``like`` need it.

    Parameters
    ----------
    mask: :py:obj:`torch.Tensor`
        Mask over the inputs, ``[n]`` (all samples) or ``[batch, n]`` (per sample).
    like: :py:obj:`torch.Tensor`
        An input, whose first dimension is the batch.
    cache: dict
        Where the cast masks are kept (to be emptied when the mask changes): a transfer in every forward would cost a
        sync on GPUs.
    key: tuple, optional
        What else tells masks in ``cache`` apart.

    Returns
    -------
    list of :py:obj:`torch.Tensor` or None
        Per input: None where nothing is cut, else the mask on the device and with the dtype of ``like``, a scalar for
        all samples or ``[batch, 1, ...]`` per sample.

    Raises
    ------
    ValueError
        If a per-sample mask does not fit the batch.
    '''
    batch = like.shape[0]
    if mask.ndim == 2 and mask.shape[0] != batch:
        raise ValueError(f'per-sample mask for {mask.shape[0]} samples, but the batch holds {batch} samples: give '
                         'one cut per sample')
    key = key + (like.device, like.dtype, like.ndim, batch if mask.ndim == 2 else None)
    if key not in cache:
        cast = mask.to(device=like.device, dtype=like.dtype)
        shape = (batch,) + (1,) * (like.ndim - 1)
        cache[key] = [None if bool((column == 1).all()) else column.reshape(shape if mask.ndim == 2 else ())
                      for column in cast.unbind(-1)]
    return cache[key]


def broadcast_mask(mask: torch.Tensor, input: torch.Tensor, dim: int) -> torch.Tensor:
    '''Reshape a mask of shape ``[n]`` or ``[batch, n]`` so that it broadcasts to ``input`` along ``dim``.

    Parameters
    ----------
    mask: :py:obj:`torch.Tensor`
        Mask over the ``n`` entries of ``input`` along ``dim``, either for all samples (``[n]``) or per sample
        (``[batch, n]``).
    input: :py:obj:`torch.Tensor`
        Tensor whose first dimension is the batch.
    dim: int
        Dimension of ``input`` along which the mask applies.

    Returns
    -------
    :py:obj:`torch.Tensor`
        The mask, on the device and with the dtype of ``input``, reshaped to broadcast against it.

    Raises
    ------
    ValueError
        If the mask does not fit ``input``.
    '''
    dim = dim % input.ndim
    count = input.shape[dim]
    if mask.shape[-1] != count:
        raise ValueError(f'mask of shape {tuple(mask.shape)} does not fit {count} summands (input shape '
                         f'{tuple(input.shape)}, dim={dim})')
    shape = [1] * input.ndim
    shape[dim] = count
    if mask.ndim == 2:
        if dim == 0:
            raise ValueError('a per-sample mask needs the summands in a dimension other than the batch dimension 0')
        if mask.shape[0] != input.shape[0]:
            raise ValueError(f'per-sample mask for {mask.shape[0]} samples, but the batch holds {input.shape[0]} '
                             'samples: give one cut per sample')
        shape[0] = input.shape[0]
    return mask.to(device=input.device, dtype=input.dtype).reshape(shape)


def stack_summands(*summands: torch.Tensor) -> torch.Tensor:
    '''Stack the summands of a sum on a new dimension 1, after the batch dimension (on dimension 0 if they are
    scalars), broadcast to one shape first if they differ (as ``+`` broadcasts), for a
    :py:class:`MaskedSum` with ``dim=1``.

    After the batch dimension, each summand is a contiguous block per sample: stacking, summing and the gradients of
    the summands (views of the stack's) cost less than on an interleaved last dimension.
    '''
    if any(summand.shape != summands[0].shape for summand in summands[1:]):
        summands = torch.broadcast_tensors(*summands)
    return torch.stack(summands, dim=min(1, summands[0].dim()))


class MaskedSum(Sum):
    '''Sum along a dimension, with a mask that stops the gradient (hence relevance) into chosen summands.

    The forward value is always the plain sum. As a subclass of :py:obj:`zennit.layer.Sum`, zennit composites attach
    their rule for sums to it.

    Parameters
    ----------
    dim: int
        Dimension over which to sum; the summands are the entries along it. With ``dim=1`` (summands stacked after
        the batch dimension, each a contiguous block per sample), a one-dimensional input (stacked scalars) is summed
        over its one dimension.

    Attributes
    ----------
    mask: :py:obj:`torch.Tensor` or None
        ``None`` (no mask), a tensor of shape ``[n]`` (for all samples) or ``[batch, n]`` (per sample). Where it is
        0, no gradient flows into the summand. It follows the device and dtype of the input.
    '''
    def __init__(self, dim: int = -1) -> None:
        super().__init__(dim=dim)
        self._mask: Optional[torch.Tensor] = None
        self._cast: Optional[Tuple[tuple, torch.Tensor]] = None

    @property
    def mask(self) -> Optional[torch.Tensor]:
        '''The mask over the summands, or None.'''
        return self._mask

    @mask.setter
    def mask(self, value: Optional[torch.Tensor]) -> None:
        if value is not None:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f'mask must be None or a tensor, got {type(value).__name__}')
            if value.ndim not in (1, 2):
                raise ValueError(f'mask must have shape [n] or [batch, n], got {tuple(value.shape)}')
            # an all-ones mask changes nothing: store None so that the forward costs nothing extra
            if bool((value == 1).all()):
                value = None
        self._mask = value
        self._cast = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        '''Sum ``input`` along ``dim``, masking the gradient into the summands.'''
        dim = self._dim(input)
        if self._mask is not None and torch.is_grad_enabled() and input.requires_grad:
            input = mask_gradient(input, self._broadcast_mask(input, dim))
        return torch.sum(input, dim=dim)

    def _dim(self, input: torch.Tensor) -> int:
        # summands stacked after the batch dimension (dim=1) that are scalars have only the one dimension
        return 0 if self.dim == 1 and input.ndim == 1 else self.dim

    def _broadcast_mask(self, input: torch.Tensor, dim: int) -> torch.Tensor:
        # cache the mask as the input needs it: a transfer in every forward would cost a sync on GPUs
        key = (input.device, input.dtype, input.ndim, input.shape[0] if self._mask.ndim == 2 else None)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, broadcast_mask(self._mask, input, dim))
        return self._cast[1]
