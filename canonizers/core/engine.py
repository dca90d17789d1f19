'''What the autograd engine wants of a custom function's backward: only the gradients it will use.

A custom :py:class:`torch.autograd.Function` that computes every gradient its inputs could have does work that
``torch.autograd.grad(outputs, inputs)`` (what zennit's rules call) throws away: the gradients of the parameters,
each as costly as the input's. The engine knows which of a node's edges it will run; its inputs must be views for it
to tell, as a leaf within ``torch.autograd.grad`` has no node of its own that the engine could skip.
'''
from typing import Optional

import torch


def engine_needs(ctx: torch.autograd.function.FunctionCtx, index: int) -> bool:
    '''Whether the backward pass now running wants the gradient of the tensor input ``index`` of ``ctx``'s function.

    ``ctx.needs_input_grad`` only says whether an input requires a gradient; ``torch.autograd.grad(outputs, inputs)``
    may want fewer. Give the function its inputs through :py:func:`as_view`, so that the engine can tell. ``index``
    counts the inputs that are tensors only: other inputs (None, numbers) have no edge in the graph.
    '''
    if index >= len(ctx.next_functions):
        return False
    node = ctx.next_functions[index][0]
    return node is not None and torch._C._will_engine_execute_node(node)


def as_view(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    '''``tensor`` as a view of itself (a node of its own in the graph, for :py:func:`engine_needs`), or None.'''
    return None if tensor is None else tensor.view_as(tensor)
