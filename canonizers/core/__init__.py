'''The core: what the family canonizers and the graph canonizer are built of.

Cuts (:py:mod:`~canonizers.core.cuts`), the masked sum (:py:mod:`~canonizers.core.masked_sum`), exact merging of batch
norms (:py:mod:`~canonizers.core.merging`, :py:mod:`~canonizers.core.layers`), rewritten blocks
(:py:mod:`~canonizers.core.rewrites`, :py:mod:`~canonizers.core.blocks`, :py:mod:`~canonizers.core.residual`,
:py:mod:`~canonizers.core.gates`), attention and normalizations with constant weights and factors
(:py:mod:`~canonizers.core.attention`, :py:mod:`~canonizers.core.normalization`), the family canonizer
(:py:mod:`~canonizers.core.family`), the forward outputs that zennit's rules reuse (:py:mod:`~canonizers.core.reuse`),
the machinery that
applies and removes them (:py:mod:`~canonizers.core.patch`, :py:mod:`~canonizers.core.lifecycle`,
:py:mod:`~canonizers.core.compat`) and the tracer of parallel paths (:py:mod:`~canonizers.core.tracing`).

The core imports nothing else of the package; the families (:py:mod:`canonizers.families`) import only the core.
'''
