'''canonizers.crp: isolated conditional heatmaps for any mix of conditions, against CRP's exclude_parallel=True
computed one condition at a time (the oracle), and cut tables written by hand from the architectures.'''
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
import zennit.core
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from helpers import assert_untouched, make_input, make_model, relative_error, snapshot
from zennit.canonizers import CompositeCanonizer
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer as ZennitResNetCanonizer

from canonizers import (
    DenseNetCanonizer,
    EfficientNetCanonizer,
    ExactMergeBatchNorm,
    GraphCanonizer,
    MobileNetCanonizer,
    PerSampleCut,
    ResNetBasicBlockCanonizer,
    ResNetCanonizer,
)
from canonizers.crp import IsolatingCondAttribution, cuts_for
from canonizers.evaluation import randomize_batch_norms
from canonizers.graph import graph_cuts_for
from canonizers.partial_backward import PartialBackward

TARGET = 3


def model_order(model, layers):
    '''``layers`` from the last to the first in the model, the order CRP's partial backward pass needs.'''
    index = {name: position for position, (name, _) in enumerate(model.named_modules())}
    return sorted(layers, key=lambda layer: -index[layer])


def argmax_channel(relevance):
    return int(relevance[0].flatten(1).sum(1).abs().argmax())


def choose_conditions(model, data, layer_sets, composite):
    '''Conditions on the channels that carry the most relevance (random networks leave many channels without any):
    for the top layer of a condition without conditioning, for each lower layer given the layers above it.'''
    attribution = CondAttribution(model, no_param_grad=False)
    layers = sorted({layer for layer_set in layer_sets for layer in layer_set})
    result = attribution(data, [{'y': [TARGET]}], composite, record_layer=layers, exclude_parallel=False)
    conditions = []
    for layer_set in layer_sets:
        ordered = model_order(model, layer_set)
        condition = {ordered[0]: [argmax_channel(result.relevances[ordered[0]])]} if ordered else {}
        for lower in ordered[1:]:
            given = attribution(data, [{**condition, 'y': [TARGET]}], composite, record_layer=[lower],
                                exclude_parallel=True)
            condition[lower] = [argmax_channel(given.relevances[lower])]
        # in the order written, which need not be CRP's
        conditions.append({**{layer: condition[layer] for layer in layer_set}, 'y': [TARGET]})
    return conditions


def count_forwards(model):
    '''Record the batch size of every forward pass of ``model``.'''
    sizes = []
    handle = model.register_forward_hook(lambda module, input, output: sizes.append(len(input[0])))
    return sizes, handle


# per model: the family canonizer, a layer below all conditioned ones (to compare recorded relevances), and the
# conditions' layers: several layers, a condition with two layers, layers whose conditions need no cut
CASES = {
    'resnet50': (
        ResNetCanonizer, 'conv1', [
            ('layer1.0.conv2',),
            ('layer2.0.downsample.0',),
            ('layer2.1.conv1', 'layer4.0.conv2'),
            ('layer3.2.conv3',),
            ('layer4.1',),
            (),
        ]),
    'densenet121': (
        DenseNetCanonizer, 'features.conv0', [
            ('features.denseblock1.denselayer2.conv1',),
            ('features.denseblock2.denselayer5.conv2',),
            ('features.transition2.conv',),
            ('features.denseblock3.denselayer10',),
            ('features.denseblock2.denselayer3.conv2', 'features.denseblock4.denselayer3.conv1'),
        ]),
    'efficientnet_b0': (
        EfficientNetCanonizer, 'features.0.0', [
            ('features.2.1.block.0.0',),
            ('features.4.2.block.1.0',),
            ('features.3.0.block.3.0',),
            ('features.6.1',),
            ('features.4.1.block.0.0', 'features.6.2.block.3.0'),
        ]),
}


