"""Activation rematerialisation of the decoder blocks (`model.remat_policy`).

"none" keeps every activation for the backward pass; the others wrap the block in
`nn.remat` with a `jax.checkpoint` policy that says what the forward pass keeps. Names the
blocks tag with `checkpoint_name`:

    layer_input    the block's input (the scan carry: [B, L, D], or V4's streams [B, L, n, D])
    attention_out  the attention branch's output
    ffn_out        the FFN / MoE branch's output

Policies:
    full           keep nothing inside the block (the scan still keeps each layer's input)
    dots           keep every matmul output
    dots_no_batch  keep matmul outputs without batch dims (weights-only products)
    save_moe       keep attention_out and ffn_out
    offload        keep nothing on the device: each layer's input goes to host memory
                   ("pinned_host") in the forward pass and comes back for its backward, so
                   the per-layer residuals (L_layers x B_local x L x D) leave HBM (TPU/GPU;
                   MaxText's decoder-layer-input offload)
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

LAYER_INPUT = "layer_input"

POLICIES: dict[str, Callable[..., Any]] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_moe": jax.checkpoint_policies.save_only_these_names("attention_out", "ffn_out"),
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host"),
}


def rematerialised(block: type[nn.Module], policy: str, scan_layers: bool) -> type[nn.Module]:
    """`block`, or `block` under `nn.remat` with POLICIES[policy]. Unscanned stacks keep
    CSE prevention on (without a scan XLA could otherwise merge the recomputation back)."""
    if policy == "none":
        return block
    return nn.remat(block, policy=POLICIES[policy], prevent_cse=not scan_layers,
                    static_argnums=())
