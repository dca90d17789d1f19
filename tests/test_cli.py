'''End-to-end tests of the ``canonizers`` command line (in-process, plus one subprocess for ``python -m``).'''
import argparse
import contextlib
import csv
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat

from canonizers import ResNetCanonizer, cli
from canonizers.cli import explaining  # noqa: F401 (the module whose progress bar the tests record)
from canonizers.demo import CLASSES, load_demo_model, sample_images
from canonizers.evaluation import randomize_batch_norms
from canonizers.leakage import leaked_share

pytest.importorskip('crp')
pytest.importorskip('matplotlib')

# the command line's code is the same on every zennit version, whose rules the other modules test: run once
pytestmark = [pytest.mark.once, pytest.mark.usefixtures('single_thread')]


ROOT = Path(__file__).resolve().parents[1]
LAYER = 'layer2.0.conv1'
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]


def run(*argv):
    '''``main(argv)`` in-process: (exit status, stdout, stderr).'''
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main([str(arg) for arg in argv])
    return status, stdout.getvalue(), stderr.getvalue()


def read_csv(path):
    '''The rows of a CSV written by the command line, without its ``#`` comment lines.'''
    with open(path, newline='') as file:
        return list(csv.DictReader(line for line in file if not line.startswith('#')))


def demo_input(path):
    '''The demo model's input for an image file, prepared independently of the command line.'''
    rgb = torch.from_numpy(np.asarray(Image.open(path).convert('RGB'), dtype=np.float32) / 255.)
    return ((rgb.permute(2, 0, 1)[None] - 0.5) / 0.25).requires_grad_(True)


def crp_heatmap(model, data, condition, composite, exclude_parallel):
    '''CRP's own conditional heatmap: the oracle.'''
    from crp.attribution import CondAttribution

    attribution = CondAttribution(model, no_param_grad=False)
    return attribution(data, [condition], composite, exclude_parallel=exclude_parallel).heatmap[0]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    '''64x64 PNGs of two shapes, and checkpoints: the demo model wrapped as {'state_dict': ...}, and a 10-class
    resnet18 with random weights wrapped as {'model': ...}.'''
    root = tmp_path_factory.mktemp('inputs')
    images, _ = sample_images(seed=3, normalized=False)
    paths = {}
    for name in ('star', 'cross'):
        pixels = (images[CLASSES.index(name)].permute(1, 2, 0) * 255.).round().to(torch.uint8).numpy()
        paths[name] = root / f'{name}.png'
        Image.fromarray(pixels).save(paths[name])

    paths['demo'] = root / 'demo.pt'
    torch.save({'state_dict': load_demo_model().state_dict(), 'epoch': 3}, paths['demo'])
    torch.manual_seed(0)
    paths['resnet18'] = root / 'resnet18.pt'
    torch.save({'model': torchvision.models.resnet18(num_classes=10).state_dict()}, paths['resnet18'])

    paths['text'] = root / 'notes.png'
    paths['text'].write_text('not an image')
    paths['garbage'] = root / 'garbage.pt'
    paths['garbage'].write_bytes(b'\x00\x01garbage' * 10)
    paths['code'] = root / 'code.pt'
    torch.save({'state_dict': Code()}, paths['code'])
    paths['pickled'] = root / 'pickled.pt'
    torch.save({'state_dict': load_demo_model().state_dict(), 'args': argparse.Namespace(lr=0.1)}, paths['pickled'])
    return paths


class Code:
    '''Unpickles as a call of ``os.system``: what ``torch.load(weights_only=True)`` must refuse, and we must say so.'''
    def __reduce__(self):
        return (os.system, ('echo unpickled',))


class Recorder:
    '''Stands in for the tqdm progress bar.'''
    def __init__(self, total, description):
        self.total, self.count = total, 0

    def update(self, count):
        self.count += count

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


@pytest.fixture(scope='module')
def explained(files, tmp_path_factory):
    '''``explain`` on the demo checkpoint for two images and two concepts, with the progress bar recorded.'''
    out = tmp_path_factory.mktemp('explained')
    bars = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli.explaining, 'progress_bar', lambda *args: bars.append(Recorder(*args)) or bars[-1])
        result = run('explain', '--model', 'demo', '--weights', files['demo'], '--image', files['star'],
                     files['cross'], '--layer', LAYER, '--concepts', '3,17', '--out', out)
    return result, out, bars


