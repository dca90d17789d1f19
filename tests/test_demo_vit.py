"""Tests of the embedded demo ViT: accuracy, size, and that GraphCanonizer explains it exactly, conservatively and
with isolated CRP concepts on the feature dimension (FeatureConcept) equal to CRP's exclude_parallel=True."""
from importlib import resources

import pytest
import torch
from helpers import FRESH_SEED, accuracy, relative_error
from torchvision.models import VisionTransformer
from zennit.composites import EpsilonPlusFlat

from canonizers import GraphCanonizer, check
from canonizers.demo import CLASSES, VIT_WEIGHTS_FILE, DemoViT, load_demo_vit, sample_images

crp_attribution = pytest.importorskip('crp.attribution')
from canonizers.crp import FeatureConcept, IsolatingCondAttribution, cuts_for  # noqa: E402

#: a layer inside the residual branch of an encoder layer, and one of its output, around which nothing is cut
MLP_LAYER = 'encoder.layers.encoder_layer_2.mlp.0'


pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def demo_vit() -> DemoViT:
    """The shipped demo ViT in eval mode."""
    return load_demo_vit()


def test_accuracy_on_fresh_images(demo_vit: DemoViT) -> None:
    """The shipped weights classify freshly generated images accurately."""
    # 1000 images: the bound then has a margin of many images (96.8% measured)
    assert accuracy(demo_vit, 1000, FRESH_SEED) >= 0.95


def test_weights_file_small_and_float32() -> None:
    """The weights file stays small enough to ship inside the package, and holds float32 tensors."""
    with resources.as_file(resources.files('canonizers.demo') / VIT_WEIGHTS_FILE) as path:
        assert path.stat().st_size <= 3 * 2 ** 20
        state_dict = torch.load(path, map_location='cpu', weights_only=True)
    assert {value.dtype for value in state_dict.values()} == {torch.float32}


def test_model_is_an_eval_torchvision_vit(demo_vit: DemoViT) -> None:
    """The model is torchvision's ViT with 8x8 patches and 4 encoder layers, for the shape classes."""
    assert isinstance(demo_vit, VisionTransformer)
    assert not demo_vit.training
    assert demo_vit.patch_size == 8 and demo_vit.image_size == 64
    assert len(demo_vit.encoder.layers) == 4
    assert demo_vit.heads.head.out_features == len(CLASSES)


def test_graph_canonizer_is_exact_and_conservative(demo_vit: DemoViT) -> None:
    """The support report of the trained ViT: traced, exact in float64, relevance conserved (bias-free copy)."""
    images, _ = sample_images()
    report = check(demo_vit, images[:1])
    assert report.operations == [], report
    assert report.forward_float64 <= 1e-10
    assert abs(report.conservation - 1) <= 1e-9, report
    assert report.status == 'supported'


def test_canonized_forward_equals_the_original_in_float64(demo_vit: DemoViT) -> None:
    """The forward of the model canonized by GraphCanonizer is the original one, to float64 rounding."""
    model = DemoViT().double().eval()
    model.load_state_dict(demo_vit.state_dict())
    images, _ = sample_images()
    images = images.double()
    with torch.no_grad():
        expected = model(images)
        instances = GraphCanonizer().apply(model)
        try:
            canonized = model(images)
        finally:
            for instance in reversed(instances):
                instance.remove()
        restored = model(images)
    assert relative_error(canonized, expected) <= 1e-10
    assert torch.equal(restored, expected)


def test_isolated_feature_concepts_equal_crp_s_exclude_parallel(demo_vit: DemoViT) -> None:
    """Isolated CRP heatmaps of MLP features of the trained ViT equal CRP's exclude_parallel=True, in float64, and
    differ from the leaky ones: the shortcut around the MLP carries much of the relevance."""
    model = DemoViT().double().eval()
    model.load_state_dict(demo_vit.state_dict())
    images, labels = sample_images()
    star = CLASSES.index('star')
    data = images[star:star + 1].double().requires_grad_()
    composite = EpsilonPlusFlat(canonizers=[GraphCanonizer()])
    # the two features of the layer with the most relevance for the class
    crp = crp_attribution.CondAttribution(model, no_param_grad=False)
    result = crp(data, [{'y': [star]}], composite, record_layer=[MLP_LAYER])
    relevances = FeatureConcept().attribute(result.relevances[MLP_LAYER], abs_norm=False)[0]
    features = relevances.argsort(descending=True)[:2].tolist()
    conditions = [{MLP_LAYER: [feature], 'y': [star]} for feature in features]
    mask_map = {MLP_LAYER: FeatureConcept.mask}

    expected = crp(data, conditions, composite, mask_map=mask_map, exclude_parallel=True).heatmap
    leaky = crp(data, conditions, composite, mask_map=mask_map, exclude_parallel=False).heatmap
    isolated = IsolatingCondAttribution(model, no_param_grad=False)(data, conditions, composite, mask_map=mask_map)
    assert relative_error(isolated.heatmap, expected) < 1e-9
    # the oracle is sharp
    assert relative_error(leaky, expected) > 1e-2
    # one ordinary backward pass with the residual cut gives the same
    cut, = cuts_for(model, conditions[:1])
    result = crp(data, conditions[:1], EpsilonPlusFlat(canonizers=[GraphCanonizer(cut=cut)]), mask_map=mask_map,
                 exclude_parallel=False)
    assert relative_error(result.heatmap[0], expected[0]) < 1e-9