class Reference:
    '''A model, its conditions, and CRP's isolated heatmaps of them, one condition at a time.'''
    def __init__(self, name):
        self.family, self.bottom, layer_sets = CASES[name]
        self.model = make_model(name, dtype=torch.float64)
        self.data = make_input(dtype=torch.float64)
        plain = EpsilonPlusFlat(canonizers=[self.family()])
        self.conditions = choose_conditions(self.model, self.data, layer_sets, plain)

        attribution = CondAttribution(self.model, no_param_grad=False)
        self.heatmaps, self.relevances, self.at_layers = [], [], []
        for condition in self.conditions:
            layers = model_order(self.model, [layer for layer in condition if layer != 'y'])
            in_crp_order = {**{layer: condition[layer] for layer in layers}, 'y': condition['y']}
            result = attribution(self.data, [in_crp_order], plain, record_layer=[self.bottom], exclude_parallel=True)
            self.heatmaps.append(result.heatmap)
            self.relevances.append(result.relevances[self.bottom])
            self.at_layers.append({layer: result.relevances[layer] for layer in layers})
        # CRP without isolation, on the same batch: what leaks, and the form of the recorded results
        self.leaky = attribution(self.data, self.conditions, plain, record_layer=[self.bottom], exclude_parallel=False)

    def assert_equal(self, heatmaps, bottom_relevances=None):
        assert heatmaps.shape == (len(self.conditions),) + self.heatmaps[0].shape[1:]
        for index, expected in enumerate(self.heatmaps):
            assert relative_error(heatmaps[index:index + 1], expected) < 1e-9, self.conditions[index]
            if bottom_relevances is not None:
                assert relative_error(bottom_relevances[index:index + 1], self.relevances[index]) < 1e-9


_REFERENCES = {}


@pytest.fixture(params=list(CASES))
def reference(request):
    if request.param not in _REFERENCES:
        _REFERENCES[request.param] = Reference(request.param)
    return _REFERENCES[request.param]


def test_call_equals_crp_exclude_parallel_in_one_pass(reference):
    model = reference.model
    canonizer = reference.family()
    attribution = IsolatingCondAttribution(model, no_param_grad=False)
    sizes, handle = count_forwards(model)
    try:
        result = attribution(reference.data, reference.conditions, EpsilonPlusFlat(canonizers=[canonizer]),
                             record_layer=[reference.bottom])
    finally:
        handle.remove()

    # one forward pass of the one input sample for all conditions
    assert sizes == [1]
    reference.assert_equal(result.heatmap, result.relevances[reference.bottom])
    # recorded as CRP records them without isolation: the same layers and shapes, the same activations
    leaky = reference.leaky
    assert list(result.relevances) == list(leaky.relevances)
    assert list(result.activations) == list(leaky.activations)
    for name in leaky.relevances:
        assert result.relevances[name].shape == leaky.relevances[name].shape
        assert relative_error(result.activations[name], leaky.activations[name]) < 1e-12
    assert relative_error(result.prediction, leaky.prediction.detach()) < 1e-12
    # at the conditioned layers, the relevance that passes them, once: CRP's exclude_parallel=True counts it twice
    for index, condition in enumerate(reference.conditions):
        for layer in condition:
            if layer != 'y':
                assert relative_error(2 * result.relevances[layer][index:index + 1],
                                      reference.at_layers[index][layer]) < 1e-9
    assert canonizer.cut == {}
    # the oracle is not trivially met: without isolation, relevance leaks around the conditioned layers
    cuts = cuts_for(model, reference.conditions)
    leaks = [relative_error(leaky.heatmap[index:index + 1], expected)
             for index, expected in enumerate(reference.heatmaps) if cuts[index]]
    assert len(leaks) >= 3 and max(leaks) > 1e-2


def test_cut_path_equals_partial_backward(reference):
    # the two ways to isolation agree: per-sample cuts in one ordinary backward pass, and partial backward passes
    model = reference.model
    cuts = PerSampleCut(cuts_for(model, reference.conditions))
    data = reference.data.repeat(len(reference.conditions), 1, 1, 1).detach().requires_grad_()
    cut = CondAttribution(model, no_param_grad=False)(
        data, reference.conditions, EpsilonPlusFlat(canonizers=[reference.family(cut=cuts)]),
        exclude_parallel=False).heatmap
    reference.assert_equal(cut)


