"""The Frozen model: a vision encoder whose output becomes n prefix embeddings inside a frozen LM.

Parameters split into `vision/...` (encoder and prefix projection: what trains) and `lm/...` (the
pretrained LM). Input is the batch contract: `tokens` [B, T] with n placeholder slots per image,
`images` [B, K, H, W, 3], `image_mask` [B, K], `image_positions` [B, K], `loss_mask` [B, T].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from frozenlm_jax.models.lm import HIDDEN_AXES, DecoderLM, LMConfig, abstract_lm_params
from frozenlm_jax.models.vision import EncoderConfig, build_encoder

VARIANTS = ("frozen", "finetuned", "scratch", "train_blind")


def _group_mean_init(key, shape, dtype=jnp.float32):
    """Row i of the [n, L] token-pooling matrix averages the i-th of n contiguous groups of tokens."""
    del key
    n, length = shape
    group = np.minimum(np.arange(length) * n // length, n - 1)
    weights = (group[None] == np.arange(n)[:, None]).astype(np.float32)
    return jnp.asarray(weights / weights.sum(axis=1, keepdims=True), dtype)


class VisionPrefix(nn.Module):
    """Images [N, H, W, 3] -> prefix embeddings [N, num_prefix_tokens, embed_dim].

    A pooled feature [N, C] is projected by one Dense to n * embed_dim (the paper's prefix). A token
    sequence [N, L, C] (a ViT with pool='tokens') is first pooled into n tokens by a learned [n, L] mixing
    matrix (`prefix_pool`, starting as the means of n contiguous groups of tokens), then each is projected by
    a Dense C -> embed_dim: parameters grow as n * L + C * D, not as L * C * n * D for a flattened sequence.
    """

    config: EncoderConfig
    num_prefix_tokens: int
    embed_dim: int
    prefix_init_std: float | None = None  # std of each prefix entry at init (e.g. the LM's embedding std)

    @nn.compact
    def __call__(self, images):
        n = self.num_prefix_tokens
        features = build_encoder(self.config, name="encoder")(images)
        if features.ndim == 3:
            mix = self.param("prefix_pool", nn.with_logical_partitioning(_group_mean_init, (None, None)),
                             (n, features.shape[1]), self.config.param_dtype)
            features = jnp.einsum("nl,blc->bnc", mix.astype(features.dtype), features)
        if self.prefix_init_std is None:
            kernel_init, bias_init = nn.initializers.lecun_normal(), nn.initializers.zeros_init()
        else:
            # The bias starts as an embedding-sized vector too: an exactly zero input embedding (a blank
            # image's prefix in train_blind) gives SmolLM2 NaN gradients.
            kernel_init = nn.initializers.normal(self.prefix_init_std / features.shape[-1] ** 0.5)
            bias_init = nn.initializers.normal(self.prefix_init_std)
        out_features = self.embed_dim if features.ndim == 3 else n * self.embed_dim
        prefix = nn.Dense(
            out_features, dtype=self.config.dtype, param_dtype=self.config.param_dtype,
            kernel_init=nn.with_logical_partitioning(kernel_init, ("vision_features", "embed")),
            bias_init=nn.with_logical_partitioning(bias_init, ("embed",)),
            name="prefix_proj")(features)
        return prefix.reshape(images.shape[0], n, self.embed_dim)


def vision_prefix(model: "Frozen") -> VisionPrefix:
    """A standalone copy of `model`'s `vision` submodule, to initialise only the vision params."""
    return VisionPrefix(model.vision_config, model.num_prefix_tokens, model.lm_config.hidden_size,
                        model.prefix_init_std, parent=None)


def check_batch(batch, num_prefix_tokens: int) -> None:
    """Host-side check that a batch follows the contract; raises ValueError naming what is wrong."""
    tokens, images = np.asarray(batch["tokens"]), batch["images"]
    mask, positions = np.asarray(batch["image_mask"]), np.asarray(batch["image_positions"])
    b, t = tokens.shape
    if images.ndim != 5 or images.shape[:2] != mask.shape or mask.shape != positions.shape or mask.shape[0] != b:
        raise ValueError(
            f"images {tuple(images.shape)} must be [B, K, H, W, 3] with image_mask and image_positions [B, K] "
            f"= {tuple(mask.shape)}, {tuple(positions.shape)} and B = {b} as in tokens {tokens.shape}")
    if batch["loss_mask"].shape != tokens.shape:
        raise ValueError(f"loss_mask {tuple(batch['loss_mask'].shape)} must have the shape of tokens {tokens.shape}")
    real = positions[mask]
    if real.size and (real.min() < 0 or real.max() + num_prefix_tokens > t):
        raise ValueError(
            f"an image's {num_prefix_tokens} prefix slots fall outside the {t} tokens (image_positions "
            f"{real.min()}..{real.max()}); leave room for every image's slots")
    for row in range(b):
        starts = np.sort(positions[row][mask[row]])
        if np.any(np.diff(starts) < num_prefix_tokens):
            raise ValueError(f"row {row}: image slots overlap (positions {starts.tolist()}, "
                             f"{num_prefix_tokens} slots each)")
        slots = (starts[:, None] + np.arange(num_prefix_tokens)).ravel()
        if np.asarray(batch["loss_mask"])[row, slots].any():
            raise ValueError(f"row {row}: loss_mask marks image slots {slots.tolist()} as targets")


class Frozen(nn.Module):
    """Vision encoder + prefix projection (`vision`) feeding a decoder-only LM (`lm`)."""

    lm_config: LMConfig
    vision_config: EncoderConfig
    num_prefix_tokens: int = 2
    variant: str = "frozen"
    prefix_init_std: float | None = None

    def setup(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown Frozen variant {self.variant!r}; supported: {', '.join(VARIANTS)}")
        self.vision = VisionPrefix(self.vision_config, self.num_prefix_tokens, self.lm_config.hidden_size,
                                   self.prefix_init_std)
        self.lm = DecoderLM(self.lm_config)

    def embed_inputs(self, batch):
        """Token embeddings [B, T, D] with each real image's prefix written into its placeholder slots."""
        tokens, images = batch["tokens"], batch["images"]
        b, t = tokens.shape
        k, n = images.shape[1], self.num_prefix_tokens
        if images.ndim != 5 or images.shape[0] != b or batch["image_mask"].shape != (b, k) \
                or batch["image_positions"].shape != (b, k):
            raise ValueError(
                f"images {images.shape} must be [B={b}, K, H, W, 3] with image_mask and image_positions [B, K]; "
                f"got {batch['image_mask'].shape} and {batch['image_positions'].shape}")
        if self.variant == "train_blind":
            images = jnp.zeros_like(images)
        prefix = self.vision(images.reshape((b * k,) + images.shape[2:])).reshape(b, k * n, -1)
        slots = (batch["image_positions"][:, :, None] + jnp.arange(n)).reshape(b, k * n)
        # Padding images write nowhere: their slots point past the end and are dropped.
        slots = jnp.where(jnp.repeat(batch["image_mask"], n, axis=1), slots, t)
        embeds = self.lm.embed(tokens)
        rows = jnp.arange(b)[:, None]
        embeds = embeds.at[rows, slots].set(prefix.astype(embeds.dtype), mode="drop")
        return nn.with_logical_constraint(embeds, HIDDEN_AXES)

    def __call__(self, batch, return_hidden: bool = False):
        """Logits [B, T, padded_vocab] (or final hidden states) for a batch."""
        return self.lm(inputs_embeds=self.embed_inputs(batch), return_hidden=return_hidden)

    def loss(self, batch, max_targets: int | None = None):
        """Mean next-token cross-entropy over `loss_mask`, the LM head applied only at predicting positions.

        max_targets: static number of target positions gathered per row (default T - 1: all). The
        `targets_dropped` metric counts targets beyond it (it should be 0).
        """
        # The last position predicts nothing, and attention is causal: it changes no other position, so the
        # LM runs without it (1/T of its FLOPs).
        hidden = self.lm(inputs_embeds=self.embed_inputs(batch)[:, :-1], return_hidden=True)
        targets, predict = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:]
        if max_targets is not None and max_targets < predict.shape[1]:
            index = jax.vmap(lambda m: jnp.nonzero(m, size=max_targets, fill_value=0)[0])(predict)
            weight = jnp.arange(max_targets)[None] < predict.sum(axis=1, keepdims=True)
            hidden = jnp.take_along_axis(hidden, index[:, :, None], axis=1)
            targets = jnp.take_along_axis(targets, index, axis=1)
        else:
            weight = predict
        nll = self.lm.target_nll(hidden, targets)
        weight = weight.astype(jnp.float32)
        count = weight.sum()
        nll_sum = (nll * weight).sum()
        loss = nll_sum / jnp.maximum(count, 1.0)
        return loss, {"loss": loss, "nll_sum": nll_sum, "num_targets": count,
                      "targets_dropped": predict.sum().astype(jnp.float32) - count}


def abstract_frozen_params(model: Frozen, image_shape: tuple[int, int, int]):
    """Boxed ShapeDtypeStructs of the full `{vision, lm}` tree, carrying logical axis names."""
    vision = vision_prefix(model)
    images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    return {"vision": jax.eval_shape(vision.init, jax.random.key(0), images)["params"],
            "lm": abstract_lm_params(model.lm_config)}
