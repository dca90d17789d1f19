'''The model zoo: :py:func:`canonizers.check` on every torchvision classification builder up to 40M parameters and on
one model of each timm model module (the smallest that builds), random weights, nothing downloaded.

Run: ``python benchmarks/bench_zoo.py [--models NAME,...] [--out docs/zoo.md] [--timeout 600]`` (timm models as
``timm:NAME``; ``--list`` prints the zoo and exits; ``--one NAME`` checks one model in this process).

Each model is checked in a fresh process (forked from a server that has imported torch, torchvision, timm and
canonizers once), so that a model that crashes, hangs or runs out of memory is reported as broken and the run goes on.
The model is built with random weights (``num_classes=10``; parameters that start at 0, such as zero-initialised
heads and last gains of residual branches, made random too), its batch norms given random statistics and affine
parameters (a fresh batch norm is the identity and tests no merging), and checked on one random input of its size.

Per model the table gives what ``check`` reports:

- status: supported (the canonized model is exact and relevance is conserved), not conservative (the report names the
  operations without a conserving rule, or the forward is not exact), refused (torch.fx cannot trace it, or
  canonizing fails), or broken (``check`` raised, changed the model, crashed or timed out);
- forward float32 / float64: relative max deviation of the canonized model from the original in float64 arithmetic;
- |conservation - 1|: R_in / R_out of a bias-free float64 copy under an epsilon-only composite;
- not conserving: the kinds of the operations the report lists as without a conserving rule (places per kind).

The summary counts the statuses, the silent models (conservation error above 1e-6 while the report names no
operation; target 0) and the refused models that ``torch.fx.symbolic_trace`` traces (target 0).
'''
import argparse
import datetime
import importlib.metadata
import multiprocessing
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torchvision

#: largest |R_in / R_out - 1| that counts as conserved (as canonizers.check)
CONSERVED = 1e-6
#: most parameters of a model in the zoo
MAX_PARAMETERS = 40_000_000
#: timeout per model in seconds
TIMEOUT = 600
#: the modules the forkserver imports once, for every model's process
PRELOAD = ['torch', 'torchvision', 'timm', 'zennit', 'canonizers', 'canonizers.evaluation']

