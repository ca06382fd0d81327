"""The vLLM suite (``vllm_suite/``) needs vLLM, which this interpreter does not have: it runs
in .venv-vllm, started by ``test_vllm_suite.py``, never collected here."""

collect_ignore = ["vllm_suite"]
