"""Tests of the embedded demo model and its synthetic shape generator."""
from importlib import resources

import pytest
import torch
from helpers import FRESH_SEED, accuracy
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from canonizers.demo import CLASSES, WEIGHTS_FILE, DemoResNet, load_demo_model, make_dataset, sample_images

pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def demo_model() -> DemoResNet:
    """The shipped demo model in eval mode."""
    return load_demo_model()


def test_accuracy_on_fresh_images(demo_model: DemoResNet) -> None:
    """The shipped weights classify freshly generated images accurately."""
    assert accuracy(demo_model, 240, FRESH_SEED) >= 0.95


def test_weights_file_small() -> None:
    """The weights file stays small enough to ship inside the package."""
    with resources.as_file(resources.files('canonizers.demo') / WEIGHTS_FILE) as path:
        assert path.stat().st_size <= 5 * 2 ** 20


def test_model_is_eval_resnet_of_basic_blocks(demo_model: DemoResNet) -> None:
    """The model looks like a torchvision ResNet to canonizers and has trained batch-norm statistics."""
    assert isinstance(demo_model, ResNet)
    assert not demo_model.training
    blocks = [module for module in demo_model.modules() if isinstance(module, BasicBlock)]
    assert len(blocks) == 4
    for block in blocks:
        assert block.bn1.running_var is not None
        assert not torch.allclose(block.bn1.running_var, torch.ones_like(block.bn1.running_var))

    # sequential batch-norm merging pairs each batch norm with the leaf registered right before it
    leaves = [module for module in demo_model.modules() if not list(module.children())]
    for previous, leaf in zip(leaves, leaves[1:]):
        if isinstance(leaf, nn.BatchNorm2d):
            assert isinstance(previous, nn.Conv2d)
            assert previous.out_channels == leaf.num_features


def test_dataset_deterministic() -> None:
    """Equal seeds give identical data, different seeds different data."""
    images, labels = make_dataset(12, 5)
    images_again, labels_again = make_dataset(12, 5)
    other, _ = make_dataset(12, 6)
    assert images.shape == (12, 3, 64, 64)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert torch.equal(images, images_again)
    assert torch.equal(labels, labels_again)
    assert not torch.equal(images, other)
    assert torch.bincount(labels, minlength=len(CLASSES)).tolist() == [2] * len(CLASSES)


def test_sample_images_one_per_class() -> None:
    """The demo samples hold one image per class, in class order."""
    images, labels = sample_images()
    assert images.shape == (len(CLASSES), 3, 64, 64)
    assert labels.tolist() == list(range(len(CLASSES)))
