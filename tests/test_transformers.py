'''Transformers, attention hybrids and normalizations under the graph canonizer, against oracles: conservation of
relevance (bias-free, float64, epsilon-only composite), the forward in float64, LXT 2.1's CP-LRP on torchvision's
vit_b_16 (in a process of its own), CRP's exclude_parallel=True with features on the last dimension, and removal.'''
import hashlib
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
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
from canonizers.core.normalization import ConstantStdLayerNorm
from canonizers.core.products import SoftmaxRule, UniformProduct
from canonizers.crp import FeatureConcept, HeadConcept, IsolatingCondAttribution, cuts_for
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


@pytest.fixture(scope='module')
def lxt_references(tmp_path_factory):
    '''LXT's input relevance on :func:`lxt_vit.build`'s vit_b_16, per treatment of attention, each computed in a
    process of its own (LXT patches torchvision's classes).'''
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([_lxt_path() or '', str(HERE.parent)]))
    # LXT's output depends on LXT, torch and the script, not on the zennit version under test: the three suites of
    # make test share one computation, kept beside LXT under a key of all three
    key = hashlib.sha256((HERE / 'lxt_vit.py').read_bytes() + torch.__version__.encode() + (
        pathlib.Path(_lxt_path() or '.') / 'lxt' / 'efficient' / 'rules.py').read_bytes()).hexdigest()[:16]
    cache = pathlib.Path(_lxt_path() or str(tmp_path_factory.mktemp('lxt'))) / 'references'
    references = {}
    for rules in ('cp-lrp', 'attnlrp'):
        out = cache / f'{key}-{rules}.pt'
        if not out.exists():
            cache.mkdir(exist_ok=True)
            partial = out.with_suffix(f'.{os.getpid()}.partial')
            subprocess.run([sys.executable, str(HERE / 'lxt_vit.py'), str(partial), rules], check=True,
                           env=environment, timeout=600)
            partial.replace(out)
        references[rules] = torch.load(out)
    return references


@pytest.mark.skipif(_lxt_path() is None, reason='LXT 2.1 is not installed in .lxt (make test installs it)')
@pytest.mark.parametrize('rules', ['cp-lrp', 'attnlrp'])
def test_attention_rules_equal_lxt_on_vit_b_16(lxt_references, rules):
    sys.path.insert(0, str(HERE))
    try:
        import lxt_vit
    finally:
        sys.path.remove(str(HERE))
    reference = lxt_references[rules]
    model, input = lxt_vit.build()
    input.requires_grad_()
    # a vanishing epsilon on linear layers, the same stabilizer on sums, Pass on activations: LXT's rules
    with Gradient(model, conservation_composite([GraphCanonizer(attention=rules)], epsilon=1e-30)) as attributor:
        _, relevance = attributor(input, lambda out: output_relevance(out, lxt_vit.TARGET))
    assert relative_error(relevance, reference) <= 1e-6
    # the oracle is sharp: gradient times input (what LXT computes, without its rules) is far from it, and so is
    # the other treatment of attention
    gradient, = torch.autograd.grad(model(input)[0, lxt_vit.TARGET], input)
    assert relative_error(input * gradient, reference) > 1e-2
    other, = {'cp-lrp', 'attnlrp'} - {rules}
    assert relative_error(lxt_references[other], reference) > 1e-2


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


