"""AdamW with a warm-up + cosine schedule and decoupled weight decay on matrices only; frozen
parameters (`optim.frozen`) get no update and no optimizer state."""

from __future__ import annotations

import re

import jax
import ml_collections
import optax
from flax import nnx

# CLIP's recipe (Radford et al. 2021): weight decay on weight matrices and the token
# embedding table, never on gains, biases, position embeddings or the logit scale. Biases
# can have two axes (q/k/v: heads x head_dim), so rank alone does not tell them apart.
NO_DECAY_NAMES = ("pos_embed",)
NO_DECAY_SUFFIXES = ("bias", "scale")


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int):
    warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.lr * optim_cfg.end_lr_fraction,
    )


def decay_mask(state: nnx.State) -> dict:
    """True for the parameters weight decay applies to: matrices (kernels, projections, the
    token embedding), judged by logical axes so stacked layers count right.

    A matrix has at least two axes besides "layers", none of them a LayerNorm's "norm";
    biases and gains (names ending in bias or scale) and position embeddings never decay.
    """

    def is_decayed(path, var) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        axes = var.get_metadata().get("logical_axes") or (None,) * var.get_value().ndim
        dims = [a for a in axes if a != "layers"]
        excluded = name.endswith(NO_DECAY_SUFFIXES) or any(n in name for n in NO_DECAY_NAMES)
        return len(dims) >= 2 and "norm" not in dims and not excluded

    mask = jax.tree_util.tree_map_with_path(
        is_decayed, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return nnx.to_pure_dict(mask)


def frozen_labels(tree: dict, patterns: tuple[str, ...]) -> dict:
    """ "frozen" / "trained" per leaf of `tree`: frozen when a regex fullmatches its path.

    Paths join the keys with "/" ("image/blocks/q_kernel"). A pattern that matches nothing
    is an error: a typo would otherwise train the tower it meant to lock.
    """
    compiled = [re.compile(p) for p in patterns]
    used: set[str] = set()

    def label(path, _) -> str:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        hits = [c.pattern for c in compiled if c.fullmatch(name)]
        used.update(hits)
        return "frozen" if hits else "trained"

    labels = jax.tree_util.tree_map_with_path(label, tree)
    unused = [p for p in patterns if p not in used]
    if unused:
        paths = sorted(
            {
                "/".join(str(getattr(k, "key", k)) for k in p[:2])
                for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
            }
        )
        raise ValueError(
            f"optim.frozen patterns {unused} match no parameter; paths look like "
            f"{', '.join(paths[:8])}/... (regexes must match the whole path, e.g. 'image/.*')"
        )
    return labels


def frozen_patterns(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The run's frozen-parameter patterns: `optim.frozen`, plus the logit scale when
    `loss.learn_scale` is false (the temperature stays at `model.init_logit_scale`)."""
    patterns = tuple(cfg.optim.get("frozen", ()))
    if not cfg.loss.get("learn_scale", True):  # .get: configs saved before the key existed
        patterns += ("logit_scale",)
    return patterns


def make_optimizer(
    optim_cfg: ml_collections.ConfigDict,
    total_steps: int,
    mask: dict,
    frozen: tuple[str, ...] | None = None,
):
    """AdamW (+ optional clipping); `frozen` parameters (default `optim_cfg.frozen`; a run
    passes `frozen_patterns(cfg)`) get zero updates and no state."""
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    trained = _adamw_chain(optim_cfg, schedule, mask)
    frozen = tuple(optim_cfg.get("frozen", ()) if frozen is None else frozen)
    if not frozen:
        return trained, schedule
    labels = frozen_labels(mask, frozen)
    # multi_transform hands each inner transform only its own leaves: Adam's moments (and
    # the clipping norm) cover the trained parameters alone.
    tx = optax.multi_transform({"trained": trained, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def _adamw_chain(optim_cfg: ml_collections.ConfigDict, schedule, mask: dict):
    chain = []
    if optim_cfg.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
    chain.append(
        optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=mask,
        )
    )
    return optax.chain(*chain)


def opt_state_specs(abstract_opt, param_specs):
    """PartitionSpecs for an optimizer state: each moment takes its parameter's spec.

    Unlike ``optax.tree_map_params``, this also handles the masked states of
    ``multi_transform`` (frozen parameters leave ``MaskedNode``s where their moments would
    be): a state leaf is matched to the parameter whose key path ends its own path; leaves
    that match no parameter (step counts) are replicated.
    """
    from jax.sharding import PartitionSpec

    def keys_of(path) -> tuple[str, ...]:
        return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))

    flat, _ = jax.tree_util.tree_flatten_with_path(
        param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    by_path = {keys_of(path): spec for path, spec in flat}

    def spec(path, leaf):
        keys = keys_of(path)
        for start in range(len(keys)):
            if keys[start:] in by_path and leaf.ndim > 0:
                return by_path[keys[start:]]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, abstract_opt)
