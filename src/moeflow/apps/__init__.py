"""Applications: the demo, the training loops, step dissection, the profiler and the serving
benchmark. The only library code that may import every other package; the command line
(:mod:`moeflow.cli`) drives them."""
