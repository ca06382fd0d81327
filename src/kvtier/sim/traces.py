"""Readers for public LLM-serving traces, by what a file holds: block hash ids
(``hash_trace``: Mooncake, Qwen-Bailian JSONL) or lengths alone (``length_trace``: Azure,
BurstGPT CSV); ``trace_file``: what they share."""

from kvtier.sim.hash_trace import HASH_BLOCK_SIZES, MOONCAKE_BLOCK_TOKENS, MooncakeTrace
from kvtier.sim.length_trace import AzureTrace
from kvtier.sim.trace_file import MAX_LINE_BYTES, TraceFormatError, check_regular_file

__all__ = ["HASH_BLOCK_SIZES", "MAX_LINE_BYTES", "MOONCAKE_BLOCK_TOKENS", "AzureTrace",
           "MooncakeTrace", "TraceFormatError", "check_regular_file"]
