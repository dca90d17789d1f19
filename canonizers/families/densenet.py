'''Canonizers for torchvision DenseNet-121, -161, -169 and -201.

Every batch norm is merged exactly: ``conv0 -> norm0`` and ``conv1 -> norm2`` into the convolution before, and the
pre-activation batch norms (``norm1 -> relu1 -> conv1`` in dense layers, ``norm -> relu -> conv`` in transitions,
``norm5 -> ReLU -> pool -> classifier`` at the head) into the layer after, with the ReLU replaced by a
:py:class:`~canonizers.ThresholdReLU` (Motzkus et al., "Measurably Stronger Explanation Reliability via Model
Canonization", ICIP 2022).

The dense connections can be cut. A dense block concatenates its input ``x0`` and the outputs ``f1, f2, ...`` of its
dense layers into the input of each later dense layer and into the block output; each of these *consumers* masks the
gradient of each feature it takes in:

- dense layer ``"skip"``: features made before the layer are cut from every consumer after it, so that relevance
  reaching them passes through the layer;
- dense layer ``"residual"``: the layer's output is cut from all its consumers;
- dense block ``"skip"``: the block input is cut from the block output;
- dense block ``"residual"``: the dense layers' outputs are cut from the block output.
'''
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torchvision.models.densenet import DenseNet, _DenseBlock, _DenseLayer, _Transition

from ..core.blocks import BlockCanonizer
from ..core.cuts import RESIDUAL, SKIP, BlockCatalog, ResolvedCut
from ..core.family import FamilyCanonizer
from ..core.masked_sum import mask_columns, mask_gradient
from ..core.merging import ExactMergeBatchNorm, LinearMerge, apply_merge, check_merge
from ..core.patch import ModulePatch
from ..core.rewrites import Checked, ForwardRewrite


def densenet_merges(root_module: torch.nn.Module) -> List[LinearMerge]:
    '''The batch-norm merges of the DenseNets in ``root_module``, except the head's (see
    :py:class:`DenseNetHeadCanonizer`), one per convolution.

    Found by the structure torchvision gives the modules, not by registration order: a dense layer's ``norm1``
    normalises a concatenation and belongs to no layer before it.

    Parameters
    ----------
    root_module: :py:obj:`torch.nn.Module`
        The model.

    Returns
    -------
    list of :py:class:`~canonizers.LinearMerge`
        ``norm1 -> relu1 -> conv1 -> norm2`` of each dense layer, ``norm -> relu -> conv`` of each transition and
        ``conv0 -> norm0`` of each DenseNet.
    '''
    merges = []
    for module in root_module.modules():
        if isinstance(module, _DenseLayer):
            merges.append(LinearMerge(module.conv1, before=module.norm1, relu=(module, 'relu1'), after=module.norm2))
        elif isinstance(module, _Transition):
            merges.append(LinearMerge(module.conv, before=module.norm, relu=(module, 'relu')))
        elif isinstance(module, DenseNet):
            merges.append(LinearMerge(module.features.conv0, after=module.features.norm0))
    return merges


def head_merge(module: DenseNet) -> LinearMerge:
    '''The merge of ``norm5`` into the classifier, across the ReLU that the rewritten forward calls as a module and
    the average pool (which commutes with the per-channel affine map).'''
    return LinearMerge(module.classifier, before=module.features.norm5, relu=(module, 'canonizer_relu'))