# --- help --------------------------------------------------------------------------------------------------------
def test_help_documents_commands_and_numbers():
    # argparse wraps help text to the terminal's width: compare with whitespace normalised
    status, stdout, _ = run('--help')
    stdout = ' '.join(stdout.split())
    assert status == 0
    for text in ('blocks', 'explain', 'demo', 'sum|leaky - isolated| / (sum|isolated| + sum|leaky - isolated|)',
                 'exclude_parallel=True'):
        assert text in stdout
    status, stdout, _ = run('explain', '--help')
    stdout = ' '.join(stdout.split())
    assert status == 0
    for text in ('--weights', 'weights_only=True', 'IMAGENET1K_V2', 'needs a connection', '--top', '--concepts',
                 '--target', '--composite', 'epsilon_gamma_box', '--device', '--size', 'leaked share'):
        assert text in stdout
    for command in ('blocks', 'demo'):
        assert run(command, '--help')[0] == 0


def test_python_dash_m_help():
    environment = dict(os.environ, OMP_NUM_THREADS='1')
    done = subprocess.run([sys.executable, '-m', 'canonizers', '--help'], capture_output=True, text=True,
                          env=environment, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('usage: canonizers')


# --- blocks ------------------------------------------------------------------------------------------------------
def test_blocks_demo_lists_blocks_branches_and_layers(monkeypatch):
    monkeypatch.setenv('COLUMNS', '120')  # the layer column wraps to the terminal
    status, stdout, _ = run('blocks', 'demo')
    assert status == 0
    rows = {line.split()[0]: line for line in stdout.splitlines() if line.startswith('layer') and 'Block' in line}
    assert list(rows) == ['layer1.0', 'layer2.0', 'layer3.0', 'layer4.0']
    assert all('BasicBlock' in row and 'skip, residual' in row for row in rows.values())
    assert 'residual: conv1 (16), conv2 (16)' in rows['layer1.0']
    assert 'downsample' not in rows['layer1.0']
    assert 'residual: conv1 (32), conv2 (32); skip: downsample.0 (32)' in rows['layer2.0']


def test_blocks_resnet18():
    status, stdout, _ = run('blocks', 'resnet18')
    assert status == 0
    assert sum(line.startswith('layer') and 'BasicBlock' in line for line in stdout.splitlines()) == 8


# --- explain -------------------------------------------------------------------------------------------------------
def test_explain_writes_pictures_csv_and_table(explained):
    (status, stdout, stderr), out, _ = explained
    assert status == 0, stderr
    assert sorted(path.name for path in out.iterdir()) == ['cross.png', 'heatmaps.csv', 'star.png']
    for name in ('star.png', 'cross.png'):
        with Image.open(out / name) as picture:
            assert picture.format == 'PNG' and picture.width > 400 and picture.height > 600
    comments = [line for line in (out / 'heatmaps.csv').read_text().splitlines() if line.startswith('#')]
    assert any('leaked share  sum|leaky - isolated| / (sum|isolated| + sum|leaky - isolated|)' in line
               for line in comments)
    rows = read_csv(out / 'heatmaps.csv')
    assert [(Path(row['image']).stem, int(row['concept'])) for row in rows] == [
        ('star', 3), ('star', 17), ('cross', 3), ('cross', 17)]
    assert all(row['cut'] == 'layer2.0:skip' for row in rows)
    assert 'leaky sum' in stdout and 'CRP ref. sum' in stdout and 'leaked share' in stdout


def test_explain_progress_bar_counts_images_and_concepts(explained):
    _, _, bars = explained
    assert len(bars) == 1
    assert bars[0].total == bars[0].count == 4


def test_explain_isolated_equals_crp_exclude_parallel(files, explained):
    (status, _, stderr), out, _ = explained
    assert status == 0, stderr
    model = load_demo_model().requires_grad_(False)
    for row in read_csv(out / 'heatmaps.csv'):
        data = demo_input(row['image'])
        target = int(model(data).argmax())
        assert int(row['target']) == int(row['predicted']) == target
        assert row['target_name'] == CLASSES[target]
        condition = {LAYER: [int(row['concept'])], 'y': [target]}
        isolated = crp_heatmap(model, data, condition, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]), True)
        leaky = crp_heatmap(model, data, condition, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]), False)
        assert float(row['isolated_sum']) == pytest.approx(isolated.sum().item(), rel=1e-5, abs=1e-7)
        assert float(row['reference_sum']) == pytest.approx(isolated.sum().item(), rel=1e-5, abs=1e-7)
        assert float(row['leaky_sum']) == pytest.approx(leaky.sum().item(), rel=1e-5, abs=1e-7)
        assert abs(float(row['leaky_sum']) - float(row['isolated_sum'])) > 1e-3
        assert float(row['leaked_share']) == pytest.approx(leaked_share(leaky, isolated), abs=1e-5)
        assert float(row['max_deviation']) < 1e-4


