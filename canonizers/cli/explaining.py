'''``canonizers explain`` and ``canonizers demo``: leaky, isolated and reference heatmaps per concept, as pictures,
a CSV and a table.'''
import argparse
import csv
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..figures import ConceptPanels, explanation_figure, save_figure
from ..leakage import MODEL_OUTPUT, attribute_class, compare_heatmaps
from .common import CSV_NAME, DEMO, NUMBERS, PROG, UsageError, check_readable
from .inputs import (
    MIN_SIZE,
    check_concepts,
    check_condition_layer,
    check_layer,
    composite_factory,
    normalize,
    parse_device,
    parse_target,
    pick_family,
    probe,
    read_image,
    require_modules,
)
from .models import LoadedModel, check_model_name, load_model


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
    #: the CRP concept of ``layer``: None for CRP's ChannelConcept (dimension 1), a FeatureConcept for token-major
    #: layers (features on the last dimension, as in transformers)
    concept: Optional[object] = None


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
    check_condition_layer(loaded, args.layer)
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
        'cut': cut_text(result['cut']),
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
        loaded.model, prediction.data, prediction.target, job.family, job.composite, job.layer, job.concept)
    relevances = relevances.cpu()
    concepts = job.concepts or top_concepts(relevances, job.top, path, job.layer)

    rows, panels = [], []
    bar.set_postfix_str(f'{path.name}, {len(concepts)} concept(s)')
    conditions = [{job.layer: [concept], MODEL_OUTPUT: [prediction.target]} for concept in concepts]
    # all concepts of the image together: one pass for the leaky heatmaps, one for the isolated ones
    results = compare_heatmaps(loaded.model, prediction.data, conditions, job.family, job.composite,
                               job.reference, job.concept) if conditions else []
    for concept, result in zip(concepts, results):
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


def cut_text(cut: Mapping[str, object]) -> str:
    '''A cut as ``block:branch`` pairs (several branches of one block joined by ``+``).'''
    return ' '.join(f'{block}:{branch if isinstance(branch, str) else "+".join(branch)}'
                    for block, branch in cut.items())


def print_warnings(job: Job, rows: Sequence[Mapping[str, object]]) -> None:
    '''The support verdict where the model is not supported, and isolated heatmaps that deviate from CRP's reference
    more than rounding explains, above the table.'''
    from .checking import deviation_warnings, verdict_warning

    warning = verdict_warning(job.loaded.model, normalize(job.images[0][1], job.loaded))
    for line in ([warning] if warning else []) + list(deviation_warnings(rows)):
        print(line)


def report(job: Job, rows: Sequence[Mapping[str, object]], seconds: float) -> None:
    '''Print the table and where the results are.'''
    from ..crp import layer_cut

    # the cut of the layer also where no concept carries relevance (no rows)
    cuts = sorted({str(row['cut']) for row in rows}) or [cut_text(layer_cut(job.loaded.model, [job.layer]))]
    print(f'model {job.loaded.name}, layer {job.layer}, composite {job.composite_name}; isolation cuts '
          f'{", ".join(cut or "nothing (no parallel path bypasses the layer)" for cut in cuts)}')
    print_warnings(job, rows)
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

    from ..demo import CLASSES, sample_images

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
    check_condition_layer(loaded, layer)
    data = torch.zeros(1, 3, loaded.size, loaded.size)
    probe(loaded, layer, data, family)


def command_demo(args: argparse.Namespace) -> int:
    '''``canonizers demo``: ``explain`` on the embedded ResNet and built-in samples, then on the embedded ViT (and a
    timm model, if timm is installed).'''
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
    demo_vit(out, [path for path in images if Path(path).stem in DEMO_VIT_SAMPLES], args)
    if importlib.util.find_spec('timm') is not None:
        demo_timm(out, images[:1], args)
    return 0


def report_extra(title: str, job: Job, rows: Sequence[Mapping[str, object]], seconds: float) -> None:
    '''Print the table of one of the demo's further models, after its title.'''
    print(f'\n{title}:')
    print(f'model {job.loaded.name}, layer {job.layer}; isolation cuts '
          f'{", ".join(sorted({str(row["cut"]) for row in rows})) or "nothing"}')
    print_warnings(job, rows)
    print(format_table(rows))
    print(f'wrote {len(job.images)} picture(s) and {CSV_NAME} to {job.out} in {seconds:.1f} s')


#: the layer of the demo ViT whose concepts the demo explains: the hidden features of the MLP of encoder layer 2,
#: inside its residual branch (the shortcut around the MLP carries relevance past them); and the samples it explains
DEMO_VIT_LAYER = 'encoder.layers.encoder_layer_2.mlp.0'
DEMO_VIT_SAMPLES = ('cross', 'star')


def demo_vit(out: Path, images: List[str], args: argparse.Namespace) -> None:
    '''The same on the embedded, trained ViT (:py:class:`~canonizers.demo.DemoViT`) through
    :py:class:`~canonizers.GraphCanonizer`, with concepts on the feature (last) dimension of its token-major layers
    (:py:class:`~canonizers.crp.FeatureConcept`), writing to ``out/vit``.'''
    from .. import demo
    from ..crp import FeatureConcept

    model = demo.load_demo_vit().requires_grad_(False).to(parse_device(args.device))
    loaded = LoadedModel('demo ViT', model, demo.MEAN, demo.STD, demo.IMAGE_SIZE, demo.CLASSES)
    check_condition_layer(loaded, DEMO_VIT_LAYER)
    job = Job(
        loaded=loaded,
        family=pick_family(loaded, DEMO_VIT_LAYER),
        composite=composite_factory(args.composite, loaded),
        composite_name=args.composite,
        images=[(Path(path), read_image(Path(path), loaded.size)) for path in images],
        layer=DEMO_VIT_LAYER,
        concepts=None,
        top=args.top,
        target=None,
        out=make_directory(out / 'vit'),
        names=picture_names([Path(path) for path in images]),
        concept=FeatureConcept(),
    )
    start = time.perf_counter()
    rows = run_job(job)
    report_extra('the same on the embedded ViT (trained; 8x8 patches, 4 layers) through GraphCanonizer, concepts on '
                 'the feature dimension (FeatureConcept)', job, rows, time.perf_counter() - start)


#: the timm model of the demo, and the layer it explains (inside the residual branch of block layer3.0)
DEMO_TIMM, DEMO_TIMM_LAYER = 'resnet10t', 'layer3.0.conv2'


def demo_timm(out: Path, images: List[str], args: argparse.Namespace) -> None:
    '''The same on a timm model no family canonizer covers, through :py:class:`~canonizers.GraphCanonizer`: with
    random weights and batch-norm statistics (nothing is downloaded), so only the isolation is shown, not what the
    concepts mean.'''
    import timm

    from ..evaluation import randomize_batch_norms

    torch.manual_seed(0)
    weights = out / f'timm-{DEMO_TIMM}-random.pt'
    torch.save(randomize_batch_norms(timm.create_model(DEMO_TIMM, pretrained=False)).state_dict(), weights)
    explain = argparse.Namespace(
        model=f'timm:{DEMO_TIMM}', weights=str(weights), image=images, layer=DEMO_TIMM_LAYER, concepts=None,
        top=args.top, target=None, size=64, out=str(out / 'timm'), composite=args.composite, device=args.device,
        no_reference=False)
    job = prepare(explain)
    start = time.perf_counter()
    rows = run_job(job)
    report_extra(f'the same on timm:{DEMO_TIMM} (random weights) through GraphCanonizer', job, rows,
                 time.perf_counter() - start)