def test_generate_mixed_layers_over_batches(reference):
    attribution = IsolatingCondAttribution(reference.model, no_param_grad=False)
    composite = EpsilonPlusFlat(canonizers=[reference.family()])
    conditions = reference.conditions
    batch_size = 2
    sizes, handle = count_forwards(reference.model)
    try:
        results = list(attribution.generate(reference.data, conditions, composite, record_layer=[reference.bottom],
                                            batch_size=batch_size, verbose=False))
    finally:
        handle.remove()

    batches = math.ceil(len(conditions) / batch_size)
    # one forward pass for all batches
    assert sizes == [1]
    assert [len(result.heatmap) for result in results] == [
        min(batch_size, len(conditions) - index * batch_size) for index in range(batches)]
    heatmaps = torch.cat([result.heatmap for result in results])
    relevances = torch.cat([result.relevances[reference.bottom] for result in results])
    reference.assert_equal(heatmaps, relevances)
    for result in results:
        assert set(result.relevances) == set(reference.leaky.relevances)
        assert len(result.prediction) == len(result.heatmap)


# --- cuts_for tables, written from the architectures --------------------------------------------------------------

RESNET50_CUTS = [
    (['layer1.0.conv1'], {'layer1.0': 'skip'}),
    (['layer2.3.bn2'], {'layer2.3': 'skip'}),
    (['layer2.0.downsample.0'], {'layer2.0': 'residual'}),
    (['layer4.0.downsample.1'], {'layer4.0': 'residual'}),
    (['layer3.1'], {}),
    (['conv1'], {}),
    (['layer4'], {}),
    (['fc'], {}),
    ([], {}),
    (['layer2.0.conv1', 'layer2.0.conv3'], {'layer2.0': 'skip'}),
    (['layer4.2.conv3', 'layer1.1.conv2'], {'layer4.2': 'skip', 'layer1.1': 'skip'}),
    (['layer3.0.downsample.0', 'layer2.3.conv2', 'layer3.0'], {'layer3.0': 'residual', 'layer2.3': 'skip'}),
]

DENSENET121_CUTS = [
    (['features.denseblock1.denselayer1.conv1'], {'features.denseblock1.denselayer1': 'skip'}),
    (['features.denseblock2.denselayer12.norm2'], {'features.denseblock2.denselayer12': 'skip'}),
    (['features.denseblock3.denselayer24.conv2'], {'features.denseblock3.denselayer24': 'skip'}),
    # a dense layer's output is its transforming branch alone: relevance through it must not bypass it
    (['features.denseblock3.denselayer10'], {'features.denseblock3.denselayer10': 'skip'}),
    (['features.denseblock2'], {}),
    (['features.transition1.conv'], {}),
    (['features.transition3'], {}),
    (['features.conv0'], {}),
    (['features.norm5'], {}),
    (['classifier'], {}),
    (['features.denseblock4.denselayer16.conv2', 'features.denseblock1.denselayer6.relu1'],
     {'features.denseblock4.denselayer16': 'skip', 'features.denseblock1.denselayer6': 'skip'}),
]

# blocks without a residual connection (stride 2, or other channel counts) have no skip to cut
EFFICIENTNET_B0_CUTS = [
    (['features.2.1.block.0.0'], {'features.2.1': 'skip'}),
    (['features.4.2.block.3.1'], {'features.4.2': 'skip'}),
    (['features.6.3.block.1.0'], {'features.6.3': 'skip'}),
    (['features.1.0.block.0.0'], {}),
    (['features.2.0.block.1.0'], {}),
    (['features.5.0.block.3.0'], {}),
    (['features.7.0.block.0.0'], {}),
    (['features.6.1'], {}),
    (['features.0.0'], {}),
    (['features.8.0'], {}),
    (['features.6.2.block.3.0', 'features.3.1.block.0.0', 'features.3.0.block.0.0'],
     {'features.6.2': 'skip', 'features.3.1': 'skip'}),
]

MOBILENET_V2_CUTS = [
    (['features.3.conv.0.0'], {'features.3': 'skip'}),
    (['features.16.conv.2'], {'features.16': 'skip'}),
    (['features.2.conv.1.0'], {}),
    (['features.11.conv.0.0'], {}),
    (['features.17.conv.2'], {}),
    (['features.13'], {}),
    (['features.18.0'], {}),
    (['features.9.conv.1.0', 'features.5.conv.3'], {'features.9': 'skip', 'features.5': 'skip'}),
]

TABLES = [
    ('resnet50', ResNetCanonizer, RESNET50_CUTS),
    ('densenet121', DenseNetCanonizer, DENSENET121_CUTS),
    ('efficientnet_b0', EfficientNetCanonizer, EFFICIENTNET_B0_CUTS),
    ('mobilenet_v2', MobileNetCanonizer, MOBILENET_V2_CUTS),
]