def test_explain_top_k_on_torchvision_checkpoint(files, tmp_path):
    status, _, stderr = run('explain', '--model', 'resnet18', '--weights', files['resnet18'], '--image',
                            files['star'], '--size', 64, '--layer', LAYER, '--top', 2, '--target', 3,
                            '--composite', 'epsilon_gamma_box', '--no-reference', '--out', tmp_path)
    assert status == 0, stderr
    rows = read_csv(tmp_path / 'heatmaps.csv')

    # the oracle: the channels of LAYER with the most relevance for class 3, from CRP directly
    from crp.attribution import CondAttribution

    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(files['resnet18'], weights_only=True)['model'])
    model.eval().requires_grad_(False)
    rgb = torch.from_numpy(np.asarray(Image.open(files['star']).convert('RGB'), dtype=np.float32) / 255.)
    data = ((rgb.permute(2, 0, 1)[None] - IMAGENET_MEAN) / IMAGENET_STD).requires_grad_(True)
    composite = EpsilonGammaBox(low=-IMAGENET_MEAN / IMAGENET_STD, high=(1 - IMAGENET_MEAN) / IMAGENET_STD,
                                canonizers=[ResNetCanonizer()])
    result = CondAttribution(model, no_param_grad=False)(
        data, [{'y': [3]}], composite, record_layer=[LAYER], exclude_parallel=False)
    top = result.relevances[LAYER][0].flatten(1).sum(1).argsort(descending=True)[:2].tolist()

    assert [int(row['concept']) for row in rows] == top
    # ImageNet normalisation and the box bounds as the oracle's: the isolated sums are CRP's exclude_parallel ones
    for row in rows:
        condition = {LAYER: [int(row['concept'])], 'y': [3]}
        isolated = crp_heatmap(model, data, condition, composite, True)
        # float32 rounding of a sum with cancellation, the concepts of an image being computed as one batch
        mass = isolated.abs().sum().item()
        assert float(row['isolated_sum']) == pytest.approx(isolated.sum().item(), abs=1e-4 * mass)
    assert all(row['target'] == '3' and row['reference_sum'] == '' for row in rows)
    assert all(row['composite'] == 'epsilon_gamma_box' for row in rows)


def test_explain_torchvision_weights_name(files, tmp_path, monkeypatch):
    '''A weights name goes to torchvision (replaced here: tests must not download) and brings class names.'''
    requested = []

    def get_model(name, weights=None, **options):
        requested.append(weights)
        torch.manual_seed(0)
        return torchvision.models.resnet18(**options)

    monkeypatch.setattr(torchvision.models, 'get_model', get_model)
    status, _, stderr = run('explain', '--model', 'resnet18', '--weights', 'IMAGENET1K_V1', '--image', files['star'],
                            '--size', 64, '--layer', LAYER, '--concepts', 0, '--target', 'goldfish',
                            '--no-reference', '--out', tmp_path)
    assert status == 0, stderr
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    (row,) = read_csv(tmp_path / 'heatmaps.csv')
    assert (row['target'], row['target_name']) == ('1', 'goldfish')