class DenseNetHeadCanonizer(ForwardRewrite):
    '''Canonizer for torchvision's ``DenseNet`` itself: the forward calls the final ReLU and the average pool as
    modules (``canonizer_relu``, ``canonizer_pool``), so that composites map rules onto them, and ``norm5`` is merged
    into the classifier with the ReLU as a :py:class:`~canonizers.ThresholdReLU`. It has nothing to cut.

    The head's merge lives here, in the same record as the added ReLU it replaces, so that the instances of
    :py:class:`DenseNetCanonizer` can be removed in any order.
    '''
    block_types = (DenseNet,)

    def refusal(self, name: str, module: torch.nn.Module) -> str:
        return (f'{name or "the model"!r} is the DenseNet itself, which has no parallel path of its own: cut dense '
                'blocks or dense layers')

    def check(self, root_module: torch.nn.Module, catalog: Optional[BlockCatalog] = None) -> Checked:
        checked = super().check(root_module, catalog)
        for module in checked.blocks.values():
            # the ReLU does not exist before rewriting: validate the batch norm and the classifier alone
            check_merge(head_merge(module)._replace(relu=None))
        return checked

    def rewrite(self, patch: ModulePatch, module: torch.nn.Module) -> None:
        patch.set_attribute(module, 'forward', self.forward.__get__(module))
        patch.set_attribute(module, 'canonizer_relu', torch.nn.ReLU().train(module.training))
        patch.set_attribute(module, 'canonizer_pool', torch.nn.AdaptiveAvgPool2d((1, 1)).train(module.training))
        merge = head_merge(module)
        check_merge(merge)
        apply_merge(patch, merge)

    @staticmethod
    def forward(self: DenseNet, x: torch.Tensor) -> torch.Tensor:
        '''Modified DenseNet forward: ReLU and pooling as modules.'''
        features = self.features(x)
        out = self.canonizer_relu(features)
        out = self.canonizer_pool(out)
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


class FeatureMasks:
    '''Gradient masks of the features that each consumer of a dense block concatenates.

    Consumer ``c`` is dense layer ``c + 1`` (counting from 1), or the block output for the last consumer; it takes in
    features ``0..c`` (the block input and the outputs of the dense layers before it).

    Parameters
    ----------
    masks: sequence of :py:obj:`torch.Tensor` or None
        Per consumer: ``None`` (nothing cut), or a mask of shape ``[c + 1]`` (all samples) or ``[batch, c + 1]`` (per
        sample), 0 where the feature's gradient is cut.
    '''
    def __init__(self, masks: Sequence[Optional[torch.Tensor]]) -> None:
        self.masks = list(masks)
        self._cast: Dict[tuple, List[Optional[torch.Tensor]]] = {}

    def __call__(self, consumer: int, features: List[torch.Tensor]) -> List[torch.Tensor]:
        '''The features as consumer ``consumer`` takes them in: unchanged, but with masked gradients.'''
        mask = self.masks[consumer]
        # nothing to cut: the same list, no extra nodes in the graph
        if mask is None or not torch.is_grad_enabled():
            return features
        columns = self._columns(consumer, mask, features[0])
        return [feature if column is None else mask_gradient(feature, column)
                for feature, column in zip(features, columns)]

    def _columns(self, consumer: int, mask: torch.Tensor, like: torch.Tensor) -> List[Optional[torch.Tensor]]:
        return mask_columns(mask, like, self._cast, (consumer,))


class DenseBlockCanonizer(BlockCanonizer):
    '''Canonizer for torchvision's ``_DenseBlock``: every concatenation in the block (the input of each dense layer
    and the block output) masks the gradient of each feature it takes in, so that dense blocks and their dense layers
    can be cut (see the module documentation).

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
        Which paths carry no relevance.
    '''
    block_types = (_DenseBlock,)

    def catalog_of(self, root_module: torch.nn.Module) -> BlockCatalog:
        catalog = super().catalog_of(root_module)
        for name, module in root_module.named_modules():
            if isinstance(module, _Transition):
                catalog.refusals[name] = (
                    f'{name!r} is a transition between dense blocks: all relevance passes through it, there is no '
                    'parallel path to cut (no cut is needed to isolate it); cut dense blocks or dense layers')
        return catalog

    def rewrite(self, patch: ModulePatch, module: torch.nn.Module) -> None:
        patch.set_attribute(module, 'forward', self.forward.__get__(module))
        patch.set_attribute(module, 'canonizer_masks', FeatureMasks([None] * (len(module) + 1)))

    def update(self, cut: ResolvedCut) -> None:
        prefix = f'{self.name}.' if self.name else ''
        layers = [prefix + child for child in self.module.keys()]
        count = len(layers)
        masks = []
        for consumer in range(count + 1):
            summands = []
            for feature in range(consumer + 1):
                # skip cuts of the dense layers between the feature and its consumer (numbered from 1)
                pairs = [(layers[index - 1], SKIP) for index in range(feature + 1, consumer + 1)]
                if feature >= 1:
                    pairs.append((layers[feature - 1], RESIDUAL))
                if consumer == count:
                    pairs.append((self.name, SKIP if feature == 0 else RESIDUAL))
                summands.append(pairs)
            masks.append(cut.mask(summands))
        self.module.canonizer_masks = FeatureMasks(masks)

    @staticmethod
    def forward(self: _DenseBlock, init_features: torch.Tensor) -> torch.Tensor:
        '''Modified _DenseBlock forward: each consumer masks the gradients of the features it takes in.'''
        masks = self.canonizer_masks
        features = [init_features]
        for consumer, layer in enumerate(self.values()):
            features.append(layer(masks(consumer, features)))
        return torch.cat(masks(len(features) - 1, features), 1)


