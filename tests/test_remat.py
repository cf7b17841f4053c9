"""ResNet(remat='blocks') recomputes each block in the backward pass: same forward, same gradients,
same BatchNorm statistics, same parameter tree as remat='none'."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbam_jax import ResNet
from cbam_jax.training.config import ConfigError, base_config, validate
from cbam_jax.training.trainer import build_model
from tests.helpers import random_variables

IMAGE_SHAPE = (2, 32, 32, 3)


def _tiny(block: str, implementation: str, remat: str) -> ResNet:
    # Two stages of one block each: a strided block with a projection shortcut and CBAM gates.
    return ResNet(stage_sizes=(1, 1), block=block, attention="cbam", attention_options={"reduction": 4}, width=8, num_classes=5, stem="cifar",
                  implementation=implementation, remat=remat)


def _loss_and_grads(model: ResNet, variables, images, labels):
    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                      train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    return loss, logits, stats, grads


# One case fast; the others compile three more pairs of training steps.
@pytest.mark.parametrize("block, implementation", [
    ("basic", "xla"),
    pytest.param("bottleneck", "xla", marks=pytest.mark.slow),
    pytest.param("basic", "auto", marks=pytest.mark.slow),
    pytest.param("bottleneck", "auto", marks=pytest.mark.slow)])
def test_remat_blocks_gives_the_same_forward_and_gradients(block, implementation):
    plain = _tiny(block, implementation, "none")
    remat = _tiny(block, implementation, "blocks")
    variables = random_variables(plain, IMAGE_SHAPE)
    # Same parameter tree (names and shapes): checkpoints load either way.
    shapes = jax.eval_shape(remat.init, jax.random.key(0), jnp.zeros(IMAGE_SHAPE))
    assert jax.tree.map(lambda a: a.shape, {k: shapes[k] for k in variables}) == \
        jax.tree.map(lambda a: a.shape, variables)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal(IMAGE_SHAPE, np.float32))
    labels = jnp.asarray(rng.integers(0, 5, IMAGE_SHAPE[0]))

    loss, logits, stats, grads = _loss_and_grads(plain, variables, images, labels)
    loss_r, logits_r, stats_r, grads_r = _loss_and_grads(remat, variables, images, labels)
    # The recomputed forward is the same computation: equal up to float32 rounding (XLA may fuse
    # the recomputed ops differently), far below the size of any gradient checked here.
    np.testing.assert_allclose(logits_r, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats_r, stats)
    flat, flat_r = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_r)
    for (path, g), g_r in zip(flat, flat_r, strict=True):
        scale = float(np.max(np.abs(g)))
        assert scale > 0, jax.tree_util.keystr(path)  # every parameter gets a gradient to compare
        np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
    # Inference is untouched by remat.
    np.testing.assert_allclose(jax.jit(remat.apply)(variables, images), jax.jit(plain.apply)(variables, images),
                               rtol=1e-6, atol=1e-6)


def test_remat_rejects_an_unknown_choice():
    with pytest.raises(ValueError, match="remat"):
        _tiny("basic", "xla", "everything")


def test_config_model_remat_reaches_the_trained_model():
    config = base_config()
    config.model.remat = "blocks"
    assert build_model(validate(config)).remat == "blocks"
    assert build_model(validate(base_config())).remat == "none"
    old = base_config()  # a config saved before the field existed
    del old.model["remat"]
    assert validate(old).model.remat == "none"
    wrong = base_config()
    wrong.model.remat = "all"
    with pytest.raises(ConfigError, match="config.model.remat = 'all'"):
        validate(wrong)


@pytest.mark.slow  # compiles two full training steps
def test_remat_blocks_lowers_the_compiled_training_step_memory():
    """XLA's buffer assignment of the jitted step (no timing): the recomputed blocks' activations are
    not kept, so the temporaries shrink (a plain jax.checkpoint does not achieve this on XLA:CPU)."""

    def temp_bytes(remat: str) -> int:
        model = ResNet(stage_sizes=(2, 2), block="basic", attention="cbam", attention_options={"reduction": 4},
                       width=8, num_classes=5, stem="cifar", implementation="xla", remat=remat)
        images = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32)
        variables = jax.eval_shape(model.init, jax.random.key(0), images)

        def loss_fn(params, batch_stats, x):
            logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
            return logits.sum()

        step = jax.jit(jax.grad(loss_fn)).lower(variables["params"], variables["batch_stats"], images).compile()
        return step.memory_analysis().temp_size_in_bytes

    plain, remat = temp_bytes("none"), temp_bytes("blocks")
    assert remat < 0.6 * plain, (remat, plain)