# --- demo ----------------------------------------------------------------------------------------------------------
def test_demo_prints_table_and_writes_pictures(tmp_path):
    status, stdout, stderr = run('demo', '--out', tmp_path, '--top', 1)
    assert status == 0, stderr
    header = next(line for line in stdout.splitlines() if line.startswith('image'))
    for column in ('leaky sum', 'isolated sum', 'CRP ref. sum', 'max dev.', 'leaked share'):
        assert column in header
    rows = read_csv(tmp_path / 'heatmaps.csv')
    assert [Path(row['image']).stem for row in rows] == list(CLASSES)
    assert all(row['layer'] == cli.DEFAULT_DEMO_LAYER and row['cut'] == 'layer2.0:skip' for row in rows)
    assert all(float(row['max_deviation']) < 1e-4 for row in rows)
    # a trained model and concepts inside a residual block: most of the leaky relevance went around the layer
    assert all(float(row['leaked_share']) > 0.3 for row in rows)
    assert sorted(path.name for path in tmp_path.glob('*.png')) == sorted(f'{name}.png' for name in CLASSES)
    assert len(list((tmp_path / 'samples').glob('*.png'))) == len(CLASSES)
    # the same on the trained ViT, concepts on its features, isolated as CRP isolates (its shortcut carries much)
    assert 'the same on the embedded ViT (trained; 8x8 patches, 4 layers) through GraphCanonizer' in stdout
    vit_rows = read_csv(tmp_path / 'vit' / 'heatmaps.csv')
    assert [Path(row['image']).stem for row in vit_rows] == list(cli.explaining.DEMO_VIT_SAMPLES)
    assert all(row['layer'] == cli.explaining.DEMO_VIT_LAYER and row['cut'] not in ('', 'nothing') for row in vit_rows)
    assert all(float(row['max_deviation']) < 1e-4 and float(row['leaked_share']) > 0.01 for row in vit_rows)
    assert sorted(path.name for path in (tmp_path / 'vit').glob('*.png')) == sorted(
        f'{name}.png' for name in cli.explaining.DEMO_VIT_SAMPLES)
    # the same on a timm model through the graph canonizer, isolated as CRP isolates
    assert 'the same on timm:resnet10t (random weights) through GraphCanonizer' in stdout
    assert 'isolation cuts layer3.0:skip' in stdout
    timm_rows = read_csv(tmp_path / 'timm' / 'heatmaps.csv')
    assert len(timm_rows) == 1 and timm_rows[0]['model'] == 'timm:resnet10t'
    assert float(timm_rows[0]['max_deviation']) < 1e-4 and float(timm_rows[0]['leaked_share']) > 0.01


def test_demo_defaults_and_committed_picture():
    args = cli.build_parser().parse_args(['demo'])
    assert Path(args.out) == Path('out', 'demo')
    assert 'canonizers demo' in (ROOT / 'Makefile').read_text().replace('-m canonizers', 'canonizers')
    picture = ROOT / 'docs' / 'demo.png'
    assert picture.stat().st_size < 300 * 1024
    with Image.open(picture) as image:
        assert image.format == 'PNG'


# --- errors ----------------------------------------------------------------------------------------------------------
def demo_args(files, out, **changes):
    '''``explain`` arguments on the demo checkpoint, with some replaced (None drops an option).'''
    options = {'--model': 'demo', '--weights': files['demo'], '--image': files['star'], '--layer': LAYER,
               '--concepts': '3', '--out': out}
    options.update(changes)
    argv = ['explain']
    for key, value in options.items():
        if value is not None:
            argv += [key, value]
    return argv


