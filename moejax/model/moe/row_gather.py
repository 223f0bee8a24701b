"""Row gathers whose VJPs are gathers too (no scatter-add), for the dropless dispatch.

Both take an index map and its inverse. An index past the end of the source reads a
zero row, so a map may leave rows empty (a sentinel index) and the two maps need not be
permutations: dropless's capacity slots (bulk_dropless.py) map P pairs into E * C slots.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def take_rows(a: jax.Array, index: jax.Array) -> jax.Array:
    """a[index] along axis 0; an index past the end reads zeros."""
    return jnp.take(a, index, axis=0, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_tokens(x: jax.Array, pairs: jax.Array, place_of_pair: jax.Array, top_k: int
                ) -> jax.Array:
    """out[j] = x[pairs[j] // T]: tokens [N, D] -> one row per listed pair [R, D].

    pairs [R] are pair ids p = n * T + t (P or more: an empty row); place_of_pair [P] is
    the row holding each pair (R or more: none). VJP: dx[n] = sum_t dout[place_of_pair[n*T+t]].
    """
    return take_rows(x, pairs // top_k)


def _take_tokens_fwd(x: jax.Array, pairs: jax.Array, place_of_pair: jax.Array, top_k: int
                     ) -> tuple[jax.Array, jax.Array]:
    return take_tokens(x, pairs, place_of_pair, top_k), place_of_pair


def _take_tokens_bwd(top_k: int, place_of_pair: jax.Array, dout: jax.Array
                     ) -> tuple[jax.Array, None, None]:
    per_pair = take_rows(dout, place_of_pair)  # [P, D], token-major
    return per_pair.reshape(-1, top_k, dout.shape[-1]).sum(1), None, None


take_tokens.defvjp(_take_tokens_fwd, _take_tokens_bwd)


@jax.custom_vjp
def permute_rows(a: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """a[perm] where inverse[i] is the output row reading a[i]; the VJP is g[inverse].

    Out-of-range entries of either map are empty rows (zeros) on that side.
    """
    return take_rows(a, perm)


def _permute_fwd(a: jax.Array, perm: jax.Array, inverse: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    return permute_rows(a, perm, inverse), inverse


def _permute_bwd(inverse: jax.Array, g: jax.Array) -> tuple[jax.Array, None, None]:
    return take_rows(g, inverse), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)