@pytest.mark.parametrize('name, family, table', TABLES)
def test_cuts_for_table(name, family, table):
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    conditions = [{**{layer: [0] for layer in layers}, 'y': [1]} for layers, _ in table]
    cuts = cuts_for(model, conditions)
    assert cuts == [expected for _, expected in table]
    # the family canonizer accepts them all at once, as a per-sample cut
    family(cut=PerSampleCut(cuts)).check(model)


def test_cuts_for_model_without_parallel_paths():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
    assert cuts_for(model, [{'0': [1], 'y': [0]}, {'1': [0, 2]}]) == [{}, {}]
    with pytest.raises(ValueError, match=r"'3'"):
        cuts_for(model, [{'3': [1]}])


# --- errors -------------------------------------------------------------------------------------------------------

def test_parallel_layers_are_refused_naming_the_block():
    model = make_model('resnet50')
    condition = {'layer2.0.conv1': [0], 'layer2.0.downsample.0': [0], 'y': [TARGET]}
    message = r"'layer2\.0\.conv1'.*'layer2\.0\.downsample\.0'.*parallel branches of block 'layer2\.0'"
    with pytest.raises(ValueError, match=message):
        cuts_for(model, [{'layer1.0.conv1': [0]}, condition])
    with pytest.raises(ValueError, match=r'condition 1 '):
        cuts_for(model, [{'layer1.0.conv1': [0]}, condition])


ZENNIT_1 = hasattr(zennit.core.Hook, '_inject_grad_fn')


@pytest.mark.parametrize('condition, message', [
    ({'layer2.0.conv1': [0], 'layer2.0.downsample.0': [1], 'y': [TARGET]},
     r"condition 1 .*layers 'layer2\.0\.conv1' and 'layer2\.0\.downsample\.0' lie on parallel paths"),
    ({'layer9.conv1': [0], 'y': [TARGET]}, r"condition 1 .*not modules of the model: 'layer9\.conv1'"),
    # a module that runs twice in the forward pass (BasicBlock uses its ReLU twice)
    ({'layer1.0.relu': [0], 'y': [TARGET]}, r"layer 'layer1\.0\.relu' ran 2 times in the forward pass"),
    ({'layer2.0.conv1': [999], 'y': [TARGET]}, r"concept 999 out of range: layer 'layer2\.0\.conv1' has 128"),
])
def test_bad_condition_is_refused_and_nothing_changes(condition, message):
    model = make_model('resnet18')
    data = make_input()
    canonizer = ResNetCanonizer()
    attribution = IsolatingCondAttribution(model, no_param_grad=False)
    before = snapshot(model)
    conditions = [{'layer1.0.conv1': [0], 'y': [TARGET]}, condition]
    with pytest.raises(ValueError, match=message):
        attribution(data, conditions, EpsilonPlusFlat(canonizers=[canonizer]))
    with pytest.raises(ValueError, match=message.replace('condition 1 ', '')):
        list(attribution.generate(data, conditions, EpsilonPlusFlat(canonizers=[canonizer]), batch_size=1,
                                  verbose=False))
    assert canonizer.cut == {}
    # also the hooks that record the layers' outputs are gone
    assert_untouched(model, before)
    with pytest.raises(ValueError, match=r"'layer9\.conv1'"):
        cuts_for(model, [{'layer9.conv1': [0], 'y': [TARGET]}])


class DataDependent(torch.nn.Module):
    '''A model torch.fx cannot trace: its control flow depends on the data.'''
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x if x.sum() > 0 else x