ERRORS = {
    'missing image': (lambda files: {'--image': files['star'].parent / 'nope.png'}, ['nope.png', 'no such file']),
    'unreadable image': (lambda files: {'--image': files['text']}, ['notes.png', 'cannot read image']),
    'missing weights': (lambda files: {'--weights': files['star'].parent / 'gone.pt'}, ['gone.pt', 'no such file']),
    'unreadable weights': (lambda files: {'--weights': files['garbage']}, ['garbage.pt', 'not a torch checkpoint']),
    'pickled objects': (lambda files: {'--weights': files['pickled']}, ['pickled.pt', 'argparse.Namespace']),
    'weights of another model': (lambda files: {'--weights': files['resnet18']}, ['resnet18.pt', 'do not fit']),
    'unknown weights name': (lambda files: {'--model': 'resnet18', '--weights': 'IMAGENET1K_V9'},
                             ['IMAGENET1K_V9', 'IMAGENET1K_V1']),
    'unknown model': (lambda files: {'--model': 'resnet181'}, ["'resnet181'", "'resnet18'"]),
    'unknown timm model': (lambda files: {'--model': 'timm:resnet5d'}, ["timm model 'resnet5d'", "'resnet50d'"]),
    'timm model without weights': (lambda files: {'--model': 'timm:resnet18', '--weights': None},
                                   ["'timm:resnet18' needs --weights", 'not downloaded']),
    'unknown layer': (lambda files: {'--layer': 'layer2.0.conv3'}, ["'layer2.0.conv3'", "'layer2.0.conv1'"]),
    'concept out of range': (lambda files: {'--concepts': '3,999'}, ['concept 999', '32 channels']),
    'negative concept': (lambda files: {'--concepts': '-1'}, ['concept -1']),
    'top out of range': (lambda files: {'--concepts': None, '--top': '33'}, ['--top 33', '32 channels']),
    'target out of range': (lambda files: {'--target': '6'}, ['target 6', '6 classes']),
    'unknown target name': (lambda files: {'--target': 'hexagon'}, ["'hexagon'", 'closest class names']),
    'concepts and top': (lambda files: {'--top': '2'}, ['--top', '--concepts']),
    'bad size': (lambda files: {'--size': '0'}, ['--size 0']),
    'too small size': (lambda files: {'--size': '7'}, ['--size 7', 'at least 32 pixels']),
    'code in checkpoint': (lambda files: {'--weights': files['code']}, ['code.pt', 'system', 'state_dict()']),
    'shared relu': (lambda files: {'--layer': 'layer2.0.relu'}, ['layer2.0.relu is used both inside the residual']),
    'unknown composite': (lambda files: {'--composite': 'epsilon_magic'}, ['epsilon_magic']),
}


@pytest.mark.parametrize('case', list(ERRORS))
def test_explain_errors_are_one_line_with_status_2(files, tmp_path, case):
    changes, expected = ERRORS[case]
    out = tmp_path / 'out'
    status, stdout, stderr = run(*demo_args(files, out, **changes(files)))
    assert status == 2
    assert len(stderr.strip().splitlines()) == 1 and 'Traceback' not in stderr
    assert stderr.startswith('canonizers: error: ')
    for text in expected:
        assert text in stderr
    # found before any work: nothing written
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize('model, layer, expected', [
    ('densenet121', 'features.denseblock2.denselayer3.relu1', 'is replaced by a ThresholdReLU while the model is'),
    ('efficientnet_b0', 'features.2.1.stochastic_depth', 'takes no part in the forward pass of the model canonized'),
    ('efficientnet_b0', 'features.2.1.block.2.fc1', 'computes the gate of squeeze-and-excitation block'),
    ('regnet_y_400mf', 'trunk_output.block1.block1-0.f.se.fc1', "computes the gate of 'mul'"),
])
def test_explain_layers_without_concepts_are_one_line_with_status_2(files, tmp_path, model, layer, expected):
    weights = tmp_path / 'weights.pt'
    torch.save(getattr(torchvision.models, model)(num_classes=10).state_dict(), weights)
    out = tmp_path / 'out'
    status, _, stderr = run('explain', '--model', model, '--weights', weights, '--image', files['star'], '--layer',
                            layer, '--top', '2', '--size', '64', '--out', out)
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and expected in stderr
    assert not out.exists()


def test_demo_with_a_layer_it_cannot_explain_writes_nothing(tmp_path):
    status, _, stderr = run('demo', '--layer', 'layer2.0.relu', '--out', tmp_path / 'demo')
    assert status == 2 and 'layer2.0.relu is used both inside' in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'demo').exists()


