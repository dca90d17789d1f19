'''The argument parser and ``main``.'''
import argparse
import os
import sys
import textwrap
from typing import Optional, Sequence

from .checking import command_check
from .common import (
    CSV_NAME,
    DEFAULT_COMPOSITE,
    DEFAULT_DEMO_LAYER,
    DEFAULT_DEMO_OUT,
    DEMO,
    EXIT_USAGE,
    NUMBERS,
    PROG,
    HelpFormatter,
    Parser,
    UsageError,
)
from .explaining import command_demo, command_explain
from .inputs import composite_names, parse_concepts
from .listing import command_blocks

# --- the parser ------------------------------------------------------------------------------------------------------
DESCRIPTION = '''\
Isolated CRP conditional heatmaps: canonizers that cut named parallel paths
(ResNet shortcuts, ...), so that the heatmap of a concept shows only relevance
that passed through that concept.
'''

EXAMPLES = f'''\
examples:
  {PROG} demo                            # the embedded shapes model, pictures in {DEFAULT_DEMO_OUT}
  {PROG} blocks resnet50                 # where conditions can be isolated
  {PROG} check timm:convnext_atto --size 64   # exact? conservative? where not?
  {PROG} explain --model demo --image star.png --layer layer3.0.conv2 --top 3 --out out/star
  {PROG} explain --model resnet50 --weights resnet50.pth --image cat.jpg dog.jpg \\
      --layer layer3.1.conv2 --concepts 3,17 --out out/pets
'''


def paragraph(text: str) -> str:
    '''``text`` wrapped for the help (descriptions keep their line breaks otherwise).'''
    return textwrap.fill(' '.join(text.split()), 88)


