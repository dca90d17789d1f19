'''Arguments and inputs checked against the model before anything is computed: images, concepts, targets, the layer
a condition names, the family canonizer.'''
import argparse
import functools
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..registry import families_for
from .common import UsageError, check_readable, closest
from .models import LoadedModel, graph_canonizer


# --- inputs ----------------------------------------------------------------------------------------------------------
def read_image(path: Path, size: int) -> torch.Tensor:
    '''Read an image as RGB in ``[0, 1]``, shorter side resized to ``size`` and centre-cropped to a square.

    Parameters
    ----------
    path: :py:obj:`pathlib.Path`
        Any image PIL can read.
    size: int
        Height and width of the result.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``[3, size, size]``.
    '''
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional

    check_readable(path, 'image')
    try:
        with Image.open(path) as image:
            rgb = functional.pil_to_tensor(image.convert('RGB'))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UsageError(f'cannot read image {str(path)!r}: {error}') from None
    rgb = rgb.float() / 255.
    if tuple(rgb.shape[1:]) != (size, size):
        rgb = functional.center_crop(functional.resize(rgb, size, antialias=True), [size, size]).clamp(0., 1.)
    return rgb


def normalize(rgb: torch.Tensor, loaded: LoadedModel) -> torch.Tensor:
    '''The model input of one RGB image: a batch of one, normalised, on the model's device.'''
    mean = torch.tensor(loaded.mean)[:, None, None]
    std = torch.tensor(loaded.std)[:, None, None]
    device = next(loaded.model.parameters()).device
    return ((rgb - mean) / std)[None].to(device)


