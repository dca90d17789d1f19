'''The canonizer for any model ``torch.fx`` can trace, built on the same core as the family canonizers.'''
from .canonizer import GraphCanonizer, graph_cuts_for
from .compiled import clear_cache

__all__ = ['GraphCanonizer', 'clear_cache', 'graph_cuts_for']