# How the zoo was chosen (timm 1.0.31, torchvision 0.29.1, torch 2.14.1, on CPU; the search is not part of the run):
# - torchvision: every builder of ``torchvision.models.list_models(module=torchvision.models)`` (quantized, detection,
#   segmentation, video and optical-flow builders live in submodules and are not listed), built with
#   ``num_classes=10``, kept when it has at most 40M parameters (counted with that head; alexnet, vgg, vit, the
#   larger convnext, swin, resnet, regnet and efficientnet from b6 on are over). Input 64x64 where the model runs at
#   64, else the smallest size it accepts (inception_v3 needs 75, maxvit_t 224 for its partitions of 7).
# - timm: per module of ``timm.list_modules()``, the models of ``timm.list_models(module=...)`` counted under
#   ``torch.device('meta')`` with ``num_classes=10``, timm's ``test_*`` models (its own small fixtures, no real
#   architecture) left out; tried in order of parameters, the first that builds with ``pretrained=False``, runs a
#   forward at the smallest size of 64, 96, 112, 128, 160, 192, 224, 256, ... up to its default input (as it is, or
#   with ``img_size=size`` for models of a fixed size) and takes under 60 s for a float64 forward and backward on the
#   2-core machine of the README's measured figures. The recorded count is that of the built model at its size.
#: torchvision builders: (name, input size, builder keywords, parameters)
TORCHVISION: List[Tuple[str, int, Dict[str, Any], int]] = [
    ('convnext_tiny', 64, {}, 27827818),
    ('densenet121', 64, {}, 6964106),
    ('densenet161', 64, {}, 26494090),
    ('densenet169', 64, {}, 12501130),
    ('densenet201', 64, {}, 18112138),
    ('efficientnet_b0', 64, {}, 4020358),
    ('efficientnet_b1', 64, {}, 6525994),
    ('efficientnet_b2', 64, {}, 7715084),
    ('efficientnet_b3', 64, {}, 10711602),
    ('efficientnet_b4', 64, {}, 17566546),
    ('efficientnet_b5', 64, {}, 28361274),
    ('efficientnet_v2_s', 64, {}, 20190298),
    ('googlenet', 64, {}, 5610154),
    ('inception_v3', 75, {}, 21806058),
    ('maxvit_t', 224, {}, 30412744),
    ('mnasnet0_5', 64, {}, 950322),
    ('mnasnet0_75', 64, {}, 1902018),
    ('mnasnet1_0', 64, {}, 3115122),
    ('mnasnet1_3', 64, {}, 5014066),
    ('mobilenet_v2', 64, {}, 2236682),
    ('mobilenet_v3_large', 64, {}, 4214842),
    ('mobilenet_v3_small', 64, {}, 1528106),
    ('regnet_x_1_6gf', 64, {}, 8286266),
    ('regnet_x_3_2gf', 64, {}, 14297642),
    ('regnet_x_400mf', 64, {}, 5098986),
    ('regnet_x_800mf', 64, {}, 6593386),
    ('regnet_x_8gf', 64, {}, 37670858),
    ('regnet_y_1_6gf', 64, {}, 10322320),
    ('regnet_y_3_2gf', 64, {}, 17938468),
    ('regnet_y_400mf', 64, {}, 3907554),
    ('regnet_y_800mf', 64, {}, 5655362),
    ('regnet_y_8gf', 64, {}, 37384642),
    ('resnet18', 64, {}, 11181642),
    ('resnet34', 64, {}, 21289802),
    ('resnet50', 64, {}, 23528522),
    ('resnext50_32x4d', 64, {}, 23000394),
    ('shufflenet_v2_x0_5', 64, {}, 352042),
    ('shufflenet_v2_x1_0', 64, {}, 1263854),
    ('shufflenet_v2_x1_5', 64, {}, 2488874),
    ('shufflenet_v2_x2_0', 64, {}, 5365486),
    ('squeezenet1_0', 64, {}, 740554),
    ('squeezenet1_1', 64, {}, 727626),
    ('swin_t', 64, {}, 27527044),
    ('swin_v2_t', 64, {}, 27590260),
]
#: timm models, one per module: (module, name, input size, create_model keywords, parameters)
TIMM: List[Tuple[str, str, int, Dict[str, Any], int]] = [
    ('byoanet', 'halonet_h1', 256, {}, 7592186),
    ('byobnet', 'mobileone_s1', 64, {}, 3557002),
    ('cait', 'cait_xxs24_224', 64, {'img_size': 64}, 11730634),
    ('coat', 'coat_tiny', 64, {'img_size': 64}, 5347070),
    ('convit', 'convit_tiny', 64, {'img_size': 64}, 5484882),
    ('convmixer', 'convmixer_768_32', 64, {}, 20348938),
    ('convnext', 'convnext_zepto_rms', 64, {}, 1901226),
    ('cpubone', 'cpubone_nano', 64, {}, 4934710),
    ('crossvit', 'crossvit_tiny_240', 64, {}, 6727700),
    ('csatv2', 'csatv2', 64, {}, 10720314),
    ('cspnet', 'cs3darknet_focus_s', 64, {}, 2766858),
    ('cspnext', 'cspnext_tiny', 64, {}, 2352550),
    ('davit', 'davit_tiny', 64, {}, 27598858),
    ('deit', 'deit_tiny_patch16_224', 64, {'img_size': 64}, 5491786),
    ('densenet', 'densenet121', 64, {}, 6964106),
    ('dla', 'dla46x_c', 64, {}, 814010),
    ('dpn', 'dpn48b', 64, {}, 8301556),
    ('edgenext', 'edgenext_xx_small', 64, {}, 1159906),
    ('efficientformer', 'efficientformer_l1', 224, {}, 11400908),
    ('efficientformer_v2', 'efficientformerv2_s0', 64, {'img_size': 64}, 3246916),
    ('efficientnet', 'mobilenetv2_035', 64, {}, 408938),
    ('efficientvim', 'efficientvim_m1', 64, {}, 5725098),
    ('efficientvit_mit', 'efficientvit_b0', 64, {}, 2141818),
    ('efficientvit_msra', 'efficientvit_m0', 64, {}, 2158366),
    ('eva', 'vit_tiny_patch16_dinov3_qkvb', 64, {}, 5491594),
    ('fasternet', 'fasternet_t0', 64, {}, 2637310),
    ('fastvit', 'fastvit_t8', 64, {}, 3264922),
    ('focalnet', 'focalnet_tiny_srf', 64, {}, 27665806),
    ('gcvit', 'gcvit_xxtiny', 64, {'img_size': 64}, 11447878),
    ('ghostnet', 'ghostnet_050', 64, {}, 1319102),
    ('hardcorenas', 'hardcorenas_b', 64, {}, 3908354),
    ('hgnet', 'hgnetv2_b0', 64, {}, 3968040),
    ('hiera', 'hiera_tiny_224', 64, {'img_size': 64}, 26872426),
    ('hieradet_sam2', 'sam2_hiera_tiny', 64, {}, 26858698),
    ('hrnet', 'hrnet_w18_small', 64, {}, 11158954),
    ('iformer', 'iformer_t', 64, {}, 2632026),
    ('inception_next', 'inception_next_atto', 64, {}, 3205130),
    ('inception_v3', 'inception_v3', 75, {}, 21806058),
    ('lcnetv2', 'lcnetv2_small', 64, {}, 2860362),
    ('levit', 'levit_128s', 64, {'img_size': 64}, 7009868),
    ('lowformer', 'lowformer_b0', 64, {}, 12515482),
    ('mambaout', 'mambaout_femto', 64, {}, 6163066),
    ('maxxvit', 'maxvit_pico_rw_256', 64, {'img_size': 64}, 7185422),
    ('metaformer', 'poolformerv2_s12', 64, {}, 11383842),
    ('mlp_mixer', 'gmlp_ti16_224', 64, {'img_size': 64}, 4589418),
    ('mobilenetv3', 'lcnet_035', 64, {}, 376180),
    ('mobilevit', 'mobilevit_xxs', 64, {}, 954234),
    ('mvitv2', 'mvitv2_tiny', 64, {}, 23412010),
    ('nest', 'nest_tiny', 64, {'img_size': 64}, 16192618),
    ('nextvit', 'nextvit_small', 64, {}, 30748618),
    ('nfnet', 'nf_regnet_b0', 64, {}, 7812898),
    ('pit', 'pit_ti_224', 64, {'img_size': 64}, 4549322),
    ('pvt_v2', 'pvt_v2_b0', 64, {}, 3412330),
    ('rdnet', 'rdnet_tiny', 64, {}, 22832418),
    ('regnet', 'regnetx_002', 64, {}, 2319482),
    ('repghost', 'repghostnet_050', 64, {}, 1045778),
    ('repvit', 'repvit_m1', 64, {}, 4722948),
    ('res2net', 'res2next50', 64, {}, 22642954),
    ('resnest', 'resnest14d', 64, {}, 8583178),
    ('resnet', 'resnet10t', 64, {}, 4927618),
    ('resnetv2', 'resnetv2_18', 64, {}, 11179850),
    ('rexnet', 'rexnet_100', 64, {}, 3528683),
    ('selecsls', 'selecsls42', 64, {}, 29086762),
    ('senet', 'legacy_seresnet18', 64, {}, 11270722),
    ('sequencer', 'sequencer2d_s', 64, {}, 27270538),
    ('shvit', 'shvit_s1', 64, {}, 6013018),
    ('sknet', 'skresnet18', 64, {}, 11450186),
    ('starnet', 'starnet_s050', 64, {}, 415018),
    ('swiftformer', 'swiftformer_xs', 64, {}, 3037780),
    ('swin_transformer', 'swin_tiny_patch4_window7_224', 64, {'img_size': 64}, 27510724),
    ('swin_transformer_v2', 'swinv2_tiny_window16_256', 64, {'img_size': 64}, 27585844),
    ('swin_transformer_v2_cr', 'swinv2_cr_tiny_224', 64, {'img_size': 64}, 27570814),
    ('tiny_vit', 'tiny_vit_5m_224', 64, {}, 5074974),
    ('tnt', 'tnt_s_legacy_patch16_224', 64, {'img_size': 64}, 23305066),
    ('tresnet', 'tresnet_m', 64, {}, 29360522),
    ('twins', 'twins_svt_small', 64, {}, 23552906),
    ('visformer', 'visformer_tiny', 64, {'img_size': 64}, 9819258),
    ('vision_transformer', 'vit_tiny_patch16_224', 64, {'img_size': 64}, 5491786),
    ('vision_transformer_hybrid', 'vit_tiny_r_s16_p8_224', 64, {'img_size': 64}, 6137994),
    ('vision_transformer_relpos', 'vit_srelpos_small_patch16_224', 64, {'img_size': 64}, 21592336),
    ('vitamin', 'vitamin_small_224', 64, {'img_size': 64}, 21812426),
    ('volo', 'volo_d1_224', 64, {'img_size': 64}, 25800620),
    ('vovnet', 'ese_vovnet19b_slim_dw', 64, {}, 1389882),
    ('xception', 'legacy_xception', 64, {}, 20827442),
    ('xception_aligned', 'xception41p', 64, {}, 24879242),
    ('xcit', 'xcit_nano_12_p8_224', 64, {}, 2921306),
]
#: timm modules without a model in the zoo, and why
SKIPPED: Dict[str, str] = {
    'beit': 'every model over 40M parameters (smallest: beit_base_patch16_224, 85.8M)',
    'deepseek_vit': 'every model over 40M parameters (smallest: deepseek_vit_412m, 411.9M)',
    'gemma4_vit': 'every model over 40M parameters (smallest: gemma4_vit_167m_enc, 167.4M)',
    'inception_resnet_v2': 'every model over 40M parameters (smallest: inception_resnet_v2, 54.3M)',
    'inception_v4': 'every model over 40M parameters (smallest: inception_v4, 41.2M)',
    'mobilenetv5': 'every model over 40M parameters (smallest: mobilenetv5_base, 80.6M)',
    'naflexvit': 'every model over 40M parameters (smallest: naflexvit_base_patch16_parfac_gap, 85.7M)',
    'nasnet': 'every model over 40M parameters (smallest: nasnetalarge, 84.8M)',
    'pnasnet': 'every model over 40M parameters (smallest: pnasnet5large, 81.8M)',
    'qwen3_vit': 'every model over 40M parameters (smallest: qwen3_vit_88m, 87.4M)',
    'vgg': 'every model over 40M parameters (smallest: vgg11, 128.8M)',
    'vision_transformer_sam': 'every model over 40M parameters (smallest: samvit_base_patch16_224, 85.7M)',
}


