'''The ``canonizers`` command line: the cuttable blocks of a model, and CRP conditional heatmaps with and without
isolation, as pictures, a CSV and a table.

Every problem with the arguments or the input files is found before any heatmap is computed, and reported as one
line on stderr with exit status 2.
'''
import argparse
import csv
import difflib
import functools
import importlib.util
import inspect
import math
import os
import pickle
import re
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .family import FamilyCanonizer
from .figures import ConceptPanels, explanation_figure, save_figure
from .leakage import MODEL_OUTPUT, attribute_class, compare_heatmaps
from .registry import families_for

PROG = 'canonizers'
#: exit status of every usage error, as argparse uses
EXIT_USAGE = 2
DEMO = 'demo'
DEFAULT_COMPOSITE = 'epsilon_plus_flat'
DEFAULT_DEMO_LAYER = 'layer2.0.conv1'
DEFAULT_DEMO_OUT = Path('out', 'demo')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224
#: keys under which checkpoints commonly keep the state dict
CHECKPOINT_KEYS = ('state_dict', 'model_state_dict', 'model', 'net')
CSV_NAME = 'heatmaps.csv'

NUMBERS = '''\
numbers (in the table, the CSV and the pictures):
  leaky         CRP conditional heatmap without isolation: relevance also flows
                around the conditioned layer, through the block's shortcut
  isolated      the same condition with the parallel paths around the layer cut
                (the canonizer's cut), so all relevance passes through the concept
  reference     CRP's exclude_parallel=True heatmap of the same condition
  relevance (R, *_sum)  the sum of a heatmap's pixels
  leaked share  sum|leaky - isolated| / (sum|isolated| + sum|leaky - isolated|):
                the share of the leaky heatmap's absolute relevance, split into its
                isolated and leaked (leaky - isolated) parts, that is leaked; in
                [0, 1], robust where positive and negative relevance cancel
  max deviation max|isolated - reference| / max|reference| (0 up to rounding)
'''


class UsageError(Exception):
    '''A problem with the arguments or inputs, reported as one line without traceback.'''


class Parser(argparse.ArgumentParser):
    '''Argument parser whose errors are :py:class:`UsageError` s, so that they are reported as one line.'''
    def error(self, message: str) -> None:
        raise UsageError(f'{message} (see {self.prog} --help)')


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    '''Keeps the layout of descriptions and epilogs, with wider option columns.'''
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=28, width=min(100, shutil.get_terminal_size((100, 24)).columns))


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


def model_names() -> List[str]:
    '''``demo`` and the names of torchvision's classification models.'''
    import torchvision

    return [DEMO] + sorted(torchvision.models.list_models(module=torchvision.models))


def closest(name: str, names: Sequence[str], count: int = 3) -> str:
    '''The names in ``names`` most similar to ``name``, for error messages.'''
    matches = difflib.get_close_matches(name, list(names), n=count, cutoff=0.)
    return ', '.join(map(repr, matches)) or '(none)'


def check_model_name(name: str) -> None:
    '''Raise a :py:class:`UsageError` naming the closest models if ``name`` is no model this tool knows.'''
    names = model_names()
    if name not in names:
        raise UsageError(f'unknown model {name!r}; closest: {closest(name, names)} (a torchvision classification '
                         f'model name, or {DEMO!r})')


def build_architecture(name: str, num_classes: Optional[int] = None, weights: object = None) -> torch.nn.Module:
    '''The model ``name`` with random (or torchvision's ``weights``) parameters, in eval mode.'''
    import torchvision

    from .demo import DemoResNet

    options = {} if num_classes is None else {'num_classes': num_classes}
    if name == DEMO:
        return DemoResNet(**options).eval()
    return torchvision.models.get_model(name, weights=weights, **options).eval()


def torchvision_weights(name: str, value: str):
    '''The torchvision weights enum member ``value`` of model ``name`` (e.g. ``IMAGENET1K_V2``), or None.'''
    import torchvision

    if name == DEMO:
        return None
    enum = torchvision.models.get_model_weights(name)
    return enum[value] if value in enum.__members__ else None


