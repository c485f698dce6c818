"""Sharded equals replicated: params loaded straight into an (fsdp, tensor) mesh really are split, and the
jitted logits match the single-device ones."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from conftest import jit_apply, write_random_hf_llama
from frozenlm_jax import load_lm
from frozenlm_jax.parallel import make_mesh


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_load_matches_replicated(tmp_path, scan_layers):
    write_random_hf_llama(tmp_path)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded = load_lm(str(tmp_path), mesh=mesh, scan_layers=scan_layers)
    plain = load_lm(str(tmp_path), scan_layers=scan_layers)

    layer = sharded.params["layers"] if scan_layers else sharded.params["layers_0"]
    q_kernel = layer["attn"]["q_proj"]["kernel"]  # (embed, heads, head_dim) -> (fsdp, tensor, -)
    assert isinstance(q_kernel.sharding, NamedSharding)
    global_shape, shard_shape = q_kernel.shape, q_kernel.addressable_shards[0].data.shape
    embed_dim = 1 if scan_layers else 0
    assert shard_shape[embed_dim] == global_shape[embed_dim] // 4
    assert shard_shape[embed_dim + 1] == global_shape[embed_dim + 1] // 2
    embedding = sharded.params["embed"]["embedding"]  # (vocab, embed) -> (tensor, fsdp)
    assert embedding.addressable_shards[0].data.shape == (256 // 2, 64 // 4)
    for path, leaf in jax.tree_util.tree_flatten_with_path(sharded.params)[0]:
        is_split = leaf.addressable_shards[0].data.size < leaf.size
        assert is_split != ("norm" in jax.tree_util.keystr(path)), path  # only norm scales replicate

    ids = np.random.default_rng(0).integers(0, 256, (8, 12))
    forward = jax.jit(lambda p, x: sharded.model.apply({"params": p}, x))
    np.testing.assert_allclose(forward(sharded.params, ids), forward(plain.params, ids), atol=1e-5)


def test_dimensions_the_mesh_does_not_divide_are_replicated(tmp_path):
    # 3 KV heads do not split over tensor=2: that dimension must replicate, the rest still shards.
    write_random_hf_llama(tmp_path, num_attention_heads=6, num_key_value_heads=3, head_dim=8, hidden_size=48)
    lm = load_lm(str(tmp_path), mesh=make_mesh({"fsdp": 4, "tensor": 2}))
    k_kernel = lm.params["layers_0"]["attn"]["k_proj"]["kernel"]
    assert k_kernel.sharding.spec[1] is None and k_kernel.addressable_shards[0].data.shape == (12, 3, 8)
    ids = np.random.default_rng(0).integers(0, 256, (2, 5))
    plain = load_lm(str(tmp_path))
    np.testing.assert_allclose(jit_apply(lm.model, {"params": lm.params}, ids),
                               jit_apply(plain.model, {"params": plain.params}, ids), atol=1e-5)


def test_mesh_shape_errors():
    with pytest.raises(ValueError, match="needs 6 devices, but 8 are available"):
        make_mesh({"data": 3, "fsdp": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 8})
    assert make_mesh({"data": 2, "fsdp": -1}).shape == {"data": 2, "fsdp": 4, "tensor": 1}
