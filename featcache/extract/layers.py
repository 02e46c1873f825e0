"""Finding the head, the pooled feature and the pre-pool map in a model's traced graph.

The graph comes from torchvision.models.feature_extraction's tracer, so the names found here are
exactly the `return_nodes` that `create_feature_extractor` accepts, for any architecture it traces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from featcache.errors import FeatcacheError

F = torch.nn.functional
_PASS_MODULES = (nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd)
_PASS_FUNCTIONS = {torch.flatten, torch.squeeze, torch.reshape, F.dropout}
_PASS_METHODS = {"view", "reshape", "flatten", "squeeze", "contiguous"}
_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape}
_FLATTEN_METHODS = {"view", "reshape", "flatten"}
# Spatial pooling: modules and functions that reduce a map over its spatial dimensions.
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.LPPool2d)
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.lp_pool2d}
_REDUCE_FUNCTIONS = {torch.mean, torch.amax}
_REDUCE_METHODS = {"mean", "amax"}

@dataclass(frozen=True)
class Layers:
    head: str  # the final nn.Linear's qualified name; its output node gives the logits
    feature: str  # node whose output the head sees (the pooled penultimate feature)
    prepool: str  # node whose output is the map just before the spatial pooling that feeds the head
    mean_pooled: bool  # the feature is the spatial mean of the pre-pool map (ResNet-style)


def trace(model: nn.Module):
    from torchvision.models import feature_extraction as fx_tv

    modes = [(module, module.training) for module in model.modules()]  # each submodule's, not just the top's
    model.eval()
    tracer = fx_tv.NodePathTracer(**fx_tv._set_default_tracer_kwargs(None))
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise FeatcacheError(f"{type(model).__name__}: cannot be traced by torch.fx ({str(exc).splitlines()[0]})") from None
    finally:
        for module, training in modes:
            module.training = training
    return graph, tracer.node_to_qualname


def find_layers(model: nn.Module, feature: str | None = None, prepool: str | None = None) -> Layers:
    """Locate head, feature and pre-pool nodes; explicit names override what is found.

    The head is the nn.Linear producing the output and the feature its input (dropout skipped). The
    pre-pool map is the map immediately before the spatial pooling that feeds the head, whatever
    form the pooling takes (see `_prepool_node`): for ResNet, DenseNet, MobileNet and CIFAR models
    that pool functionally (`F.avg_pool2d(out, 8).view(...)`) the last activation map; for VGG-style
    heads on fully connected layers the last ReLU map before the final max-pool.
    """
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

    feat_node = head_node.args[0]
    # Dropout in eval is the identity: the feature is what goes into it.
    while _is_dropout(feat_node, module_of(feat_node)):
        feat_node = feat_node.args[0]
    pool_input, mean_pooled = _prepool_node(feat_node, module_of)
    mean_pooled = mean_pooled and feature is None and prepool is None
    feature_name = feature or qualname[feat_node]
    if prepool is None:
        if pool_input is None:
            raise FeatcacheError(
                f"{type(model).__name__}: the head's input ({qualname[feat_node]}) is neither a spatial pool of a "
                "feature map nor computed from a flattened map, so there is no pre-pool map for "
                "chan_max/chan_mean; name one with backbone.prepool_layer"
            )
        prepool = qualname[pool_input]
    known = set(qualname.values())
    for label, name in (("feature_layer", feature_name), ("prepool_layer", prepool)):
        if name not in known:
            raise FeatcacheError(f"{type(model).__name__}: no node {name!r} for {label}")
    return Layers(head=head, feature=feature_name, prepool=prepool, mean_pooled=mean_pooled)


def _is_dropout(node, module) -> bool:
    return isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)) or (
        node.op == "call_function" and node.target is F.dropout)


def _is_passthrough(node, module) -> bool:
    """Ops that move or drop values without mixing them: flatten, view, squeeze, dropout, identity."""
    return isinstance(module, _PASS_MODULES) or (node.op == "call_function" and node.target in _PASS_FUNCTIONS) \
        or (node.op == "call_method" and node.target in _PASS_METHODS)


def _is_flatten(node, module) -> bool:
    return isinstance(module, nn.Flatten) or (node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS) \
        or (node.op == "call_method" and node.target in _FLATTEN_METHODS)


def _pool_kind(node, module) -> str | None:
    """"mean" for a global average pool, "pool" for any other spatial pooling, None for anything else.

    Global average: AdaptiveAvgPool2d(1) / F.adaptive_avg_pool2d(x, 1), a mean over dims (2, 3), or a
    mean over the last dim of a map flattened from dim 2 (`x.flatten(2).mean(2)`, `x.view(n, c, -1)
    .mean(-1)`). Other pooling: average, max and power pools (module or functional, whatever their
    window), adaptive pools to a size other than 1, and amax over spatial dims. A mean or amax only
    counts when it reduces no batch or channel dimension (every dim >= 2 or negative).
    """
    if isinstance(module, _POOL_MODULES):
        size = getattr(module, "output_size", None)
        return "mean" if isinstance(module, nn.AdaptiveAvgPool2d) and size in (1, (1, 1)) else "pool"
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        if node.target is F.adaptive_avg_pool2d:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            if size in (1, (1, 1), [1, 1]):
                return "mean"
        return "pool"
    is_reduce = (node.op == "call_function" and node.target in _REDUCE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _REDUCE_METHODS)
    if not is_reduce:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return None  # a reduction over everything, batch included: not a pool
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    if not dims or not all(isinstance(d, int) and (d >= 2 or d < 0) for d in dims):
        return None
    is_mean = node.target == "mean" or node.target is torch.mean
    source = node.args[0]
    flattened = isinstance(source, torch.fx.Node) and _is_flatten(source, None)
    if is_mean and (set(dims) in ({2, 3}, {-2, -1}) or (flattened and dims in ((2,), (-1,)))):
        return "mean"
    return "pool"


def _prepool_node(feat_node, module_of, limit: int = 500):
    """(the pre-pool map's node, whether the feature is exactly its global spatial mean).

    Walking back from the feature along first inputs, the first spatial pooling or flatten met
    marks where the map ends; from there every further pooling and pass-through op is walked back
    over (VGG: adaptive avg-pool, then the final max-pool), and the node reached is the map. None
    when no pooling or flatten is found.
    """
    node, direct = feat_node, True
    for _ in range(limit):
        if not isinstance(node, torch.fx.Node) or node.op == "placeholder":
            return None, False
        module = module_of(node)
        if _pool_kind(node, module) or _is_flatten(node, module):
            break
        direct = direct and _is_passthrough(node, module)
        if not node.args:
            return None, False
        node = node.args[0]
    else:
        return None, False
    kinds = []
    while isinstance(node, torch.fx.Node) and node.op != "placeholder":
        module = module_of(node)
        kind = _pool_kind(node, module)
        if not (kind or _is_passthrough(node, module)):
            break
        if kind:
            kinds.append(kind)
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.op == "placeholder":
        return None, False
    return node, direct and kinds == ["mean"]