def weights_names(name: str) -> List[str]:
    '''The torchvision weights names of model ``name``.'''
    import torchvision

    return [] if name == DEMO else list(torchvision.models.get_model_weights(name).__members__)


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
        ``demo`` or a torchvision classification model name.
    weights: str, optional
        A file holding a state dict, or a torchvision weights name (``IMAGENET1K_V2``, ``DEFAULT``); for ``demo``
        the embedded weights by default.
    size: int, optional
        Input height and width; 64 for ``demo`` and 224 for torchvision models by default.
    device: :py:obj:`torch.device`
        Where to compute.

    Returns
    -------
    :py:class:`LoadedModel`
        The model in eval mode on ``device``.
    '''
    from . import demo

    check_model_name(name)
    class_names = None
    if weights is None and name == DEMO:
        model = demo.load_demo_model()
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


# --- inputs ----------------------------------------------------------------------------------------------------------
def check_readable(path: Path, what: str) -> Path:
    '''``path`` if it is a readable file; else a :py:class:`UsageError` naming it.'''
    if not path.exists():
        raise UsageError(f'{what} {str(path)!r}: no such file')
    if not path.is_file():
        raise UsageError(f'{what} {str(path)!r}: not a file')
    if not os.access(path, os.R_OK):
        raise UsageError(f'{what} {str(path)!r}: not readable (permission denied)')
    return path


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
    return int(output.shape[1]), int(logits.shape[1])


def check_condition_layer(loaded: LoadedModel, family: type, layer: str) -> None:
    '''Raise a :py:class:`UsageError` if a CRP condition may not name ``layer`` (e.g. a ReLU used inside a branch and
    after its sum, a gate layer, a layer relevance can go around outside every canonizer's blocks).'''
    from .crp import cuts_for

    try:
        family().layer_cuts(loaded.model, [layer])
        cuts_for(loaded.model, [{layer: [0]}])
    except ValueError as error:
        raise UsageError(str(error).replace("condition 0 {'" + layer + "': [0]}: ", '')) from None


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
    '''The family canonizer class for the model: the one whose blocks hold ``layer``, else the first that fits.'''
    families = families_for(loaded.model)
    if not families:
        raise UsageError(unsupported(loaded.name, loaded.model))
    for candidate in families:
        if layer and any(layer.startswith(block + '.') for block in candidate.blocks(loaded.model)):
            return type(candidate)
    return type(families[0])


def unsupported(name: str, model: torch.nn.Module) -> str:
    '''What to say of a model no family canonizer fits: not supported where it has parallel paths, never that it
    needs no isolation unless tracing showed it has none.'''
    from .tracing import TracingError, describe, parallel_paths

    try:
        merges = list(parallel_paths(model).merges.values())
    except TracingError as error:
        return (f'model {name!r} is not supported (yet): no canonizer of this package rewrites its blocks, and '
                f'{error}, so whether relevance bypasses its layers is unknown')
    if merges:
        return (f'model {name!r} is not supported (yet): it has {describe(merges)}, which no canonizer of this package '
                "covers; crp's CondAttribution(exclude_parallel=True) isolates conditions on any model")
    return (f'model {name!r} has no parallel paths (traced with torch.fx): CRP conditions on its layers need no '
            'isolation, and there is nothing to cut')


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


# --- explaining ------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    '''Everything an explanation run needs, validated.'''
    loaded: LoadedModel
    family: type
    composite: Callable[..., object]
    composite_name: str
    images: List[Tuple[Path, torch.Tensor]]
    layer: str
    concepts: Optional[List[int]]
    top: Optional[int]
    target: Optional[int]
    out: Path
    reference: bool = True
    #: the picture file name of each image
    names: Dict[Path, str] = field(default_factory=dict)


def prepare(args: argparse.Namespace) -> Job:
    '''Validate all arguments and inputs of ``explain`` (and ``demo``) before any heatmap is computed.'''
    require_modules('crp', 'matplotlib', 'tqdm')
    check_model_name(args.model)
    for path in args.image:
        check_readable(Path(path), 'image')
    device = parse_device(args.device)
    if args.size is not None and args.size < MIN_SIZE:
        raise UsageError(f'--size {args.size}: too small, the model reduces its input up to 32-fold; use at least '
                         f'{MIN_SIZE} pixels (224 for ImageNet models)')
    loaded = load_model(args.model, args.weights, args.size, device)
    images = [(Path(path), read_image(Path(path), loaded.size)) for path in args.image]
    check_layer(loaded.model, args.layer)
    family = pick_family(loaded, args.layer)
    check_condition_layer(loaded, family, args.layer)
    channels, classes = probe(loaded, args.layer, normalize(images[0][1], loaded), family)
    if args.concepts is not None:
        check_concepts(args.concepts, channels, args.layer)
    elif not 1 <= args.top <= channels:
        raise UsageError(f'--top {args.top} out of range: layer {args.layer!r} has {channels} channels')
    target = parse_target(args.target, loaded, classes)
    return Job(
        loaded=loaded,
        family=family,
        composite=composite_factory(args.composite, loaded),
        composite_name=args.composite,
        images=images,
        layer=args.layer,
        concepts=args.concepts,
        top=args.top if args.concepts is None else None,
        target=target,
        out=make_directory(Path(args.out)),
        reference=not args.no_reference,
        names=picture_names([Path(path) for path in args.image]),
    )


def make_directory(path: Path) -> Path:
    '''Create the output directory, or raise a :py:class:`UsageError` saying why not.'''
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f'cannot create output directory {str(path)!r}: {error.strerror or error}') from None
    if not os.access(path, os.W_OK):
        raise UsageError(f'output directory {str(path)!r} is not writable')
    return path


