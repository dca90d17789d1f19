'''Transformers, attention hybrids and normalizations under the graph canonizer, against oracles: conservation of
relevance (bias-free, float64, epsilon-only composite), the forward in float64, LXT 2.1's CP-LRP on torchvision's
vit_b_16 (in a process of its own), CRP's exclude_parallel=True with features on the last dimension, and removal.'''
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torchvision
from crp.attribution import CondAttribution
from helpers import (
    assert_untouched,
    conservation_composite,
    output_relevance,
    randomize_batch_norms,
    relative_error,
    snapshot,
)
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat

from canonizers import GraphCanonizer, NotConservedWarning, check
from canonizers.crp import FeatureConcept, IsolatingCondAttribution, cuts_for
from canonizers.support import bias_free

TARGET = 3
HERE = pathlib.Path(__file__).parent


class Attention(torch.nn.Module):
    '''Explicit attention as timm writes it (``fused_attn=False``), with a relative position bias, or through
    ``F.scaled_dot_product_attention``.'''
    def __init__(self, dim: int = 8, heads: int = 2, fused: bool = False) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.bias = torch.nn.Parameter(torch.randn(heads, 17, 17))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            x = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        else:
            attn = (q * (dim // self.heads) ** -0.5) @ k.transpose(-2, -1)
            x = (attn + self.bias).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Tokens(torch.nn.Module):
    '''A small transformer on 4x4 patches of an 8x8 input: a class token, a position embedding, pre-norm blocks with
    ``attention``, a channels-first LayerNorm (between permutes), a GroupNorm, an RMSNorm and a batch norm that cannot
    be merged (its input is used twice) in the stem.'''
    def __init__(self, attention: str) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 1)
        self.stem_norm = torch.nn.BatchNorm2d(8)
        self.group = torch.nn.GroupNorm(2, 8)
        self.patch = torch.nn.Conv2d(8, 8, 2, stride=2)
        self.channels = torch.nn.LayerNorm(8)
        self.token = torch.nn.Parameter(torch.randn(1, 1, 8))
        self.position = torch.nn.Parameter(torch.randn(1, 17, 8))
        self.norm1 = torch.nn.LayerNorm(8)
        self.attention = attention
        if attention == 'module':
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        else:
            self.attn = Attention(fused=attention == 'sdpa')
        self.norm2 = torch.nn.RMSNorm(8)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.group(self.stem_norm(x) + x)
        x = self.patch(x)
        x = self.channels(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1) + self.position
        y = self.norm1(x)
        x = x + (self.attn(y, y, y, need_weights=False)[0] if self.attention == 'module' else self.attn(y))
        x = x + self.mlp(self.norm2(x))
        return self.head(x[:, 0])


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    '''``model`` in float64 and eval mode, with random batch-norm statistics and random normalization parameters
    (fresh ones are 1 and 0, which test nothing).'''
    torch.manual_seed(0)
    model = randomize_batch_norms(model).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1 and parameter.shape[0] > 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
            elif parameter.abs().max() == 0:
                parameter.normal_(0, 0.05)
    return model


def vit() -> torch.nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=10)


#: models, their input size
MODELS = {
    'own, nn.MultiheadAttention': (lambda: Tokens('module'), 8),
    'own, explicit attention': (lambda: Tokens('explicit'), 8),
    'own, scaled_dot_product_attention': (lambda: Tokens('sdpa'), 8),
    'torchvision vit (2 layers)': (vit, 32),
    'torchvision swin_t': (lambda: torchvision.models.swin_t(num_classes=10), 64),
    'torchvision swin_v2_t': (lambda: torchvision.models.swin_v2_t(num_classes=10), 64),
    'timm vit_tiny_patch16_224': (lambda: timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=32,
                                                            depth=2), 32),
    'timm convnext_atto': (lambda: timm.create_model('convnext_atto', num_classes=10), 32),
    'timm levit_128s (hybrid)': (lambda: timm.create_model('levit_128s', num_classes=10, img_size=64), 64),
}


