"""Serving MoE models.

* :mod:`moeflow.serving.engine`: continuous batching (iteration-level scheduling, chunked
  prefill, recompute preemption) over :mod:`moeflow.serving.kv_blocks`, a KV cache in
  fixed-size blocks under a memory budget.
* :mod:`moeflow.serving.openai_api`: the OpenAI-compatible HTTP API of ``moeflow serve``
  (FastAPI, the ``[serve]`` extra).
* :mod:`moeflow.serving.disaggregated`: disaggregated expert parallelism (FinDEP) with
  attention and expert rank groups: the forward pass of an attention rank, the expert
  ranks' server, and ``serve`` for static batches.
* :mod:`moeflow.serving.disagg_server`: the engine of ``moeflow serve --ag N --eg M``
  (continuous batching on each attention rank, ranks forked and watched by the HTTP process).
* :mod:`moeflow.serving.disagg_weights`: each rank's part of a safetensors checkpoint, read
  without the rest.
"""