def build_parser() -> argparse.ArgumentParser:
    '''The parser of the ``canonizers`` command line.'''
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EXAMPLES + '\n' + NUMBERS,
                    formatter_class=HelpFormatter)
    commands = parser.add_subparsers(title='commands', dest='command', required=True, metavar='COMMAND')

    blocks = commands.add_parser(
        'blocks', help='list the cuttable blocks of a model and the layers conditions may use',
        description=paragraph(
            'List every cuttable block of a model: its type, the branches that can be cut, and the convolutional '
            'and linear layers in each branch that a CRP condition may name, with their number of channels '
            '(concepts). The model is built with random weights; nothing is downloaded.'),
        formatter_class=HelpFormatter)
    blocks.add_argument('model', metavar='MODEL', help=f'a torchvision classification model name, or {DEMO!r}')
    blocks.set_defaults(run=command_blocks)

    check = commands.add_parser(
        'check', help='the support report of a model: exact? conservative? where not?',
        description=paragraph(
            'Check whether GraphCanonizer supports a model: whether torch.fx traces it, the merges of parallel '
            'paths it finds and which can be cut, the batch norms it merges exactly and those it cannot, the '
            'operations on the relevance path without a conserving rule (by name and kind), the forward deviation '
            'of the canonized model (float32 and float64) from float64 arithmetic, and the conservation of relevance '
            'of a bias-free float64 copy under an epsilon-only composite; then a one-line verdict. The model is '
            'built with random weights and batch-norm statistics (demo: its embedded weights); nothing is '
            'downloaded. Exit status: 0 supported (exact and conservative), 1 not conservative, 2 refused.'),
        formatter_class=HelpFormatter)
    check.add_argument('model', metavar='MODEL',
                       help=f'a torchvision classification model name, timm:NAME for a timm model, or {DEMO!r}')
    check.add_argument('--size', type=int, metavar='PIXELS',
                       help='input height and width (default: 64 for demo, timm\'s declared input size for timm '
                            'models, 224 for torchvision models)')
    check.add_argument('--seed', type=int, default=0, help='seed of the random weights and input (default: 0)')
    check.set_defaults(run=command_check)

    explain = commands.add_parser(
        'explain', help='isolated and leaky CRP heatmaps of chosen concepts for your images',
        description=paragraph(
            'For each image, CRP conditional heatmaps of the chosen concepts of one layer, with and without '
            'isolation: one PNG per image (input, class heatmap, and per concept the leaky, isolated and leaked '
            f'heatmaps), a CSV ({CSV_NAME}) of the numbers of all images, and a table on stdout. All arguments and '
            'files are checked before any heatmap is computed.'),
        epilog=NUMBERS, formatter_class=HelpFormatter)
    explain.add_argument('--model', required=True, metavar='NAME',
                         help=f'a torchvision classification model name (e.g. resnet50), or {DEMO!r} for the '
                              'embedded demo model')
    explain.add_argument('--weights', metavar='FILE',
                         help='a file holding a state dict, bare or in a checkpoint under "state_dict", "model", '
                              '... (loaded with torch.load(weights_only=True), which unpickles no code); or a '
                              'torchvision weights name such as IMAGENET1K_V2 or DEFAULT, downloaded once (needs a '
                              f'connection). Default for {DEMO!r}: the embedded weights')
    explain.add_argument('--image', nargs='+', required=True, metavar='IMG',
                         help='image files (any format PIL reads); the shorter side is resized to --size and the '
                              'centre cropped to a square')
    explain.add_argument('--layer', required=True,
                         help='layer whose concepts (channels) to explain, e.g. layer3.0.conv2 (see: '
                              f'{PROG} blocks MODEL)')
    concepts = explain.add_mutually_exclusive_group(required=True)
    concepts.add_argument('--concepts', type=parse_concepts, metavar='C,C,...',
                          help='channel indices of --layer to explain, e.g. 3,17')
    concepts.add_argument('--top', type=int, metavar='K',
                          help='explain the K channels of --layer with the most relevance for the target')
    explain.add_argument('--target', metavar='CLASS',
                         help='class index or name to explain (default: the predicted class of each image)')
    explain.add_argument('--size', type=int, metavar='PIXELS',
                         help='input height and width (default: 64 for demo, 224 for torchvision models); inputs '
                              'are normalised with the demo or the ImageNet statistics')
    explain.add_argument('--out', required=True, metavar='DIR', help='directory for the pictures and the CSV')
    add_method_arguments(explain)
    explain.add_argument('--no-reference', action='store_true',
                         help="skip CRP's exclude_parallel=True reference (saves a third backward pass per concept)")
    explain.set_defaults(run=command_explain)

    demo = commands.add_parser(
        'demo', help='the same on the embedded demo model and built-in sample images',
        description=paragraph(
            'Run explain on the embedded demo model (a small ResNet trained on 64x64 images of six shapes: circle, '
            'square, triangle, cross, star, ring) for one built-in sample image per class (written to DIR/samples), '
            'and print the table of leaky, isolated and reference heatmap sums.'),
        epilog=NUMBERS, formatter_class=HelpFormatter)
    demo.add_argument('--out', default=str(DEFAULT_DEMO_OUT), metavar='DIR',
                      help=f'directory for the pictures, the CSV and the samples (default: {DEFAULT_DEMO_OUT})')
    demo.add_argument('--layer', default=DEFAULT_DEMO_LAYER,
                      help=f'layer whose concepts to explain (default: {DEFAULT_DEMO_LAYER})')
    demo.add_argument('--top', type=int, default=3, metavar='K',
                      help='number of most relevant concepts per image (default: 3)')
    add_method_arguments(demo)
    demo.set_defaults(run=command_demo)
    return parser


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    '''The composite and device arguments.'''
    names = composite_names()
    parser.add_argument('--composite', default=DEFAULT_COMPOSITE, choices=names, metavar='NAME',
                        help=f'zennit composite (LRP rules), one of: {", ".join(names)} (default: '
                             f'{DEFAULT_COMPOSITE}); the box bounds of epsilon_gamma_box follow the normalisation')
    parser.add_argument('--device', default='cpu', help='torch device, e.g. cpu or cuda (default: cpu)')


def main(argv: Optional[Sequence[str]] = None) -> int:
    '''Run the ``canonizers`` command line.

    Parameters
    ----------
    argv: sequence of str, optional
        The arguments; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        The exit status: 0 on success, 2 for a usage error (reported as one line on stderr).
    '''
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except UsageError as error:
        print(f'{PROG}: error: {error}', file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit:  # --help
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader (e.g. head) went away: stop quietly, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
