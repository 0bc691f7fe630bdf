"""The fast forward to residual-stream hook points: the bridge's own weights, run as a plain Hugging Face model.

TransformerBridge wraps every submodule of the HF model in hook points and re-implements attention eagerly
(to expose `hook_pattern`), so its forward spends more time in elementwise passes and copies than in its
matrix products. Reading the residual stream needs none of that: a plain copy of the HF model, built on the
same parameter tensors (no second copy of the weights) with PyTorch's fused attention (SDPA), gives the same
activations; a forward hook reads each block's input or output and the pass stops after the deepest one.
On the 2-core Xeon this forward to SmolLM2's block 6 runs ~2x the bridge's (scripts/bench_train.py --only
forward). Any other hook point (attention, MLP, norms) still goes through the bridge.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch

_BLOCK_EDGE = re.compile(r"blocks\.(\d+)\.hook_(in|out)")
"""The bridge's canonical names of a block's input (`hook_resid_pre`) and output (`hook_resid_post`)."""


class _Stop(Exception):
    """Raised by the hook on the deepest block asked for: nothing after it needs to run."""


class ResidualForward:
    """Runs the plain HF model only as far as the deepest requested block, reading blocks' inputs and outputs."""

    def __init__(self, plain: Any, layers: torch.nn.ModuleList, hook_dict: dict[str, Any]) -> None:
        self.plain, self.layers, self.hook_dict = plain, layers, hook_dict

    @classmethod
    def of(cls, bridge: Any) -> ResidualForward | None:
        """The fast forward sharing `bridge`'s weights, or None where its model cannot be rebuilt plainly."""
        hf = getattr(bridge, "original_model", None)
        blocks = getattr(getattr(bridge, "adapter", None), "component_mapping", {}).get("blocks")
        if hf is None or blocks is None:
            return None
        with torch.device("meta"):  # a skeleton: every tensor is then the bridge's own
            plain = type(hf)._from_config(copy.deepcopy(hf.config), attn_implementation="sdpa")
        if not _share_tensors(plain, hf):
            return None
        return cls(plain.eval(), plain.get_submodule(blocks.name), bridge.hook_dict)

    def block_edge(self, hook_point: str) -> tuple[int, str] | None:
        """(block index, "in" or "out") when `hook_point` is a block's input or output, else None."""
        hook = self.hook_dict.get(hook_point)
        match = _BLOCK_EDGE.fullmatch(getattr(hook, "name", "") or "")
        return (int(match.group(1)), match.group(2)) if match else None

    def serves(self, hook_points: Sequence[str]) -> bool:
        return all(self.block_edge(name) is not None for name in hook_points)

    @torch.no_grad()
    def run(self, tokens_BT: torch.Tensor, hook_points: Sequence[str]) -> dict[str, torch.Tensor]:
        """hook point -> (B, T, d_model) activations; every hook point must be one `serves` accepts."""
        edges = {name: self.block_edge(name) for name in hook_points}
        deepest = max(edges.values(), key=lambda edge: (edge[0], edge[1] == "out"))
        acts: dict[str, torch.Tensor] = {}

        def reader(layer: int, side: str) -> Any:
            names = [name for name, edge in edges.items() if edge == (layer, side)]

            def read(module: Any, args: tuple, kwargs: dict, output: Any = None) -> None:
                x = (args[0] if args else kwargs["hidden_states"]) if side == "in" else output
                x_BTD = x[0] if isinstance(x, tuple) else x
                acts.update(dict.fromkeys(names, x_BTD))
                if (layer, side) == deepest:
                    raise _Stop

            return read

        handles = []
        for layer, side in set(edges.values()):
            module = self.layers[layer]
            if side == "in":
                handles.append(module.register_forward_pre_hook(reader(layer, side), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(reader(layer, side), with_kwargs=True))
        try:
            self.plain(input_ids=tokens_BT, use_cache=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return acts


def _share_tensors(plain: torch.nn.Module, hf: torch.nn.Module) -> bool:
    """Point every parameter and buffer of `plain` at `hf`'s tensor of the same name (the bridge nests each HF
    module as `._original_component`). False when one has no counterpart."""
    theirs: dict[str, torch.Tensor] = {}
    for name, tensor in [*hf.named_parameters(remove_duplicate=False), *hf.named_buffers(remove_duplicate=False)]:
        theirs.setdefault(name.replace("._original_component", ""), tensor)
    mine = [*plain.named_parameters(remove_duplicate=False), *plain.named_buffers(remove_duplicate=False)]
    if any(name not in theirs for name, _ in mine):
        return False
    for name, _ in mine:
        owner, _, leaf = name.rpartition(".")
        module = plain.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = theirs[name]  # the bridge's Parameter itself: shared, not copied
        else:
            module._buffers[leaf] = theirs[name]
    return True
