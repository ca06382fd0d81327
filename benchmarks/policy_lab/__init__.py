"""The policy lab: block-level replays of request streams through eviction policies.

``replay.py`` holds the request model, the policy contract and the replay loop;
``baselines.py`` the known policies (LRU, Belady, ARC, SIEVE, S3-FIFO);
``learned.py`` kvtier's candidates (queue-aware soft claims, an online reuse predictor,
cost-aware value); ``workloads.py`` turns traces and generators into lab request streams.
``benchmarks/policy_lab.py`` runs them all and prints the table.
"""