@pytest.mark.parametrize('rules', ['cp-lrp', 'attnlrp'])
def test_attention_heads_are_concepts_isolated_as_crp_s_exclude_parallel(rules):
    '''Heads of timm's attention (``HeadConcept`` on ``attn.norm``, where the heads' outputs lie side by side): each
    head's isolated heatmap equals CRP's exclude_parallel=True, and the heads' heatmaps add up to that of all heads
    together. On the fused projection ``attn.qkv`` (three blocks of heads), CP-LRP gives a head the relevance of its
    output, all of it in its values; AttnLRP gives its queries and keys a share.'''
    model = randomized(timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=32, patch_size=8, depth=2,
                                         embed_dim=32, num_heads=4))
    output, qkv = 'blocks.1.attn.norm', 'blocks.1.attn.qkv'
    input = data(32).requires_grad_()
    composite = EpsilonPlusFlat(canonizers=[GraphCanonizer(attention=rules)])
    crp = CondAttribution(model, no_param_grad=False)
    # a vanishing epsilon: the weighting of the values then conserves each head's relevance exactly
    recorded = crp(input, [{'y': [TARGET]}], conservation_composite([GraphCanonizer(attention=rules)]),
                   record_layer=[output, qkv]).relevances
    heads = HeadConcept(4).attribute(recorded[output], abs_norm=False)[0]
    # the oracle of the head's relevance: the sums of its features, by hand
    assert relative_error(heads, recorded[output][0].reshape(-1, 4, 8).sum((0, 2))) < 1e-12
    values = recorded[qkv][0].reshape(-1, 3, 4, 8)
    queries_and_keys = values[:, :2].abs().max().item()
    if rules == 'cp-lrp':
        assert relative_error(HeadConcept(4, chunks=3).attribute(recorded[qkv], abs_norm=False)[0], heads) < 1e-9
        assert queries_and_keys == 0
    else:
        assert queries_and_keys > 1e-3 * values.abs().max().item()

    mask_map = {output: HeadConcept(4).mask}
    conditions = [{output: [head], 'y': [TARGET]} for head in range(4)] + [{output: [0, 1, 2, 3], 'y': [TARGET]}]
    expected = crp(input, conditions, composite, mask_map=mask_map, exclude_parallel=True).heatmap
    leaky = crp(input, conditions, composite, mask_map=mask_map, exclude_parallel=False).heatmap
    isolated = IsolatingCondAttribution(model, no_param_grad=False)(input, conditions, composite, mask_map=mask_map)
    assert relative_error(isolated.heatmap, expected) < 1e-9
    assert relative_error(leaky, expected) > 1e-2
    assert relative_error(expected[:4].sum(0), expected[4]) < 1e-9


def test_head_concept_masks_and_counts_the_features_of_a_head():
    concept = HeadConcept(2, chunks=3)
    # [batch, tokens, 3 chunks x 2 heads x 2 features]
    relevance = torch.arange(2 * 5 * 12, dtype=torch.float64).reshape(2, 5, 12)
    head_one = [2, 3, 6, 7, 10, 11]
    assert torch.equal(concept.attribute(relevance, abs_norm=False)[:, 1], relevance[..., head_one].sum((1, 2)))
    masked = concept.mask(1, [1])(relevance.clone())
    assert torch.equal(masked[0], relevance[0]) and masked[1].nonzero()[:, 1].unique().tolist() == head_one
    assert len(concept.get_rf_indices((5, 12))) == 30
    # one entry of head 1 (token 0, the first of its features in the second chunk): feature 6
    neuron = concept.mask_rf(0, {1: [2]})(torch.ones(1, 5, 12))
    assert neuron.nonzero().tolist() == [[0, 0, 6]]
    with pytest.raises(ValueError, match=r'HeadConcept\(heads=2, chunks=3\): a layer output of shape \(1, 5, 8\)'):
        concept.attribute(torch.ones(1, 5, 8))
    with pytest.raises(ValueError, match='heads=0 must be a positive int'):
        HeadConcept(0)


def test_feature_concept_attributes_the_last_dimension():
    relevance = torch.arange(24.).reshape(1, 3, 8)
    # ChannelConcept would sum over the features and give one value per token
    assert torch.equal(FeatureConcept().attribute(relevance, abs_norm=False), relevance.sum(1))


def test_attention_rules_are_validated_and_kept_by_copies():
    for rules in ('cp-lrp', 'attnlrp'):
        canonizer = GraphCanonizer(attention=rules)
        assert canonizer.copy().attention == rules and f"attention={rules!r}" in repr(canonizer)
    with pytest.raises(ValueError, match="attention='softmax': must be one of 'cp-lrp', 'attnlrp'"):
        GraphCanonizer(attention='softmax')


def _relevance(model, input, rules, composite=None):
    composite = composite or conservation_composite([GraphCanonizer(attention=rules)], epsilon=1e-30)
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(input, lambda out: output_relevance(out, TARGET))
    return relevance


