"""Expert parallelism for a whole model in one call, on a ``DeviceMesh``.

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    with torch.device("meta"):                       # nothing allocated yet
        model = patch_model(AutoModelForCausalLM.from_config(config))
    parallelize(model, mesh, checkpoint="path/to/hf_dir")   # each rank: its experts only
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    sync_gradients(model)                            # the global batch's gradient
    optimizer.step()

Every :class:`moeflow.MoELayer` of the model (a transformers model patched by
:func:`moeflow.integrations.patch_model`, or moeflow's own models) becomes an
:class:`~moeflow.parallel.ExpertParallel` over the mesh's ``ep`` (and ``esp``) dimensions, the
layout of GShard (Lepikhin et al., ICLR'21: experts sharded, everything else replicated)
and of DeepSpeed-MoE's EP x DP grid (Rajbhandari et al., ICML'22): with a ``dp``
dimension each expert shard is replicated ``dp`` times and its gradient is summed over those
replicas. The dense parts (attention, embeddings, norms, routers, shared experts) are
data parallel over the whole world: sharded with FSDP2 ``fully_shard`` (``dense="fsdp"``, the
default; runs on gloo) or replicated with their gradients summed in flat buckets by
:func:`sync_gradients` (``dense="replicate"``, DDP's algorithm). Call :func:`sync_gradients`
after ``backward`` in both cases: it sums the expert gradients over their ``dp`` replicas.

Layout: mesh dimensions are named from ``("dp", "ep", "esp")`` (``ep`` required, the others
optional, in that order). A rank's expert-parallel group is its ``(ep, esp)`` sub-mesh,
ESP innermost (group rank ``p * S + s``, :class:`~moeflow.parallel.ExpertParallel`'s order).

Sharded from the start: on a model built on the meta device, the full experts never exist on
any rank. Each ExpertParallel slices the meta layer (free), ``to_empty`` allocates only this
rank's ``E/P`` experts x ``F/S`` columns, and ``checkpoint=`` fills them from a safetensors
file or a transformers directory, reading only those bytes
(:class:`~moeflow.checkpoint.shards.SafetensorsCheckpoint`). Every check (mesh, degrees,
checkpoint keys) runs before the first collective, so a bad layout fails on every rank alike.

Around it: :func:`clip_grad_norm_` (the single-process global norm), :func:`load_balancing_loss`
(transformers' aux loss on the global batch), :func:`export_pretrained` (experts gathered, a
transformers directory written) and :mod:`moeflow.parallel.checkpoint` (sharded DCP
save/resume).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from moeflow.checkpoint.shards import SafetensorsCheckpoint
from moeflow.comm.groups import subgroup
from moeflow.comm.timeouts import resolve_timeout
from moeflow.comm.topology import Topology
from moeflow.errors import ConfigError, CorruptDataError, DistributedConfigError, InputError
from moeflow.layer.moe import MoELayer
from moeflow.parallel.data_parallel import clip_grad_norm_, sync_gradients
from moeflow.parallel.expert_parallel import ExpertParallel

__all__ = [
    "parallelize",
    "ParallelLayout",
    "sync_gradients",
    "clip_grad_norm_",
    "load_pretrained_weights",
    "check_checkpoint",
    "check_hf_checkpoint",
    "load_balancing_loss",
    "expert_state",
    "gather_hf_state_dict",
    "export_pretrained",
    "MESH_DIMS",
]

MESH_DIMS = ("dp", "ep", "esp")
#: ExpertParallel parameter -> the MoELayer key the state-dict adapters know
_EP_TO_LAYER = {"w_in": "experts.w_in", "w_out": "experts.w_out"}


@dataclass
class ParallelLayout:
    """Where this rank sits: degrees, coordinates and the process groups built for it."""

    dp: int
    ep: int
    esp: int
    dp_rank: int
    ep_rank: int
    esp_rank: int
    expert_group: object = None  # the (ep, esp) sub-mesh: an ExpertParallel's group
    dp_group: object = None  # replicas of this rank's expert shard
    timeout_s: float = 120.0
    layers: list[str] = field(default_factory=list)  # paths of the ExpertParallel modules
    checkpoint_bytes_read: int = 0  # tensor bytes this rank read from ``checkpoint``
    checkpoint: str | None = None  # the ``checkpoint`` the weights came from (an input)
    dense: str = "fsdp"  # "fsdp" or "replicate" (see parallelize)
    topology: Topology | None = None  # the expert group's node layout
    schedule: str | None = None  # a Parm schedule (MP group = ESP group), or None
    aux_loss: str = "local"  # "local" or "global" (see parallelize)

    @property
    def world(self) -> int:
        return self.dp * self.ep * self.esp


def _mesh_layout(mesh) -> tuple[dict[str, int], dict[str, int], list[int], list[int]]:
    """Sizes and coordinates per dimension, the ranks of this rank's (ep, esp) sub-mesh and
    of its dp replicas. Raises DistributedConfigError for a mesh that does not fit."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise DistributedConfigError(f"mesh must be a torch DeviceMesh, got {type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if "ep" not in names or any(n not in MESH_DIMS for n in names) or len(set(names)) != len(names):
        raise DistributedConfigError(
            f"mesh_dim_names={names}: need 'ep' and optionally 'dp' and 'esp' (each once)"
        )
    order = [n for n in MESH_DIMS if n in names]
    if list(names) != order:
        raise DistributedConfigError(f"mesh_dim_names={names} must be in the order {tuple(order)}")
    world = dist.get_world_size()
    if mesh.size() != world:
        raise DistributedConfigError(
            f"the mesh has {mesh.size()} ranks {tuple(mesh.shape)} but "
            f"the world has {world}: the mesh must cover the world"
        )
    coord = mesh.get_coordinate()
    if coord is None:
        raise DistributedConfigError(f"rank {dist.get_rank()} is not in the mesh")
    sizes = {n: 1 for n in MESH_DIMS}
    pos = {n: 0 for n in MESH_DIMS}
    for i, n in enumerate(names):
        sizes[n], pos[n] = int(mesh.shape[i]), int(coord[i])
    grid = mesh.mesh.reshape(sizes["dp"], sizes["ep"], sizes["esp"])
    expert_ranks = [int(r) for r in grid[pos["dp"]].reshape(-1)]
    dp_ranks = [int(r) for r in grid[:, pos["ep"], pos["esp"]]]
    return sizes, pos, expert_ranks, dp_ranks


def expert_topology(world_topology: Topology | None, expert_ranks: list[int], S: int) -> Topology:
    """The node layout of an expert group (global ranks ``expert_ranks`` in group order)
    from the world's (``None``: :meth:`Topology.from_env`). The group must be node-major with
    the same number of ranks on every node it spans, a multiple of the ESP size ``S``.
    Raises DistributedConfigError otherwise; communicates nothing."""
    world = dist.get_world_size()
    if world_topology is None:
        world_topology = Topology.from_env()
    if not isinstance(world_topology, Topology):
        raise DistributedConfigError(
            f"topology must be a moeflow.comm.Topology, got {type(world_topology).__name__}"
        )
    if world_topology.world_size != world:
        raise DistributedConfigError(
            f"topology.world_size={world_topology.world_size} but the world has {world} "
            "ranks: the topology describes the whole world"
        )
    nodes = [world_topology.node_of(r) for r in expert_ranks]
    k = nodes.count(nodes[0])
    blocks = [nodes[i : i + k] for i in range(0, len(nodes), k)]
    if (
        len(nodes) % k
        or any(len(set(b)) != 1 or len(b) != k for b in blocks)
        or len({b[0] for b in blocks}) != len(blocks)
    ):
        raise DistributedConfigError(
            f"the expert group {expert_ranks} lies on nodes {nodes} "
            f"({world_topology.ranks_per_node} ranks per node): it must be node-major with "
            "the same number of ranks on each node"
        )
    if k % S:
        raise DistributedConfigError(
            f"the mesh's esp={S} must divide the expert group's ranks per node ({k}): "
            "an ESP group lives inside one node"
        )
    return Topology.explicit(len(expert_ranks), k)


def check_dispatcher(dispatcher: str, esp: int) -> str:
    """The dispatcher's registered name (aliases resolved), checked against the ESP size
    before any communication: ``"dedup"`` (HierMoE) sends tokens, copied to whole experts
    after crossing, so it takes no ESP slicing. Raises ConfigError."""
    from moeflow.parallel.dispatch import dispatcher_class

    name = dispatcher_class(dispatcher).name
    if name == "dedup" and esp > 1:
        raise ConfigError(
            "dispatcher",
            dispatcher,
            f"a row dispatcher ('a2a', 'capacity', 'hierarchical') with esp={esp}: 'dedup' "
            "copies tokens to whole experts after crossing (esp must be 1)",
        )
    return name


def _check_schedule(schedule: str | None, S: int) -> str | None:
    """A Parm schedule's role name, checked before any communication (ConfigError)."""
    if schedule is None:
        return None
    from moeflow.parallel.mp_schedule import SCHEDULE_ALIASES, SCHEDULES, canonical_schedule

    name = canonical_schedule(schedule)
    if name not in SCHEDULES:
        raise ConfigError("schedule", schedule, f"one of {SCHEDULES} (aliases: {SCHEDULE_ALIASES})")
    if S == 1:
        raise ConfigError(
            "schedule",
            schedule,
            "None unless the mesh has an 'esp' dimension > 1 (Parm's model-parallel group "
            "is the ESP group)",
        )
    return name


def _moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
    if isinstance(model, MoELayer):
        raise ConfigError(
            "model",
            "a MoELayer",
            "a model that contains MoE layers (wrap a single layer with ExpertParallel)",
        )
    if not found:
        raise ConfigError(
            "model",
            type(model).__name__,
            "a model with moeflow MoE layers (patch transformers models with "
            "moeflow.integrations.patch_model first)",
        )
    return found


def _hf_key(layer_path: str, adapter, ours: str) -> list[str]:
    """transformers' in-memory key(s) of the layer tensor ``ours`` (moeflow's name)."""
    if adapter is None:
        return [f"{layer_path}.{ours}"]
    for rule in adapter.rules:
        if rule.ours == ours:
            return [f"{layer_path}.{k}" for k in rule.theirs]
    return [f"{layer_path}.{ours}"]


def _check_checkpoint(
    ckpt: SafetensorsCheckpoint, model: nn.Module, layers: list[tuple[str, MoELayer]]
) -> None:
    """Every tensor the model needs is in the checkpoint (the experts in any layout), with the
    shape the model has (InputError / CorruptDataError naming them otherwise)."""
    missing: list[str] = []
    wrong: list[str] = []
    adapters = {p: m.__dict__.get("hf_state_dict_adapter") for p, m in layers}
    for path, layer in layers:
        adapter = layer.__dict__.get("hf_state_dict_adapter")
        prefix = _hf_key(path, adapter, "experts.w_in")[0].rpartition(".")[0] + "."
        gated = layer.cfg.expert_type == "swiglu"
        missing += ckpt.missing_experts(prefix, layer.cfg.num_experts, gated)
        w_in, w_out = layer.experts.w_in, layer.experts.w_out
        wrong += ckpt.expert_shape_errors(
            prefix, layer.cfg.num_experts, gated, tuple(w_in.shape), tuple(w_out.shape)
        )
    for name, shape in _dense_keys(model, adapters):
        found = ckpt.resolve(name)
        if found is None:
            missing.append(name)
        elif ckpt.shape(found) != shape:
            wrong.append(f"{found} is {ckpt.shape(found)}, the model needs {shape}")
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise InputError(
            f"checkpoint {ckpt.path!r} lacks {len(missing)} tensor(s) the model "
            f"needs: {missing[:8]}{more}"
        )
    if wrong:
        more = f" (+{len(wrong) - 4} more)" if len(wrong) > 4 else ""
        raise CorruptDataError(
            f"checkpoint {ckpt.path!r}: tensor shapes disagree with its config: "
            f"{'; '.join(wrong[:4])}{more}"
        )


def check_hf_checkpoint(path: str, what: str = "--model"):
    """Check a transformers checkpoint directory before any rank starts, reading no weight:
    ``config.json`` (:func:`~moeflow.checkpoint.shards.read_config`), a model built from it on
    the meta device and patched, and every tensor that model needs in the safetensors files
    with its shape (:func:`check_checkpoint`). Returns the transformers config. Raises
    InputError / CorruptDataError / UnsupportedModelError naming the file (``what`` names
    the flag in the messages)."""
    from moeflow._deps import require
    from moeflow.checkpoint.shards import read_config
    from moeflow.errors import MoeflowError, UnsupportedModelError
    from moeflow.integrations import patch_model

    transformers = require("transformers", f"{what} (a transformers checkpoint directory)")
    path = os.fspath(path)
    doc = read_config(path)
    file = os.path.join(path, "config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        if "model_type" in str(e) or "Unrecognized" in str(e):
            raise UnsupportedModelError(
                f"{file}: model_type={doc.get('model_type')!r} is not a transformers model "
                "this installation knows"
            ) from None
        raise CorruptDataError(f"{file}: {' '.join(str(e).split())[:200]}") from None
    except (TypeError, AttributeError, OSError) as e:
        raise CorruptDataError(f"{file}: {' '.join(str(e).split())[:200]}") from None
    try:
        with torch.device("meta"):
            model = patch_model(transformers.AutoModelForCausalLM.from_config(config))
    except MoeflowError:
        raise
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(
            f"{file}: not a causal LM transformers can build ({' '.join(str(e).split())[:200]})"
        ) from None
    except (TypeError, AttributeError, RuntimeError, ZeroDivisionError) as e:
        raise CorruptDataError(
            f"{file}: a field has a wrong value ({' '.join(str(e).split())[:200]})"
        ) from None
    check_checkpoint(model, path)
    return config


def check_checkpoint(model: nn.Module, checkpoint: str) -> None:
    """Check, without reading any tensor, that ``checkpoint`` (a safetensors file or a
    transformers directory) holds every tensor of ``model`` (a patched model, e.g. on the meta
    device) with its shape, as :func:`parallelize` does before loading; a launcher calls it
    before starting ranks. Raises InputError / CorruptDataError naming the file or tensor."""
    _check_checkpoint(SafetensorsCheckpoint(checkpoint), model, _moe_layers(model))


def _dense_keys(model: nn.Module, adapters: dict) -> list[tuple[str, tuple[int, ...]]]:
    """transformers' keys of every persistent tensor outside the expert weights (tied
    parameters once, under their first name) with the shape each must have (a tensor held as
    n parts along dim 0 gives each part 1/n of its rows); ``adapters``: MoE layer path -> its
    adapter."""
    keys, seen = [], set()
    for name, t in named_tensors(model):
        if id(t) in seen:
            continue
        seen.add(id(t))
        owner = next((p for p in adapters if name.startswith(p + ".")), None)
        if owner is None:
            parts = [name]
        else:
            rel = name[len(owner) + 1 :]
            if rel in ("experts.w_in", "experts.w_out", *_EP_TO_LAYER):
                continue
            parts = _hf_key(owner, adapters[owner], rel)
        shape = tuple(t.shape)
        if len(parts) > 1 and shape:
            shape = (shape[0] // len(parts), *shape[1:])
        keys += [(k, shape) for k in parts]
    return keys


def named_tensors(model: nn.Module):
    """Parameters and persistent buffers with their module paths (duplicates included)."""
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        pre = f"{mod_name}." if mod_name else ""
        for n, p in mod._parameters.items():
            if p is not None:
                yield pre + n, p
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                yield pre + n, b


def _relink_view(ep: ExpertParallel) -> None:
    """Point a patched layer's transformers view (``hf_view``) at the ExpertParallel module,
    so it no longer holds the full layer and its expert aliases read the local slices."""
    view = ep._modules.get("hf_view")
    if view is None:
        return
    for m in view.modules():
        if "_moeflow_layer" in m.__dict__:
            m.__dict__["_moeflow_layer"] = ep
            links = m.__dict__.get("_moeflow_links") or {}
            m.__dict__["_moeflow_links"] = {
                attr: (ours[len("experts.") :] if ours.startswith("experts.") else ours, i, n)
                for attr, (ours, i, n) in links.items()
            }


def parallelize(
    model: nn.Module,
    mesh,
    *,
    dispatcher: str = "a2a",
    r_fwd: int = 1,
    r_bwd: int = 1,
    plan=None,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    timeout_s: float | None = None,
    kernel: str | None = None,
    compress=False,
    dense: str = "fsdp",
    topology: Topology | None = None,
    schedule: str | None = None,
    parm_cluster=None,
    aux_loss: str = "local",
) -> nn.Module:
    """Make every MoE layer of ``model`` expert parallel over ``mesh``; returns ``model``.

    Args:
        model: a model holding :class:`moeflow.MoELayer` modules, on a real device or on the
            meta device (then ``checkpoint`` is required and only this rank's share is ever
            allocated).
        mesh: a ``DeviceMesh`` over the whole world with dimensions named from
            ``("dp", "ep", "esp")`` in that order, ``ep`` required.
        dispatcher, r_fwd, r_bwd, plan, timeout_s, kernel, compress: as
            :class:`~moeflow.parallel.ExpertParallel` (``plan`` is read per layer index).
        checkpoint: a safetensors file or a transformers checkpoint directory; every rank
            reads the dense tensors and only its own expert slices.
        device: where a meta model is allocated.
        dense: how the dense parts are data parallel over the world: ``"fsdp"`` (default;
            PyTorch FSDP2 ``fully_shard`` on each block of a ``ModuleList`` and on the root,
            expert slices ignored: parameters sharded over the world, gradients
            reduce-scattered by FSDP; it runs on gloo) or ``"replicate"`` (every rank holds
            them; :func:`sync_gradients` all-reduces their gradients in flat buckets, DDP's
            algorithm).
        topology: the world's node layout (a :class:`~moeflow.comm.Topology` over all
            ranks, e.g. ``Topology.explicit(world, ranks_per_node)`` to declare loopback
            ranks as nodes); default ``Topology.from_env()`` (``LOCAL_WORLD_SIZE`` /
            ``MOEFLOW_RANKS_PER_NODE``, else one node). The expert group's topology follows
            from the mesh: its ranks must be node-major (the same number on each node it
            spans), and ``esp`` must divide that number (an ESP group lives in one node).
            Node-level dispatchers (``"hierarchical"``, ``"dedup"``) and Parm's schedules
            use it.
        schedule, parm_cluster: a Parm schedule (``"plain"``, ``"split_tokens"``,
            ``"split_rows"``, ``"auto"``; ``"s1"`` / ``"s2"``), with the mesh's ``esp``
            sub-group as the model-parallel group: the ranks of one ESP group then feed the
            *same* tokens (Parm, INFOCOM'24). None (default): every rank its own tokens.
            Needs ``esp`` > 1.
        aux_loss: ``"local"`` (default: each rank's routers compute the load-balancing and
            z-losses on its own batch) or ``"global"`` (over the whole batch of the world,
            statistics all-reduced: :func:`moeflow.parallel.aux_loss.use_global_aux_loss`).

    The layout is stored as ``model.moeflow_layout`` (:class:`ParallelLayout`). After
    ``backward`` call :func:`sync_gradients`.

    Raises (all before any communication): DistributedConfigError (mesh not over the world,
    unknown dimension names, experts not divisible by ``ep``, FFN not divisible by ``esp``),
    ConfigError (no MoE layer; a meta model without ``checkpoint``), InputError (the
    checkpoint lacks tensors, expert weights included).
    """
    if not dist.is_initialized():
        raise DistributedConfigError(
            "torch.distributed is not initialised: call init_process_group first"
        )
    if dense not in ("replicate", "fsdp"):
        raise ConfigError("dense", dense, "'replicate' or 'fsdp'")
    from moeflow.parallel.aux_loss import check_aux_loss

    aux_loss = check_aux_loss(aux_loss, schedule)
    sizes, pos, expert_ranks, dp_ranks = _mesh_layout(mesh)
    layers = _moe_layers(model)
    P, S = sizes["ep"], sizes["esp"]
    expert_topo = expert_topology(topology, expert_ranks, S)
    schedule = _check_schedule(schedule, S)
    check_dispatcher(dispatcher, S)
    for path, layer in layers:
        cfg = layer.cfg
        if cfg.num_experts % P:
            raise DistributedConfigError(
                f"{path}: num_experts={cfg.num_experts} is not divisible by the mesh's ep={P}"
            )
        if cfg.ffn_hidden_size % S:
            raise DistributedConfigError(
                f"{path}: ffn_hidden_size={cfg.ffn_hidden_size} is not divisible by the "
                f"mesh's esp={S}"
            )
    on_meta = any(t.is_meta for _, t in named_tensors(model))
    if on_meta and checkpoint is None:
        raise ConfigError(
            "checkpoint",
            None,
            "a checkpoint path: the model is on the meta "
            "device and its weights must come from somewhere",
        )
    ckpt = SafetensorsCheckpoint(checkpoint) if checkpoint is not None else None
    if ckpt is not None:
        _check_checkpoint(ckpt, model, layers)

    # -- communication starts here ---------------------------------------------------------
    t = resolve_timeout(timeout_s)
    layout = ParallelLayout(
        dp=sizes["dp"],
        ep=P,
        esp=S,
        dp_rank=pos["dp"],
        ep_rank=pos["ep"],
        esp_rank=pos["esp"],
        timeout_s=t,
    )
    # local-synchronisation sub-groups: each is made by its members only
    layout.expert_group = subgroup(None, expert_ranks, t)
    layout.dp_group = subgroup(None, dp_ranks, t) if len(dp_ranks) > 1 else None
    layout.topology = expert_topo
    layout.schedule = schedule
    mp_group = None
    if schedule is not None:  # Parm: the MP group is this rank's ESP group
        p = pos["ep"]
        mp_group = subgroup(None, expert_ranks[p * S : (p + 1) * S], t)
    for i, (path, layer) in enumerate(layers):
        adapter = layer.__dict__.get("hf_state_dict_adapter")
        ep = ExpertParallel(
            layer,
            group=layout.expert_group,
            topology=expert_topo,
            dispatcher=dispatcher,
            esp_size=S,
            r_fwd=r_fwd,
            r_bwd=r_bwd,
            plan=plan,
            layer_index=i,
            timeout_s=t,
            kernel=kernel,
            compress=compress,
            mp_group=mp_group,
            schedule=schedule or "plain",
            parm_cluster=parm_cluster,
        )
        ep.hf_adapter = adapter
        ep.layer_path = path
        _relink_view(ep)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, ep)
        layout.layers.append(path)
    del layers  # the full layers (and, off meta, their expert weights) can go now
    if on_meta:
        model.to_empty(device=device)
        _init_non_persistent(model)
    if ckpt is not None:
        with ckpt:
            layout.checkpoint_bytes_read = load_pretrained_weights(model, ckpt)
        layout.checkpoint = str(checkpoint)
    layout.dense = dense
    if aux_loss == "global":  # distinct batches: the whole world (EP x DP)
        from moeflow.parallel.aux_loss import use_global_aux_loss

        use_global_aux_loss(model, None, t)
    layout.aux_loss = aux_loss
    if dense == "fsdp":
        _fully_shard_dense(model, t)
    model.moeflow_layout = layout
    return model


def _fully_shard_dense(model: nn.Module, timeout_s: float) -> None:
    """FSDP2 over the whole world for everything but the expert slices: each block of a
    ``ModuleList`` that holds an ExpertParallel is one FSDP unit (its parameters gathered for
    its forward only), the root takes the rest (embeddings, final norm, head)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    dense_mesh = DeviceMesh("cpu", torch.arange(world), mesh_dim_names=("dense",))
    experts = {
        p for m in model.modules() if isinstance(m, ExpertParallel) for p in m.expert_parameters()
    }
    for m in list(model.modules()):
        if isinstance(m, nn.ModuleList):
            for block in m:
                if any(isinstance(x, ExpertParallel) for x in block.modules()):
                    fully_shard(
                        block,
                        mesh=dense_mesh,
                        ignored_params={p for p in block.parameters() if p in experts},
                    )
    fully_shard(model, mesh=dense_mesh, ignored_params=experts)


def _init_non_persistent(model: nn.Module) -> None:
    """Recompute buffers no checkpoint holds (rotary ``inv_freq``) after ``to_empty``, with
    the model's own initialiser (transformers' ``_init_weights`` rebuilds them)."""
    init = getattr(model, "_init_weights", None)
    for m in model.modules():
        if m._non_persistent_buffers_set and init is not None:
            init(m)


@torch.no_grad()
def load_pretrained_weights(model: nn.Module, ckpt) -> int:
    """Fill a parallelized model from ``ckpt`` (a path or a :class:`SafetensorsCheckpoint`):
    dense tensors whole, each ExpertParallel's expert range x FFN slice only. Returns the
    bytes read."""
    if not isinstance(ckpt, SafetensorsCheckpoint):
        with SafetensorsCheckpoint(ckpt) as c:
            return load_pretrained_weights(model, c)
    eps = {p: m for p, m in model.named_modules() if isinstance(m, ExpertParallel)}
    paths = list(eps)
    before = ckpt.bytes_read
    for path, ep in eps.items():
        adapter = ep.__dict__.get("hf_adapter")
        prefix = _hf_key(path, adapter, "experts.w_in")[0].rpartition(".")[0] + "."
        (e0, e1), (f0, f1) = ep.expert_range, ep.ffn_slice
        ckpt.read_experts_into(prefix, e0, e1, f0, f1, ep.gated, ep.w_in, ep.w_out)
    done = set()
    for name, t in named_tensors(model):
        if id(t) in done:
            continue
        owner = next((p for p in paths if name.startswith(p + ".")), None)
        if owner is not None:
            rel = name[len(owner) + 1 :]
            if rel in _EP_TO_LAYER:
                continue
            keys = _hf_key(owner, eps[owner].__dict__.get("hf_adapter"), rel)
        else:
            keys = [name]
        found = [ckpt.resolve(k) for k in keys]
        if any(k is None for k in found):
            raise InputError(f"checkpoint {ckpt.path!r} has no tensor {keys} for {name}")
        parts = [ckpt.read(k) for k in found]
        t.copy_(parts[0] if len(parts) == 1 else torch.cat(parts, dim=0))
        done.add(id(t))
    return ckpt.bytes_read - before


def expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's expert slices keyed by ``<layer path>.w_in@ep{p}of{P}.esp{s}of{S}``: names
    unique to the shard (replicas over ``dp`` share them), as a sharded checkpoint needs, and
    naming the layout, so another layout finds no key instead of a wrongly shaped one."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, ExpertParallel):
            tag = f"@ep{m.ep_rank}of{m.ep_size}.esp{m.esp_rank}of{m.esp_size}"
            out[f"{path}.w_in{tag}"] = m.w_in
            out[f"{path}.w_out{tag}"] = m.w_out
    return out


@torch.no_grad()
def gather_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict in transformers' in-memory keys and layouts, experts
    gathered from every rank (collective: every rank of each expert group calls it)."""
    sd: dict[str, torch.Tensor] = {}
    eps = {p: m for p, m in model.named_modules() if isinstance(m, ExpertParallel)}
    for name, t in named_tensors(model):
        owner = next((p for p in eps if name.startswith(p + ".")), None)
        if owner is None:
            sd[name] = _full(t.detach())
    for path, ep in eps.items():
        w_in, w_out = ep.full_expert_weights()
        block = {"experts.w_in": w_in, "experts.w_out": w_out}
        for name, t in ep.named_parameters():
            if name not in _EP_TO_LAYER:
                block[name] = _full(t.detach())
        for name, t in ep.named_buffers():
            block[name] = _full(t.detach())
        adapter = ep.__dict__.get("hf_adapter")
        if adapter is not None:
            block = adapter.to_hf(block)
        sd.update({f"{path}.{k}": v for k, v in block.items()})
    return sd


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a DTensor; collective), else ``t``."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if full_tensor is not None else t


