"""Serving MoE models.

* :mod:`moeflow.serving.engine`: continuous batching (iteration-level scheduling, chunked
  prefill, recompute preemption) over :mod:`moeflow.serving.kv_blocks`, a KV cache in
  fixed-size blocks under a memory budget.
* :mod:`moeflow.serving.openai_api`: the OpenAI-compatible HTTP API of ``moeflow serve``
  (FastAPI, the ``[serve]`` extra).
* :mod:`moeflow.serving.disaggregated`: disaggregated expert parallelism (FinDEP) with
  attention and expert rank groups, static batches.
"""
