'''What differs between the zennit versions this package supports (0.4.6, 0.5.1 and 1.0).'''
from typing import Dict, List, Optional, Tuple

import torch
import zennit.core
from zennit.canonizers import Canonizer

#: Whether zennit's rules swap in their modified parameters by assignment: zennit 1.0 and newer load them with
#: ``load_state_dict(assign=True)`` (``zennit.core.ParamMod.state_dicts``, zennit pull request #223) and afterwards
#: put *new* parameter objects holding the previous values back, so a merge must not rely on the parameter objects it
#: changed staying in the module; in exchange, a merge may install tensors computed from the original parameters
#: (gradients reach those). zennit 0.4.6 and 0.5.1 swap parameters with ``setattr`` and back, which requires
#: ``torch.nn.Parameter`` objects (leaves) there.
RULES_ASSIGN_PARAMETERS: bool = hasattr(getattr(zennit.core, 'ParamMod', None), 'state_dicts')


class RestoreSwappedParameters(Canonizer):
    '''Canonizer that, on removal, puts back the parameter objects zennit's rules replaced while it was applied.

    zennit 1.0's rules leave a new parameter object over the same data in every layer they ran on (see
    :py:data:`RULES_ASSIGN_PARAMETERS`). An optimizer built before an attribution then holds objects the model no
    longer uses, and training with explanations silently stops updating those layers after the first step. The family
    canonizers of this package include this one, so that after removal the whole model holds its own parameter objects
    again, as it does with zennit 0.4.6 and 0.5.1. Only a replacement that is a parameter over the original's very
    data is undone, never anything else. With zennit 0.4.6 and 0.5.1, :py:meth:`apply` does nothing.
    '''
    def __init__(self) -> None:
        self.registered: List[Tuple[Dict[str, Optional[torch.nn.Parameter]], str, torch.nn.Parameter]] = []

    def apply(self, root_module: torch.nn.Module) -> List['RestoreSwappedParameters']:
        '''Remember the parameter objects of ``root_module`` (with zennit 1.0 and newer).

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.

        Returns
        -------
        list of :py:class:`RestoreSwappedParameters`
            One registered instance, or none with zennit 0.4.6 and 0.5.1.
        '''
        if not RULES_ASSIGN_PARAMETERS:
            return []
        instance = self.copy()
        instance.register(root_module)
        return [instance]

    def register(self, root_module: torch.nn.Module) -> None:
        '''Remember the parameter objects of every module of ``root_module``.'''
        self.registered = [
            (module._parameters, name, parameter) for module in root_module.modules()
            for name, parameter in module._parameters.items() if parameter is not None
        ]

    def remove(self) -> None:
        '''Put back each remembered parameter whose registry entry is now another parameter over the same data.'''
        for registry, name, parameter in self.registered:
            current = registry.get(name)
            if (
                current is not parameter and isinstance(current, torch.nn.Parameter)
                and current.data_ptr() == parameter.data_ptr() and current.shape == parameter.shape
                and current.dtype == parameter.dtype
            ):
                registry[name] = parameter
        self.registered = []
