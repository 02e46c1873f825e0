"""Finding the head, the pooled feature and the pre-pool map in a model's traced graph.

The graph comes from torchvision.models.feature_extraction's tracer, so the names found here are
exactly the `return_nodes` that `create_feature_extractor` accepts, for any architecture it traces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from featcache.errors import FeatcacheError

_PASS_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)
_PASS_FUNCTIONS = {torch.flatten, torch.squeeze, torch.nn.functional.dropout}
_PASS_METHODS = {"view", "reshape", "flatten", "squeeze", "contiguous"}


@dataclass(frozen=True)
class Layers:
    head: str  # the final nn.Linear's qualified name; its output node gives the logits
    feature: str  # node whose output the head sees (the pooled penultimate feature)
    prepool: str  # node whose output is the last feature map before global pooling
    mean_pooled: bool  # the feature is the spatial mean of the pre-pool map (ResNet-style)


def trace(model: nn.Module):
    from torchvision.models import feature_extraction as fx_tv

    was_training = model.training
    model.eval()
    tracer = fx_tv.NodePathTracer(**fx_tv._set_default_tracer_kwargs(None))
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise FeatcacheError(f"{type(model).__name__}: cannot be traced by torch.fx ({str(exc).splitlines()[0]})") from None
    finally:
        model.train(was_training)
    return graph, tracer.node_to_qualname


def find_layers(model: nn.Module, feature: str | None = None, prepool: str | None = None) -> Layers:
    """Locate head, feature and pre-pool nodes; explicit names override what is found."""
    graph, qualname = trace(model)
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)

    def module_of(node):
        return modules.get(node.target) if node.op == "call_module" else None

    output = next(n for n in nodes if n.op == "output")
    head_node = output.args[0]
    if not isinstance(head_node, torch.fx.Node) or not isinstance(module_of(head_node), nn.Linear):
        raise FeatcacheError(
            f"{type(model).__name__}: its output is not produced by an nn.Linear layer, so it has no linear head "
            "to replay post-hoc methods through"
        )
    head = head_node.target

    def skip_passthrough(node):
        while True:
            mod = module_of(node)
            if isinstance(mod, _PASS_MODULES) or (node.op == "call_function" and node.target in _PASS_FUNCTIONS) \
                    or (node.op == "call_method" and node.target in _PASS_METHODS):
                node = node.args[0]
            else:
                return node

    feat_node = head_node.args[0]
    # Dropout in eval is the identity: the feature is what goes into it.
    while isinstance(module_of(feat_node), (nn.Dropout, nn.Identity)) or (
        feat_node.op == "call_function" and feat_node.target is torch.nn.functional.dropout
    ):
        feat_node = feat_node.args[0]
    pool = skip_passthrough(feat_node)
    pool_input = _global_pool_input(pool, module_of(pool))
    mean_pooled = pool_input is not None and feature is None and prepool is None
    feature_name = feature or qualname[feat_node]
    if prepool is None:
        if pool_input is None:
            # A head on fully connected layers (VGG): the pre-pool map is the last feature map
            # before the flatten that leads to the feature, taken before any pooling of it.
            pool_input = _map_before_flatten(feat_node, module_of)
        if pool_input is None:
            raise FeatcacheError(
                f"{type(model).__name__}: the head's input ({qualname[feat_node]}) is neither a global average "
                "pool of a feature map nor computed from a flattened map, so there is no pre-pool map for "
                "chan_max/chan_mean; name one with backbone.prepool_layer"
            )
        prepool = qualname[pool_input]
    known = set(qualname.values())
    for label, name in (("feature_layer", feature_name), ("prepool_layer", prepool)):
        if name not in known:
            raise FeatcacheError(f"{type(model).__name__}: no node {name!r} for {label}")
    return Layers(head=head, feature=feature_name, prepool=prepool, mean_pooled=mean_pooled)


def _map_before_flatten(node, module_of):
    """Walking back along first inputs: the input of the first flatten, before pooling modules."""
    seen = 0
    while isinstance(node, torch.fx.Node) and node.op != "placeholder" and seen < 200:
        seen += 1
        mod = module_of(node)
        is_flatten = isinstance(mod, nn.Flatten) or (node.op == "call_function" and node.target is torch.flatten) \
            or (node.op == "call_method" and node.target in ("flatten", "view", "reshape"))
        if is_flatten:
            source = node.args[0]
            while isinstance(module_of(source), (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d)):
                source = source.args[0]
            return source
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        node = node.args[0]
    return None


def _global_pool_input(node, module):
    """The input node of a global average pool, or None if `node` is not one."""
    if isinstance(module, nn.AdaptiveAvgPool2d):
        size = module.output_size
        if size in (1, (1, 1)):
            return node.args[0]
    if node.op == "call_function" and node.target is torch.nn.functional.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if size in (1, (1, 1)):
            return node.args[0]
    if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if tuple(dims if isinstance(dims, (tuple, list)) else (dims,)) in ((2, 3), (-2, -1)):
            return node.args[0]
    return None