@pytest.mark.parametrize('model, block, branches', [
    ('googlenet', 'inception3a', '0, 1, 2, 3'), ('regnet_y_400mf', 'trunk_output.block2.block2-0', 'skip, residual'),
    ('convnext_tiny', 'features.1.0', 'skip, residual'), ('mnasnet0_5', 'layers.8.1', 'skip, residual'),
    ('shufflenet_v2_x0_5', 'stage2.1', '0, 1'), ('vit_b_16', 'encoder.layers.encoder_layer_0', 'skip, residual'),
    ('timm:resnet50d', 'layer3.0', 'skip, residual'),
])
def test_blocks_of_other_models_are_the_graph_canonizer_s(model, block, branches):
    status, stdout, stderr = run('blocks', model)
    assert status == 0, stderr
    assert stdout.startswith(f'{model}: GraphCanonizer')
    rows = [line for line in stdout.splitlines() if line.startswith(block + ' ') or line.startswith(block + ':')]
    assert rows and branches in rows[0]


def test_blocks_timm_resnet50d_lists_its_blocks():
    status, stdout, _ = run('blocks', 'timm:resnet50d')
    assert status == 0
    rows = [line for line in stdout.splitlines() if line.startswith('layer') and 'Bottleneck' in line]
    assert len(rows) == 16
    assert 'residual: conv1 (128)' in next(row for row in rows if row.startswith('layer2.0 '))


def test_blocks_of_a_model_without_parallel_paths():
    status, stdout, _ = run('blocks', 'vgg11')
    assert status == 0 and "model 'vgg11' has no parallel paths (traced with torch.fx)" in stdout


def test_blocks_leaves_out_gate_layers():
    status, stdout, _ = run('blocks', 'efficientnet_b0')
    assert status == 0 and 'block.0.0' in stdout and 'fc1' not in stdout and 'fc2' not in stdout


def test_blocks_unknown_model():
    status, _, stderr = run('blocks', 'resnet181')
    assert status == 2
    assert "'resnet181'" in stderr and "'resnet18'" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA is available here')
def test_unavailable_device(files, tmp_path):
    status, _, stderr = run(*demo_args(files, tmp_path / 'out', **{'--device': 'cuda'}))
    assert status == 2 and "'cuda'" in stderr


def test_missing_command():
    status, _, stderr = run()
    assert status == 2 and len(stderr.strip().splitlines()) == 1


# --- images and pictures ----------------------------------------------------------------------------------------------
def test_read_image_resizes_shorter_side_and_crops_centre(tmp_path):
    pixels = np.zeros((60, 90, 3), dtype=np.uint8)
    pixels[:, 15:75] = 255  # a white centre square between black side bars that the crop removes
    Image.fromarray(pixels).save(tmp_path / 'wide.png')
    rgb = cli.read_image(tmp_path / 'wide.png', 30)
    assert rgb.shape == (3, 30, 30)
    assert rgb.min() >= 0. and rgb[:, :, 2:-2].min() > 0.99


def test_picture_labels_and_symmetric_colour_ranges():
    from canonizers.figures import ConceptPanels, explanation_figure

    leaky = torch.linspace(-1., 3., 64).reshape(8, 8)
    # a faint isolated heatmap with a structure of its own (not a scaled copy of the leaky one)
    isolated = torch.linspace(-1., 1., 64).reshape(8, 8).T * 0.01
    figure = explanation_figure(torch.rand(8, 8, 3), leaky * 10, [ConceptPanels(7, 0.5, leaky, isolated, 0.75)],
                                image_title='input', class_title='class', heading='heading')
    axes = figure.axes
    titles = [ax.get_title() for ax in axes]
    leaked = f'{(leaky - isolated).sum().item():+.3g}'
    assert f'leaky, shared scale\nR={leaky.sum().item():+.3g}, 75% leaked ({leaked})' in titles
    assert f'isolated, shared scale\nR={isolated.sum().item():+.3g}' in titles
    assert f'isolated, own scale\nR={isolated.sum().item():+.3g}' in titles
    # the leaked part is no panel of its own: it repeated the leaky heatmap
    assert not any(title.startswith('leaked') for title in titles)
    assert 'concept 7' in axes[3].get_ylabel()
    heatmaps = {ax.get_title(): image for ax in axes for image in ax.get_images() if image.get_cmap().name == 'bwr'}
    assert len(heatmaps) == 4
    for image in heatmaps.values():
        low, high = image.get_clim()
        assert low == -high and high > 0.
    class_image, leaky_image, shared_image, own_image = heatmaps.values()
    # leaky and isolated share one range, so their magnitudes compare: the larger of their two bounds
    assert leaky_image.get_clim() == shared_image.get_clim()
    assert shared_image.get_clim()[1] == pytest.approx(float(np.percentile(leaky.abs(), 99.5)))
    # the isolated heatmap on its own range too, where its structure shows: drawn on the shared one, it would be
    # a white square (its largest value is 1/300 of the range)
    own_bound = float(np.percentile(isolated.abs(), 99.5))
    assert own_image.get_clim()[1] == pytest.approx(own_bound)
    assert own_image.get_clim()[1] <= isolated.abs().max().item() < shared_image.get_clim()[1] / 100
    # the class heatmap has its own range
    assert class_image.get_clim() != leaky_image.get_clim()
    # a colour bar for each of the row's two scales, labelled with its range
    bars = axes[6:]
    assert len(bars) == 2
    assert bars[0].get_ylim() == pytest.approx(shared_image.get_clim())
    assert bars[1].get_ylim() == pytest.approx(own_image.get_clim())


