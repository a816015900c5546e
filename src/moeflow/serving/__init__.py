"""Serving MoE models: disaggregated expert parallelism (FinDEP) with attention and expert
rank groups (:mod:`moeflow.serving.disaggregated`)."""