def test_cuts_for_other_models_are_the_graph_canonizer_s():
    model = googlenet()
    data = make_input(dtype=torch.float64)
    conditions = choose_conditions(model, data, [('inception3a.branch2.1.conv',), ('inception4e',)], EpsilonPlusFlat(
        canonizers=[GraphCanonizer()]))
    cuts = cuts_for(model, conditions)
    assert cuts == graph_cuts_for(model, conditions)
    assert cuts[0] and 'inception3a' in cuts[0]
    # the two ways to isolation agree: cuts in one ordinary backward pass, and partial backward passes
    batch = data.repeat(2, 1, 1, 1).detach().requires_grad_()
    cut = CondAttribution(model, no_param_grad=False)(
        batch, conditions, EpsilonPlusFlat(canonizers=[GraphCanonizer(cut=PerSampleCut(cuts))]),
        exclude_parallel=False).heatmap
    partial = IsolatingCondAttribution(model, no_param_grad=False)(
        data, conditions, EpsilonPlusFlat(canonizers=[GraphCanonizer()])).heatmap
    assert partial.abs().max() > 0
    assert relative_error(cut, partial) < 1e-9
    with pytest.raises(ValueError, match=r'trac'):
        cuts_for(DataDependent().eval(), [{'conv': [0], 'y': [0]}])


class OwnResidualBlock(torch.nn.Module):
    '''A user's own ResNet-like block (``out = out + identity``), which no canonizer of this package rewrites.'''
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


def own_residual_model():
    model = torch.nn.Sequential(OwnResidualBlock(), OwnResidualBlock(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(3, 5))
    torch.manual_seed(0)
    return randomize_batch_norms(model).eval().double()


def googlenet():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=False)
    return randomize_batch_norms(model).eval().double()


# models no canonizer of this package covers, composites without one (or with zennit's, or a misfit family)
ANY_MODEL = {
    'googlenet': (googlenet, lambda: EpsilonPlusFlat(), [
        ('inception3a.branch2.1.conv',), ('inception4b.branch3.0.conv',), ('inception4e',),
        ('inception5a.branch4.1.conv', 'inception3b.branch1.conv'),
    ]),
    'own residual': (own_residual_model, lambda: EpsilonPlusFlat(canonizers=[ResNetCanonizer()]), [
        ('1.conv',), ('0.bn',), ('1.conv', '0.conv'),
    ]),
    'resnet18 with zennit canonizer': (lambda: make_model('resnet18', dtype=torch.float64),
                                       lambda: EpsilonPlusFlat(canonizers=[ZennitResNetCanonizer()]), [
        ('layer2.0.conv2',), ('layer3.1.bn1',), ('layer4.0.downsample.0', 'layer1.1.conv1'),
    ]),
}


@pytest.mark.parametrize('name', list(ANY_MODEL))
def test_any_model_and_composite_equals_crp_exclude_parallel(name):
    make, composite, layer_sets = ANY_MODEL[name]
    model = make()
    data = make_input(dtype=torch.float64)
    with warnings.catch_warnings():
        # a family canonizer warns that it fits no block of the own model
        warnings.simplefilter('ignore')
        conditions = choose_conditions(model, data, layer_sets, composite())
        result = IsolatingCondAttribution(model, no_param_grad=False)(data, conditions, composite())
        leaks = []
        for index, condition in enumerate(conditions):
            layers = model_order(model, [layer for layer in condition if layer != 'y'])
            in_crp_order = {**{layer: condition[layer] for layer in layers}, 'y': condition['y']}
            attribution = CondAttribution(model, no_param_grad=False)
            expected = attribution(data, [in_crp_order], composite(), exclude_parallel=True).heatmap
            leaky = attribution(data, [in_crp_order], composite(), exclude_parallel=False).heatmap
            assert expected.abs().max() > 0
            assert relative_error(result.heatmap[index:index + 1], expected) < 1e-9, condition
            leaks.append(relative_error(leaky, expected))
    # not trivially met: relevance goes around some of the layers
    assert max(leaks) > 1e-2


def test_layer_no_relevance_reaches_is_refused():
    model = make_model('efficientnet_b0')
    attribution = IsolatingCondAttribution(model, no_param_grad=False)
    # the canonizer makes squeeze-and-excitation gates constant in the backward pass
    with pytest.raises(ValueError, match=r"no relevance reaches layer 'features\.2\.1\.block\.2\.fc1' from the "
                                         r'model output'):
        attribution(make_input(), [{'features.2.1.block.2.fc1': [0], 'y': [TARGET]}],
                    EpsilonPlusFlat(canonizers=[EfficientNetCanonizer()]))
    with pytest.raises(ValueError, match=r"no relevance reaches layer 'features\.7\.0\.block\.0\.0' from "
                                         r"start_layer 'features\.3'"):
        attribution(make_input(), [{'features.7.0.block.0.0': [0]}], EpsilonPlusFlat(
            canonizers=[EfficientNetCanonizer()]), start_layer='features.3')


