"""Single-device MoE layer library. Knows nothing about distribution."""

from moeflow.layer.experts import Experts, SharedExperts
from moeflow.layer.moe import MoELayer
from moeflow.layer.routers import (
    ROUTER_CLASSES,
    DeepSeekRouter,
    ExpertChoiceRouter,
    Router,
    Routing,
    SigmoidRouter,
    SoftmaxTopKRouter,
    SwitchRouter,
    TopKRouter,
    XMoERouter,
    assignments_from_topk,
    build_router,
    capacity,
    load_balancing_loss,
    z_loss,
)

__all__ = [
    "Experts",
    "SharedExperts",
    "MoELayer",
    "Router",
    "TopKRouter",
    "Routing",
    "ROUTER_CLASSES",
    "SoftmaxTopKRouter",
    "SwitchRouter",
    "SigmoidRouter",
    "XMoERouter",
    "ExpertChoiceRouter",
    "DeepSeekRouter",
    "assignments_from_topk",
    "build_router",
    "capacity",
    "load_balancing_loss",
    "z_loss",
]
