'''Models for the command line: torchvision or the demo model, their weights (state dicts read without running
code) and input preparation.'''
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .common import (
    CHECKPOINT_KEYS,
    DEMO,
    IMAGENET_MEAN,
    IMAGENET_SIZE,
    IMAGENET_STD,
    UsageError,
    check_readable,
    closest,
)


# --- models --------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    '''A model ready to explain, with how its inputs are prepared.

    Parameters
    ----------
    name: str
        ``demo`` or a torchvision model name.
    model: :py:obj:`torch.nn.Module`
        The model in eval mode, on its device, without parameter gradients.
    mean, std: tuple of float
        The input normalisation per RGB channel.
    size: int
        Height and width of the input.
    class_names: sequence of str, optional
        The name of each output, if known.
    '''
    name: str
    model: torch.nn.Module
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    size: int
    class_names: Optional[Sequence[str]] = None

    def class_label(self, index: int) -> str:
        '''The name of output ``index``, or ``class <index>``.'''
        if self.class_names is not None and index < len(self.class_names):
            return self.class_names[index]
        return f'class {index}'


#: the prefix of timm model names (``timm:resnet50d``)
TIMM = 'timm:'


def timm_name(name: str) -> Optional[str]:
    '''The timm model name in ``name`` (``timm:NAME``), or None for other models.'''
    return name[len(TIMM):] if name.startswith(TIMM) else None


def _timm():
    try:
        import timm
    except ImportError:
        raise UsageError('timm models need timm: pip install timm') from None
    return timm


def model_names() -> List[str]:
    '''``demo`` and the names of torchvision's classification models.'''
    import torchvision

    return [DEMO] + sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> None:
    '''Raise a :py:class:`UsageError` naming the closest models if ``name`` is no model this tool knows.'''
    timm_model = timm_name(name)
    if timm_model is not None:
        known = _timm().list_models()
        if timm_model not in known:
            raise UsageError(f'unknown timm model {timm_model!r}; closest: {closest(timm_model, known)}')
        return
    names = model_names()
    if name not in names:
        raise UsageError(f'unknown model {name!r}; closest: {closest(name, names)} (a torchvision classification '
                         f'model name, timm:NAME for a timm model, or {DEMO!r})')


def build_architecture(name: str, num_classes: Optional[int] = None, weights: object = None) -> torch.nn.Module:
    '''The model ``name`` with random (or torchvision's ``weights``) parameters, in eval mode; timm models are
    built without pretrained weights (never downloaded).'''
    import torchvision

    from ..demo import DemoResNet

    options = {} if num_classes is None else {'num_classes': num_classes}
    if name == DEMO:
        return DemoResNet(**options).eval()
    timm_model = timm_name(name)
    if timm_model is not None:
        return _timm().create_model(timm_model, pretrained=False, **options).eval()
    return torchvision.models.get_model(name, weights=weights, **options).eval()


def torchvision_weights(name: str, value: str):
    '''The torchvision weights enum member ``value`` of model ``name`` (e.g. ``IMAGENET1K_V2``), or None.'''
    import torchvision

    if name == DEMO or timm_name(name) is not None:
        return None
    enum = torchvision.models.get_model_weights(name)
    return enum[value] if value in enum.__members__ else None


def weights_names(name: str) -> List[str]:
    '''The torchvision weights names of model ``name``.'''
    import torchvision

    if name == DEMO or timm_name(name) is not None:
        return []
    return list(torchvision.models.get_model_weights(name).__members__)


