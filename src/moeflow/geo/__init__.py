"""Training over slow, uneven links (FusionLLM / FusionAI): the op graph of a model, the
pipeline runtime with its membership broker, and sparsified links (AdaTopK). The partition
itself is a pure planner (:mod:`moeflow.plan.geo`)."""
