"""The operator graph of a model (FusionLLM's OP-DAG) from ``torch.fx``, and its pipeline stages.

FusionLLM (Tang et al., "FusionLLM: A Decentralized LLM Training System on Geo-distributed GPUs
with Adaptive Compression", 2024) treats the model as a DAG of operators, partitions it over
devices and sends only the tensors that cross each cut. Here:

- :func:`trace` turns a training module (``forward(*inputs) -> loss``) into an fx graph and
  measures it once on example inputs: each node's forward FLOPs (``FlopCounterMode``), the
  bytes of its output, and the bytes of the parameters it uses. The result,
  :class:`Traced`, carries the pure :class:`moeflow.plan.geo.OpGraph` the planner partitions.
- :meth:`Traced.split` cuts the graph at the planner's ``bounds`` into :class:`Stage` modules.
  Stage ``s`` receives exactly ``ops.cut_tensors(bounds[s])`` and sends exactly
  ``ops.cut_tensors(bounds[s + 1])``; a tensor needed two stages later passes through the
  stage in between. So the bytes the planner charges to a link are the bytes the runtime sends.

How fx nodes become OpGraph nodes (our derivation):

- Every placeholder, computing node and the output node is one OpNode, in graph order:
  placeholders first (zero FLOPs; a partition keeps them all in stage 0), ``"output"`` last
  (zero FLOPs and bytes; the values the model returns reach the last stage like any other).
  A node whose output is a view of an input gets ``act_bytes=0``: it holds no new memory.
- ``get_attr`` nodes (parameters, buffers) are folded into their users: each stage that reads
  an attribute gets its own ``get_attr``. A parameter's bytes count at its first user only.
- A node that returns a tuple (a leaf module returning ``(y, aux)``, ``unbind``) is one OpNode
  together with the ``getitem`` nodes that unpack it; when it crosses a cut, the unpacked
  tensors cross (dict keys are the ``getitem`` nodes' names) and its ``out_bytes`` is their sum.
  All of them cross even if a later stage needs only one (``q, k, v = qkv.unbind()`` cut
  between the uses of ``q`` and ``k``): the planner is charged for what is sent, and sees such
  cuts as dear. Other uses of a tuple value are refused (:class:`~moeflow.errors.InputError`).
- Values computed from tensor metadata only (``x.shape``, ``x.size(-1)``, ``x.device`` and
  arithmetic on them) are replaced by their value on the example inputs, so only tensors cross
  cuts. The graph is therefore specialised to the example inputs' shapes, dtypes and devices:
  feed it micro-batches of the example's shape. A non-tensor value that depends on tensor
  *data* (``x.item()``) cannot be specialised and is refused.

Stage splitting builds one new fx ``Graph`` per stage rather than using
``torch.fx.passes.split_module``: ``split_module`` wires a value straight from its producer's
submodule to every later submodule that reads it (and every model input to every submodule
that uses it), while a pipeline stage may only talk to its neighbours; here a value needed two
stages later is an output of the stage in between, so what crosses each link is exactly
``cut_tensors``.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from moeflow.errors import ConfigError, InputError, PlanError
from moeflow.plan.geo import OpGraph, OpNode
from moeflow.validate import is_int

OUTPUT = "output"  # the key under which the last stage returns the model's output

# calls whose result is tensor metadata, never tensor data
_META_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "element_size"})
_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``torch._grouped_mm``: every row of the grouped dimension meets one group's matrix."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # (N, K) rows by group @ (E, K, O)
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # (O, N) @ (N, I), N split by group
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # (E, M, K) @ (K, N), N split by group
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]  # batched


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


#: forward formulas torch's FlopCounterMode lacks: the grouped GEMM of the MoE experts and
#: the CPU flash-attention kernel behind ``F.scaled_dot_product_attention``
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._grouped_mm: _grouped_mm_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
}


def flop_counter() -> FlopCounterMode:
    """torch's ``FlopCounterMode`` (silent) with :data:`EXTRA_FLOP_FORMULAS`: the counter
    :func:`trace` measures nodes with."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _has_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (tuple, list)):
        return any(_has_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    return False


def _constant(v):
    """A metadata value as an fx-printable constant (``torch.Size`` becomes a tuple)."""
    if isinstance(v, torch.Size):
        return tuple(int(s) for s in v)
    if isinstance(v, (tuple, list)):
        return type(v)(_constant(x) for x in v)
    return v


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_modules

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


class _Measure(fx.Interpreter):
    """One forward pass that records each node's FLOPs, tensor bytes and non-tensor values.

    With ``fake`` (a ``FakeTensorMode``) the pass runs on fake tensors: shapes, dtypes and
    storages without data or arithmetic; parameters and buffers are faked as they are read."""

    def __init__(self, gm: fx.GraphModule, fake=None):
        super().__init__(gm)
        self.fake = fake
        self.flops: dict[fx.Node, int] = {}
        self.nbytes: dict[fx.Node, int] = {}  # tensor-valued nodes
        self.kind: dict[fx.Node, str] = {}  # "tensor" | "tuple" | "other"
        self.value: dict[fx.Node, object] = {}  # non-tensor values
        self.views: set[fx.Node] = set()  # outputs that share an input's storage

    def fetch_attr(self, target: str):
        v = super().fetch_attr(target)
        if self.fake is not None and isinstance(v, torch.Tensor):
            return self.fake.from_tensor(v)  # memoised: one fake per parameter
        return v

    def run_node(self, n: fx.Node):
        with flop_counter() as counter:
            out = super().run_node(n)
        self.flops[n] = counter.get_total_flops()
        if n.op != "placeholder" and _is_view(out, self._inputs_of(n)):
            self.views.add(n)
        if isinstance(out, torch.Tensor):
            self.kind[n] = "tensor"
            self.nbytes[n] = _tensor_bytes(out)
        elif _has_tensor(out):
            self.kind[n] = "tuple"
        else:
            self.kind[n] = "other"
            self.value[n] = out
        return out

    def _inputs_of(self, n: fx.Node) -> list[torch.Tensor]:
        out = []
        for a in n.all_input_nodes:
            v = self.env.get(a)
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif isinstance(v, (tuple, list)):
                out.extend(x for x in v if isinstance(x, torch.Tensor))
        return out


def _is_view(out, inputs: list[torch.Tensor]) -> bool:
    """Every tensor of ``out`` lives in the storage of one of ``inputs`` (a view or getitem:
    no new memory)."""
    tensors = [out] if isinstance(out, torch.Tensor) else list(out) if _has_tensor(out) else []
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not tensors or not inputs:
        return False
    # the storage object itself, not its data pointer: meta and fake tensors have none
    storages = {t.untyped_storage()._cdata for t in inputs}
    return all(t.untyped_storage()._cdata in storages for t in tensors)


def _is_meta(n: fx.Node, meta: set[fx.Node]) -> bool:
    """``n``'s non-tensor value is a function of tensor metadata (and constants) only."""
    if n.op == "call_method" and n.target in _META_METHODS:
        return True
    if (
        n.op == "call_function"
        and n.target is getattr
        and len(n.args) == 2
        and n.args[1] in _META_ATTRS
    ):
        return True
    if n.op not in ("call_function", "call_method"):
        return False
    return all(a in meta for a in n.all_input_nodes)


@dataclass
class _Unit:
    """One OpGraph node: its fx node, the getitem nodes folded into it, and what crosses a cut
    when it does (node names)."""

    node: fx.Node
    getitems: list[fx.Node]
    carried: list[str]


def _take(values: dict, names: tuple[str, ...], stage: int) -> tuple:
    """A stage's inputs from the dict it is given; names the missing ones."""
    if not isinstance(values, dict):
        raise InputError(f"stage {stage} expects a dict of tensors, got {type(values).__name__}")
    missing = [n for n in names if n not in values]
    if missing:
        raise InputError(f"stage {stage} is missing inputs {missing} (it needs {list(names)})")
    return tuple(values[n] for n in names)


class Stage(fx.GraphModule):
    """Stage ``index`` of a partition: ``stage(values) -> dict``.

    ``values`` maps fx node names to tensors and must hold every name of ``input_names``
    (stage 0: the model's inputs by placeholder name; stage ``s > 0``: what stage ``s - 1``
    returned). The result maps ``output_names`` to tensors: the cut tensors at the stage's end,
    or ``{"output": <model output>}`` for the last stage. Its parameters are the original
    model's parameter objects that its nodes use, under the original names, so
    ``stage.state_dict()`` loads into the original model (``strict=False``).
    """

    def __init__(
        self,
        root: nn.Module,
        graph: fx.Graph,
        *,
        index: int,
        input_names: list[str],
        output_names: list[str],
    ):
        super().__init__(root, graph, class_name=f"Stage{index}")
        self.index = index
        self.input_names = list(input_names)
        self.output_names = list(output_names)


class Traced:
    """A traced training module: ``gm`` (shares parameters with ``model``), the ``ops`` graph
    the planner partitions, and ``node_names[i]``, the fx node of OpGraph node ``i``.

    ``input_names`` are the model's inputs (placeholders, OpGraph nodes ``0..len-1``); a
    partition must keep them all in stage 0 (``bounds[1] >= len(input_names)``).
    """

    def __init__(self, model: nn.Module, gm: fx.GraphModule, ops: OpGraph, units: list[_Unit]):
        self.model = model
        self.gm = gm
        self.ops = ops
        self._units = units
        self.node_names = [u.node.name for u in units]
        self.input_names = [u.node.name for u in units if u.node.op == "placeholder"]

    def carried(self, i: int) -> list[str]:
        """The names of the tensors that cross a cut when OpGraph node ``i``'s output does
        (the node itself, or the unpacked elements of a tuple)."""
        return list(self._units[i].carried)

    def cut_names(self, i: int) -> list[str]:
        """Names of the tensors that cross a cut before OpGraph node ``i``."""
        return [name for p in self.ops.cut_tensors(i) for name in self._units[p].carried]

    def _check_bounds(self, bounds) -> tuple[int, ...]:
        n = len(self._units)
        b = tuple(bounds) if isinstance(bounds, Sequence) else None
        ok = (
            b is not None
            and len(b) >= 2
            and all(is_int(x) for x in b)
            and b[0] == 0
            and b[-1] == n
            and all(x < y for x, y in zip(b, b[1:]))
        )
        if not ok:
            raise ConfigError(
                "bounds", bounds, f"strictly increasing ints from 0 to the graph's {n} nodes"
            )
        b = tuple(int(x) for x in b)
        if b[1] < len(self.input_names):
            raise PlanError(
                f"bounds {list(b)}: stage 0 must hold the model inputs {self.input_names} "
                f"(bounds[1] >= {len(self.input_names)})"
            )
        return b

    def split(self, bounds) -> list[Stage]:
        """One :class:`Stage` per range ``[bounds[s], bounds[s+1])`` of the OpGraph."""
        b = self._check_bounds(bounds)
        by_name = {n.name: n for n in self.gm.graph.nodes}
        stages, owner = [], {}
        for s in range(len(b) - 1):
            lo, hi = b[s], b[s + 1]
            last = s == len(b) - 2
            input_names = self.input_names if s == 0 else self.cut_names(lo)
            output_names = [OUTPUT] if last else self.cut_names(hi)
            g = fx.Graph()
            values = g.placeholder("values")
            taken = g.call_function(_take, (values, tuple(input_names), s))
            env: dict[fx.Node, fx.Node] = {}
            for j, name in enumerate(input_names):
                env[by_name[name]] = g.call_function(operator.getitem, (taken, j))

            def arg(a: fx.Node, g=g, env=env) -> fx.Node:
                if a not in env and a.op == "get_attr":
                    env[a] = g.get_attr(a.target)
                return env[a]

            for unit in self._units[lo:hi]:
                node = unit.node
                if node.op == "placeholder":
                    continue  # a model input: taken from ``values`` above
                if node.op == "output":
                    g.output({OUTPUT: fx.map_arg(node.args[0], arg)})
                    continue
                env[node] = g.node_copy(node, arg)
                for gi in unit.getitems:
                    env[gi] = g.node_copy(gi, arg)
            if not last:
                g.output({name: env[by_name[name]] for name in output_names})
            g.lint()
            stage = Stage(
                self.gm, g, index=s, input_names=list(input_names), output_names=output_names
            )
            _mirror_non_persistent(self.model, stage)
            for pname, p in stage.named_parameters():
                if id(p) in owner and owner[id(p)] != s:
                    raise PlanError(
                        f"bounds {list(b)}: parameter {pname!r} is used by stages "
                        f"{owner[id(p)]} and {s}; a partition must keep each parameter's "
                        "users in one stage"
                    )
                owner[id(p)] = s
            stages.append(stage)
        return stages


def _mirror_non_persistent(root: nn.Module, stage: nn.Module) -> None:
    """Buffers the model does not save stay unsaved in the stage (fx registers every copied
    tensor attribute as a persistent buffer)."""
    for name, _ in list(stage.named_buffers()):
        *path, field = name.split(".")
        owner = root
        for p in path:
            owner = getattr(owner, p)
        if field in getattr(owner, "_non_persistent_buffers_set", ()):
            sub = stage.get_submodule(".".join(path)) if path else stage
            sub._non_persistent_buffers_set.add(field)


def trace(
    model: nn.Module, example_inputs: tuple, *, leaf_modules: tuple[type, ...] | None = None
) -> Traced:
    """Trace ``model`` with ``torch.fx`` (instances of ``leaf_modules`` stay one node each;
    None: the model's own ``leaf_modules`` attribute, if it has one) and measure its graph on
    ``example_inputs`` (one forward pass, run without autograd; the global RNG state is
    restored afterwards)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"trace expects an nn.Module, got {type(model).__name__}")
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise InputError("trace: example_inputs must be a non-empty tuple of tensors")
    if leaf_modules is None:
        leaf_modules = getattr(model, "leaf_modules", ())
    leaf_modules = tuple(leaf_modules)
    if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in leaf_modules):
        raise ConfigError("leaf_modules", leaf_modules, "a tuple of nn.Module subclasses")

    graph = _Tracer(leaf_modules).trace(model)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Graph")
    _mirror_non_persistent(model, gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise InputError(
            f"trace: the model takes {len(placeholders)} inputs "
            f"({[p.name for p in placeholders]}), {len(inputs)} example inputs were given"
        )

    measure = _measure(gm, inputs)
    _specialise(gm, measure)
    units = _units(gm, measure)
    ops = _op_graph(gm, measure, units)
    return Traced(model, gm, ops, units)


def _measure(gm: fx.GraphModule, inputs: tuple) -> _Measure:
    """Each node's FLOPs, bytes and metadata on the example inputs.

    First on fake tensors (``torch._subclasses.FakeTensorMode``): FLOPs, output bytes and
    views follow from shapes, dtypes and storages alone, so no arithmetic runs (GPT-2 medium,
    492 nodes: 0.5 s instead of a forward pass of 10-45 s on 2 CPUs). A graph whose shapes
    or values depend on tensor data (MoE routing, ``.item()``) cannot run on fake tensors;
    it is measured by one real forward pass instead, which also raises that graph's own
    errors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cuda = sorted({x.device.index or 0 for x in inputs if x.device.type == "cuda"})
    try:
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        measure = _Measure(gm, fake)
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), fake:
            measure.run(*(fake.from_tensor(x) for x in inputs))
        return measure
    except Exception:  # any op fake tensors cannot run: measure for real
        pass
    measure = _Measure(gm)
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        measure.run(*inputs)
    return measure


