'''``canonizers check`` and the support warnings of ``explain``: exit status 0 supported, 1 not conservative, 2 refused
or a usage error (one line, no traceback); ``explain`` prints the verdict above its table where a model is not
supported, and flags isolated heatmaps that deviate from CRP's reference above rounding.'''
import contextlib
import csv
import io

import pytest
import torch
import torchvision
from PIL import Image

from canonizers import cli
from canonizers.cli.checking import ROUNDING, deviation_warnings
from canonizers.evaluation import randomize_batch_norms

pytest.importorskip('crp')
timm = pytest.importorskip('timm')


# the command line's code is the same on every zennit version, whose rules the other modules test: run once
pytestmark = pytest.mark.once


def run(*argv):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main([str(arg) for arg in argv])
    return status, stdout.getvalue(), stderr.getvalue()


def test_check_a_conserving_model_exits_0():
    status, stdout, stderr = run('check', 'demo')
    assert status == 0, stderr
    assert 'traced: yes' in stdout and 'operations without a conserving rule: none' in stdout
    assert 'verdict: exact and conservative' in stdout
    # progress on stderr, step by step
    assert 'check: tracing' in stderr and 'check: relevance of a bias-free float64 copy' in stderr


def test_check_a_model_that_does_not_conserve_exits_1_and_names_the_operations():
    # the linear attention of EfficientViT (B) divides by a sum of its own signal: no rule applies
    status, stdout, _ = run('check', 'timm:efficientvit_b0', '--size', '32')
    assert status == 1
    assert "merge (4 places): a truediv of 2 paths in 'stages.2.blocks.1.context_module.main'" in stdout
    assert 'verdict: exact, relevance not conserved at 4 places of merge' in stdout


def test_check_traces_a_model_that_branches_on_shapes_for_its_input_shape():
    # MobileViT's blocks branch on shapes (timm marks them not traceable): traced for the one input shape
    status, stdout, _ = run('check', 'timm:mobilevit_xxs', '--size', '32')
    assert status == 0
    assert 'GraphCanonizer(input_shape=(1, 3, 32, 32))' in stdout and 'verdict: exact and conservative' in stdout


@pytest.mark.parametrize('argv, message', [
    (('check', 'resnet1'), "unknown model 'resnet1'; closest:"),
    (('check', 'timm:nosuchnet'), "unknown timm model 'nosuchnet'"),
    (('check', 'demo', '--size', '0'), '--size 0: must be a positive number of pixels'),
])
def test_check_usage_errors_are_one_line_with_status_2(argv, message):
    status, stdout, stderr = run(*argv)
    assert status == 2 and stdout == ''
    assert stderr.count('\n') == 1 and message in stderr and 'Traceback' not in stderr


def test_explain_prints_the_verdict_above_its_table_where_a_model_is_not_supported(tmp_path):
    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model('mobilevit_xxs', pretrained=False, num_classes=10))
    weights = tmp_path / 'mobilevit.pt'
    torch.save(model.state_dict(), weights)
    image = tmp_path / 'noise.png'
    Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(
        image)
    status, stdout, stderr = run('explain', '--model', 'timm:mobilevit_xxs', '--weights', weights, '--image',
                                 image, '--layer', 'stages.1.1.conv2_kxk.conv', '--top', '1', '--size', '32',
                                 '--out', tmp_path / 'out')
    assert status == 0, stderr
    warning = next(line for line in stdout.splitlines() if line.startswith('warning: '))
    # check traces it for one shape; explain, for any, keeps the blocks that branch on shapes whole
    assert warning.startswith('warning: ByobNet branches on shapes, and explain keeps the modules and functions that '
                              'do whole')
    assert stdout.index(warning) < stdout.index('concept')


def test_deviations_above_rounding_are_flagged():
    rows = [{'image': 'a.png', 'concept': 3, 'max_deviation': 2e-7}, {'image': 'b.png', 'concept': 5,
                                                                      'max_deviation': 0.3},
            {'image': 'c.png', 'concept': 1, 'max_deviation': ''}]
    warnings = deviation_warnings(rows)
    assert len(warnings) == 1 and 'concept 5 of b.png' in warnings[0] and 'above float32 rounding' in warnings[0]


def _vit_b_16():
    return torchvision.models.vit_b_16()


def _vit_tiny():
    return timm.create_model('vit_tiny_patch16_224', pretrained=False)


@pytest.mark.parametrize('model, build, layer', [
    ('timm:vit_tiny_patch16_224', _vit_tiny, 'blocks.10.mlp.fc1'),
    ('vit_b_16', _vit_b_16, 'encoder.layers.encoder_layer_10.mlp.0'),
])
def test_explain_isolates_feature_concepts_of_vision_transformers(tmp_path, model, build, layer):
    torch.manual_seed(0)
    network = build()
    for parameter in network.parameters():
        if parameter.dim() > 1 and parameter.abs().max() == 0:
            # zero-initialised heads leave no relevance
            torch.nn.init.normal_(parameter, std=0.02)
    weights = tmp_path / 'vit.pt'
    torch.save(network.state_dict(), weights)
    image = tmp_path / 'noise.png'
    Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(
        image)
    status, stdout, stderr = run('explain', '--model', model, '--weights', weights, '--image', image, '--layer', layer,
                                 '--top', '2', '--out', tmp_path / 'out')
    assert status == 0, stderr
    lines = [line for line in (tmp_path / 'out' / 'heatmaps.csv').read_text().splitlines() if not line.startswith('#')]
    rows = list(csv.DictReader(lines))
    assert len(rows) == 2
    features = network.get_submodule(layer).out_features
    for row in rows:
        # concepts are features (the last dimension), not tokens, and isolated as CRP's exclude_parallel=True
        assert 0 <= int(row['concept']) < features and features > 197
        # float32 rounding, or (above it) the float64 deviation
        assert float(row['max_deviation']) <= ROUNDING
        assert row['cut'] and float(row['leaked_share']) > 0.1
    assert 'deviates from CRP' not in stdout


def test_explain_does_not_warn_where_the_general_trace_conserves_as_well():
    # timm's Swin keeps its window functions as leaves in the general trace: check traces through them for the shape,
    # explain does not, and loses nothing by it
    model = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, num_classes=10, img_size=64,
                              window_size=4, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1)).eval()
    data = torch.randn(1, 3, 64, 64)
    from canonizers import check
    from canonizers.cli.checking import verdict_warning

    report = check(model, data)
    assert report.supported and report.input_shape == (1, 3, 64, 64), report.verdict
    assert verdict_warning(model, data) is None
