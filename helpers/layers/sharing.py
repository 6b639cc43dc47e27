"""Decoder layers shared between models: stage views over one set of layers, renumbered per call.

Stages A / AB / FULL (helpers.layers.bundles.load_stages) hold one set of decoder layers (A's plus
the bundles'), and each stage is a thin model whose `layers` list references them. Shared attention
modules cannot hold one `layer_idx` per stage, so a pre-forward hook renumbers them to the running
stage's positions on every call; each stage then uses an ordinary cache sized by its own config
(cached generation works; stages must not run concurrently from several threads).

Usage: `m = stage_view(a_model, layers, config); m.base_model.register_forward_pre_hook(renumber_hook(layers))`
"""

from __future__ import annotations

import copy
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from helpers.core import arch
from helpers.core.checkpoint import Checkpoint


def memory_names(fam: arch.Family, sd: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """One layer's on-disk tensors under its in-memory names (Mixtral legacy experts fused)."""
    prefix = f"model.layers.{layer}."
    router = arch.LEGACY.router.format(l=layer)
    if fam.is_moe and router in sd:
        w = {}
        for k in list(sd):
            if m := arch.LEGACY_EXPERT_RE.match(k):
                w[int(m.group(2)), m.group(3)] = sd.pop(k)  # [I, H] or [H, I]
        E = 1 + max(e for e, _ in w)
        sd[prefix + "mlp.gate.weight"] = sd.pop(router)  # [E, H]
        sd[prefix + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w[e, "w1"], w[e, "w3"]]) for e in range(E)]
        )  # [E, 2I, H]
        sd[prefix + "mlp.experts.down_proj"] = torch.stack([w[e, "w2"] for e in range(E)])  # [E, H, I]
    return {k[len(prefix) :]: v for k, v in sd.items()}


def load_bundle_layers(bdir: Path, layer_cls, config, dtype, device) -> dict[int, nn.Module]:
    """Fresh decoder layers (original layer_idx) holding a bundle's weights, in owned memory."""
    ck = Checkpoint(bdir)
    fam = arch.detect(config.to_dict())
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in ck.iter():
        by_layer.setdefault(arch.layer_of(name), {})[name] = t
    out = {}
    for l, sd in sorted(by_layer.items()):
        with torch.device("meta"):
            layer = layer_cls(config, l).to(dtype)
        if any(True for _ in layer.buffers()):  # buffers would come out of to_empty uninitialised
            with torch.device(device):
                layer = layer_cls(config, l).to(dtype)
        else:
            layer = layer.to_empty(device=device)
        layer.load_state_dict(memory_names(fam, sd, l), strict=True)  # copies (and casts) into the new tensors
        out[l] = layer.eval()
    return out


def renumber_hook(layers: list[nn.Module]):
    """A pre-forward hook setting every `layer_idx` in `layers` to its position in this stage."""
    pairs = [(m, pos) for pos, layer in enumerate(layers) for m in layer.modules() if hasattr(m, "layer_idx")]

    def hook(_module, _args):
        for m, pos in pairs:
            m.layer_idx = pos

    return hook


def stage_view(a_model, layers: list[nn.Module], config):
    """A model of A's class sharing every module of `a_model` except its list of decoder layers."""
    with torch.device("meta"):
        out = type(a_model)(config)  # every tensor on meta: replaced by A's below, none allocated
    a_base, v_base = a_model.base_model, out.base_model
    for name, child in a_model.named_children():
        if child is not a_base:
            setattr(out, name, child)
    for name, child in a_base.named_children():
        setattr(v_base, name, nn.ModuleList(layers) if name == "layers" else child)
    for src, dst in ((a_model, out), (a_base, v_base)):
        dst._parameters.update(src._parameters)
        dst._buffers.update(src._buffers)
    left = [n for n, t in chain(out.named_parameters(), out.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"stage view of {type(a_model).__name__} left unshared tensors: {left[:4]}")
    out.generation_config = copy.deepcopy(a_model.generation_config)
    return out.eval()


def share_output_hooks(models: list, all_layers: list[nn.Module], a_model) -> None:
    """Install transformers' output-capturing hooks once on the shared modules, not once per stage
    (per-stage installs would record every shared layer twice with output_hidden_states)."""
    try:
        from transformers.utils.output_capturing import install_all_output_capturing_hooks
    except ImportError:
        return
    cfg = copy.deepcopy(a_model.config)
    cfg.num_hidden_layers = len(all_layers)
    union = stage_view(a_model, all_layers, cfg)
    install_all_output_capturing_hooks(union.base_model)
    for m in models:
        m.base_model._output_capturing_hooks_installed = True
