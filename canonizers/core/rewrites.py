'''Canonizers that rewrite the forward of modules of given types, reversibly and all or nothing.'''
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from zennit.canonizers import Canonizer

from .cuts import BlockCatalog, ResolvedCut
from .lifecycle import REWRITTEN, remove_all, rewritten_forward
from .patch import ModulePatch


class Checked(NamedTuple):
    '''What :py:meth:`ForwardRewrite.check` found, for :py:meth:`ForwardRewrite.apply_checked`.

    Attributes
    ----------
    blocks: dict of str to :py:obj:`torch.nn.Module`
        The modules to rewrite, by name.
    cut: :py:class:`~canonizers.core.cuts.ResolvedCut`, optional
        The cut resolved against the model's blocks (canonizers with cuts only).
    '''
    blocks: Dict[str, torch.nn.Module]
    cut: Optional[ResolvedCut] = None


class ForwardRewrite(Canonizer):
    '''Base class of canonizers that rewrite the forward of modules of :py:attr:`module_types` (and add the modules
    the new forward calls), without parallel paths of their own to cut: e.g. a gate treated as a constant, or a
    forward that calls functional operations as modules.

    Subclasses set :py:attr:`module_types` and implement :py:meth:`rewrite`. Like every part of a family, it is
    applied in two steps: :py:meth:`check` validates and finds what to change without changing anything, and
    :py:meth:`apply_checked` changes it, undoing what it did if anything fails.
    '''
    #: module types whose forward this canonizer rewrites
    block_types: Tuple[type, ...] = ()

    def __init__(self) -> None:
        self.name = ''
        self.module: Optional[torch.nn.Module] = None
        self.patch = ModulePatch()

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'

    # --- finding ---------------------------------------------------------------------------------------------------
    def rewrites(self, name: str, module: torch.nn.Module) -> bool:
        '''Whether ``module`` is a block whose forward this canonizer rewrites.'''
        return isinstance(module, self.block_types)

    def blocks(self, root_module: torch.nn.Module) -> Dict[str, torch.nn.Module]:
        '''The modules of ``root_module`` whose forward this canonizer rewrites, by name.'''
        return {name: module for name, module in root_module.named_modules() if self.rewrites(name, module)}

    def branches(self, name: str, module: torch.nn.Module) -> Tuple[str, ...]:
        '''The branches of a rewritten module that can be cut: none, unless the canonizer has cuts.'''
        return ()

    def refusal(self, name: str, module: torch.nn.Module) -> Optional[str]:
        '''Why a rewritten module cannot be named in a cut; None to treat its name as that of any layer (inside its
        enclosing block, if any).'''
        return None

    def catalog_of(self, root_module: torch.nn.Module) -> BlockCatalog:
        '''The cuttable blocks of ``root_module`` among the rewritten ones, and the refusals of the others, against
        which cuts are resolved.'''
        cuttable, refusals = {}, {}
        for name, module in self.blocks(root_module).items():
            branches = self.branches(name, module)
            if branches:
                cuttable[name] = branches
            elif self.refusal(name, module) is not None:
                refusals[name] = self.refusal(name, module)
        return BlockCatalog(cuttable, [name for name, _ in root_module.named_modules()], refusals)

    def layer_refusal(self, name: str, module: torch.nn.Module, layer: str) -> Optional[str]:
        '''Why a CRP condition may not name ``layer`` (a name relative to block ``name``), or None if it may.'''
        return None

    # --- check, then apply -----------------------------------------------------------------------------------------
    def check(self, root_module: torch.nn.Module, catalog: Optional[BlockCatalog] = None) -> Checked:
        '''Validate that this canonizer can be applied, without changing anything.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.
        catalog: :py:class:`~canonizers.core.cuts.BlockCatalog`, optional
            The cuttable blocks of the model (used by canonizers with cuts).

        Returns
        -------
        :py:class:`Checked`
            The modules to rewrite, by name.

        Raises
        ------
        RuntimeError
            If a module's forward is rewritten already (another canonizer is still registered).
        '''
        blocks = self.blocks(root_module)
        for name, module in blocks.items():
            if rewritten_forward(module):
                raise RuntimeError(
                    f'block {name!r} already has a rewritten forward (is another canonizer still registered on this '
                    'model? nested composite contexts are not supported): remove it first'
                )
        return Checked(blocks)

    def apply(self, root_module: torch.nn.Module) -> List['ForwardRewrite']:
        '''Rewrite all modules of ``root_module`` this canonizer rewrites; on failure, undo what was done and raise.

        Returns
        -------
        list of :py:class:`ForwardRewrite`
            One registered instance per rewritten module.
        '''
        return self.apply_checked(root_module, None, self.check(root_module))

    def apply_checked(
        self, root_module: torch.nn.Module, catalog: Optional[BlockCatalog], checked: Checked
    ) -> List['ForwardRewrite']:
        ''':py:meth:`apply` after :py:meth:`check` passed, with what it returned.'''
        instances: List[ForwardRewrite] = []
        try:
            for name, module in checked.blocks.items():
                instance = self.copy()
                instances.append(instance)
                instance.register(name, module)
                instance.registered(self, catalog, checked.cut)
        except BaseException:
            remove_all(instances)
            raise
        return instances

    def register(self, name: str, module: torch.nn.Module) -> None:
        '''Rewrite the forward of one module.'''
        self.name, self.module = name, module
        try:
            self.rewrite(self.patch, module)
            REWRITTEN.claim(self.patch, module)
        except BaseException:
            self.patch.undo()
            raise

    def registered(self, owner: 'ForwardRewrite', catalog: Optional[BlockCatalog], cut: Optional[ResolvedCut]) -> None:
        '''Called once this instance has rewritten its module; canonizers with cuts set their masks here.'''

    def remove(self) -> None:
        '''Restore the module's original forward and remove the added modules.'''
        self.patch.undo()

    def copy(self) -> 'ForwardRewrite':
        '''Return an unregistered copy of this canonizer.'''
        return self.__class__()

    # --- to be implemented by each architecture ----------------------------------------------------------------
    def rewrite(self, patch: ModulePatch, module: torch.nn.Module) -> None:
        '''Install the rewritten forward and the modules it needs on ``module``, recording all changes in ``patch``.'''
        raise NotImplementedError