def _is_state_dict(value: object) -> bool:
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(key, str) and isinstance(item, torch.Tensor) for key, item in value.items()))


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    '''Read a state dict, bare or inside a checkpoint, without unpickling anything but tensors and containers.

    Parameters
    ----------
    path: :py:obj:`pathlib.Path`
        A file written by ``torch.save``: a state dict, or a mapping holding one under one of
        :py:data:`CHECKPOINT_KEYS`.

    Returns
    -------
    dict of str to :py:obj:`torch.Tensor`
        The state dict, without the ``module.`` prefix of ``DataParallel``.

    Raises
    ------
    UsageError
        If the file cannot be read, holds anything ``torch.load(weights_only=True)`` refuses, or holds no state dict.
    '''
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except OSError as error:
        raise UsageError(f'cannot read weights {str(path)!r}: {error.strerror or error}') from None
    except pickle.UnpicklingError as error:
        # torch reports every unpickling failure as "Weights only load failed"; only an unsupported global is an
        # object that the safe unpickler refuses, anything else is a broken or foreign file
        found = re.search(r'(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)', str(error))
        if not found:
            raise UsageError(f'cannot load weights {str(path)!r}: not a torch checkpoint (the safe unpickler of '
                             'torch.load(weights_only=True) cannot read it)') from None
        what = f' (found {found.group(1)})'
        raise UsageError(f'weights {str(path)!r} hold more than tensors{what}: torch.load(weights_only=True) '
                         'refuses to unpickle objects, which could run arbitrary code; save model.state_dict() '
                         'instead') from None
    except Exception as error:  # torch raises many types for files that are not checkpoints
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f'cannot load weights {str(path)!r}: not a torch checkpoint ({first})') from None

    state_dict = checkpoint if _is_state_dict(checkpoint) else None
    if state_dict is None and isinstance(checkpoint, Mapping):
        state_dict = next((checkpoint[key] for key in CHECKPOINT_KEYS if _is_state_dict(checkpoint.get(key))), None)
    if state_dict is None:
        raise UsageError(f'weights {str(path)!r} hold no state dict (expected a mapping of parameter names to tensors, '
                         f'bare or under one of the keys {", ".join(map(repr, CHECKPOINT_KEYS))})')
    if all(key.startswith('module.') for key in state_dict):
        state_dict = {key[len('module.'):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _classifier_outputs(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    '''The number of classes the state dict's last linear layer has, if it differs from the model's.'''
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if not linears:
        return None
    name, module = linears[-1]
    weight = state_dict.get(f'{name}.weight')
    if weight is None or weight.dim() != 2 or weight.shape[0] == module.out_features:
        return None
    return int(weight.shape[0])


def load_weights_file(name: str, path: Path) -> torch.nn.Module:
    '''Model ``name`` with the weights in file ``path``, whose number of classes may differ from the default.'''
    state_dict = read_state_dict(path)
    model = build_architecture(name)
    num_classes = _classifier_outputs(model, state_dict)
    if num_classes is not None:
        model = build_architecture(name, num_classes)
    misfits = state_dict_misfits(model.state_dict(), state_dict)
    if misfits:
        raise UsageError(f'weights {str(path)!r} do not fit model {name!r}: {misfits}')
    model.load_state_dict(state_dict)
    return model


def state_dict_misfits(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    '''What keeps ``given`` from loading where ``expected`` is the model's state dict, briefly; empty if it fits.'''
    def some(items):
        return ', '.join(items[:2]) + (', ...' if len(items) > 2 else '')

    missing = [repr(key) for key in expected if key not in given]
    unexpected = [repr(key) for key in given if key not in expected]
    shapes = [f'{key!r} {list(given[key].shape)} instead of {list(expected[key].shape)}'
              for key in expected if key in given and given[key].shape != expected[key].shape]
    parts = [f'{len(missing)} missing keys ({some(missing)})' if missing else '',
             f'{len(unexpected)} unexpected keys ({some(unexpected)})' if unexpected else '',
             f'{len(shapes)} of other shape ({some(shapes)})' if shapes else '']
    return '; '.join(part for part in parts if part)


def download_weights(name: str, weights) -> torch.nn.Module:
    '''Model ``name`` with torchvision's ``weights``, downloaded unless they are in torch's cache already.'''
    try:
        return build_architecture(name, weights=weights)
    except OSError as error:  # URLError and friends
        raise UsageError(f'cannot get torchvision weights {weights} (they are downloaded once, which needs a '
                         f'connection): {error}') from None


def load_model(name: str, weights: Optional[str], size: Optional[int], device: torch.device) -> LoadedModel:
    '''Build model ``name`` with its weights and the input preparation it needs.

    Parameters
    ----------
    name: str
        ``demo``, a torchvision classification model name, or ``timm:NAME``.
    weights: str, optional
        A file holding a state dict, or a torchvision weights name (``IMAGENET1K_V2``, ``DEFAULT``); for ``demo``
        the embedded weights by default; timm models take a file.
    size: int, optional
        Input height and width; 64 for ``demo`` and 224 for torchvision models by default.
    device: :py:obj:`torch.device`
        Where to compute.

    Returns
    -------
    :py:class:`LoadedModel`
        The model in eval mode on ``device``.
    '''
    from .. import demo

    check_model_name(name)
    class_names = None
    if weights is None and name == DEMO:
        model = demo.load_demo_model()
    elif weights is None and timm_name(name) is not None:
        raise UsageError(f'model {name!r} needs --weights: a state-dict file (timm weights are not downloaded)')
    elif weights is None:
        raise UsageError(f'model {name!r} needs --weights: a state-dict file, or a torchvision weights name '
                         f'({", ".join(weights_names(name))})')
    elif Path(weights).exists():
        model = load_weights_file(name, check_readable(Path(weights), 'weights'))
    elif torchvision_weights(name, weights) is not None:
        enum = torchvision_weights(name, weights)
        model = download_weights(name, enum)
        class_names = enum.meta.get('categories')
    else:
        names = weights_names(name)
        alternative = f' (nor a torchvision weights name of {name!r}: {", ".join(names)})' if names else ''
        raise UsageError(f'weights {weights!r}: no such file{alternative}')

    if name == DEMO:
        mean, std, default_size = demo.MEAN, demo.STD, demo.IMAGE_SIZE
        class_names = demo.CLASSES
    elif timm_name(name) is not None:
        # the normalisation and input size the model was trained with, as timm declares them
        config = getattr(model, 'pretrained_cfg', None) or {}
        mean = config.get('mean', IMAGENET_MEAN)
        std = config.get('std', IMAGENET_STD)
        default_size = int(config.get('input_size', (3, IMAGENET_SIZE, IMAGENET_SIZE))[-1])
    else:
        mean, std, default_size = IMAGENET_MEAN, IMAGENET_STD, IMAGENET_SIZE
        class_names = class_names or _imagenet_categories(name, model)
    model = model.eval().requires_grad_(False).to(device)
    return LoadedModel(name, model, tuple(mean), tuple(std), size or default_size, class_names)


def _imagenet_categories(name: str, model: torch.nn.Module) -> Optional[Sequence[str]]:
    '''ImageNet's category names if the model has as many outputs, from torchvision's (offline) weights metadata.'''
    import torchvision

    try:
        categories = torchvision.models.get_model_weights(name).DEFAULT.meta.get('categories')
    except (ValueError, AttributeError):  # a model without published weights
        return None
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    if categories and linears and linears[-1].out_features == len(categories):
        return categories
    return None


def graph_canonizer(name: str, model: torch.nn.Module) -> type:
    ''':py:class:`~canonizers.GraphCanonizer` for a model no family canonizer fits, if torch.fx can trace it.'''
    from ..graph import GraphCanonizer
    from ..graph.tracer import TraceFailure, trace

    # GraphCanonizer's own tracer, which keeps timm's no-trace modules whole where tracing through them fails
    try:
        trace(model)
    except TraceFailure as failure:
        from ..registry import FAMILIES

        families = ', '.join(cls.__name__ for cls in FAMILIES.values())
        raise UsageError(f'model {name!r} is not supported: {failure}, so GraphCanonizer cannot canonize it, and no '
                         f'family canonizer ({families}) rewrites its blocks') from None
    return GraphCanonizer
