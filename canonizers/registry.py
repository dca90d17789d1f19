'''The family canonizers by name, and the ones that fit a model.

An explicit table, as zennit's registry of composites: the order of imports decides nothing, and a model that two
families fit is reported as such rather than given to the first.
'''
from typing import Dict, List, Type

import torch

from .core.family import FamilyCanonizer, find_fitting_families_with
from .families.densenet import DenseNetCanonizer
from .families.efficientnet import EfficientNetCanonizer
from .families.mobilenet import MobileNetCanonizer
from .families.resnet import ResNetCanonizer

#: the family canonizers of this package, by name
FAMILIES: Dict[str, Type[FamilyCanonizer]] = {
    'resnet': ResNetCanonizer,
    'densenet': DenseNetCanonizer,
    'efficientnet': EfficientNetCanonizer,
    'mobilenet': MobileNetCanonizer,
}


def families_for(root_module: torch.nn.Module) -> List[FamilyCanonizer]:
    '''Unregistered instances of the family canonizers that rewrite blocks of ``root_module``.'''
    instances = [cls() for cls in FAMILIES.values()]
    return [instance for instance in instances if instance.rewrites_blocks_of(root_module)]


# the families' misfit warnings name the families that fit the model
find_fitting_families_with(families_for)
