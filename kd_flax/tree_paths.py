"""Pytree key paths as strings: the one formatter every module uses.

`path_str` turns a `jax.tree_util` key path (DictKey, GetAttrKey, SequenceKey,
FlattenedIndexKey — what `tree_flatten_with_path` gives, nnx `State` paths included) or a
plain tuple of keys (what `nnx.to_flat_state` gives) into `"encoder/layers/0/.../kernel"`.
The trailing `.value` attribute nnx Variables add is dropped, so a param has one name
whichever way its tree was flattened.
"""

from __future__ import annotations

import jax


def path_str(path) -> str:
    """``"encoder/layers/0/self_attn/q_proj/kernel"`` from a key path or a tuple of keys."""
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return jax.tree_util.keystr(path, simple=True, separator="/")
