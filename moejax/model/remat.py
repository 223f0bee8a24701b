"""Activation rematerialisation of the decoder blocks (`model.remat_policy`).

"none" keeps every activation for the backward pass; the others wrap the block in
`nn.remat` with a `jax.checkpoint` policy that says what the forward pass saves: nothing
("full": the block is recomputed), matmul outputs ("dots"), matmul outputs without batch
dimensions ("dots_no_batch"), or only the block's attention and FFN outputs, the names the
blocks give them with `checkpoint_name` ("save_moe").
"""
from __future__ import annotations

import flax.linen as nn
import jax

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_moe": jax.checkpoint_policies.save_only_these_names("attention_out", "ffn_out"),
}


def rematerialised(block: type[nn.Module], policy: str, scan_layers: bool) -> type[nn.Module]:
    """`block`, or `block` under `nn.remat` with POLICIES[policy]. Unscanned stacks keep
    CSE prevention on (without a scan XLA could otherwise merge the recomputation back)."""
    if policy == "none":
        return block
    return nn.remat(block, policy=POLICIES[policy], prevent_cse=not scan_layers,
                    static_argnums=())