def _specialise(gm: fx.GraphModule, m: _Measure) -> None:
    """Replace metadata-only values by their example value; refuse other non-tensor values;
    merge duplicate ``getitem`` nodes; drop what is left unused."""
    meta: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if m.kind.get(n) == "other" and n.users and _is_meta(n, meta):
            meta.add(n)
    for n in list(gm.graph.nodes):
        if n not in meta:
            continue
        value = _constant(m.value[n])
        for user in list(n.users):
            user.args = fx.map_arg(user.args, lambda a, n=n, v=value: v if a is n else a)
            user.kwargs = fx.map_arg(user.kwargs, lambda a, n=n, v=value: v if a is n else a)
        gm.graph.erase_node(n)
    for n in gm.graph.nodes:
        if m.kind.get(n) != "tuple":
            continue
        seen: dict = {}
        for user in list(n.users):
            if user.op == "call_function" and user.target is operator.getitem:
                key = user.args[1]
                if key in seen:
                    user.replace_all_uses_with(seen[key])
                    gm.graph.erase_node(user)
                else:
                    seen[key] = user
    gm.graph.eliminate_dead_code()
    for n in gm.graph.nodes:
        if m.kind.get(n) == "other" and n.users:
            raise InputError(
                f"trace: node {n.name!r} ({n.format_node()}) computes a non-tensor value from "
                "tensor data; only tensors and tensor shapes can flow through the graph"
            )
    gm.graph.lint()
    gm.recompile()


