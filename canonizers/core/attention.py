'''Attention with constant attention weights (CP-LRP), and the other linear maps with a constant operand that
transformers hold: as modules zennit's linear-layer rules attach to.

In an attention ``softmax(q k^T / sqrt(d)) v`` relevance has two ways back: through the values, and through the
queries and keys into the softmax. CP-LRP (Ali et al., ICML 2022), LXT's recommended setting for vision transformers,
holds the attention weights constant: the output is then a linear map of the values, whose weight is the attention
matrix, and relevance flows through the values alone. As a module that subclasses :py:obj:`torch.nn.Linear`, that map
gets the Epsilon rule of every zennit composite (it is LRP-0 with a vanishing epsilon, the rule LXT applies to it).

zennit's rules compute the backward pass by calling the module's forward again with its input alone (zennit 0.4.6
and 0.5.1 pass no keyword arguments on): the modules here therefore keep the constant operand of their last call.
With one module per place the forward calls it (the graph canonizer's per-call copies), that is the right one.
'''
import contextlib
import math
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .products import SoftmaxRule, UniformProduct, pass_relevance, shift_relevance


class ConstantOperand(torch.nn.Linear):
    '''Base of the linear maps whose weight (or shift) is a tensor of the forward, constant in the backward pass,
    passed as the keyword ``operand`` and kept for zennit's second forward. Not built by ``torch.nn.Linear.__init__``
    (no parameters of its own).'''
    def __init__(self) -> None:
        torch.nn.Module.__init__(self)
        self.operand: Optional[torch.Tensor] = None

    def keep(self, operand: Optional[torch.Tensor]) -> torch.Tensor:
        '''Keep ``operand`` (detached) for later calls without it; return the operand to use.'''
        if operand is not None:
            self.operand = operand.detach()
        elif self.operand is None:
            raise RuntimeError(f'{type(self).__name__} was called without an operand before it had one')
        return self.operand

    def extra_repr(self) -> str:
        return ''