def test_attnlrp_is_the_same_on_every_form_of_attention():
    # the same attention as explicit products and softmax in the graph, through F.scaled_dot_product_attention and
    # as nn.MultiheadAttention: three code paths, one function, one set of rules (the module's is LXT's, tested above)
    explicit = randomized(Tokens('explicit'))
    fused = randomized(Tokens('sdpa'))
    fused.load_state_dict(explicit.state_dict())
    module = randomized(Tokens('module'))
    state = {name: value for name, value in explicit.state_dict().items() if not name.startswith('attn.')}
    state.update({'attn.in_proj_weight': explicit.attn.qkv.weight, 'attn.in_proj_bias': explicit.attn.qkv.bias,
                  'attn.out_proj.weight': explicit.attn.proj.weight, 'attn.out_proj.bias': explicit.attn.proj.bias})
    module.load_state_dict(state)
    input = data(8).requires_grad_()
    reference = _relevance(explicit, input, 'attnlrp')
    assert relative_error(_relevance(fused, input, 'attnlrp'), reference) < 1e-10
    # nn.MultiheadAttention has no relative position bias: without it, the three agree
    with torch.no_grad():
        explicit.attn.bias.zero_()
    reference = _relevance(explicit, input, 'attnlrp')
    assert relative_error(_relevance(module, input, 'attnlrp'), reference) < 1e-10
    # the oracle is sharp: CP-LRP on the same model differs
    assert relative_error(_relevance(explicit, input, 'cp-lrp'), reference) > 1e-2


@pytest.mark.parametrize('name', ['torchvision swin_t', 'torchvision swin_v2_t', 'timm vit_tiny_patch16_224',
                                  'timm levit_128s (hybrid)'])
def test_attnlrp_attributes_any_attention_exactly_and_removal_restores(name):
    build, size = MODELS[name]
    model = randomized(build())
    before = snapshot(model)
    input = data(size).requires_grad_()
    expected = model(input)
    for composite in (EpsilonPlusFlat(canonizers=[GraphCanonizer(attention='attnlrp')]), None):
        composite = composite or conservation_composite([GraphCanonizer(attention='attnlrp')])
        with Gradient(model, composite) as attributor:
            output, relevance = attributor(input, torch.eye(10, dtype=torch.float64)[[TARGET]])
        assert relative_error(output, expected) <= 1e-12
        assert torch.isfinite(relevance).all()
    # relevance reaches the input through queries and keys too: not CP-LRP's
    assert relative_error(relevance, _relevance(model, input, 'cp-lrp', conservation_composite(
        [GraphCanonizer()]))) > 1e-3
    assert_untouched(model, before)


def _bilinear_reference(a, b, relevance, equation):
    '''The uniform rule written out: every term ``a_i b_j`` of an output gets its share of the output's relevance,
    and each factor half of it.'''
    inputs, output = equation.split('->')
    first, second = inputs.split(',')
    letters = ''.join(dict.fromkeys(first + second))
    terms = torch.einsum(f'{first},{second}->{letters}', a, b)
    z = torch.einsum(equation, a, b)
    share = terms * (relevance / z).reshape([z.shape[output.index(letter)] if letter in output else 1
                                             for letter in letters])
    return torch.einsum(f'{letters}->{first}', share) / 2, torch.einsum(f'{letters}->{second}', share) / 2


@pytest.mark.parametrize('operation', ['mul', 'matmul', 'bmm', 'einsum'])
def test_uniform_product_gives_each_factor_half_of_its_contributions(operation):
    generator = torch.Generator().manual_seed(0)
    shapes = {'mul': ((2, 3, 4), (2, 1, 4)), 'matmul': ((2, 3, 4), (4, 5)), 'bmm': ((2, 3, 4), (2, 4, 5)),
              'einsum': ((2, 3, 4), (2, 4, 5))}[operation]
    a, b = (torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True) for shape in shapes)
    # a vanishing stabilizer: the rule itself, to rounding
    product = UniformProduct(operation, 'bij,bjk->bik' if operation == 'einsum' else None, epsilon=1e-30)
    output = product(a, b)
    expected = {'mul': torch.mul, 'matmul': torch.matmul, 'bmm': torch.bmm, 'einsum': torch.matmul}[operation](a, b)
    assert torch.equal(output, expected)
    relevance = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    relevance_a, relevance_b = torch.autograd.grad(output, (a, b), relevance)
    equation = 'bij,bjk->bik' if operation in ('bmm', 'einsum') else 'bij,jk->bik' if operation == 'matmul' else (
        'bij,bzj->bij')
    if operation == 'mul':
        # the broadcast factor sums its shares over the dimension it was broadcast along
        share = relevance / 2
        reference = (share, share.sum(1, keepdim=True))
    else:
        reference = _bilinear_reference(a.detach(), b.detach(), relevance, equation)
    assert relative_error(relevance_a, reference[0]) < 1e-12 and relative_error(relevance_b, reference[1]) < 1e-12
    # conservative: the halves add up to the relevance of the product
    assert abs((relevance_a.sum() + relevance_b.sum()) / relevance.sum() - 1) < 1e-12


