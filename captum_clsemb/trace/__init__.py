"""The traced forward: one pass, everything recorded by name, optional interventions."""

from captum_clsemb.trace.cache import RECORDABLE, ActivationCache
from captum_clsemb.trace.forward import Trace, keep_token_index, resolve_attention_edit, run_block, trace
from captum_clsemb.trace.interventions import NoClassToken, SelfOnly

__all__ = [
    "trace",
    "Trace",
    "ActivationCache",
    "RECORDABLE",
    "SelfOnly",
    "NoClassToken",
    "keep_token_index",
    "resolve_attention_edit",
    "run_block",
]
