'''``GraphCanonizer(input_shape=...)`` on models whose forward branches on shapes (padding to windows, caches of the
token count, as timm's Twins, TinyViT, EfficientViT and ConViT do): traced for one input shape, exact, conservative,
refusing other shapes and dtypes, and leaving the model bitwise as it was; without it, such modules of timm are
kept whole and named.'''
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_untouched, conservation_composite, output_relevance, relative_error, snapshot
from zennit.attribution import Gradient

from canonizers import GraphCanonizer, NotConservedWarning, check
from canonizers.evaluation import randomize_batch_norms
from canonizers.support import bias_free

SHAPE = (1, 3, 20, 20)
TARGET = 2


class WindowMixer(torch.nn.Module):
    '''Tokens mixed within windows, the feature map padded to a multiple of the window first (``if pad > 0``, a branch
    on the shape), with a cache of the padded width as a plain attribute.'''
    def __init__(self, channels: int, window: int = 3) -> None:
        super().__init__()
        self.window = window
        self.norm = torch.nn.LayerNorm(channels)
        self.mix = torch.nn.Linear(window * window, window * window)
        self.width = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        pad_h = (self.window - height % self.window) % self.window
        pad_w = (self.window - width % self.window) % self.window
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        if self.width != x.shape[-1]:
            self.width = x.shape[-1]
        rows, columns = x.shape[2] // self.window, x.shape[3] // self.window
        windows = x.reshape(batch, channels, rows, self.window, columns, self.window).permute(0, 2, 4, 1, 3, 5)
        windows = windows.reshape(batch, rows, columns, channels, self.window * self.window)
        normed = self.norm(windows.transpose(-1, -2)).transpose(-1, -2)
        mixed = windows + self.mix(normed)
        mixed = mixed.reshape(batch, rows, columns, channels, self.window, self.window).permute(0, 3, 1, 4, 2, 5)
        return mixed.reshape(batch, channels, rows * self.window, columns * self.window)[:, :, :height, :width]


class WindowNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.mixer = WindowMixer(8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mixer(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))


def make(dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    model = randomize_batch_norms(WindowNet()).requires_grad_(False)
    with torch.no_grad():
        for parameter in model.mixer.norm.parameters():
            parameter.uniform_(0.5, 1.5)
    model = model.to(dtype)
    return model if bias else bias_free(model, SHAPE)


def data(shape=SHAPE, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)


def test_without_input_shape_the_model_cannot_be_traced():
    with pytest.raises(ValueError, match='cannot canonize WindowNet: torch.fx cannot trace'):
        GraphCanonizer().apply(make())


@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_exact_for_its_shape_and_bitwise_restore(dtype, tolerance):
    model = make(dtype)
    exact = make()(data())
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter('error', NotConservedWarning)
        instances = GraphCanonizer(input_shape=SHAPE).apply(model)
    # tracing filled no cache: the width is set by the forward of the canonized model alone
    assert model.mixer.width is None
    canonized = model(data(dtype=dtype))
    for instance in instances:
        instance.remove()
    assert relative_error(canonized.double(), exact) <= tolerance
    model.mixer.width = None
    assert_untouched(model, before)


@pytest.mark.parametrize('shape, dtype, message', [
    ((2, 3, 20, 20), torch.float64, r'not for shape \(2, 3, 20, 20\) and torch.float64: canonize it with '
                                    r'input_shape=\(2, 3, 20, 20\)'),
    ((1, 3, 22, 22), torch.float64, r'not for shape \(1, 3, 22, 22\)'),
    (SHAPE, torch.float32, r'for inputs of that shape and torch.float64 alone .* not for shape \(1, 3, 20, 20\) and '
                           r'torch.float32'),
])
def test_other_shapes_and_dtypes_are_refused(shape, dtype, message):
    model = make()
    instances = GraphCanonizer(input_shape=SHAPE).apply(model)
    try:
        with pytest.raises(ValueError, match=message):
            model(data(shape, dtype))
    finally:
        for instance in instances:
            instance.remove()


def test_conserves_relevance_and_the_oracle_is_sharp():
    model = make(bias=False)
    with Gradient(model, conservation_composite([GraphCanonizer(input_shape=SHAPE)])) as attributor:
        output, relevance = attributor(data().requires_grad_(), lambda output: output_relevance(output, TARGET))
    assert abs(relevance.sum().item() / output[0, TARGET].item() - 1) <= 1e-9
    # its LayerNorm, without a rule, scales relevance
    with Gradient(model, conservation_composite([])) as attributor:
        output, relevance = attributor(data().requires_grad_(), lambda output: output_relevance(output, TARGET))
    assert abs(relevance.sum().item() / output[0, TARGET].item() - 1) > 1e-3


def test_check_traces_for_the_example_and_says_so():
    report = check(make(), data())
    assert report.status == 'supported', report.verdict
    assert any('GraphCanonizer(input_shape=(1, 3, 20, 20))' in note for note in report.notes)


@pytest.mark.parametrize('shape', [(), (1, 0, 3), (1, 3.0, 4), 'abc', 5, (True, 3)])
def test_bad_input_shapes_are_refused(shape):
    with pytest.raises(ValueError, match=r'input_shape=.*: must be a sequence of positive integers'):
        GraphCanonizer(input_shape=shape)


def test_timm_modules_that_branch_on_shapes_are_traced_through():
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model('mobilevit_xxs', pretrained=False, num_classes=10)).double()
    example = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # kept whole without an input shape, and named
    with pytest.warns(NotConservedWarning, match=r"keeps 'stages.2.1', .* whole: .* "
                                                 r"GraphCanonizer\(input_shape=\.\.\.\) traces through them"):
        instances = GraphCanonizer().apply(model)
    for instance in instances:
        instance.remove()
    report = check(model, example)
    assert report.status == 'supported' and report.operations == [], report.verdict
    assert abs(report.conservation - 1) <= 1e-9 and report.forward_float64 <= 1e-12