def _units(gm: fx.GraphModule, m: _Measure) -> list[_Unit]:
    units, folded = [], set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" or n in folded:
            continue
        if m.kind.get(n) == "tuple":
            getitems = []
            for user in n.users:
                if not (user.op == "call_function" and user.target is operator.getitem):
                    raise InputError(
                        f"trace: node {n.name!r} returns a tuple that {user.name!r} uses whole; "
                        "only unpacked tuple elements can cross between stages"
                    )
                if m.kind.get(user) != "tensor":
                    raise InputError(
                        f"trace: {user.name!r} unpacks a non-tensor element of {n.name!r}"
                    )
                getitems.append(user)
            folded.update(getitems)
            units.append(_Unit(n, getitems, [g.name for g in getitems]))
        elif n.op == "placeholder" and m.kind.get(n) != "tensor":
            raise InputError(f"trace: input {n.name!r} is not a tensor")
        else:
            units.append(_Unit(n, [], [n.name] if m.kind.get(n) == "tensor" else []))
    return units


def _params_of(gm: fx.GraphModule, node: fx.Node) -> list[nn.Parameter]:
    """The parameters ``node`` uses: its module's, or those its ``get_attr`` inputs read."""
    out = []
    if node.op == "call_module":
        out.extend(gm.get_submodule(node.target).parameters())
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            *path, field = a.target.split(".")
            v = getattr(gm.get_submodule(".".join(path)) if path else gm, field)
            if isinstance(v, nn.Parameter):
                out.append(v)
    return out