def test_softmax_rule_is_gradient_times_input_of_the_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    logits[0, 0, 1] = float('-inf')
    logits.requires_grad_()
    weights = SoftmaxRule(dim=-1)(logits)
    assert torch.equal(weights, logits.softmax(-1))
    relevance = torch.randn(weights.shape, generator=generator, dtype=torch.float64) * weights.detach()
    result, = torch.autograd.grad(weights, logits, relevance)
    # AttnLRP's rule as LXT computes it: gradient times input, the output's gradient being relevance / output
    reference_input = logits.detach().clone().requires_grad_()
    reference_output = reference_input.softmax(-1)
    gradient, = torch.autograd.grad(reference_output, reference_input,
                                    (relevance / reference_output.detach()).nan_to_num(0.0))
    finite = logits.detach().masked_fill(torch.isinf(logits.detach()), 0.0)
    assert relative_error(result, finite * gradient) < 1e-12
    # a masked logit gets nothing
    assert result[0, 0, 1] == 0 and torch.isfinite(result).all()


@pytest.mark.parametrize('dims,affine', [(1, 'both'), (2, 'both'), (1, 'weight'), (1, 'bias'), (1, 'none')])
def test_constant_std_layer_norm_is_the_layer_norm_with_its_std_detached(dims, affine):
    generator = torch.Generator().manual_seed(dims)
    shape = (2, 5, 3, 4)
    normalized = shape[len(shape) - dims:]
    input = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1).requires_grad_()
    weight = torch.nn.Parameter(torch.rand(normalized, generator=generator, dtype=torch.float64) + 0.5)
    bias = torch.nn.Parameter(torch.randn(normalized, generator=generator, dtype=torch.float64))
    weight = weight if affine in ('both', 'weight') else None
    bias = bias if affine in ('both', 'bias') else None
    module = ConstantStdLayerNorm(weight, bias, 1e-5, dims=dims)
    output = module(input)
    # the forward is torch's LayerNorm
    assert relative_error(output, F.layer_norm(input, normalized, weight, bias, 1e-5)) < 1e-12

    # the backward pass is that of the composition with the standard deviation detached, to second order
    def composed(input):
        axes = tuple(range(-dims, 0))
        centred = input - input.mean(axes, keepdim=True)
        result = centred / torch.sqrt(centred.pow(2).mean(axes, keepdim=True) + 1e-5).detach()
        result = result if weight is None else result * weight
        return result if bias is None else result + bias

    leaves = [input] + [parameter for parameter in (weight, bias) if parameter is not None]
    relevance = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    reference = composed(input)
    grads = torch.autograd.grad(output, leaves, relevance, create_graph=True)
    references = torch.autograd.grad(reference, leaves, relevance, create_graph=True)
    for grad, expected in zip(grads, references):
        assert relative_error(grad, expected) < 1e-12
    probe = torch.randn(shape, generator=generator, dtype=torch.float64)
    second = torch.autograd.grad((grads[0] * probe).sum(), leaves[1:] + [relevance], allow_unused=True)
    expected = torch.autograd.grad((references[0] * probe).sum(), leaves[1:] + [relevance], allow_unused=True)
    for grad, reference_grad in zip(second, expected):
        assert (grad is None) == (reference_grad is None)
        if grad is not None:
            assert relative_error(grad, reference_grad) < 1e-12
    # only the gradients asked for are computed, each right
    alone, = torch.autograd.grad(module(input), input, relevance.detach())
    assert relative_error(alone, references[0]) < 1e-12