def parse_concepts(text: str) -> List[int]:
    '''``"3,17"`` as ``[3, 17]`` (argparse type).'''
    try:
        concepts = [int(part) for part in text.split(',') if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of channel indices') from None
    if not concepts:
        raise argparse.ArgumentTypeError('no concept given')
    return list(dict.fromkeys(concepts))


def parse_device(text: str) -> torch.device:
    '''A torch device that exists on this machine.'''
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f'unknown device {text!r} (use cpu or cuda)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'device {text!r}: CUDA is not available on this machine')
    return device


# --- checks against the model --------------------------------------------------------------------------------------
def check_layer(model: torch.nn.Module, layer: str) -> None:
    '''Raise a :py:class:`UsageError` naming the closest module names if ``layer`` is not a module of ``model``.'''
    names = [name for name, _ in model.named_modules() if name]
    if layer not in names:
        raise UsageError(f'layer {layer!r} is not a module of the model; closest: {closest(layer, names)}')


def probe(loaded: LoadedModel, layer: str, data: torch.Tensor, family: type) -> Tuple[int, int]:
    '''The number of channels (concepts) of ``layer`` and of outputs (classes), from one forward pass of the model
    canonized by ``family``, in which the layer must take part (the heatmaps are computed in that model).'''
    shapes = {}

    def record(module: torch.nn.Module, input: object, output: object) -> None:
        # the first call only (a module may be called more than once), and no value returned: a returned value would
        # replace the module's output in every later call
        shapes.setdefault('layer', output)

    original = dict(loaded.model.named_modules())[layer]
    instances = family().apply(loaded.model)
    try:
        module = dict(loaded.model.named_modules())[layer]
        if module is not original:
            raise UsageError(f'layer {layer!r} ({type(original).__name__}) is replaced by a {type(module).__name__} '
                             f'while the model is canonized by {family.__name__} (its batch norm is merged into the '
                             'next layer), so its channels are no concepts of the model; condition on a convolution '
                             'or linear layer instead')
        handle = module.register_forward_hook(record)
        try:
            with torch.no_grad():
                logits = loaded.model(data)
        finally:
            handle.remove()
    finally:
        for instance in reversed(instances):
            instance.remove()
    if 'layer' not in shapes:
        raise UsageError(f'layer {layer!r} takes no part in the forward pass of the model canonized by '
                         f'{family.__name__} (it is replaced or skipped there, e.g. a ReLU merged into a threshold '
                         'ReLU, or stochastic depth, the identity in eval mode), so it carries no relevance; condition '
                         'on a convolution, linear layer or batch norm instead')
    output = shapes['layer']
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        raise UsageError(f'layer {layer!r} gives no [batch, channels, ...] tensor, so it has no concepts to '
                         'condition on')
    from ..crp.concepts import token_major

    # the features of token-major layers (transformers: [batch, tokens, features]) are on the last dimension
    return int(output.shape[-1] if token_major(module, output) else output.shape[1]), int(logits.shape[1])


def check_condition_layer(loaded: LoadedModel, layer: str) -> None:
    '''Raise a :py:class:`UsageError` if a CRP condition may not name ``layer`` (e.g. a ReLU used inside a branch and
    after its sum, a gate layer, a layer relevance can go around outside every canonizer's blocks).'''
    from ..crp import layer_cut

    try:
        layer_cut(loaded.model, [layer])
    except ValueError as error:
        raise UsageError(str(error)) from None


#: the smallest input size: classification networks reduce their input up to 32-fold
MIN_SIZE = 32


def check_concepts(concepts: Sequence[int], channels: int, layer: str) -> None:
    '''Raise a :py:class:`UsageError` naming the first concept index out of ``range(channels)``.'''
    for concept in concepts:
        if not 0 <= concept < channels:
            raise UsageError(f'concept {concept} out of range: layer {layer!r} has {channels} channels '
                             f'(0..{channels - 1})')


def parse_target(text: Optional[str], loaded: LoadedModel, classes: int) -> Optional[int]:
    '''The target class from an index or a class name; None (the prediction) if not given.'''
    if text is None:
        return None
    names = list(loaded.class_names or [])
    if re.fullmatch(r'[+-]?\d+', text.strip()):
        target = int(text)
    elif text in names:
        target = names.index(text)
    else:
        hint = f'; closest class names: {closest(text, names)}' if names else ''
        raise UsageError(f'target {text!r} is neither a class index nor a class name{hint}')
    if not 0 <= target < classes:
        raise UsageError(f'target {target} out of range: the model has {classes} classes (0..{classes - 1})')
    return target


def pick_family(loaded: LoadedModel, layer: Optional[str] = None) -> type:
    '''The family canonizer class for the model: the one that fits it, or of several the one whose blocks hold
    ``layer``, never the first of several by chance; :py:class:`~canonizers.GraphCanonizer` for any other model
    torch.fx can trace.'''
    families = families_for(loaded.model)
    if not families:
        return graph_canonizer(loaded.name, loaded.model)
    holding = [candidate for candidate in families
               if layer and any(layer.startswith(block + '.') for block in candidate.blocks(loaded.model))]
    if len(families) == 1 or len(holding) == 1:
        return type((holding or families)[0])
    names = ', '.join(type(candidate).__name__ for candidate in (holding or families))
    raise UsageError(f'model {loaded.name!r} fits several family canonizers ({names}) and layer {layer!r} does not '
                     'tell which: not supported (yet)')


def composite_factory(name: str, loaded: LoadedModel) -> Callable[..., object]:
    '''The zennit composite class ``name``, with the input bounds filled in for those that need them.'''
    from zennit.composites import COMPOSITES

    cls = COMPOSITES[name]
    parameters = inspect.signature(cls).parameters
    if 'low' in parameters and 'high' in parameters:
        device = next(loaded.model.parameters()).device
        mean = torch.tensor(loaded.mean, device=device)[None, :, None, None]
        std = torch.tensor(loaded.std, device=device)[None, :, None, None]
        # the bounds of the box rule are the normalised images of black and white
        return functools.partial(cls, low=(0. - mean) / std, high=(1. - mean) / std)
    return cls


def composite_names() -> List[str]:
    '''The zennit composites that take canonizers.'''
    from zennit.composites import COMPOSITES

    return sorted(name for name, cls in COMPOSITES.items() if 'canonizers' in inspect.signature(cls).parameters)


def require_modules(*names: str) -> None:
    '''Raise a :py:class:`UsageError` if an optional dependency is missing.'''
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f'this command needs {", ".join(missing)}: pip install "zennit-canonizers[crp]" matplotlib')