class PositionalAttention(torch.nn.Module):
    '''Attention whose logits get relative positions computed from the queries written into a slice, as MViTv2's
    ``attn[:, :, 1:, 1:] = ...`` (an item assignment, which only the shape-specialized trace takes).'''
    def __init__(self, channels: int = 8, tokens: int = 10) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(channels, 3 * channels)
        self.positions = torch.nn.Parameter(torch.randn(tokens - 1, channels) * 0.3)
        self.proj = torch.nn.Linear(channels, channels)
        self.head = torch.nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = q @ k.transpose(-2, -1)
        attn[:, 1:, 1:] = attn[:, 1:, 1:] + q[:, 1:] @ self.positions.transpose(0, 1)
        x = x + self.proj(attn.softmax(dim=-1) @ v)
        return self.head(x.mean(1))


def test_item_assignments_are_traced_and_named_where_relevance_flows_through_them():
    from canonizers.graph.compiled import compiled_for

    torch.manual_seed(0)
    model = PositionalAttention().double().eval().requires_grad_(False)
    example = torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = model(example)
    # under CP-LRP the logits carry no relevance: nothing to name, and relevance is conserved
    assert compiled_for(model, 'cp-lrp', tuple(example.shape)).operations == []
    report = check(model, example)
    assert report.status == 'supported' and abs(report.conservation - 1) <= 1e-9, report.verdict
    instances = GraphCanonizer(input_shape=example.shape).apply(model)
    assert relative_error(model(example), exact) <= 1e-12
    for instance in instances:
        instance.remove()
    # under AttnLRP they do, and the gradient passes the assignment: named
    operations = compiled_for(model, 'attnlrp', tuple(example.shape)).operations
    assert [(operation.name, operation.kind) for operation in operations] == [('setitem', 'function')]


def test_cuts_for_takes_the_input_shape():
    pytest.importorskip('crp')
    from canonizers.crp import cuts_for

    model = make()
    with pytest.raises(ValueError, match='torch.fx cannot trace'):
        cuts_for(model, [{'mixer.mix': [0], 'y': [1]}])
    cut, = cuts_for(model, [{'mixer.mix': [0], 'y': [1]}], input_shape=SHAPE)
    # relevance around the mixing layer goes through the residual's other input: cut
    assert cut and cut == GraphCanonizer(input_shape=SHAPE).layer_cuts(model, ['mixer.mix'])
