'''Modules that canonizers put into models.'''
import torch
from zennit.types import Activation


class ThresholdReLU(torch.nn.Module, Activation):
    '''ReLU with a per-channel threshold, left behind when a batch norm before a ReLU is merged into the linear layer
    after it.

    With the batch norm as ``a * x + b`` per channel and ``t = -b / a``, ``ReLU(a * x + b) = a * (g(x) - t)``, where
    ``g(x) = x`` if ``a * x + b > 0`` and ``g(x) = t`` otherwise: the factor ``a`` and the shift ``-a * t = b`` go into
    the following linear layer, and this module computes ``g``, which is ``max(x, t)`` for ``a > 0`` and
    ``min(x, t)`` for ``a < 0``.

    Subclassing :py:class:`zennit.types.Activation` makes zennit composites treat it as an activation (and so attach
    ``Pass`` to it, as they do to ReLUs): ``SubclassMeta`` counts true subclasses as well as its listed members, in
    zennit 0.4.6 and 0.5.1 alike.

    Parameters
    ----------
    threshold: :py:obj:`torch.Tensor`
        The threshold ``t`` per channel, shape ``[channels]``.
    direction: :py:obj:`torch.Tensor`
        Per channel, where negative, ``g`` keeps the values below the threshold, else those above it.
    '''
    def __init__(self, threshold: torch.Tensor, direction: torch.Tensor) -> None:
        super().__init__()
        if threshold.ndim != 1 or threshold.shape != direction.shape:
            raise ValueError(f'threshold and direction must have the same shape [channels], got '
                             f'{tuple(threshold.shape)} and {tuple(direction.shape)}')
        negative = direction < 0
        infinity = torch.full_like(threshold, float('inf'))
        # not persistent: the bounds follow .to() but stay out of state dicts, which are the model's own
        self.register_buffer('lower', torch.where(negative, -infinity, threshold), persistent=False)
        # the upper bound costs a second pass in forward and backward: only where some channel needs it
        upper = torch.where(negative, threshold, infinity) if bool(negative.any()) else None
        self.register_buffer('upper', upper, persistent=False)

    @property
    def threshold(self) -> torch.Tensor:
        '''The threshold per channel.'''
        if self.upper is None:
            return self.lower.clone()
        return torch.where(torch.isinf(self.lower), self.upper, self.lower)

    @property
    def direction(self) -> torch.Tensor:
        '''The direction per channel: 1 keeps the values above the threshold, -1 those below it.'''
        return 1. - 2. * torch.isinf(self.lower).to(self.lower)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        '''Apply ``g`` per channel (dimension 1) of ``input``.'''
        shape = (-1,) + (1,) * (input.ndim - 2)
        # a selection is exact (g returns x or t bitwise, never a rounded difference), and unlike maximum/minimum it
        # sends no gradient into x at a tie, as the ReLU it replaces sends none at 0
        lower = self.lower.reshape(shape)
        output = torch.where(input > lower, input, lower)
        if self.upper is not None:
            upper = self.upper.reshape(shape)
            output = torch.where(output < upper, output, upper)
        return output

    def extra_repr(self) -> str:
        return f'channels={self.lower.shape[0]}'