def data(size: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize('name', list(MODELS))
def test_transformers_are_exact_and_conserve_relevance(name):
    build, size = MODELS[name]
    model = randomized(build())
    before = snapshot(model)
    report = check(model, data(size))
    assert_untouched(model, before)
    assert report.operations == [], report
    assert report.forward_float64 <= 1e-12
    assert abs(report.conservation - 1) <= 1e-9, report
    assert report.status == 'supported'


@pytest.mark.parametrize('name', ['own, nn.MultiheadAttention', 'own, explicit attention', 'torchvision swin_t'])
def test_any_composite_attributes_transformers_and_removal_restores_them(name):
    # zennit gives Pass to nn.MultiheadAttention (an activation to zennit), which the canonized forward never calls
    build, size = MODELS[name]
    model = randomized(build())
    before = snapshot(model)
    input = data(size).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter('error', NotConservedWarning)
        for composite in (EpsilonPlusFlat(canonizers=[GraphCanonizer()]), conservation_composite([GraphCanonizer()])):
            with Gradient(model, composite) as attributor:
                _, relevance = attributor(input, torch.eye(10, dtype=torch.float64)[[TARGET]])
            assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert_untouched(model, before)


def test_transformers_without_normalizing_factor_rule_are_not_conserving_by_the_gradient():
    # the oracle is sharp: the plain gradient (no canonizer) of the same bias-free model does not conserve
    model = bias_free(randomized(Tokens('explicit')))
    input = data(8).requires_grad_()
    with Gradient(model, conservation_composite([])) as attributor:
        output, relevance = attributor(input, torch.eye(10, dtype=torch.float64)[[TARGET]])
    assert abs(relevance.sum().item() / output[0, TARGET].item() - 1) > 1e-3


def _lxt_path() -> 'str | None':
    path = os.environ.get('CANONIZERS_LXT', str(HERE.parent / '.lxt'))
    return path if (pathlib.Path(path) / 'lxt').is_dir() else None


@pytest.mark.skipif(_lxt_path() is None, reason='LXT 2.1 is not installed in .lxt (make test installs it)')
def test_cp_lrp_equals_lxt_on_vit_b_16(tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        import lxt_vit
    finally:
        sys.path.remove(str(HERE))
    out = tmp_path / 'lxt.pt'
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([_lxt_path(), str(HERE.parent)]))
    subprocess.run([sys.executable, str(HERE / 'lxt_vit.py'), str(out)], check=True, env=environment, timeout=600)
    reference = torch.load(out)
    model, input = lxt_vit.build()
    input.requires_grad_()
    # a vanishing epsilon on linear layers, the same stabilizer on sums, Pass on activations: LXT's rules
    with Gradient(model, conservation_composite([GraphCanonizer()], epsilon=1e-30)) as attributor:
        _, relevance = attributor(input, lambda out: output_relevance(out, lxt_vit.TARGET))
    assert relative_error(relevance, reference) <= 1e-6
    # the oracle is sharp: gradient times input (what LXT computes, without its rules) is far from it
    gradient, = torch.autograd.grad(model(input)[0, lxt_vit.TARGET], input)
    assert relative_error(input * gradient, reference) > 1e-2


@pytest.mark.parametrize('layers', [('encoder.layers.encoder_layer_1.mlp.0',),
                                    # CRP wants the last layer first
                                    ('encoder.layers.encoder_layer_1.mlp.0', 'encoder.layers.encoder_layer_0.mlp.3')])
def test_feature_concepts_of_vit_are_isolated_as_crp_s_exclude_parallel(layers):
    model = randomized(vit())
    input = data(32, batch=1).requires_grad_()
    composite = EpsilonPlusFlat(canonizers=[GraphCanonizer()])
    conditions = [{**{layer: [feature] for layer in layers}, 'y': [TARGET]} for feature in (1, 5)]
    mask_map = {layer: FeatureConcept.mask for layer in layers}
    crp = CondAttribution(model, no_param_grad=False)
    expected = torch.cat([
        crp(input, [condition], composite, mask_map=mask_map, exclude_parallel=True).heatmap
        for condition in conditions])
    leaky = crp(input, conditions, composite, mask_map=mask_map, exclude_parallel=False).heatmap
    isolated = IsolatingCondAttribution(model, no_param_grad=False)(input, conditions, composite, mask_map=mask_map)
    assert relative_error(isolated.heatmap, expected) < 1e-9
    # the relevance around the conditioned layers is not small here, so the oracle is sharp
    assert relative_error(leaky, expected) > 1e-2
    # one ordinary backward pass with the residual cuts gives the same
    for condition, heatmap in zip(conditions, expected):
        cut, = cuts_for(model, [condition])
        cut_composite = EpsilonPlusFlat(canonizers=[GraphCanonizer(cut=cut)])
        result = crp(input, [condition], cut_composite, mask_map=mask_map, exclude_parallel=False)
        assert relative_error(result.heatmap[0], heatmap) < 1e-9


def test_feature_concept_attributes_the_last_dimension():
    relevance = torch.arange(24.).reshape(1, 3, 8)
    # ChannelConcept would sum over the features and give one value per token
    assert torch.equal(FeatureConcept().attribute(relevance, abs_norm=False), relevance.sum(1))


def test_attention_rules_are_validated_and_kept_by_copies():
    canonizer = GraphCanonizer(attention='cp-lrp')
    assert canonizer.copy().attention == 'cp-lrp' and "attention='cp-lrp'" in repr(canonizer)
    with pytest.raises(ValueError, match="attention='attnlrp': must be one of 'cp-lrp' .*not implemented"):
        GraphCanonizer(attention='attnlrp')
    with pytest.raises(ValueError, match="attention='softmax'"):
        GraphCanonizer(attention='softmax')