class Entry(NamedTuple):
    '''A model of the zoo: its name (torchvision builder or ``timm:NAME``), how to build it (random weights, eval
    mode), its input height and width, and its parameter count when the zoo was chosen.'''
    name: str
    build: Callable[[], torch.nn.Module]
    size: int
    parameters: int = 0


def torchvision_builder(name: str, options: Dict[str, Any]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        keywords = dict(num_classes=10, **options)
        if name in ('googlenet', 'inception_v3'):
            keywords.update(aux_logits=False, init_weights=False)
        return without_zeros(torchvision.models.get_model(name, weights=None, **keywords)).eval()
    return build


def timm_builder(name: str, options: Dict[str, Any]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm

        return without_zeros(timm.create_model(name, pretrained=False, num_classes=10, **options)).eval()
    return build


def without_zeros(model: torch.nn.Module) -> torch.nn.Module:
    '''Give every parameter that starts at 0, biases aside, random values, in place: a head of zeros (torchvision's
    ViT, timm's Hiera, gMLP, Sequencer) makes every output 0, and a residual branch that ends in a gain or normalization
    weight of 0 (timm's ``zero_init_last``, Swin V2's post-norms, NFNet's gains) adds nothing; neither tests anything.
    Weights of linear layers and convolutions get normal values of std 0.02, scales uniform ones in [0.5, 1.5].'''
    with torch.no_grad():
        for module in model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if 'bias' in name or not parameter.is_floating_point() or parameter.numel() == 0 or parameter.any():
                    continue
                if name == 'weight' and isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
                    parameter.normal_(std=0.02)
                else:
                    parameter.uniform_(0.5, 1.5)
    return model


def zoo() -> List[Entry]:
    '''The models of the benchmark: torchvision's first, then timm's by module.'''
    entries = [Entry(name, torchvision_builder(name, options), size, parameters)
               for name, size, options, parameters in TORCHVISION]
    entries += [Entry(f'timm:{name}', timm_builder(name, options), size, parameters)
                for _, name, size, options, parameters in TIMM]
    return entries


def example_input(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def unchanged(model: torch.nn.Module, before: Dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        after[key].dtype == value.dtype and after[key].shape == value.shape and torch.equal(after[key], value)
        for key, value in before.items())


def traces(model: torch.nn.Module) -> bool:
    '''Whether plain ``torch.fx.symbolic_trace`` traces the model.'''
    try:
        torch.fx.symbolic_trace(model)
    except Exception:
        return False
    return True


def measure(entry: Entry) -> Dict[str, Any]:
    '''Check one model, in this process: the figures of its row, as plain values.'''
    from canonizers import check
    from canonizers.evaluation import randomize_batch_norms

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.manual_seed(0)
        model = randomize_batch_norms(entry.build())
        result: Dict[str, Any] = {'parameters': sum(parameter.numel() for parameter in model.parameters())}
        before = state(model)
        try:
            report = check(model, example_input(entry.size), progress=False)
        except Exception as error:
            result.update(status='broken', verdict=f'check raised {type(error).__name__}: {first_line(error)}',
                          traceback=traceback.format_exc())
            return dict(result, seconds=time.perf_counter() - start)
        if not unchanged(model, before):
            result.update(status='broken', verdict='check changed the model')
            return dict(result, seconds=time.perf_counter() - start)
        kinds: Dict[str, set] = {}
        for operation in report.operations:
            kinds.setdefault(operation.kind, set()).add(operation.place)
        result.update(
            status=report.status, verdict=report.verdict, traced=report.traced,
            forward_float32=report.forward_float32, forward_float64=report.forward_float64,
            conservation=report.conservation, kinds={kind: len(places) for kind, places in kinds.items()},
            cancels=report.cancels and not report.operations,
            exit_code=report.exit_code)
        if report.status == 'refused':
            result['fx_traces'] = traces(model)
    return dict(result, seconds=time.perf_counter() - start)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else '(no message)'


def child(entry_name: str, connection: Any) -> None:
    connection.send(measure(entries_by_name()[entry_name]))
    connection.close()


def noop() -> None:
    pass


def isolated(context: Any, name: str, timeout: float) -> Dict[str, Any]:
    ''':py:func:`measure` in a fresh process; broken with the reason where it crashes or runs past ``timeout``.'''
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=child, args=(name, sender), daemon=True)
    start = time.perf_counter()
    process.start()
    sender.close()
    result: Optional[Dict[str, Any]] = None
    try:
        if receiver.poll(timeout):
            result = receiver.recv()
    except (EOFError, OSError):
        result = None
    process.join(10 if result is not None else 0.1)
    if process.is_alive():
        process.kill()
        process.join()
    if result is None:
        code = process.exitcode
        if time.perf_counter() - start >= timeout:
            reason = f'timed out after {timeout:.0f} s'
        elif code is not None and code < 0:
            reason = f'killed by {signal.Signals(-code).name}' + (' (out of memory?)' if code == -9 else '')
        else:
            reason = f'the process ended with exit status {code}'
        result = {'status': 'broken', 'verdict': reason}
    result.setdefault('seconds', time.perf_counter() - start)
    return result


def entries_by_name() -> Dict[str, Entry]:
    return {entry.name: entry for entry in zoo()}


def number(value: Optional[float]) -> str:
    return '-' if value is None else '0' if value == 0 else f'{value:.1e}'


def silent(result: Dict[str, Any]) -> bool:
    '''Conservation lost while the report names no operation without a conserving rule.'''
    conservation = result.get('conservation')
    lost = conservation is not None and abs(conservation - 1) > CONSERVED
    return lost and not result.get('kinds') and not result.get('cancels')


def refused_tracing(result: Dict[str, Any]) -> bool:
    '''Refused although torch.fx traces the model.'''
    return result['status'] == 'refused' and bool(result.get('fx_traces'))


def row(entry: Entry, result: Dict[str, Any]) -> List[str]:
    parameters = result.get('parameters', entry.parameters)
    conservation = result.get('conservation')
    kinds = ', '.join(f'{kind} ({places})' for kind, places in result.get('kinds', {}).items())
    if silent(result):
        kinds = '**none (silent)**'
    elif result.get('cancels'):
        kinds = 'none (relevance cancels beyond float64)'
    status = result['status']
    verdict = result.get('verdict', '')
    if status == 'broken':
        status, verdict = 'broken', f'broken: {verdict}'
    elif refused_tracing(result):
        verdict += ' (torch.fx.symbolic_trace traces it)'
    return [f'`{entry.name}`', f'{parameters / 1e6:.2f}', f'{entry.size}', status,
            number(result.get('forward_float32')), number(result.get('forward_float64')),
            '-' if conservation is None else number(abs(conservation - 1)), kinds or '-', verdict]


def markdown(header: List[str], rows: List[List[str]]) -> str:
    def line(cells: List[str]) -> str:
        return '| ' + ' | '.join(re.sub(r'\s+', ' ', cell).replace('|', '\\|') for cell in cells) + ' |'
    return '\n'.join([line(header), '|' + '---|' * len(header)] + [line(cells) for cells in rows])


def machine() -> str:
    try:
        lines = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        lines = []
    for text in lines:
        if text.startswith('Model name:'):
            return text.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> str:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return 'not installed'
    return (f'{datetime.date.today().isoformat()}: torch {torch.__version__}, torchvision {torchvision.__version__}, '
            f'timm {version("timm")}, zennit {version("zennit")}, {torch.get_num_threads()} threads, {machine()}')


def summary(results: List[Dict[str, Any]], seconds: float) -> str:
    counts: Dict[str, int] = {}
    for result in results:
        counts[result['status']] = counts.get(result['status'], 0) + 1
    statuses = ', '.join(f'{status}: {counts.get(status, 0)}'
                         for status in ('supported', 'not conservative', 'refused', 'broken'))
    return (f'{len(results)} models: {statuses}; silent: {sum(map(silent, results))}; refused that torch.fx traces: '
            f'{sum(map(refused_tracing, results))} (targets: none silent, broken or refused that torch.fx traces); '
            f'{seconds / 60:.1f} min')


HEADER = ['model', 'parameters (M)', 'input', 'status', 'forward float32', 'forward float64', '|conservation - 1|',
          'not conserving', 'verdict']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', help='comma-separated names (torchvision builders, timm:NAME); default all')
    parser.add_argument('--list', action='store_true', help='print the zoo and exit')
    parser.add_argument('--out', help='write the markdown table to this file (default: stdout)')
    parser.add_argument('--timeout', type=float, default=TIMEOUT, help='seconds per model (default %(default)s)')
    parser.add_argument('--one', metavar='NAME', help='check one model in this process and print its row')
    args = parser.parse_args()
    entries = entries_by_name()
    if args.one:
        print(markdown(HEADER, [row(entries[args.one], measure(entries[args.one]))]))
        return
    if args.models:
        unknown = [name for name in args.models.split(',') if name not in entries]
        if unknown:
            parser.error(f'not in the zoo: {", ".join(unknown)} (see --list)')
        selected = [entries[name] for name in args.models.split(',')]
    else:
        selected = list(entries.values())
    if args.list:
        modules = {f'timm:{name}': module for module, name, _, _, _ in TIMM}
        for entry in selected:
            options = next((options for name, _, options, _ in TORCHVISION if name == entry.name), None)
            if options is None:
                options = next(options for _, name, _, options, _ in TIMM if f'timm:{name}' == entry.name)
            print(f'{entry.name:48s} {modules.get(entry.name, "torchvision"):28s} {entry.size:4d} '
                  f'{entry.parameters / 1e6:7.2f}M {options or ""}')
        print(f'{sum(not entry.name.startswith("timm:") for entry in selected)} torchvision, '
              f'{sum(entry.name.startswith("timm:") for entry in selected)} timm; skipped timm modules: '
              f'{len(SKIPPED)}', file=sys.stderr)
        return
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload(PRELOAD)
    start = time.perf_counter()
    # the server imports PRELOAD before its first fork: not in any model's time
    warmup = context.Process(target=noop)
    warmup.start()
    warmup.join()
    rows, results = [], []
    for index, entry in enumerate(selected):
        result = isolated(context, entry.name, args.timeout)
        results.append(result)
        rows.append([re.sub(r'\s+', ' ', cell) for cell in row(entry, result)])
        print(f'[{index + 1}/{len(selected)}, {result["seconds"]:.0f} s] ' + ' | '.join(rows[-1]), file=sys.stderr,
              flush=True)
        if 'traceback' in result:
            print(result['traceback'], file=sys.stderr, flush=True)
    text = '\n\n'.join([f'canonizers.check, random weights and batch norms, {versions()}',
                        markdown(HEADER, rows), summary(results, time.perf_counter() - start)]) + '\n'
    if args.out:
        with open(args.out, 'w') as file:
            file.write(text)
    else:
        print(text, end='')


if __name__ == '__main__':
    main()