def picture_names(paths: Sequence[Path]) -> Dict[Path, str]:
    '''A distinct picture file name for each image: its stem, numbered where stems repeat.'''
    names, used = {}, set()
    for path in paths:
        name, number = path.stem, 1
        while name in used:
            number += 1
            name = f'{path.stem}-{number}'
        used.add(name)
        names[path] = f'{name}.png'
    return names


def progress_bar(total: int, description: str):
    '''The progress bar over images and concepts (shown on a terminal only).'''
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit='concept', file=sys.stderr, disable=None, leave=False)


@dataclass
class Prediction:
    '''The model's view of one image.'''
    data: torch.Tensor
    probabilities: torch.Tensor
    predicted: int
    target: int


def predict(job: Job, rgb: torch.Tensor) -> Prediction:
    '''Classify one image; the target is the predicted class unless the job names one.'''
    data = normalize(rgb, job.loaded)
    with torch.no_grad():
        probabilities = job.loaded.model(data).softmax(1)[0].cpu()
    predicted = int(probabilities.argmax())
    return Prediction(data, probabilities, predicted, predicted if job.target is None else job.target)


def csv_row(job: Job, path: Path, prediction: Prediction, concept: int, relevance: float,
            result: Mapping[str, object]) -> Dict[str, object]:
    '''The CSV row of one condition, from a result of :py:func:`~canonizers.leakage.compare_heatmaps`.'''
    label = job.loaded.class_label
    reference = result['reference']
    return {
        'image': str(path),
        'picture': job.names.get(path, ''),
        'model': job.loaded.name,
        'layer': job.layer,
        'composite': job.composite_name,
        'target': prediction.target,
        'target_name': label(prediction.target),
        'predicted': prediction.predicted,
        'predicted_name': label(prediction.predicted),
        'probability': prediction.probabilities[prediction.predicted].item(),
        'concept': concept,
        'concept_relevance': relevance,
        'leaky_sum': result['leaky'].sum().item(),
        'isolated_sum': result['isolated'].sum().item(),
        'reference_sum': '' if reference is None else reference.sum().item(),
        'max_deviation': '' if reference is None else result['deviation'],
        # empty where there is no relevance at all: nothing could leak, and 0% would claim that nothing did
        'leaked_share': '' if math.isnan(result['leaked_share']) else result['leaked_share'],
        'cut': ' '.join(f'{block}:{branch}' for block, branch in result['cut'].items()),
    }


