"""Compact torchvision-style ResNet for the synthetic shapes and its embedded weights.

The model is built from :class:`torchvision.models.resnet.BasicBlock` and has the attribute names, module
registration order and forward order of :class:`torchvision.models.resnet.ResNet`, so canonizers written for
torchvision ResNets (batch-norm merging in registration order, BasicBlock forward rewrites) apply unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet, conv1x1

from .shapes import CLASSES

__all__ = ['DEFAULT_WIDTHS', 'DemoResNet', 'WEIGHTS_FILE', 'load_demo_model', 'load_shipped']

DEFAULT_WIDTHS: tuple[int, int, int, int] = (16, 32, 64, 128)
WEIGHTS_FILE: str = 'weights.pt'


class DemoResNet(ResNet):
    """A tiny ResNet (one BasicBlock per stage) for 64x64 RGB inputs.

    Compared to torchvision's ResNet-18, the widths are much smaller, every stage has a single BasicBlock, and the
    stem convolution is 3x3 (instead of 7x7), still with stride 2 and followed by the max pool, so a 64x64 input
    gives 16x16 feature maps in ``layer1`` and 2x2 in ``layer4``. The forward pass is torchvision's: conv1 -> bn1
    -> relu -> maxpool -> layer1..layer4 -> avgpool -> flatten -> fc.

    Parameters
    ----------
    num_classes : int, optional
        Number of output logits; defaults to the number of shape classes.
    widths : sequence of int, optional
        Channel widths of the four stages.
    """

    def __init__(self, num_classes: int = len(CLASSES), widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        if len(widths) != 4:
            raise ValueError(f'widths needs 4 entries, got {len(widths)}')
        # ResNet.__init__ hard-codes the widths 64..512 and a 7x7 stem, so only nn.Module is initialised; ResNet is
        # still the base class so that isinstance checks and its forward apply
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64

        # registration order equals forward order, which sequential batch-norm merging relies on
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(widths[0], stride=1)
        self.layer2 = self._make_stage(widths[1], stride=2)
        self.layer3 = self._make_stage(widths[2], stride=2)
        self.layer4 = self._make_stage(widths[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.)
                nn.init.constant_(module.bias, 0.)

    def _make_stage(self, planes: int, stride: int) -> nn.Sequential:
        """One BasicBlock, with the downsample branch built exactly like torchvision's ``ResNet._make_layer``."""
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        block = BasicBlock(self.inplanes, planes, stride, downsample)
        self.inplanes = planes * BasicBlock.expansion
        return nn.Sequential(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute class logits.

        Parameters
        ----------
        x : torch.Tensor
            Normalised images of shape ``[N, 3, H, W]`` (see :func:`canonizers.demo.shapes.normalize`).

        Returns
        -------
        torch.Tensor
            Logits of shape ``[N, num_classes]``.
        """
        # spelled out rather than relying on ResNet._forward_impl, which is torchvision-internal
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def load_demo_model(device: str | torch.device = 'cpu') -> DemoResNet:
    """Load the demo model with the weights shipped in this package.

    Parameters
    ----------
    device : str or torch.device, optional
        Device to put the model on.

    Returns
    -------
    DemoResNet
        The trained model in eval mode, so batch norms use their running statistics.
    """
    return load_shipped(DemoResNet(), WEIGHTS_FILE, device)


def load_shipped(model: torch.nn.Module, file_name: str, device: str | torch.device = 'cpu') -> torch.nn.Module:
    """Load the state dict shipped in this package as ``file_name`` into ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        A freshly built demo model of the architecture the file was trained for.
    file_name : str
        The weights file inside :mod:`canonizers.demo`.
    device : str or torch.device, optional
        Device to put the model on.

    Returns
    -------
    torch.nn.Module
        ``model`` with the weights, on ``device``, in eval mode.
    """
    with resources.as_file(resources.files(__package__) / file_name) as path:
        state_dict = torch.load(path, map_location='cpu', weights_only=True)
    model.load_state_dict(state_dict)
    return model.to(device).eval()