class ConstantWeighting(ConstantOperand):
    '''``weight @ input`` (or ``input @ weight``) with a constant ``weight``: the attention weights applied to the
    values, under CP-LRP.

    Parameters
    ----------
    left: bool
        Whether the weight is the left factor (``attn @ v``, the usual order).
    equation: str, optional
        The ``torch.einsum`` equation of the product, if it is one (the weight's operand where ``left`` says).
    '''
    def __init__(self, left: bool = True, equation: Optional[str] = None) -> None:
        super().__init__()
        self.left = left
        self.equation = equation

    def forward(self, input: torch.Tensor, *, operand: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.keep(operand)
        factors = (weight, input) if self.left else (input, weight)
        if self.equation is not None:
            return torch.einsum(self.equation, *factors)
        return torch.matmul(*factors)

    def extra_repr(self) -> str:
        return ', '.join(([] if self.left else ['left=False']) + (
            [] if self.equation is None else [f'equation={self.equation!r}']))


class ConstantShift(ConstantOperand):
    '''``input + shift`` with a shift that does not depend on the input (a position embedding, a relative position
    bias added to a signal): a bias, to zennit's rules, which absorbs its share of the relevance as biases do.

    Attributes
    ----------
    zeroed: bool
        Class-wide: while True (:func:`zeroed_shifts`), every shift adds 0, as biases are zeroed for a bias-free
        measurement of conservation (shifts computed by layers, such as XCiT's Fourier position encoding, cannot be
        zeroed through the parameters).
    '''
    zeroed = False

    def forward(self, input: torch.Tensor, *, operand: Optional[torch.Tensor] = None) -> torch.Tensor:
        shift = self.keep(operand)
        return input + (shift * 0 if ConstantShift.zeroed else shift)


@contextlib.contextmanager
def zeroed_shifts() -> Iterator[None]:
    '''Make every :py:class:`ConstantShift` add 0 within the context.'''
    before, ConstantShift.zeroed = ConstantShift.zeroed, True
    try:
        yield
    finally:
        ConstantShift.zeroed = before


class SlicedLinear(torch.nn.Linear):
    '''The linear map of rows ``start:stop`` of a weight (and bias): one of the projections of
    :py:obj:`torch.nn.MultiheadAttention`'s packed input projection, as a linear layer of its own. Holds the
    attention's parameter objects.'''
    def __init__(self, weight: torch.nn.Parameter, bias: Optional[torch.nn.Parameter], rows: Tuple[int, int],
                 bias_rows: Tuple[int, int]) -> None:
        torch.nn.Module.__init__(self)
        self.weight = weight
        self.bias = bias
        self.rows, self.bias_rows = rows, bias_rows

    def operands(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        '''The weight and bias of this projection: views of the rows of the packed ones.'''
        bias = None if self.bias is None else self.bias[self.bias_rows[0]:self.bias_rows[1]]
        return self.weight[self.rows[0]:self.rows[1]], bias

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, *self.operands())

    def extra_repr(self) -> str:
        return f'rows={self.rows[0]}:{self.rows[1]}'


def attention_logits(query: torch.Tensor, key: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                     is_causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    '''The masked logits ``q k^T * scale + mask`` of :py:func:`torch.nn.functional.scaled_dot_product_attention`
    (``[..., L, S]``).'''
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    return _masked(torch.matmul(query, key.transpose(-2, -1)) * scale, attn_mask, is_causal)


def _masked(logits: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
            shift: Optional[torch.nn.Module] = None) -> torch.Tensor:
    '''``logits`` with the causal mask, and ``attn_mask`` (boolean: where to attend; else added, by ``shift`` if
    given).'''
    if is_causal:
        length, source = logits.shape[-2], logits.shape[-1]
        causal = torch.ones(length, source, dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~causal, float('-inf'))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float('-inf'))
        else:
            logits = logits + attn_mask if shift is None else shift(logits, operand=attn_mask)
    return logits


def attention_weights(query: torch.Tensor, key: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                      is_causal: bool = False, scale: Optional[float] = None,
                      enable_gqa: bool = False) -> torch.Tensor:
    '''The weights ``softmax(q k^T * scale + mask)`` of :py:func:`torch.nn.functional.scaled_dot_product_attention`,
    written out (``[..., L, S]``).'''
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    return attention_logits(query, key, attn_mask, is_causal, scale).softmax(dim=-1)


class ConstantAttention(torch.nn.Module):
    '''``softmax(q k^T * scale + mask) v`` with constant attention weights (CP-LRP): queries and keys carry no
    relevance, the weights are applied to the values by :py:attr:`weighting`, a linear layer to zennit's rules.'''
    #: whether relevance flows into queries and keys
    relevant_queries = False

    def __init__(self) -> None:
        super().__init__()
        self.weighting = ConstantWeighting()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                scale: Union[torch.Tensor, float, None] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        '''The output and the attention weights (``[..., L, S]``); ``attn_mask`` boolean (where to attend) or
        added to the logits.'''
        weights = attention_logits(query.detach(), key.detach(), attn_mask, is_causal, scale).softmax(dim=-1)
        return self.weighting(value, operand=weights), weights


class UniformAttention(torch.nn.Module):
    '''``softmax(q k^T * scale + mask) v`` under AttnLRP (Achtibat et al., ICML 2024): the uniform rule on both
    products (:py:attr:`logits`, :py:attr:`weighting`), the softmax rule (:py:attr:`softmax`), and an added mask or
    bias as a bias to zennit's rules (:py:attr:`shift`); relevance flows into queries, keys and values (see
    :py:mod:`canonizers.core.products`).'''
    relevant_queries = True

    def __init__(self) -> None:
        super().__init__()
        self.logits = UniformProduct('matmul')
        self.shift = ConstantShift()
        self.softmax = SoftmaxRule(dim=-1)
        self.weighting = UniformProduct('matmul')

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                scale: Union[torch.Tensor, float, None] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        '''The output and the attention weights, as :py:meth:`ConstantAttention.forward`.'''
        scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
        logits = _masked(self.logits(query, key.transpose(-2, -1), scale=scale), attn_mask, is_causal, self.shift)
        weights = self.softmax(logits)
        return self.weighting(weights, value), weights


#: the attention modules of each treatment of attention (the graph canonizer's ``attention``)
ATTENTIONS = {'cp-lrp': ConstantAttention, 'attnlrp': UniformAttention}


def scaled_dot_product_attention(attention: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    ''':py:func:`torch.nn.functional.scaled_dot_product_attention` (in eval mode: no dropout) computed by
    ``attention`` (:py:class:`ConstantAttention` or :py:class:`UniformAttention`).'''
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
    return attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)[0]


class AttentionProjections(torch.nn.Module):
    '''The input projections of :py:obj:`torch.nn.MultiheadAttention` as linear layers of their own, holding the
    attention's parameter objects: the values always, queries and keys where relevance flows into them (AttnLRP).'''
    def __init__(self, module: torch.nn.MultiheadAttention, queries_and_keys: bool = False) -> None:
        super().__init__()
        embed = module.embed_dim
        packed = module._qkv_same_embed_dim
        rows = [(0, embed), (embed, 2 * embed), (2 * embed, 3 * embed)]
        weights = [module.in_proj_weight] * 3 if packed else [
            module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
        linears = [SlicedLinear(weight, module.in_proj_bias, row if packed else (0, embed), row)
                   for weight, row in zip(weights, rows)]
        self.value = linears[2]
        self.query, self.key = linears[:2] if queries_and_keys else (None, None)


def multi_head_attention(module: torch.nn.MultiheadAttention, projections: AttentionProjections,
                         attention: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         key_padding_mask: Optional[torch.Tensor] = None,
                         need_weights: bool = True, attn_mask: Optional[torch.Tensor] = None,
                         average_attn_weights: bool = True,
                         is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    '''The forward of :py:obj:`torch.nn.MultiheadAttention` ``module`` in eval mode, with its input projections
    (``projections``), attention (``attention``: :py:class:`ConstantAttention` or :py:class:`UniformAttention`) and
    output projection (``module.out_proj``) as modules, so that zennit's rules attach to them. Under CP-LRP queries and
    keys are computed from detached inputs and carry no relevance. Returns what the module returns.'''
    if module.batch_first:
        query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
    length, batch, embed = query.shape
    heads, head_dim = module.num_heads, module.head_dim
    if projections.query is not None:
        q, k = projections.query(query), projections.key(key)
    else:
        if module._qkv_same_embed_dim:
            weight_q, weight_k = module.in_proj_weight[:embed], module.in_proj_weight[embed:2 * embed]
        else:
            weight_q, weight_k = module.q_proj_weight, module.k_proj_weight
        bias = module.in_proj_bias
        bias_q, bias_k = (None, None) if bias is None else (bias[:embed], bias[embed:2 * embed])
        q = F.linear(query.detach(), weight_q, bias_q)
        k = F.linear(key.detach(), weight_k, bias_k)
    v = projections.value(value)
    source = k.shape[0]
    # [length, batch, embed] -> [batch, heads, length, head_dim]
    q, k, v = (tensor.reshape(tensor.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3) for tensor in (q, k, v))
    mask = None
    if attn_mask is not None:
        mask = attn_mask.view(batch, heads, length, source) if attn_mask.dim() == 3 else attn_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float('-inf'))
    if key_padding_mask is not None:
        padding = key_padding_mask.view(batch, 1, 1, source)
        if padding.dtype == torch.bool:
            padding = torch.zeros(padding.shape, dtype=q.dtype, device=q.device).masked_fill(padding, float('-inf'))
        mask = padding if mask is None else mask + padding
    output, weights = attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
    output = output.permute(2, 0, 1, 3).reshape(length, batch, embed)
    output = module.out_proj(output)
    if module.batch_first:
        output = output.transpose(0, 1)
    if not need_weights:
        return output, None
    return output, weights.mean(1) if average_attn_weights else weights


def unsupported_attention(module: torch.nn.MultiheadAttention) -> Optional[str]:
    '''Why :py:func:`multi_head_attention` cannot stand in for ``module``, or None.'''
    if module.bias_k is not None or module.add_zero_attn:
        return 'add_bias_kv or add_zero_attn'
    if not module._qkv_same_embed_dim and module.kdim != module.vdim:
        return 'keys and values of different sizes'
    return None


def _shift_mask(padded: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int],
                like: torch.Tensor) -> torch.Tensor:
    '''The additive mask (0 or -100) of shifted windows that keeps tokens from attending across the regions the
    cyclic shift joined: ``[windows, tokens, tokens]``.'''
    regions = like.new_zeros(padded)
    number = 0
    for rows in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for columns in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[rows[0]:rows[1], columns[0]:columns[1]] = number
            number += 1
    regions = regions.view(padded[0] // window[0], window[0], padded[1] // window[1], window[1])
    regions = regions.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    differs = regions.unsqueeze(1) - regions.unsqueeze(2)
    return differs.masked_fill(differs != 0, -100.0).masked_fill(differs == 0, 0.0)


def window_attention(module: torch.nn.Module, attention: torch.nn.Module, input: torch.Tensor,
                     qkv_weight: torch.Tensor, proj_weight: torch.Tensor, relative_position_bias: torch.Tensor,
                     window_size: Sequence[int], num_heads: int, shift_size: Sequence[int],
                     attention_dropout: float = 0.0, dropout: float = 0.0, qkv_bias: Optional[torch.Tensor] = None,
                     proj_bias: Optional[torch.Tensor] = None, logit_scale: Optional[torch.Tensor] = None,
                     training: bool = True) -> torch.Tensor:
    '''torchvision's ``shifted_window_attention`` (Swin and Swin V2, in eval mode) computed by ``attention``
    (:py:class:`ConstantAttention` or :py:class:`UniformAttention`): the queries, keys and values come from
    ``module.qkv`` and the output from ``module.proj`` (the linear layers of the ``ShiftedWindowAttention`` block, so
    that zennit's rules attach to them); under CP-LRP queries and keys are computed from the detached input.'''
    batch, height, width, channels = input.shape
    window = (window_size[0], window_size[1])
    x = F.pad(input, (0, 0, 0, (window[1] - width % window[1]) % window[1], 0, (window[0] - height % window[0])
                      % window[0]))
    padded = (x.shape[1], x.shape[2])
    # a window as large as the padded input has nothing to shift
    shift = tuple(0 if window[axis] >= padded[axis] else shift_size[axis] for axis in (0, 1))
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (padded[0] // window[0]) * (padded[1] // window[1])
    x = x.view(batch, padded[0] // window[0], window[0], padded[1] // window[1], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * windows, window[0] * window[1], channels)
    tokens, head = x.shape[1], channels // num_heads
    qkv = module.qkv(x)
    if not attention.relevant_queries:
        if logit_scale is not None and qkv_bias is not None:
            # Swin V2 has no key bias
            qkv_bias = torch.cat([qkv_bias[:channels], torch.zeros_like(qkv_bias[channels:2 * channels]),
                                  qkv_bias[2 * channels:]])
        bias_qk = None if qkv_bias is None else qkv_bias[:2 * channels]
        qkv = torch.cat([F.linear(x.detach(), qkv_weight[:2 * channels], bias_qk), qkv[..., 2 * channels:]], -1)
    elif logit_scale is not None and qkv_bias is not None:
        # Swin V2 has no key bias: module.qkv's is zeroed in its forward, and so here
        qkv = shift_relevance(qkv, -torch.cat([torch.zeros_like(qkv_bias[:channels]), qkv_bias[channels:2 * channels],
                                               torch.zeros_like(qkv_bias[2 * channels:])]))
    qkv = qkv.reshape(x.shape[0], tokens, 3, num_heads, head).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        # cosine attention: the norms are constant (as LayerNorm's standard deviation), relevance passes them
        q, k = (pass_relevance(tensor, 1 / tensor.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12))
                for tensor in (q, k))
        scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        scale = head ** -0.5
    bias = relative_position_bias
    if sum(shift) > 0:
        mask = _shift_mask(padded, window, shift, x)
        bias = (bias + mask.unsqueeze(1)).repeat(batch, 1, 1, 1)
    x, _ = attention(q, k, v, attn_mask=bias, scale=scale)
    x = x.transpose(1, 2).reshape(x.shape[0], tokens, channels)
    x = module.proj(x)
    x = x.view(batch, padded[0] // window[0], padded[1] // window[1], window[0], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded[0], padded[1], channels)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()