def test_empty_conditions_several_samples_in_generate_and_bad_batch_size_are_refused():
    model = make_model('resnet18')
    attribution = IsolatingCondAttribution(model, no_param_grad=False)
    composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    with pytest.raises(ValueError, match='conditions is empty'):
        attribution(make_input(), [], composite)
    with pytest.raises(ValueError, match='data holds 2'):
        next(attribution.generate(make_input(2), [{'y': [TARGET]}], composite, verbose=False))
    with pytest.raises(ValueError, match='batch_size must be a positive integer, not 0'):
        next(attribution.generate(make_input(), [{'y': [TARGET]}], composite, batch_size=0, verbose=False))


# --- restoring, compatibility ---------------------------------------------------------------------------------------

def failing_mask(batch_id, concept_ids, layer_name):
    def mask(grad):
        raise RuntimeError('mask failed')
    return mask


@pytest.mark.parametrize('method', ['call', 'generate'])
def test_model_is_restored_on_error_and_the_composite_cut_is_crp_s(method):
    model = make_model('resnet18', dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    cut = {'layer1.0': 'residual'}
    canonizer = ResNetCanonizer(cut=cut)
    attribution = IsolatingCondAttribution(model, no_param_grad=False)
    conditions = [{'layer3.0.conv1': [0], 'y': [TARGET]}, {'layer2.1.conv2': [1], 'y': [TARGET]}]

    def run(**kwargs):
        composite = EpsilonPlusFlat(canonizers=[canonizer])
        if method == 'call':
            return attribution(data, conditions, composite, **kwargs).heatmap
        return torch.cat([result.heatmap for result in attribution.generate(data, conditions, composite,
                                                                            verbose=False, **kwargs)])

    before = snapshot(model)
    with pytest.raises(RuntimeError, match='mask failed'):
        run(mask_map=failing_mask)
    assert canonizer.cut == cut
    # also the hooks that record the layers' outputs
    assert_untouched(model, before)

    # the composite's own cut takes part, as in CRP
    heatmaps = run()
    assert_untouched(model, before)
    crp = CondAttribution(model, no_param_grad=False)
    for index, condition in enumerate(conditions):
        expected = crp(data, [condition], EpsilonPlusFlat(canonizers=[ResNetCanonizer(cut=cut)])).heatmap
        assert relative_error(heatmaps[index:index + 1], expected) < 1e-9


def test_exclude_parallel_false_is_crp_unchanged():
    model = make_model('resnet18', dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    conditions = choose_conditions(model, data, [('layer3.0.conv1',), ('layer2.1.conv2', 'layer1.0')],
                                   EpsilonPlusFlat(canonizers=[ResNetCanonizer()]))
    cut = {'layer4.0': 'residual'}

    def run(attribution_type, canonizers, generate=False):
        attribution = attribution_type(model, no_param_grad=False)
        composite = EpsilonPlusFlat(canonizers=canonizers)
        if generate:
            return torch.cat([result.heatmap for result in attribution.generate(
                data, conditions, composite, batch_size=1, exclude_parallel=False, verbose=False)])
        return attribution(data, conditions, composite, exclude_parallel=False).heatmap

    canonizer = ResNetCanonizer(cut=cut)
    ours = run(IsolatingCondAttribution, [canonizer])
    assert torch.equal(ours, run(CondAttribution, [ResNetCanonizer(cut=cut)]))
    assert canonizer.cut == cut
    assert torch.equal(run(IsolatingCondAttribution, [], True), run(CondAttribution, [], True))
    isolated = IsolatingCondAttribution(model, no_param_grad=False)(
        data, conditions, EpsilonPlusFlat(canonizers=[ResNetCanonizer()])).heatmap
    assert relative_error(ours, isolated) > 1e-3


START_OPTIONS = {'start_layer': 'layer3.1', 'init_rel': lambda activation: activation.clamp(min=0)}
START_LAYERS = ['layer3.0.conv2', 'layer2.0.downsample.0']


def start_conditions(model, data):
    plain = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    # CRP's exclude_parallel=False starts at the raw output too, which zennit 1.0 cannot (below): ours, not isolated,
    # with the one layer, is the same heatmap as CRP's
    start = IsolatingCondAttribution(model, no_param_grad=False)(
        data, [{START_LAYERS[0]: list(range(256))}], plain, record_layer=START_LAYERS, **START_OPTIONS)
    return [{START_LAYERS[0]: [argmax_channel(start.relevances[START_LAYERS[0]])]},
            {START_LAYERS[1]: [argmax_channel(start.relevances[START_LAYERS[1]])]}]


@pytest.mark.skipif(ZENNIT_1, reason="CRP's start_layer fails with zennit 1.0 (KeyError 'grad_output'): its backward "
                                     "pass starts at the layer's raw output, before the identity of the layer's rule")
def test_start_layer_init_rel_mask_map_record_layer_and_on_device_as_crp():
    model = make_model('resnet18', dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    plain = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    options = {**START_OPTIONS, 'mask_map': {layer: ChannelConcept.mask for layer in START_LAYERS},
               'on_device': 'cpu'}
    conditions = start_conditions(model, data)
    # above, between and below the conditioned layers, and the start layer itself
    record = ['layer4.0.conv1', 'layer3.1', 'layer3.0', 'layer2.1.conv1', 'layer1.0.conv1', 'conv1']

    result = IsolatingCondAttribution(model, no_param_grad=False)(
        data, conditions, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]), record_layer=record, **options)
    for index, condition in enumerate(conditions):
        expected = CondAttribution(model, no_param_grad=False)(data, [condition], plain, exclude_parallel=True,
                                                               record_layer=record, **options)
        assert expected.heatmap.abs().max() > 0
        assert relative_error(result.heatmap[index], expected.heatmap[0]) < 1e-9
        assert torch.equal(result.prediction[index], expected.prediction[0].detach())
        # the batch records the layers of both conditions
        assert set(expected.relevances) | set(START_LAYERS) == set(result.relevances)
        for name, relevance in expected.relevances.items():
            if relevance.abs().max() == 0:
                # above the start layer
                assert result.relevances[name][index].abs().max() == 0, name
            else:
                # CRP's exclude_parallel=True counts the relevance at a conditioned layer twice
                factor = 2 if name in condition else 1
                assert relative_error(factor * result.relevances[name][index], relevance[0]) < 1e-9, name
        assert expected.relevances['layer4.0.conv1'].abs().max() == 0


def test_start_layer_works_on_every_zennit_version():
    # the chain of vector-Jacobian products from the start layer's output as the rules return it, written out
    model = make_model('resnet18', dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    conditions = start_conditions(model, data)
    result = IsolatingCondAttribution(model, no_param_grad=False)(
        data, conditions, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]), **START_OPTIONS)
    modules = dict(model.named_modules())
    outputs = {}
    for index, condition in enumerate(conditions):
        (layer, channels), = condition.items()
        with EpsilonPlusFlat(canonizers=[ResNetCanonizer()]).context(model) as modified:
            handles = [modules[name].register_forward_hook(
                lambda module, input, output, name=name: outputs.__setitem__(name, output))
                for name in (START_OPTIONS['start_layer'], layer)]
            input = data.detach().clone().requires_grad_()
            modified(input)
            for handle in handles:
                handle.remove()
            start = outputs[START_OPTIONS['start_layer']]
            at_layer, = torch.autograd.grad(start, outputs[layer], START_OPTIONS['init_rel'](start.detach()),
                                            retain_graph=True)
            mask = torch.zeros_like(at_layer)
            mask[:, channels] = 1
            expected, = torch.autograd.grad(outputs[layer], input, at_layer * mask)
        assert expected.abs().max() > 0
        assert relative_error(result.heatmap[index], expected.sum(1)[0]) < 1e-9


