"""moeflow compress / decompress / inspect end to end on a real safetensors file."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeflow.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "layers.0.mlp.weight": (torch.randn(96, 200, generator=g) * 0.02).to(torch.bfloat16),
        "layers.0.mlp.bias": torch.zeros(96, dtype=torch.bfloat16),
        "layers.0.norm.weight": torch.ones(200, dtype=torch.float16),
        "embed.weight": torch.randn(300, 64, generator=g) * 0.02,
        "position_ids": torch.arange(512).reshape(1, 512),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }
    path = d / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "origin": "moeflow-test"})
    return d, path, tensors


@pytest.mark.parametrize("codec", ["auto", "tbe"])
def test_round_trip_is_byte_identical(checkpoint, codec, capsys):
    d, path, tensors = checkpoint
    mfz = d / f"m-{codec}.mfz"
    out = d / f"out-{codec}.safetensors"
    assert main(["compress", str(path), str(mfz), "--codec", codec, "--no-progress"]) == 0
    assert mfz.stat().st_size < path.stat().st_size
    assert main(["decompress", str(mfz), str(out), "--no-progress"]) == 0
    assert out.read_bytes() == path.read_bytes()
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "moeflow-test"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    assert not [p for p in os.listdir(d) if p.startswith(".tmp-")]  # temp files cleaned


def test_inspect_reports_ratio_entropy_codec(checkpoint, capsys):
    d, path, _ = checkpoint
    mfz = d / "i.mfz"
    assert main(["compress", str(path), str(mfz), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(mfz), "--verify"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("layers.0.mlp.weight"))
    fields = line.split()
    assert fields[3] == "entropy" and float(fields[4]) > 1.3 and 2.0 < float(fields[5]) < 3.5
    assert "position_ids" in out and "raw" in out and "verified" in out
    assert main(["inspect", str(mfz), "--json"]) == 0
    idx = json.loads(capsys.readouterr().out)
    assert len(idx["tensors"]) == 8


def test_progress_bar_goes_to_stderr(checkpoint, capsys):
    d, path, _ = checkpoint
    assert main(["compress", str(path), str(d / "p.mfz"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "compress" in err and "100" in err


def test_corrupt_mfz_fails_cleanly_and_leaves_no_output(checkpoint, capsys):
    d, path, _ = checkpoint
    mfz = d / "c.mfz"
    assert main(["compress", str(path), str(mfz), "--no-progress"]) == 0
    raw = bytearray(mfz.read_bytes())
    raw[200] ^= 0xFF
    bad = d / "bad.mfz"
    bad.write_bytes(bytes(raw))
    out = d / "never.safetensors"
    assert main(["decompress", str(bad), str(out), "--no-progress"]) == 2
    assert not out.exists()
    assert "corrupt" in capsys.readouterr().err.lower()
    trunc = d / "trunc.mfz"
    trunc.write_bytes(bytes(raw[:-5]))
    assert main(["inspect", str(trunc)]) == 2
    assert main(["compress", str(d / "missing.safetensors"), str(d / "x.mfz")]) == 2
    assert not [p for p in os.listdir(d) if p.startswith(".tmp-")]
