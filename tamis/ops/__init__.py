"""Runtime kernels, one per registry entry, grouped by family.

`kernel.py` holds the interface and the table; each family module registers its kernels
on import: `text` (cheap text statistics), `lm` (answer-loss scorers, Nuggets' one-shot
losses), `embedding` (cached text embeddings), `less` (LESS gradient features), `judge`
(judge models), `digit` (DEITA's scorers), `diversity` (samplers), `cluster` (KMeans groups), `dedup`
(deduplication and decontamination), `functions` (expression
functions), `models` and `data` (constructors), `probes` (probe experiments, fitted selectors). Plug-ins register through the same table
(`tamis.plugins`). The modules import torch only inside kernels, so `check` and
`explain` stay fast.
"""

from tamis.ops import cluster, data, deita, dedup, digit, diversity, embedding, functions, indicators, judge, less, lm, models, probes, text  # noqa: F401  (registration)
from tamis.ops.kernel import (Built, BuildEnv, ExecOptions, Kernel, Lazy, Resources, kernel_for, kernels,
                              register, unregister)

__all__ = ["Built", "BuildEnv", "ExecOptions", "Kernel", "Lazy", "Resources", "kernel_for", "kernels", "register",
           "unregister"]
