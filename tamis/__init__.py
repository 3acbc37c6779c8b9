"""tamis: a declarative language and compiler for LLM data-selection recipes.

Plug-ins register their own operators with the decorators exported here (see
`tamis.plugins` and the README's "Writing your own operator").
"""
__version__ = "0.1.0"

from tamis.plugins import REQUIRED, Param, function, judge_prompt, sampler, scorer  # noqa: E402

__all__ = ["Param", "REQUIRED", "function", "judge_prompt", "sampler", "scorer"]
