'''Blocks with parallel paths whose forward is rewritten so that named paths (branches) can be cut.'''
from typing import Dict, List, Optional, Tuple, Union

import torch

from .cuts import BRANCHES, RESIDUAL, BlockCatalog, CutLike, ParsedCut, PerSampleCut, ResolvedCut, parse_cut, public_cut
from .rewrites import Checked, ForwardRewrite


class BlockCanonizer(ForwardRewrite):
    '''Base class of canonizers that rewrite the forward of blocks with parallel paths, so that named paths can be cut.

    Subclasses set :py:attr:`block_types` and implement :py:meth:`rewrite` (install the new forward and its modules)
    and :py:meth:`update` (set the gradient masks for a resolved cut). :py:meth:`apply` validates everything before
    it changes anything, and undoes what it did if anything fails.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
        Which paths carry no relevance; see the package documentation.
    '''
    def __init__(self, cut: CutLike = None) -> None:
        super().__init__()
        self._cut: ParsedCut = parse_cut(cut)
        # registered instances, to update their masks when the cut changes
        self._instances: List[BlockCanonizer] = []
        self.owner: Optional[BlockCanonizer] = None
        self.catalog: Optional[BlockCatalog] = None

    # --- the cut -------------------------------------------------------------------------------------------------
    @property
    def cut(self) -> Union[Dict[str, str], PerSampleCut]:
        '''The cut, as a mapping of block names or patterns to branches (or a :py:class:`PerSampleCut`). Setting it
        validates it against every registered model first, then acts from the next forward pass on.'''
        return public_cut(self._cut)

    @cut.setter
    def cut(self, value: CutLike) -> None:
        parsed = parse_cut(value)
        catalogs = {id(instance.catalog): instance.catalog for instance in self._instances}
        # resolve against every model first, so that a bad cut changes nothing anywhere
        resolved = {key: catalog.resolve(parsed) for key, catalog in catalogs.items()}
        self._cut = parsed
        for instance in self._instances:
            instance.update(resolved[id(instance.catalog)])

    def __repr__(self) -> str:
        return f'{type(self).__name__}(cut={self.cut!r})'

    # --- finding and validating blocks --------------------------------------------------------------------------
    def branches(self, name: str, module: torch.nn.Module) -> Tuple[str, ...]:
        '''The branches of a rewritten block that can be cut; empty if the block cannot be cut.'''
        return BRANCHES

    def branch_of(self, name: str, module: torch.nn.Module, layer: str) -> str:
        '''The branch of block ``name`` that holds ``layer`` (a name relative to the block); the transforming
        (``"residual"``) branch unless a subclass knows better.'''
        return RESIDUAL

    def isolating_cut(self, name: str, module: torch.nn.Module, layer: str) -> Tuple[str, ...]:
        '''The branches of block ``name`` to cut so that all relevance through the block passes ``layer``: every
        branch but the one holding it.'''
        held = self.branch_of(name, module, layer)
        return tuple(branch for branch in self.branches(name, module) if branch != held)

    def refusal(self, name: str, module: torch.nn.Module) -> Optional[str]:
        return f'block {name!r} ({type(module).__name__}) has no parallel path that could be cut'

    def check(self, root_module: torch.nn.Module, catalog: Optional[BlockCatalog] = None) -> Checked:
        '''Validate that this canonizer can be applied, without changing anything.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.
        catalog: :py:class:`~canonizers.core.cuts.BlockCatalog`, optional
            Blocks to resolve the cut against; those of this canonizer by default.

        Returns
        -------
        :py:class:`~canonizers.core.rewrites.Checked`
            The blocks to rewrite, and the cut resolved against the model's blocks.
        '''
        blocks = super().check(root_module, catalog).blocks
        return Checked(blocks, (catalog or self.catalog_of(root_module)).resolve(self._cut))

    # --- applying and removing ------------------------------------------------------------------------------------
    def apply(self, root_module: torch.nn.Module, catalog: Optional[BlockCatalog] = None) -> List['BlockCanonizer']:
        '''Rewrite all blocks of ``root_module``; on failure, undo what was done and raise.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.
        catalog: :py:class:`~canonizers.core.cuts.BlockCatalog`, optional
            Blocks to resolve the cut against; those of this canonizer by default.

        Returns
        -------
        list of :py:class:`BlockCanonizer`
            One registered instance per rewritten block.
        '''
        catalog = catalog or self.catalog_of(root_module)
        return self.apply_checked(root_module, catalog, self.check(root_module, catalog))

    def registered(self, owner: ForwardRewrite, catalog: Optional[BlockCatalog], cut: Optional[ResolvedCut]) -> None:
        # cut changes of the owner reach this instance until it is removed
        self.owner, self.catalog = owner, catalog
        owner._instances.append(self)
        self.patch.on_undo(lambda: owner._instances.remove(self))
        self.update(cut)

    # --- to be implemented by each architecture ----------------------------------------------------------------
    def update(self, cut: ResolvedCut) -> None:
        '''Set the gradient masks of this block for a resolved cut.'''
        raise NotImplementedError