def top_concepts(relevances: torch.Tensor, top: int, path: Path, layer: str) -> List[int]:
    '''The ``top`` channels with the most relevance, leaving out channels without any (saying so).'''
    ranked = [concept for concept in relevances.argsort(descending=True)[:top].tolist() if relevances[concept] != 0]
    if len(ranked) < top:
        print(f'note: {path}: only {len(ranked)} channel(s) of layer {layer!r} carry relevance for the target; '
              f'explaining {"those" if ranked else "none"} instead of {top}', file=sys.stderr)
    return ranked


def explain_image(job: Job, path: Path, rgb: torch.Tensor, bar) -> List[Dict[str, object]]:
    '''Compute the heatmaps of one image, write its picture, and return its CSV rows.'''
    loaded = job.loaded
    prediction = predict(job, rgb)
    class_heatmap, relevances = attribute_class(
        loaded.model, prediction.data, prediction.target, job.family, job.composite, job.layer)
    relevances = relevances.cpu()
    concepts = job.concepts or top_concepts(relevances, job.top, path, job.layer)

    rows, panels = [], []
    for concept in concepts:
        bar.set_postfix_str(f'{path.name} concept {concept}')
        condition = {job.layer: [concept], MODEL_OUTPUT: [prediction.target]}
        result = compare_heatmaps(loaded.model, prediction.data, [condition], job.family, job.composite,
                                  job.reference)[0]
        result = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in result.items()}
        relevance = relevances[concept].item()
        panels.append(ConceptPanels(concept, relevance, result['leaky'], result['isolated'], result['leaked_share']))
        rows.append(csv_row(job, path, prediction, concept, relevance, result))
        bar.update(1)
    write_picture(job, path, rgb, prediction, class_heatmap.cpu(), panels)
    return rows


def write_picture(job: Job, path: Path, rgb: torch.Tensor, prediction: Prediction, class_heatmap: torch.Tensor,
                  panels: Sequence[ConceptPanels]) -> Path:
    '''Draw and write the picture of one image.'''
    label = job.loaded.class_label
    probability = prediction.probabilities[prediction.predicted].item()
    figure = explanation_figure(
        rgb.permute(1, 2, 0), class_heatmap, panels,
        image_title=f'{path.name}\npredicted {label(prediction.predicted)} ({probability:.0%})',
        class_title=f'heatmap of {label(prediction.target)}\nR={class_heatmap.sum().item():+.3g}',
        heading=f'{job.loaded.name} · {job.layer} · {job.composite_name} · '
                f'{"top " if job.top else ""}concepts for {label(prediction.target)}',
    )
    return save_figure(figure, job.out / job.names[path])


def run_job(job: Job) -> List[Dict[str, object]]:
    '''Explain every image of ``job``, writing one picture per image and the CSV; return the CSV rows.'''
    per_image = len(job.concepts) if job.concepts else job.top
    rows: List[Dict[str, object]] = []
    bar = progress_bar(len(job.images) * per_image, f'{job.loaded.name} {job.layer}')
    try:
        for path, rgb in job.images:
            rows += explain_image(job, path, rgb, bar)
    finally:
        bar.close()
    write_csv(rows, job.out / CSV_NAME)
    return rows


CSV_COLUMNS = ('image', 'picture', 'model', 'layer', 'composite', 'target', 'target_name', 'predicted',
               'predicted_name', 'probability', 'concept', 'concept_relevance', 'leaky_sum', 'isolated_sum',
               'reference_sum', 'max_deviation', 'leaked_share', 'cut')


