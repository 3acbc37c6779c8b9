"""tamis: a declarative language and compiler for LLM data-selection recipes."""
__version__ = "0.1.0"
