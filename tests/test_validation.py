'''Bad input is refused with a clear error before anything is touched.'''
import pytest
import torchvision
from helpers import assert_untouched, make_model, snapshot
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer as ZennitResNetCanonizer

from canonizers import DenseNetCanonizer, PerSampleCut, ResNetCanonizer

BAD_CUTS = [
    (['layer3.9'], ValueError, r"'layer3\.9' is not a module of this model; closest block names: 'layer3\.5'"),
    (['layer3.0.conv1'], ValueError, r"'layer3\.0\.conv1' is a layer inside block 'layer3\.0'"),
    (['layer3.0.downsample.0'], ValueError, r"inside block 'layer3\.0'"),
    (['layer7.*'], ValueError, r"pattern 'layer7\.\*' matches no cuttable block"),
    (['conv1'], ValueError, r"'conv1' is not a cuttable block; closest block names"),
    ({'layer3.0': 'shortcut'}, ValueError, r"branch 'shortcut' for 'layer3\.0' is not valid: use 'skip' or 'residual'"),
    ([3], TypeError, 'must be strings'),
    (PerSampleCut([None, ['layer1.5']]), ValueError, r"'layer1\.5'"),
]


@pytest.mark.parametrize('cut, error, message', BAD_CUTS)
def test_bad_cut_is_refused_and_model_untouched(cut, error, message):
    model = make_model('resnet50')
    before = snapshot(model)
    with pytest.raises(error, match=message):
        ResNetCanonizer(cut=cut).apply(model)
    assert_untouched(model, before)


@pytest.mark.parametrize('cut, error, message', BAD_CUTS[:2])
def test_bad_cut_refused_inside_a_composite(cut, error, message):
    model = make_model('resnet50')
    before = snapshot(model)
    composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer(cut=cut)])
    with pytest.raises(error, match=message):
        with composite.context(model):
            pass
    composite.remove()
    assert_untouched(model, before)


def test_training_mode_is_refused():
    model = make_model('resnet18').train()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r'call model\.eval\(\)'):
        ResNetCanonizer().apply(model)
    assert_untouched(model, before)


@pytest.mark.parametrize('first', [ResNetCanonizer, ZennitResNetCanonizer])
def test_nested_application_is_refused(first):
    model = make_model('resnet18')
    instances = first().apply(model)
    registered = snapshot(model)
    with pytest.raises(RuntimeError, match='still registered'):
        ResNetCanonizer().apply(model)
    assert_untouched(model, registered)
    for instance in instances:
        instance.remove()


def test_unknown_name_under_a_block_is_not_called_a_layer():
    model = make_model('resnet18')
    with pytest.raises(ValueError, match=r"'layer3\.0\.conv9' is not a module of this model"):
        ResNetCanonizer(cut=['layer3.0.conv9']).apply(model)


def test_layer_cuts_refuse_the_shared_relu_of_a_block():
    model = make_model('resnet18')
    with pytest.raises(ValueError, match=r"layer2\.0\.relu is used both inside the residual branch and after the sum"):
        ResNetCanonizer().layer_cuts(model, ['layer2.0.relu'])
    assert ResNetCanonizer().layer_cuts(model, ['layer2.0.bn1']) == {'layer2.0': 'skip'}


def test_version_and_repr_show_what_is_installed_and_cut():
    from importlib.metadata import version

    import canonizers
    assert canonizers.__version__ == version('zennit-canonizers')
    assert repr(canonizers.ResNetCanonizer(cut=['layer3.0'])) == "ResNetCanonizer(cut={'layer3.0': 'skip'})"
    assert repr(canonizers.MobileNetCanonizer()) == 'MobileNetCanonizer(cut={})'


@pytest.mark.parametrize('canonizer, name, message', [
    (ResNetCanonizer, 'densenet121',
     'ResNetCanonizer rewrites no block of DenseNet: it only merges batch norms, and no path can be cut; '
     'DenseNetCanonizer fits this model'),
    (DenseNetCanonizer, 'regnet_y_400mf', r'RegNet has 16 products, 16 sums of parallel paths .*not supported \(yet\)'),
    (ResNetCanonizer, 'vgg11', r'VGG has no parallel paths \(traced with torch\.fx\); canonizers\.ExactMergeBatchNorm'),
])
def test_family_that_rewrites_no_block_warns_with_what_fits(canonizer, name, message):
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    before = snapshot(model)
    with pytest.warns(UserWarning, match=message):
        instances = canonizer().apply(model)
    for instance in instances:
        instance.remove()
    assert_untouched(model, before)


def test_sdist_holds_what_its_tests_and_readme_need(tmp_path):
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    build = ('import sys; from setuptools import build_meta; '
             'print(build_meta.build_sdist(sys.argv[1]))')
    name = subprocess.run([sys.executable, '-c', build, str(tmp_path)], cwd=root, check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as archive:
        members = {member.split('/', 1)[1] for member in archive.getnames() if '/' in member}
        info = archive.extractfile(f'{name[:-len(".tar.gz")]}/PKG-INFO').read().decode()
    for path in ('tests/helpers.py', 'tests/conftest.py', 'tests/test_contract.py', 'docs/demo.png', 'LICENSE',
                 'COPYING', 'canonizers/py.typed', 'canonizers/demo/weights.pt', 'Makefile'):
        assert path in members, path
    assert 'License-Expression: LGPL-3.0-or-later' in info