def write_csv(rows: Sequence[Mapping[str, object]], path: Path) -> Path:
    '''Write the rows as CSV, after comment lines (``#``) that define the numbers.'''
    with open(path, 'w', newline='') as file:
        file.write('# canonizers explain: CRP conditional heatmaps of one concept each, with and without isolation\n')
        file.write('# read with pandas.read_csv(path, comment="#"), or skip the lines starting with "#"\n')
        for line in NUMBERS.splitlines()[1:]:
            file.write(f'# {line}\n')
        file.write('# concept_relevance: the concept\'s relevance at the layer for the target (class heatmap pass); '
                   'cut: block:branch cut to isolate the layer\n')
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def number_format(values: Sequence[float]) -> Callable[[float], str]:
    '''One format for a table's heatmap sums, so that they line up: fixed point with four significant digits of
    the largest, or scientific where that would take too many digits.'''
    largest = max((abs(value) for value in values), default=0.)
    if largest == 0. or 1e-4 <= largest < 1e6:
        decimals = max(1, 3 - math.floor(math.log10(largest))) if largest else 4
        return lambda value: f'{value:+.{decimals}f}'
    return lambda value: f'{value:+.3e}'


def format_table(rows: Sequence[Mapping[str, object]]) -> str:
    '''The per-condition table printed after a run.'''
    header = ('image', 'target', 'concept', 'leaky sum', 'isolated sum', 'CRP ref. sum', 'max dev.', 'leaked share')
    sums = [row[key] for row in rows for key in ('leaky_sum', 'isolated_sum', 'reference_sum') if row[key] != '']
    number = number_format(sums)
    lines = []
    for row in rows:
        reference = row['reference_sum']
        lines.append((
            str(row['image']), str(row['target_name']), str(row['concept']),
            number(row['leaky_sum']), number(row['isolated_sum']),
            '-' if reference == '' else number(reference),
            '-' if row['max_deviation'] == '' else f'{row["max_deviation"]:.1e}',
            'no relevance' if row['leaked_share'] == '' else f'{row["leaked_share"]:.1%}',
        ))
    widths = [max(len(text) for text in column) for column in zip(header, *lines)]
    # numbers right-aligned, names left-aligned
    aligned = [lambda text, width: text.ljust(width)] * 2 + [lambda text, width: text.rjust(width)] * 6

    def render(cells):
        return '  '.join(align(text, width) for align, text, width in zip(aligned, cells, widths)).rstrip()
    return '\n'.join([render(header), render(['-' * width for width in widths])] + [render(line) for line in lines])


def report(job: Job, rows: Sequence[Mapping[str, object]], seconds: float) -> None:
    '''Print the table and where the results are.'''
    cuts = sorted({str(row['cut']) for row in rows}) or ['']
    print(f'model {job.loaded.name}, layer {job.layer}, composite {job.composite_name}; isolation cuts '
          f'{", ".join(cut or "nothing (no parallel path bypasses the layer)" for cut in cuts)}')
    print(format_table(rows))
    print()
    print(NUMBERS, end='')
    print(f'\nwrote {len(job.images)} picture(s) and {CSV_NAME} to {job.out} in {seconds:.1f} s')


# --- commands --------------------------------------------------------------------------------------------------------
def command_explain(args: argparse.Namespace) -> int:
    '''``canonizers explain``.'''
    job = prepare(args)
    start = time.perf_counter()
    rows = run_job(job)
    report(job, rows, time.perf_counter() - start)
    return 0


def write_samples(directory: Path) -> List[Path]:
    '''Write the demo's built-in sample images (one per class) as PNGs, named by class.'''
    from PIL import Image

    from .demo import CLASSES, sample_images

    images, labels = sample_images(normalized=False)
    paths = []
    for image, label in zip(images, labels):
        pixels = (image.permute(1, 2, 0) * 255.).round().clamp(0, 255).to(torch.uint8).numpy()
        path = directory / f'{CLASSES[int(label)]}.png'
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def check_demo_layer(layer: str) -> None:
    '''Raise a :py:class:`UsageError` if ``layer`` cannot be conditioned on in the demo model.'''
    loaded = load_model(DEMO, None, None, torch.device('cpu'))
    check_layer(loaded.model, layer)
    family = pick_family(loaded, layer)
    check_condition_layer(loaded, family, layer)
    data = torch.zeros(1, 3, loaded.size, loaded.size)
    probe(loaded, layer, data, family)