def _op_graph(gm: fx.GraphModule, m: _Measure, units: list[_Unit]) -> OpGraph:
    index = {}
    for i, u in enumerate(units):
        index[u.node] = i
        for g in u.getitems:
            index[g] = i
    counted: set[int] = set()
    nodes = []
    for u in units:
        n = u.node
        inputs = sorted({index[a] for a in n.all_input_nodes if a.op != "get_attr"})
        param_bytes = 0
        for p in _params_of(gm, n):
            if id(p) not in counted:
                counted.add(id(p))
                param_bytes += _tensor_bytes(p)
        if n.op == "output":
            out_bytes = 0  # returned, not sent
        elif m.kind.get(n) == "tuple":
            out_bytes = sum(m.nbytes[g] for g in u.getitems)
        else:
            out_bytes = m.nbytes.get(n, 0)
        flops = m.flops.get(n, 0) + sum(m.flops.get(g, 0) for g in u.getitems)
        nodes.append(
            OpNode(
                name=n.name,
                flops=float(flops),
                out_bytes=float(out_bytes),
                param_bytes=float(param_bytes),
                inputs=tuple(inputs),
                # a view allocates nothing: it crosses a cut as a tensor but holds no memory
                act_bytes=0.0 if n in m.views or n.op == "output" else None,
            )
        )
    return OpGraph(tuple(nodes))