def test_broadcast_targets_and_unbatched_passes_equal_crp(monkeypatch):
    # every data sample with every condition (sample-major), as CondAttribution broadcasts; conditions with other
    # targets on one sample; block-level canonizers inside zennit's CompositeCanonizer; with and without batched
    # partial backward passes
    model = make_model('resnet18', dtype=torch.float64)
    data = make_input(2, dtype=torch.float64)
    conditions = choose_conditions(model, data[:1], [('layer3.0.downsample.0',), ('layer1.1.conv1', 'layer4.1.conv2')],
                                   EpsilonPlusFlat(canonizers=[ResNetCanonizer()]))
    conditions += [{'y': [1]}, {**conditions[0], 'y': [7]}, {**conditions[1], 'y': [1]}]
    attribution = IsolatingCondAttribution(model, no_param_grad=False)
    nested = CompositeCanonizer([ExactMergeBatchNorm(), ResNetBasicBlockCanonizer()])
    heatmaps = attribution(data, conditions, EpsilonPlusFlat(canonizers=[nested])).heatmap
    pairwise = attribution(data, conditions[:2], EpsilonPlusFlat(canonizers=[ResNetCanonizer()])).heatmap
    monkeypatch.setattr(PartialBackward, 'batched', False)
    unbatched = attribution(data, conditions, EpsilonPlusFlat(canonizers=[nested])).heatmap

    reference = CondAttribution(model, no_param_grad=False)
    plain = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    count = len(conditions)
    assert heatmaps.shape[0] == 2 * count
    for sample in range(2):
        one = data[sample:sample + 1].detach().requires_grad_()
        for index, condition in enumerate(conditions):
            crp_order = {key: condition[key] for key in sorted(condition, key=lambda key: key != 'layer4.1.conv2')}
            expected = reference(one, [crp_order], plain, exclude_parallel=True).heatmap
            assert relative_error(heatmaps[sample * count + index], expected[0]) < 1e-9
            assert relative_error(unbatched[sample * count + index], expected[0]) < 1e-9
            if index == sample:
                assert relative_error(pairwise[sample], expected[0]) < 1e-9


