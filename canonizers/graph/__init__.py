'''The canonizer for any model ``torch.fx`` can trace, built on the same core as the family canonizers.

Usage, with CRP::

    import timm
    from crp.attribution import CondAttribution
    from zennit.composites import EpsilonPlusFlat

    from canonizers import GraphCanonizer
    from canonizers.graph import graph_cuts_for

    model = timm.create_model('resnet50d', pretrained=True).eval()
    conditions = [{'layer3.0.conv2': [5], 'y': [3]}]
    cut, = graph_cuts_for(model, conditions)                 # {'layer3.0': 'skip'}
    composite = EpsilonPlusFlat(canonizers=[GraphCanonizer(cut=cut)])
    heatmap = CondAttribution(model)(data, conditions, composite, exclude_parallel=False).heatmap
    # equals CRP's exclude_parallel=True with GraphCanonizer() (no cut), to rounding

Where each part lives:

- :py:mod:`~canonizers.graph.tracer`: tracing without touching the model (hooks left out, constants taken back);
- :py:mod:`~canonizers.graph.analysis`: the data flow, its sums, concatenations and gates of parallel paths, and
  the functional operations that become modules;
- :py:mod:`~canonizers.graph.batchnorms`: which batch norm merges into which layers;
- :py:mod:`~canonizers.graph.transformer`: normalizations, attention and constant shifts, to become modules with
  rules;
- :py:mod:`~canonizers.graph.cutting`: the names and branches cuts use, and the isolation rule of
  :py:func:`graph_cuts_for`;
- :py:mod:`~canonizers.graph.program`: the rewritten forward and the modules it calls;
- :py:mod:`~canonizers.graph.compiled`: all of it, once per model;
- :py:mod:`~canonizers.graph.canonizer`: :py:class:`GraphCanonizer` itself.
'''
from .canonizer import GraphCanonizer, graph_cuts_for
from .compiled import clear_cache

__all__ = ['GraphCanonizer', 'clear_cache', 'graph_cuts_for']