def export_pretrained(
    model: nn.Module, out_dir: str, *, rank0_only: bool = True, overwrite: bool = False
) -> None:
    """Save a parallelized transformers model as a transformers checkpoint directory
    (``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it, patched or not).

    Collective: every rank gathers the experts; rank 0 builds the unpatched transformers
    model from ``model.config``, loads the gathered state dict strictly and writes it with
    ``save_pretrained`` (transformers' own on-disk layout) into a temporary directory that
    then replaces ``out_dir`` as a whole.

    Before any gathering, ``out_dir`` is checked (:func:`moeflow.files.check_output`): the
    checkpoint the model was loaded from (or a directory that holds it) and a path that is
    not a directory are refused, and an existing directory is replaced only with
    ``overwrite``. Rank 0 checks; every rank raises InputError when it refuses."""
    from moeflow.files import atomic_dir, check_output

    writer = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    layout = getattr(model, "moeflow_layout", None)
    cfg = getattr(model, "config", None)
    inputs = [getattr(layout, "checkpoint", None), getattr(cfg, "_name_or_path", None) or None]
    refused = None
    if writer:
        try:
            check_output("out_dir", out_dir, inputs=inputs, force=overwrite, directory=True)
        except InputError as e:
            refused = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        from moeflow.comm.collectives import all_reduce

        on_gpu = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
        flag = torch.tensor([1.0 if refused is not None else 0.0], device=device)
        timeout = getattr(layout, "timeout_s", None) or resolve_timeout(None)
        all_reduce(flag, None, "export path check", timeout, reduce_op=dist.ReduceOp.MAX)
        if flag.item() > 0 and refused is None:
            raise InputError(f"export: out_dir {str(out_dir)!r} was refused on rank 0")
    if refused is not None:
        raise refused
    sd = gather_hf_state_dict(model)
    if rank0_only and dist.get_rank() != 0:
        return
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(
            "model", type(model).__name__, "a transformers model (with .config) to export"
        )
    import transformers

    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    hf.load_state_dict(sd, strict=False, assign=True)
    missing = [n for n, t in named_tensors(hf) if t.is_meta]
    if missing:
        raise InputError(f"export: the gathered state dict lacks {missing[:8]}")
    hf.tie_weights()
    _init_non_persistent_meta(hf)
    with atomic_dir(out_dir, force=overwrite) as tmp:
        hf.save_pretrained(tmp)


