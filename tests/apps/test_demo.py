import subprocess
import sys

import torch

from moeflow import cli
from moeflow.apps.demo import main
from moeflow.models.demo import BatchSampler, DemoModelConfig, build_demo_model, load_corpus


def test_corpus_is_stdlib_source():
    data = load_corpus(max_bytes=200_000)
    assert len(data) == 200_000
    assert b"def " in data and b"import " in data


def test_demo_loss_falls_quickly():
    torch.manual_seed(0)
    cfg = DemoModelConfig(
        dim=32, num_layers=1, num_heads=2, seq_len=32, num_experts=4, ffn_hidden_size=64
    )
    model = build_demo_model(cfg)
    sample = BatchSampler(load_corpus(max_bytes=300_000), cfg.seq_len, 8, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        x, y = sample()
        _, loss, aux = model(x, y)
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


def test_demo_command_runs(capsys):
    rc = main(
        [
            "--steps",
            "8",
            "--dim",
            "32",
            "--layers",
            "1",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--experts",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert "summary: 8 steps" in out and "loss" in out
    assert rc in (0, 1)


def test_help_lists_existing_subcommands():
    available = cli._available()
    out = subprocess.run(
        [sys.executable, "-m", "moeflow.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "demo" in out
    for name in available:
        assert name in out
    missing = set(cli.COMMANDS) - set(available)
    for name in missing:
        assert f"    {name} " not in out