# ---- training modules --------------------------------------------------------------------
class MoEWithAux(nn.Module):
    """An :class:`~moeflow.layer.moe.MoELayer` that returns ``(y, aux_loss)``, so the
    auxiliary loss flows through the graph as a value instead of a module attribute.

    It is an fx leaf (routing is data dependent). It registers the layer's own children and
    parameters under the layer's names, so parameter names are unchanged by the wrapping; the
    layer still records ``aux_loss`` and ``last_counts_E`` as usual.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        for name, p in layer.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self._layer = (layer,)  # a tuple: not registered twice

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self._layer[0]
        y = layer(x)
        return y, layer.aux_loss


class _DemoBlock(nn.Module):
    """:class:`moeflow.models.demo.Block`'s math, with the MoE returning its aux loss."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.num_heads = block.num_heads
        self.norm1, self.qkv, self.proj, self.norm2 = (
            block.norm1,
            block.qkv,
            block.proj,
            block.norm2,
        )
        self.moe = MoEWithAux(block.moe)

    def forward(self, x_BLD: torch.Tensor, aux) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_BLD, aux)`` after this block; ``aux`` is the running sum of aux losses."""
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(self.norm1(x_BLD)).view(B, L, 3, self.num_heads, -1).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x_BLD = x_BLD + self.proj(a.transpose(1, 2).reshape(B, L, D))
        y_BLD, layer_aux = self.moe(self.norm2(x_BLD))
        aux = aux + layer_aux  # first: a cut right after it does not carry y_BLD for aux's sake
        return x_BLD + y_BLD, aux


class DemoTrainingModule(nn.Module):
    """``forward(idx, targets) -> lm_loss + sum of aux losses`` over a
    :class:`moeflow.models.demo.DemoLM`'s own modules (shared, same parameter names)."""

    leaf_modules = (MoEWithAux,)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vocab = model.head.out_features
        self.embed, self.pos, self.norm, self.head = model.embed, model.pos, model.norm, model.head
        self.blocks = nn.ModuleList(_DemoBlock(b) for b in model.blocks)

    def forward(self, idx_BL: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
        L = idx_BL.shape[1]
        x = self.embed(idx_BL) + self.pos[:L]
        aux = 0  # summed from 0 in layer order, as DemoLM's sum(): the same float result
        for block in self.blocks:
            x, aux = block(x, aux)
        logits = self.head(self.norm(x))
        lm_loss = F.cross_entropy(logits.reshape(-1, self.vocab), targets_BL.reshape(-1))
        return lm_loss + aux


def demo_training_module(model) -> DemoTrainingModule:
    """The training loss of a :class:`moeflow.models.demo.DemoLM` as an fx-traceable module:
    ``forward(idx, targets)`` equals ``lm_loss + aux`` of ``model(idx, targets)``. Its
    ``leaf_modules`` attribute is what :func:`trace` keeps whole."""
    from moeflow.models.demo import DemoLM

    if not isinstance(model, DemoLM):
        raise InputError(f"demo_training_module expects a DemoLM, got {type(model).__name__}")
    return DemoTrainingModule(model)


class GPT2TrainingModule(nn.Module):
    """``forward(idx, targets) -> cross entropy`` of a transformers ``GPT2LMHeadModel``.

    The top-level forward is ours (transformers 5 has no fx tracer, and
    ``GPT2Model.forward`` takes ``**kwargs``, builds masks and caches): token plus position
    embeddings, the blocks, the final norm and the head. fx traces through each ``GPT2Block``;
    ``GPT2Attention`` is a leaf (it unpacks ``key_states.shape``, which fx cannot iterate), and
    with SDPA and no mask it is causal. Parameter names are the ``GPT2LMHeadModel``'s.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.transformer = lm.transformer
        self.lm_head = lm.lm_head
        self.vocab = lm.config.vocab_size
        self.__dict__["lm"] = lm  # the transformers model, for reference (not registered)

    @property
    def leaf_modules(self) -> tuple[type, ...]:
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

        return (GPT2Attention,)

    def forward(self, idx_BL: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        L = idx_BL.shape[1]
        # wpe.weight[:L] is wpe(arange(L)) without an index tensor to carry
        x = t.drop(t.wte(idx_BL) + t.wpe.weight[:L])
        for block in t.h:
            x = block(x)
        logits = self.lm_head(t.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, self.vocab), targets_BL.reshape(-1))


def gpt2_training_module(config) -> GPT2TrainingModule:
    """A freshly initialised transformers ``GPT2LMHeadModel`` for ``config`` (a
    ``GPT2Config``; ``tie_word_embeddings`` must be False, since tied input and output
    embeddings would be one parameter used by the first and the last stage), with SDPA
    attention, in training mode (dropout as the config says), as a training module. The
    config is copied, not changed. Seed with ``torch.manual_seed`` first."""
    from moeflow._deps import require

    transformers = require("transformers", "gpt2_training_module")
    if not isinstance(config, transformers.GPT2Config):
        raise InputError(f"gpt2_training_module expects a GPT2Config, got {type(config)}")
    if config.tie_word_embeddings:
        raise ConfigError(
            "tie_word_embeddings",
            True,
            "False: tied embeddings are one parameter used by the first and the last stage",
        )
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    lm = transformers.GPT2LMHeadModel(config)
    lm.train()
    return GPT2TrainingModule(lm)