def test_generate_shows_progress(capsys):
    model = make_model('resnet18')
    attribution = IsolatingCondAttribution(model, no_param_grad=False)
    composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    conditions = [{'layer1.0.conv1': [0], 'y': [TARGET]}, {'layer4.0.downsample.0': [0], 'y': [TARGET]},
                  {'y': [TARGET]}]
    list(attribution.generate(make_input(), conditions, composite, batch_size=1, verbose=True))
    assert '3/3' in capsys.readouterr().err
    list(attribution.generate(make_input(), conditions, composite, batch_size=2, verbose=False))
    assert capsys.readouterr().err == ''


def test_import_without_crp():
    # canonizers works without zennit-crp; only canonizers.crp needs it, and says how to install it
    code = '''
import sys
sys.modules['crp'] = None
import canonizers
try:
    import canonizers.crp
except ImportError as error:
    print(error)
'''
    environment = {**os.environ, 'OMP_NUM_THREADS': '1'}
    output = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, env=environment)
    assert 'pip install zennit-canonizers[crp]' in output.stdout


def test_generate_with_a_tensor_init_rel_equals_crp_generate():
    # the initial relevance of each row of a batch differs: the backward pass from the output, shared by the batches,
    # must not mix them up
    model = make_model('resnet18', dtype=torch.float64)
    data = make_input(dtype=torch.float64)
    init_rel = torch.randn(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    relevance = CondAttribution(model, no_param_grad=False)(
        data, [{'y': [TARGET]}], composite, record_layer=['layer2.0.conv1'], exclude_parallel=False).relevances
    channels = relevance['layer2.0.conv1'][0].flatten(1).sum(1).abs().argsort(descending=True)[:5].tolist()
    conditions = [{'layer2.0.conv1': [channel], 'y': [TARGET]} for channel in channels]
    ours = list(IsolatingCondAttribution(model, no_param_grad=False).generate(
        data, conditions, composite, init_rel=init_rel, batch_size=2, verbose=False))
    theirs = list(CondAttribution(model, no_param_grad=False).generate(
        data, conditions, composite, init_rel=init_rel, batch_size=2, exclude_parallel=True, verbose=False))
    assert [len(result.heatmap) for result in ours] == [len(result.heatmap) for result in theirs] == [2, 2, 1]
    for mine, expected in zip(ours, theirs):
        assert expected.heatmap.abs().max() > 0
        assert relative_error(mine.heatmap, expected.heatmap) < 1e-9
    # the rows' initial relevances differ: the same condition in another row has another heatmap
    again = list(IsolatingCondAttribution(model, no_param_grad=False).generate(
        data, conditions[1:2] + conditions[:1], composite, init_rel=init_rel, batch_size=2, verbose=False))
    assert relative_error(again[0].heatmap[1:], ours[0].heatmap[:1]) > 1e-3