def test_zero_relevance_is_reported_as_such():
    from canonizers.figures import ConceptPanels, explanation_figure

    zeros = torch.zeros(8, 8)
    assert math.isnan(leaked_share(zeros, zeros))
    figure = explanation_figure(torch.rand(8, 8, 3), zeros, [ConceptPanels(7, 0., zeros, zeros, math.nan)],
                                image_title='input', class_title='class', heading='heading')
    assert 'leaky, shared scale\nR=+0, no relevance' in [ax.get_title() for ax in figure.axes]
    row = {'image': 'a/star.png', 'target_name': 'star', 'concept': 7, 'leaky_sum': 0., 'isolated_sum': 0.,
           'reference_sum': 0., 'max_deviation': '', 'leaked_share': ''}
    table = cli.format_table([row, dict(row, image='b/star.png')])
    assert 'no relevance' in table and '0.0%' not in table and 'a/star.png' in table and 'b/star.png' in table


# --- the numbers -----------------------------------------------------------------------------------------------------
def test_leaked_share_definition():
    isolated = torch.tensor([1., -1., 2.])
    assert leaked_share(isolated, isolated) == 0.
    assert leaked_share(torch.tensor([3., 0., 0.]), torch.zeros(3)) == 1.
    assert math.isnan(leaked_share(torch.zeros(3), torch.zeros(3)))
    # the leak cancels the isolated heatmap exactly: half of the mass leaked, where 1 - 0 / 0 is undefined
    assert leaked_share(torch.zeros(3), isolated) == pytest.approx(0.5)
    assert leaked_share(torch.tensor([2., -1., 2.]), isolated) == pytest.approx(1 / 5)


def test_explain_a_timm_model_through_the_graph_canonizer(files, tmp_path):
    import timm

    torch.manual_seed(0)
    # timm starts the last batch norm of each block at zero: random statistics, or no relevance passes the blocks
    model = randomize_batch_norms(timm.create_model('resnet10t', pretrained=False, num_classes=10))
    weights = tmp_path / 'resnet10t.pt'
    torch.save(model.state_dict(), weights)
    out = tmp_path / 'out'
    status, stdout, stderr = run('explain', '--model', 'timm:resnet10t', '--weights', weights, '--image', files['star'],
                                 '--layer', 'layer3.0.conv2', '--top', '2', '--size', '64', '--out', out)
    assert status == 0, stderr
    assert 'isolation cuts layer3.0:skip' in stdout
    rows = read_csv(out / 'heatmaps.csv')
    assert len(rows) == 2 and all(row['cut'] == 'layer3.0:skip' for row in rows)
    # the isolated heatmaps are CRP's exclude_parallel=True, and differ from the leaky ones
    assert all(float(row['max_deviation']) < 1e-4 for row in rows)
    assert all(float(row['leaked_share']) > 0.01 for row in rows)
