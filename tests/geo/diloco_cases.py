"""The small DiLoCo job the geo tests share (a 2-layer demo model, 2 micro-batches of 2)."""

SMALL = dict(
    dim=32,
    layers=2,
    heads=2,
    seq_len=16,
    experts=4,
    ffn=64,
    microbatch_size=2,
    microbatches=2,
    max_bytes=200_000,
    timeout_s=120.0,
)