def _init_non_persistent_meta(model: nn.Module) -> None:
    """Allocate and recompute non-persistent buffers left on the meta device."""
    for m in model.modules():
        for n in list(m._non_persistent_buffers_set):
            b = m._buffers.get(n)
            if b is not None and b.is_meta:
                m._buffers[n] = torch.empty_like(b, device="cpu")
    _init_non_persistent(model)


def load_balancing_loss(
    router_logits,
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    group=None,
) -> torch.Tensor:
    """This rank's share of the load-balancing loss of the *global* batch, from transformers'
    ``outputs.router_logits`` (one ``[tokens, E]`` tensor per MoE layer).

    The Switch Transformer loss (Fedus et al., JMLR'22, Eq. 4-6) as transformers computes it,
    ``E * sum_e f_e P_e`` with ``f`` the top-k assignment frequency and ``P`` the mean router
    probability, both over all layers' rows; here ``f`` and the row count are all-reduced over
    ``group`` (the world by default), so the mean of the ranks' values is the global-batch
    loss and, after :func:`sync_gradients` (``op="mean"``), so is the gradient: the
    single-process value for any split of the batch. Use it in place of ``outputs.aux_loss``
    (which is the local batch's)::

        loss = out.loss + coef * (load_balancing_loss(out.router_logits, E, k) - out.aux_loss)
    """
    from moeflow.comm.collectives import all_reduce

    counts = torch.zeros(num_experts, dtype=torch.float64)
    prob_sum = None
    rows = torch.zeros((), dtype=torch.float64)
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        _, chosen = torch.topk(probs, top_k, dim=-1)
        w = torch.ones(chosen.shape[0]) if mask is None else mask.to(probs.device)
        counts += torch.zeros(num_experts, dtype=torch.float64).scatter_add_(
            0, chosen.reshape(-1).cpu(), w.cpu().double().repeat_interleave(top_k)
        )
        p = (probs * w.unsqueeze(-1)).sum(0)
        prob_sum = p if prob_sum is None else prob_sum + p
        rows += w.double().sum().cpu()
    if prob_sum is None:
        raise InputError("router_logits is empty: run the model with output_router_logits=True")
    stats = torch.cat([counts, rows.reshape(1)])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        all_reduce(stats, group, "load-balancing statistics all-reduce", resolve_timeout(None))
    W = dist.get_world_size(group) if dist.is_initialized() else 1
    f_E = (stats[:-1] / stats[-1]).to(prob_sum.dtype).to(prob_sum.device)
    return num_experts * W * torch.sum(f_E * prob_sum) / stats[-1].item()