class DenseLayerCanonizer(BlockCanonizer):
    '''Canonizer for torchvision's ``_DenseLayer``: its forward never checkpoints (``memory_efficient``), which would
    run the layers, and the hooks of composites on them, twice. Its cuts are made by the masks of the enclosing dense
    block (see :py:class:`DenseBlockCanonizer`); a layer inside it belongs to its transforming (``"residual"``)
    branch, so CRP conditions on it cut the dense layer's skip.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
        Which paths carry no relevance.
    '''
    block_types = (_DenseLayer,)

    def rewrite(self, patch: ModulePatch, module: torch.nn.Module) -> None:
        patch.set_attribute(module, 'forward', self.forward.__get__(module))

    def branch_of(self, name: str, module: torch.nn.Module, layer: str) -> str:
        return RESIDUAL

    def update(self, cut: ResolvedCut) -> None:
        pass

    @staticmethod
    def forward(self: _DenseLayer, input: torch.Tensor) -> torch.Tensor:
        '''Modified _DenseLayer forward, without checkpointing.'''
        features = [input] if isinstance(input, torch.Tensor) else input
        out = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseNetCanonizer(FamilyCanonizer):
    '''Canonizer for torchvision DenseNet-121, -161, -169 and -201 (with or without ``memory_efficient``).

    Merges every batch norm exactly (the pre-activation ones into the layer after them, with a
    :py:class:`~canonizers.ThresholdReLU`), calls the final ReLU and average pool as modules, and rewrites
    dense blocks and dense layers so that their dense connections can be cut.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
        Which paths carry no relevance: dense block names (``"features.denseblock2"``), dense layer names
        (``"features.denseblock2.denselayer3"``) or glob patterns whose skip path is cut, or a mapping of them to
        ``"skip"`` or ``"residual"``. A dense layer's skip cut makes all relevance reaching the features before it
        pass through it; its residual cut removes its output from all consumers. A dense block's skip cut removes the
        block input from the block output, its residual cut the dense layers' outputs.
    '''
    parts = (
        lambda: ExactMergeBatchNorm(densenet_merges),
        DenseNetHeadCanonizer,
        DenseBlockCanonizer,
        DenseLayerCanonizer,
    )

    def layer_cuts(self, root_module: torch.nn.Module, layers: Iterable[str]) -> Dict[str, str]:
        '''The cut that makes all relevance reaching the input pass through every one of ``layers``.

        A layer inside a dense layer, and a dense layer itself, cut the dense layer's skip; transitions, the stem,
        dense blocks and the head lie on the only path and need no cut.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.
        layers: iterable of str
            Names of modules of the model.

        Returns
        -------
        dict of str to str
            Dense layer names and the branch to cut; empty if nothing needs cutting.
        '''
        layers = list(layers)
        dense_layers = {name for name, module in root_module.named_modules() if isinstance(module, _DenseLayer)}
        # a dense layer's output runs parallel to the features before it, so a condition on the dense layer itself
        # needs its own skip cut: no branch of the enclosing block expresses that
        cuts = super().layer_cuts(root_module, [layer for layer in layers if layer not in dense_layers])
        cuts.update((layer, SKIP) for layer in layers if layer in dense_layers)
        return cuts

