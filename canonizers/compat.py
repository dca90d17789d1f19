'''What differs between the zennit versions this package supports (0.4.6, 0.5.1 and 1.0).'''
import zennit.core

#: Whether zennit's rules swap in their modified parameters by assignment: zennit 1.0 and newer load them with
#: ``load_state_dict(assign=True)`` (``zennit.core.ParamMod.state_dicts``, zennit pull request #223) and afterwards
#: put *new* parameter objects holding the previous values back, so a merge must not rely on the parameter objects it
#: changed staying in the module; in exchange, a merge may install tensors computed from the original parameters
#: (gradients reach those). zennit 0.4.6 and 0.5.1 swap parameters with ``setattr`` and back, which requires
#: ``torch.nn.Parameter`` objects (leaves) there.
RULES_ASSIGN_PARAMETERS: bool = hasattr(getattr(zennit.core, 'ParamMod', None), 'state_dicts')
