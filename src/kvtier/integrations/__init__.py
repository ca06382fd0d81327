"""Adapters that put kvtier's pieces inside other serving engines (each behind its own extra).

``kvtier.integrations.vllm``: kvtier's remote store as a vLLM secondary tier and kvtier's
eviction policies as vLLM's CPU-tier cache policy (extra ``vllm``).
"""