def command_demo(args: argparse.Namespace) -> int:
    '''``canonizers demo``: ``explain`` on the embedded model and built-in samples.'''
    out = Path(args.out)
    # the layer is checked before anything is written: the samples are written only to be read back
    check_demo_layer(args.layer)
    out = make_directory(out)
    images = [str(path) for path in write_samples(make_directory(out / 'samples'))]
    explain = argparse.Namespace(
        model=DEMO, weights=None, image=images, layer=args.layer, concepts=None, top=args.top, target=None,
        size=None, out=args.out, composite=args.composite, device=args.device, no_reference=False)
    job = prepare(explain)
    start = time.perf_counter()
    rows = run_job(job)
    report(job, rows, time.perf_counter() - start)
    print(f'the same for one sample by hand: {PROG} explain --model demo --image {images[0]} --layer {job.layer} '
          f'--top {job.top} --out {out / "explain"}')
    return 0


def block_layers(family: FamilyCanonizer, model: torch.nn.Module) -> Dict[str, Dict[str, List[str]]]:
    '''Per cuttable block, per branch, the convolutional and linear layers (relative names, with their channels)
    whose innermost cuttable block it is: the layers a CRP condition may name.'''
    from zennit.types import Linear

    layers: Dict[str, Dict[str, List[str]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        try:
            cut = family.layer_cuts(model, [name])
        except ValueError:
            # layers a condition may not name (gate layers, shared ReLUs) are not listed
            continue
        branches = family.blocks(model)
        for block, cut_branches in cut.items():
            cut_branches = {cut_branches} if isinstance(cut_branches, str) else set(cut_branches)
            # the branch that holds the layer: the one its isolating cut leaves
            held = '/'.join(branch for branch in branches.get(block, ()) if branch not in cut_branches) or '-'
            channels = getattr(module, 'out_channels', getattr(module, 'out_features', '?'))
            layers.setdefault(block, {}).setdefault(held, []).append(f'{name[len(block) + 1:]} ({channels})')
    return layers


def blocks_table(model: torch.nn.Module, families: Sequence[FamilyCanonizer], width: int) -> str:
    '''The table of ``canonizers blocks``, its last column wrapped to ``width`` characters.'''
    modules = dict(model.named_modules())
    order = {name: index for index, name in enumerate(modules)}
    rows = []
    for family in families:
        layers = block_layers(family, model)
        blocks = family.blocks(model)
        for block, branches in blocks.items():
            listing = [f'{branch}: {", ".join(names)}' for branch, names in layers.get(block, {}).items()]
            nested = any(other.startswith(block + '.') for other in blocks)
            rows.append((block, type(modules[block]).__name__, ', '.join(branches),
                         listing or ['- (see the blocks inside it)' if nested else '-']))
    # in the model's order, so that nested blocks follow the block that holds them
    rows.sort(key=lambda row: order[row[0]])
    header = ('block', 'type', 'can cut', ['condition layers by branch (channels)'])
    rule = tuple('-' * len(text) for text in header[:3]) + (['-' * len(header[3][0])],)
    widths = [max(len(row[column]) for row in [header] + rows) for column in range(3)]
    last = max(30, width - sum(widths) - 2 * len(widths) - 1)
    lines = []
    for *cells, listing in [header, rule] + rows:
        prefix = '  '.join(text.ljust(size) for text, size in zip(cells, widths)) + '  '
        lines += [(prefix if number == 0 else ' ' * len(prefix)) + text
                  for number, text in enumerate(wrap_listing(listing, last))]
    return '\n'.join(line.rstrip() for line in lines)


def wrap_listing(parts: Sequence[str], width: int) -> List[str]:
    '''``parts`` joined by ``"; "`` on one line if it fits, else one part per line, each wrapped to ``width``.'''
    joined = '; '.join(parts)
    if len(joined) <= width:
        return [joined]
    return [line for part in parts for line in textwrap.wrap(part, width, subsequent_indent='  ',
                                                               break_on_hyphens=False)]


def command_blocks(args: argparse.Namespace) -> int:
    '''``canonizers blocks``.'''
    check_model_name(args.model)
    model = build_architecture(args.model)
    families = families_for(model)
    if not families:
        message = unsupported(args.model, model)
        if 'not supported' in message:
            raise UsageError(message)
        print(message)
        return 0
    width = shutil.get_terminal_size((120, 24)).columns
    print(f'{args.model}: {", ".join(type(family).__name__ for family in families)}')
    print(blocks_table(model, families, width))
    total = sum(len(family.blocks(model)) for family in families)
    example = next(iter(_example_layer(model, families)), 'BLOCK.LAYER')
    print()
    print(textwrap.fill(
        f'{total} cuttable blocks. A condition names a layer in full (block + "." + layer, e.g. --layer {example}); '
        'isolating it cuts the other branch of its block: the skip for a layer in the residual branch, the residual '
        'branch for one in the skip.', min(width, 100)))
    return 0


def _example_layer(model: torch.nn.Module, families: Sequence[FamilyCanonizer]) -> List[str]:
    for family in families:
        for block, branches in block_layers(family, model).items():
            for names in branches.values():
                return [f'{block}.{names[0].split(" ")[0]}']
    return []


# --- the parser ------------------------------------------------------------------------------------------------------
DESCRIPTION = '''\
Isolated CRP conditional heatmaps: canonizers that cut named parallel paths
(ResNet shortcuts, ...), so that the heatmap of a concept shows only relevance
that passed through that concept.
'''

EXAMPLES = f'''\
examples:
  {PROG} demo                            # the embedded shapes model, pictures in {DEFAULT_DEMO_OUT}
  {PROG} blocks resnet50                 # where conditions can be isolated
  {PROG} explain --model demo --image star.png --layer layer3.0.conv2 --top 3 --out out/star
  {PROG} explain --model resnet50 --weights resnet50.pth --image cat.jpg dog.jpg \\
      --layer layer3.1.conv2 --concepts 3,17 --out out/pets
'''


def paragraph(text: str) -> str:
    '''``text`` wrapped for the help (descriptions keep their line breaks otherwise).'''
    return textwrap.fill(' '.join(text.split()), 88)


def build_parser() -> argparse.ArgumentParser:
    '''The parser of the ``canonizers`` command line.'''
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EXAMPLES + '\n' + NUMBERS,
                    formatter_class=HelpFormatter)
    commands = parser.add_subparsers(title='commands', dest='command', required=True, metavar='COMMAND')

    blocks = commands.add_parser(
        'blocks', help='list the cuttable blocks of a model and the layers conditions may use',
        description=paragraph(
            'List every cuttable block of a model: its type, the branches that can be cut, and the convolutional '
            'and linear layers in each branch that a CRP condition may name, with their number of channels '
            '(concepts). The model is built with random weights; nothing is downloaded.'),
        formatter_class=HelpFormatter)
    blocks.add_argument('model', metavar='MODEL', help=f'a torchvision classification model name, or {DEMO!r}')
    blocks.set_defaults(run=command_blocks)

    explain = commands.add_parser(
        'explain', help='isolated and leaky CRP heatmaps of chosen concepts for your images',
        description=paragraph(
            'For each image, CRP conditional heatmaps of the chosen concepts of one layer, with and without '
            'isolation: one PNG per image (input, class heatmap, and per concept the leaky, isolated and leaked '
            f'heatmaps), a CSV ({CSV_NAME}) of the numbers of all images, and a table on stdout. All arguments and '
            'files are checked before any heatmap is computed.'),
        epilog=NUMBERS, formatter_class=HelpFormatter)
    explain.add_argument('--model', required=True, metavar='NAME',
                         help=f'a torchvision classification model name (e.g. resnet50), or {DEMO!r} for the '
                              'embedded demo model')
    explain.add_argument('--weights', metavar='FILE',
                         help='a file holding a state dict, bare or in a checkpoint under "state_dict", "model", '
                              '... (loaded with torch.load(weights_only=True), which unpickles no code); or a '
                              'torchvision weights name such as IMAGENET1K_V2 or DEFAULT, downloaded once (needs a '
                              f'connection). Default for {DEMO!r}: the embedded weights')
    explain.add_argument('--image', nargs='+', required=True, metavar='IMG',
                         help='image files (any format PIL reads); the shorter side is resized to --size and the '
                              'centre cropped to a square')
    explain.add_argument('--layer', required=True,
                         help='layer whose concepts (channels) to explain, e.g. layer3.0.conv2 (see: '
                              f'{PROG} blocks MODEL)')
    concepts = explain.add_mutually_exclusive_group(required=True)
    concepts.add_argument('--concepts', type=parse_concepts, metavar='C,C,...',
                          help='channel indices of --layer to explain, e.g. 3,17')
    concepts.add_argument('--top', type=int, metavar='K',
                          help='explain the K channels of --layer with the most relevance for the target')
    explain.add_argument('--target', metavar='CLASS',
                         help='class index or name to explain (default: the predicted class of each image)')
    explain.add_argument('--size', type=int, metavar='PIXELS',
                         help='input height and width (default: 64 for demo, 224 for torchvision models); inputs '
                              'are normalised with the demo or the ImageNet statistics')
    explain.add_argument('--out', required=True, metavar='DIR', help='directory for the pictures and the CSV')
    add_method_arguments(explain)
    explain.add_argument('--no-reference', action='store_true',
                         help="skip CRP's exclude_parallel=True reference (saves a third backward pass per concept)")
    explain.set_defaults(run=command_explain)

    demo = commands.add_parser(
        'demo', help='the same on the embedded demo model and built-in sample images',
        description=paragraph(
            'Run explain on the embedded demo model (a small ResNet trained on 64x64 images of six shapes: circle, '
            'square, triangle, cross, star, ring) for one built-in sample image per class (written to DIR/samples), '
            'and print the table of leaky, isolated and reference heatmap sums.'),
        epilog=NUMBERS, formatter_class=HelpFormatter)
    demo.add_argument('--out', default=str(DEFAULT_DEMO_OUT), metavar='DIR',
                      help=f'directory for the pictures, the CSV and the samples (default: {DEFAULT_DEMO_OUT})')
    demo.add_argument('--layer', default=DEFAULT_DEMO_LAYER,
                      help=f'layer whose concepts to explain (default: {DEFAULT_DEMO_LAYER})')
    demo.add_argument('--top', type=int, default=3, metavar='K',
                      help='number of most relevant concepts per image (default: 3)')
    add_method_arguments(demo)
    demo.set_defaults(run=command_demo)
    return parser


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    '''The composite and device arguments.'''
    names = composite_names()
    parser.add_argument('--composite', default=DEFAULT_COMPOSITE, choices=names, metavar='NAME',
                        help=f'zennit composite (LRP rules), one of: {", ".join(names)} (default: '
                             f'{DEFAULT_COMPOSITE}); the box bounds of epsilon_gamma_box follow the normalisation')
    parser.add_argument('--device', default='cpu', help='torch device, e.g. cpu or cuda (default: cpu)')


def main(argv: Optional[Sequence[str]] = None) -> int:
    '''Run the ``canonizers`` command line.

    Parameters
    ----------
    argv: sequence of str, optional
        The arguments; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        The exit status: 0 on success, 2 for a usage error (reported as one line on stderr).
    '''
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except UsageError as error:
        print(f'{PROG}: error: {error}', file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit:  # --help
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader (e.g. head) went away: stop quietly, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
