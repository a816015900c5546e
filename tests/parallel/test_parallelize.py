"""Whole-model expert parallelism (``moeflow.parallel.parallelize``) on 4 gloo ranks: tiny
Qwen3-MoE and Mixtral checkpoints written by transformers' ``save_pretrained`` (sharded
safetensors + index), built on the meta device, sharded from the start, trained 10 steps; the
loss curve equals the single-process one (fp32, within 1e-5), and the exported directory
reloads in transformers with equal logits. Also the typed errors raised before any
communication. The helpers here are shared with the checkpoint and train tests."""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_ranks

pytestmark = pytest.mark.dist
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

STEPS = 10
SEQ = 12
LR = 1e-2
TOL = 1e-5


def tiny_config(family: str, experts: int = 8):
    common = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            intermediate_size=32,
            moe_intermediate_size=12,
            num_experts=experts,
            norm_topk_prob=True,
            **common,
        )
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=12, num_local_experts=experts, **common)
    raise ValueError(family)


def save_tiny(
    family: str, out_dir, experts: int = 8, seed: int = 0, shard: str = "20KB", **config
) -> str:
    """A randomly initialised tiny model saved as sharded safetensors + index."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, experts)
    for k, v in config.items():
        setattr(cfg, k, v)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(out_dir), max_shard_size=shard)
    return str(out_dir)


def batch(world: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (world, SEQ), generator=g)


def build_parallel(path: str, mesh_shape: tuple, names: tuple, **kw):
    """Meta model -> patch_model -> parallelize with the checkpoint (on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh

    from moeflow.integrations import patch_model
    from moeflow.parallel import parallelize

    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = patch_model(
            transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        )
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    return parallelize(model, mesh, checkpoint=path, **kw)


def train_steps(model, opt, ids, steps: int, world: int) -> list[float]:
    """``steps`` steps on this rank's ``ids``; the global (mean over ranks) losses."""
    import torch.distributed as dist

    from moeflow.parallel import sync_gradients

    out = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        sync_gradients(model)
        opt.step()
        g = loss.detach().clone()
        dist.all_reduce(g)
        out.append(g.item() / world)
    return out


def _train_and_export(rank, world, path, mesh_shape, names, export_dir, dense):
    from moeflow.parallel import export_pretrained

    model = build_parallel(path, mesh_shape, names, dense=dense)
    model.train()
    # sharded from the start: this rank holds only its experts
    expert_numel = sum(
        m.w_in.numel() + m.w_out.numel() for m in model.modules() if hasattr(m, "expert_range")
    )
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = train_steps(model, opt, batch(world)[rank : rank + 1], STEPS, world)
    if export_dir is not None:
        export_pretrained(model, export_dir)
    return losses, expert_numel


def _reference_after(path: str, world: int = 4):
    """The single-process model after the reference run, and its losses."""
    from moeflow.integrations import patch_model

    model = patch_model(
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids = batch(world)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def _check_family(
    tmp_path, family: str, mesh_shape: tuple, names: tuple, export: bool, dense: str = "replicate"
):
    path = save_tiny(family, tmp_path / "ckpt")
    ref_model, ref = _reference_after(path)
    export_dir = str(tmp_path / "export") if export else None
    res = run_ranks(_train_and_export, 4, path, mesh_shape, names, export_dir, dense, timeout_s=240)
    for losses, _ in res:
        assert max(abs(a - b) for a, b in zip(losses, ref)) < TOL, (losses, ref)
    cfg = tiny_config(family)
    E = cfg.num_local_experts if family == "mixtral" else cfg.num_experts
    P = dict(zip(names, mesh_shape)).get("ep", 1) * dict(zip(names, mesh_shape)).get("esp", 1)
    per_layer = (
        E
        * 3
        * cfg.hidden_size
        * (cfg.moe_intermediate_size if family == "qwen3_moe" else cfg.intermediate_size)
    )
    total = per_layer * cfg.num_hidden_layers
    for _, numel in res:
        assert numel == total // P  # exactly 1/P of the expert weights, no overhead
    if export:
        # the exported directory reloads, unpatched, with the trained model's logits
        back = transformers.AutoModelForCausalLM.from_pretrained(
            export_dir, dtype=torch.float32
        ).eval()
        ref_model.eval()
        ids = batch(4, seed=7)
        with torch.no_grad():
            torch.testing.assert_close(
                back(input_ids=ids).logits, ref_model(input_ids=ids).logits, atol=1e-5, rtol=1e-5
            )


def test_qwen3_moe_ep4_matches_single_process_and_exports(tmp_path):
    _check_family(tmp_path, "qwen3_moe", (4,), ("ep",), export=True)


def test_mixtral_ep2_dp2_fsdp2_dense_matches_single_process_and_exports(tmp_path):
    # FSDP2 fully_shard runs on gloo: dense parts sharded over the world, experts EP x DP
    _check_family(tmp_path, "mixtral", (2, 2), ("dp", "ep"), export=True, dense="fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("dense", ["replicate", "fsdp"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize(
    "layout", [((4,), ("ep",)), ((2, 2), ("dp", "ep")), ((2, 2), ("ep", "esp"))]
)
def test_families_and_layouts_match_single_process(tmp_path, family, layout, dense):
    if (family, layout[1], dense) in (
        ("qwen3_moe", ("ep",), "replicate"),
        ("mixtral", ("dp", "ep"), "fsdp"),
    ):
        pytest.skip("a default-suite test")
    _check_family(tmp_path, family, *layout, export=True, dense=dense)


# -- typed errors before any communication ------------------------------------------------
def _expect_error(rank, world, path, mesh_ranks, names):
    """The error ``parallelize`` raises, as (class name, text). The mesh is made without
    process groups (``_init_backend=False``) so that nothing communicates at all: a check
    that ran after a collective would hang here and time out."""
    import transformers as tf
    from torch.distributed.device_mesh import DeviceMesh

    from moeflow.errors import MoeflowError
    from moeflow.integrations import patch_model
    from moeflow.parallel import parallelize

    config = tf.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = patch_model(tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    mesh = DeviceMesh("cpu", torch.tensor(mesh_ranks), mesh_dim_names=names, _init_backend=False)
    try:
        parallelize(model, mesh, checkpoint=path)
    except MoeflowError as e:
        return type(e).__name__, str(e)
    return None


def test_bad_inputs_raise_typed_errors_before_communication(tmp_path):
    import json
    import os

    path = save_tiny("qwen3_moe", tmp_path / "ok", experts=6)
    # 6 experts over ep=4: not divisible
    res = run_ranks(_expect_error, 4, path, [0, 1, 2, 3], ("ep",), timeout_s=60)
    assert all(r[0] == "DistributedConfigError" and "num_experts=6" in r[1] for r in res)
    # a mesh that does not cover the world; a dimension name parallelize does not know
    res = run_ranks(_expect_error, 4, path, [0, 1], ("ep",), timeout_s=60)
    assert all(r[0] == "DistributedConfigError" and "world has 4" in r[1] for r in res)
    res = run_ranks(_expect_error, 4, path, [[0, 1], [2, 3]], ("ep", "tp"), timeout_s=60)
    assert all(r[0] == "DistributedConfigError" and "'tp'" in r[1] for r in res)
    # a checkpoint missing an expert: drop expert 5 of layer 1 from the index
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index) as f:
        meta = json.load(f)
    meta["weight_map"] = {
        k: v for k, v in meta["weight_map"].items() if ".layers.1.mlp.experts.5." not in k
    }
    with open(index, "w") as f:
        json.dump(meta, f)
    res = run_ranks(_expect_error, 2, path, [0, 1], ("ep",), timeout_s=60)
    assert all(r[0] == "InputError" and "layers.1.mlp.experts.5" in r[1] for r in res)


# -- router logits and the global-batch load-balancing loss --------------------------------
def _aux_rank(rank, world, path, use_global):
    import torch.distributed as dist

    from moeflow.parallel import sync_gradients
    from moeflow.parallel.parallelize import load_balancing_loss

    model = build_parallel(path, (world,), ("ep",))
    model.train()
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids = batch(world)[rank : rank + 1]
    out = []
    for _ in range(5):
        o = model(input_ids=ids, labels=ids)
        assert len(o.router_logits) == cfg.num_hidden_layers  # transformers' outputs work
        loss = o.loss
        if use_global:
            loss = loss + cfg.router_aux_loss_coef * (
                load_balancing_loss(o.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
                - o.aux_loss
            )
        opt.zero_grad()
        loss.backward()
        sync_gradients(model)
        opt.step()
        g = loss.detach().clone()
        dist.all_reduce(g)
        out.append(g.item() / world)
    return out


def test_router_logits_and_global_batch_aux_loss_match_single_process(tmp_path):
    path = save_tiny(
        "qwen3_moe", tmp_path / "ckpt", output_router_logits=True, router_aux_loss_coef=0.5
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from moeflow.integrations import patch_model

    patch_model(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids = batch(4)
    ref = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss  # CE + coef * aux of the global batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.append(loss.item())
    glob = run_ranks(_aux_rank, 4, path, True, timeout_s=120)[0]
    local = run_ranks(_aux_rank, 4, path, False, timeout_s=120)[0]
    assert max(abs(a - b) for a, b in zip(glob, ref)) < TOL, (glob, ref)
    # the per-rank aux loss is a different objective: the global option is what matches
    assert max(abs(a - b) for a, b in zip(local, ref)) > 10 * TOL


# -- moeflow's own demo model (no transformers, no checkpoint: sliced from the full layers) --
def _demo_losses(model, x, y, steps, sync=None, world=1):
    import torch.distributed as dist

    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    out = []
    for _ in range(steps):
        _, loss, _ = model(x, y)
        opt.zero_grad()
        loss.backward()
        if sync is not None:
            sync(model)
        opt.step()
        g = loss.detach().clone()
        if world > 1:
            dist.all_reduce(g)
        out.append(g.item() / world)
    return out


def _demo_rank(rank, world, mesh_shape, names, x, y):
    from torch.distributed.device_mesh import init_device_mesh

    from moeflow.models.demo import DemoModelConfig, build_demo_model
    from moeflow.parallel import ExpertParallel, parallelize, sync_gradients

    model = build_demo_model(
        DemoModelConfig(
            dim=16, num_layers=2, seq_len=8, num_experts=8, ffn_hidden_size=12, aux_loss_coef=0.0
        ),
        seed=0,
    )
    parallelize(model, init_device_mesh("cpu", mesh_shape, mesh_dim_names=names))
    assert all(isinstance(b.moe, ExpertParallel) for b in model.blocks)
    b = x.shape[0] // world
    return _demo_losses(
        model, x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b], 5, sync_gradients, world
    )


def test_demo_model_ep2_dp2_matches_single_process():
    from moeflow.models.demo import DemoModelConfig, build_demo_model

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (4, 8), generator=g)
    y = torch.randint(0, 256, (4, 8), generator=g)
    ref_model = build_demo_model(
        DemoModelConfig(
            dim=16, num_layers=2, seq_len=8, num_experts=8, ffn_hidden_size=12, aux_loss_coef=0.0
        ),
        seed=0,
    )
    ref = _demo_losses(ref_model, x, y, 5)
    res = run_ranks(_demo_rank, 4, (2, 2), ("dp", "ep"), x, y, timeout_s=120)
    assert max(abs(a - b) for a, b in zip(res[0], ref)) < TOL, (res[0], ref)


# -- gradient clipping over the layout --------------------------------------------------------
def _grad_norm_rank(rank, world, path, mesh_shape, names, dense):
    from moeflow.parallel.parallelize import clip_grad_norm_, sync_gradients

    model = build_parallel(path, mesh_shape, names, dense=dense)
    ids = batch(world)[rank : rank + 1]
    model(input_ids=ids, labels=ids).loss.backward()
    sync_gradients(model)
    before = clip_grad_norm_(model, 1e-3)
    after = clip_grad_norm_(model, 1e9)  # the clipped norm, no further scaling
    return before, after


@pytest.mark.parametrize(
    "layout,dense", [(((2, 2), ("dp", "ep")), "replicate"), (((2, 2), ("ep", "esp")), "fsdp")]
)
def test_clip_grad_norm_is_the_single_process_norm(tmp_path, layout, dense):
    from moeflow.integrations import patch_model

    path = save_tiny("qwen3_moe", tmp_path / "ckpt")
    model = patch_model(
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    )
    ids = batch(4)
    model(input_ids=ids, labels=ids).loss.backward()
    ref = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    res = run_ranks(_grad_norm_rank, 4, path, *layout, dense, timeout_s=120)
    for before, after in res:
        assert abs(before - ref) < 1e-5 * ref, (before, ref)
        assert abs(after - 1e-3) < 1e-6


# -- damaged checkpoint directories: typed errors naming the file, before any tensor is read --
def _meta_model(path):
    import transformers as tf

    from moeflow.integrations import patch_model

    config = tf.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return patch_model(tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32))


def _damage(path, how):
    """Damage checkpoint directory ``path`` in one of the ways a file goes bad; returns the
    file name the error must name."""
    import json
    import os
    import struct

    index = os.path.join(path, "model.safetensors.index.json")
    with open(index) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[0]
    file = os.path.join(path, shard)
    raw = open(file, "rb").read()
    if how == "truncated":
        open(file, "wb").write(raw[: len(raw) // 2])
    elif how == "garbage":
        open(file, "wb").write(b"\x00garbage" * 100)
    elif how == "huge header":
        open(file, "wb").write(struct.pack("<Q", 10**15) + raw[8:])
    elif how == "missing shard":
        os.remove(file)
        return "missing"
    elif how == "index garbage":
        open(index, "w").write('{"weight_map": ')
        return "model.safetensors.index.json"
    return shard


@pytest.mark.parametrize(
    "how", ["truncated", "garbage", "huge header", "missing shard", "index garbage"]
)
def test_damaged_checkpoint_files_are_typed_errors(tmp_path, how):
    from moeflow.errors import CorruptDataError, InputError
    from moeflow.parallel.parallelize import check_checkpoint

    path = save_tiny("qwen3_moe", tmp_path / "hf", experts=4)
    model = _meta_model(path)
    needle = _damage(path, how)
    kind = InputError if how == "missing shard" else CorruptDataError
    with pytest.raises(kind, match=needle) as ei:
        check_checkpoint(model, path)
    assert "\n" not in str(ei.value)
    # the ranks' parallelize() checks the same way, before any communication
    res = run_ranks(_expect_error, 2, path, [0, 1], ("ep",), timeout_s=60)
    assert all(r[0] == kind.__name__ and needle in r[1] for r in res), res


def test_config_that_disagrees_with_the_weights_names_the_tensor(tmp_path):
    import json
    import os

    from moeflow.errors import CorruptDataError
    from moeflow.parallel.parallelize import check_checkpoint

    path = save_tiny("qwen3_moe", tmp_path / "hf", experts=4)
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["moe_intermediate_size"] *= 2
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(CorruptDataError, match=r"experts\.0\.gate_proj\.weight is \(\d+, \d+\)"):
        check_checkpoint(_meta_model(path), path)
    cfg["moe_intermediate_size"] //= 2
    cfg["vocab_size"] += 3
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(CorruptDataError, match=r"embed_tokens\.weight is"):
        check_checkpoint(_meta_model(path), path)


# -- the topology from the mesh: node-level dispatchers and Parm schedules -----------------
NODE_CASES = [
    # (mesh shape, names, dispatcher, schedule): 2 declared nodes x 2 ranks each
    ((4,), ("ep",), "hierarchical", None),
    ((4,), ("ep",), "dedup", None),
    ((2, 2), ("ep", "esp"), "a2a", "split_tokens"),
    ((2, 2), ("ep", "esp"), "hierarchical", "split_rows"),
]


def _grads_by_reference_name(model) -> dict:
    """This rank's gradients keyed by the single-process model's names; expert slices as
    ``(name, expert range, ffn slice, esp rank, esp size, grad)``."""
    out = {}
    eps = {p: m for p, m in model.named_modules() if hasattr(m, "expert_range")}
    for name, p in model.named_parameters():
        owner = next((e for e in eps if name.startswith(e + ".")), None)
        rel = name[len(owner) + 1 :] if owner else None
        if rel in ("w_in", "w_out"):
            out[f"{owner}.experts.{rel}"] = (eps[owner], p.grad)
        else:
            out[name] = (None, p.grad)
    return out


def _node_rank(rank, world, path, cases):
    import torch.distributed as dist

    from moeflow.comm import Topology
    from moeflow.parallel import sync_gradients

    results = []
    for shape, names, dispatcher, schedule in cases:
        model = build_parallel(
            path,
            shape,
            names,
            dense="replicate",
            dispatcher=dispatcher,
            schedule=schedule,
            topology=Topology.explicit(world, 2),
        )
        model.train()
        topo = {m.topology.num_nodes for m in model.modules() if hasattr(m, "topology")}
        # with a Parm schedule the ranks of an ESP (= MP) group feed the same row
        S = dict(zip(names, shape)).get("esp", 1)
        row = rank // S if schedule else rank
        ids = batch(world)[row : row + 1]
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        losses, grads = [], None
        for step in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            sync_gradients(model)
            if step == 0:
                grads = {}
                for k, (ep, g) in _grads_by_reference_name(model).items():
                    info = None if ep is None else (ep.expert_range, ep.ffn_slice, ep.esp_rank)
                    grads[k] = (info, None if g is None else g.clone())
            opt.step()
            g = loss.detach().clone()
            dist.all_reduce(g)
            losses.append(g.item() / world)
        results.append((topo, losses, grads, model.moeflow_layout.topology.num_nodes))
    return results


def _reference_grads(path: str, rows: int):
    from moeflow.integrations import patch_model

    model = patch_model(
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids = batch(4)[:rows]
    losses, grads = [], None
    for step in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return losses, grads


def test_declared_nodes_hierarchical_dedup_and_parm_match_single_process(tmp_path):
    from moeflow.parallel.expert_parallel import slice_w_in

    path = save_tiny("qwen3_moe", tmp_path / "ckpt")
    res = run_ranks(_node_rank, 4, path, NODE_CASES, timeout_s=300)
    refs = {rows: _reference_grads(path, rows) for rows in (2, 4)}
    for rank_res in res:
        for (shape, names, dispatcher, schedule), (topo, losses, grads, nodes) in zip(
            NODE_CASES, rank_res
        ):
            case = f"{dispatcher}/{schedule}"
            assert topo == {2} and nodes == 2, case  # every layer sees 2 nodes of 2 ranks
            ref_losses, ref_grads = refs[2 if schedule else 4]
            assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < TOL, (case, losses)
            assert set(grads) == set(ref_grads), case
            S = dict(zip(names, shape)).get("esp", 1)
            for name, (info, got) in grads.items():
                want = ref_grads[name]
                if info is not None:
                    (e0, e1), (f0, f1), s = info
                    if name.endswith("w_in"):
                        want = slice_w_in(want, e0, e1, s, S, True)
                    else:
                        want = want[e0:e1, :, f0:f1]
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4, msg=f"{case} {name}")


def _bad_topology(rank, world, path, ranks_per_node, shape, names):
    from moeflow.comm import Topology
    from moeflow.errors import MoeflowError

    try:
        build_parallel(path, shape, names, topology=Topology.explicit(world, ranks_per_node))
    except MoeflowError as e:
        return type(e).__name__, str(e)
    return None


def test_layouts_that_cannot_work_are_refused_before_communication(tmp_path):
    path = save_tiny("qwen3_moe", tmp_path / "ckpt")
    # an ESP group of 2 cannot span nodes of 1 rank
    res = run_ranks(_bad_topology, 2, path, 1, (1, 2), ("ep", "esp"), timeout_s=60)
    assert all(r[0] == "DistributedConfigError" and "ESP group" in r[1] for r in res)
    # dedup sends tokens to whole experts: no ESP slicing
    res = run_ranks(_dedup_esp_error, 4, path, timeout_s=60)
    assert all(r[0] == "ConfigError" and "a row dispatcher" in r[1] for r in res)


# -- parallelize(aux_loss="global"): moeflow routers' aux loss over the world's batch -----
def _with_aux_coefs(model):
    """Turn on the moeflow routers' load-balancing and z-losses (patched transformers layers
    leave them off: transformers computes its own from ``router_logits``)."""
    from moeflow import MoELayer

    for m in model.modules():
        if isinstance(m, MoELayer):
            m.cfg = m.cfg.replace(aux_loss_coef=0.1, z_loss_coef=0.01)
            m.router.cfg = m.cfg
    return model


def _global_aux_rank(rank, world, path, aux_loss):
    from torch.distributed.device_mesh import init_device_mesh

    from moeflow.integrations import patch_model
    from moeflow.parallel import parallelize, sync_gradients

    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = patch_model(
            transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        )
    _with_aux_coefs(model)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    parallelize(model, mesh, checkpoint=path, dense="replicate", aux_loss=aux_loss)
    assert model.moeflow_layout.aux_loss == aux_loss
    model.train()
    ids = batch(world)[rank : rank + 1]
    model(input_ids=ids)
    aux = sum(m.aux_loss for m in model.modules() if hasattr(m, "expert_range"))
    aux.backward()
    sync_gradients(model)
    grads = {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if "router" in n and p.grad is not None
    }
    return aux.item(), grads


def test_parallelize_global_aux_loss_is_the_whole_batch_loss(tmp_path):
    from moeflow import MoELayer
    from moeflow.integrations import patch_model

    path = save_tiny("qwen3_moe", tmp_path / "ckpt")
    ref = _with_aux_coefs(
        patch_model(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    )
    ref.train()
    ref(input_ids=batch(4))
    want = sum(m.aux_loss for m in ref.modules() if isinstance(m, MoELayer))
    want.backward()
    ref_grads = {
        n: p.grad for n, p in ref.named_parameters() if "router" in n and p.grad is not None
    }
    glob = run_ranks(_global_aux_rank, 4, path, "global", timeout_s=120)
    local = run_ranks(_global_aux_rank, 4, path, "local", timeout_s=120)
    for aux, grads in glob:
        assert abs(aux - want.item()) < 1e-6, (aux, want.item())
        assert set(grads) == set(ref_grads) and grads
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], atol=1e-8, rtol=1e-5, msg=n)
    assert max(abs(aux - want.item()) for aux, _ in local) > 1e-4


def _dedup_esp_error(rank, world, path):
    from moeflow.errors import MoeflowError

    try:
        build_parallel(path, (2, 2), ("ep", "esp"), dispatcher="dedup")
    except MoeflowError as e:
        return type(e).__name__, str(e)
    return None
