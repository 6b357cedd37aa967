"""loss.learn_scale: true lets the temperature move; false freezes it (its bit-identity after
training is checked on the trained run of tests/test_grounding.py)."""

import jax
import numpy as np
from tiny import tiny_config

from jaxclip import config as config_lib
from jaxclip import mesh as mesh_lib
from jaxclip import run_setup
from jaxclip.optim import frozen_patterns
from jaxclip.train_step import make_train_step

INIT = 1.5  # model.init_logit_scale (log of the scale)


def test_learn_scale_is_a_config_key_defaulting_to_true():
    cfg = config_lib.load_config("demo")
    assert cfg.loss.learn_scale is True and "logit_scale" not in frozen_patterns(cfg)
    config_lib.override(cfg, "loss.learn_scale", "false")
    assert cfg.loss.learn_scale is False and frozen_patterns(cfg)[-1] == "logit_scale"


def test_a_fixed_temperature_has_no_optimizer_state():
    def moment_paths(learn_scale: bool) -> set[str]:
        setup = run_setup.build(tiny_config(**{"loss.learn_scale": learn_scale}))
        flat = jax.tree_util.tree_flatten_with_path(setup.abstract_state["opt_state"])[0]
        return {jax.tree_util.keystr(path) for path, _ in flat if "logit_scale" in str(path)}

    assert moment_paths(True) and not moment_paths(False)


def test_a_learned_temperature_moves_with_the_squared_loss():
    cfg = tiny_config(
        **{"loss.kind": "squared", "model.init_logit_scale": INIT, "optim.warmup_steps": 0}
    )
    setup = run_setup.build(cfg, jax.devices()[:1])
    step = make_train_step(setup)
    # Small random parameters instead of the model's initializer: a cheaper compile.
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
        setup.abstract_state["params"],
    )
    params["logit_scale"] = np.float32(INIT)
    state = run_setup.init_state(setup, jax.device_put(params, setup.state_shardings["params"]))
    for seed in range(3):
        batch = run_setup.synthetic_batch(setup, np.random.default_rng(seed))
        state, metrics = step(state, mesh_lib.global_batch(setup.mesh, batch))
        assert np.isfinite(float(metrics["loss"]))
    assert float(state["params"]["logit_scale"]) != INIT
