"""cbam_jax.nnx: the NNX modules give the Linen model's logits, gradients and SGD step, load
pretrained weights and give Linen variables back."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import cbam_jax
import cbam_jax.nnx
from cbam_jax.pretrained import save_pretrained
from tests.helpers import randomize

TOLERANCE = 1e-6


def _random_variables(module, in_channels, seed=0):
    """Random values for every variable of `module` (no real init needed)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, in_channels)))
    return randomize({name: shapes[name] for name in ("params", "batch_stats") if name in shapes}, seed)


def _max_difference(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [path for path, _ in leaves_a] == [path for path, _ in leaves_b]
    return max(float(jnp.max(jnp.abs(x - y))) for (_, x), (_, y) in zip(leaves_a, leaves_b))


@pytest.mark.parametrize("kind", sorted(cbam_jax.nnx.LAYERS))
def test_every_layer_matches_linen_in_eval_and_training(kind):
    options = {"reduction": 4, "implementation": "xla"} if kind in ("cbam", "spatial_gate") else {"reduction": 4}
    if kind == "spatial_gate":
        del options["reduction"]
    linen = cbam_jax.nnx.LAYERS[kind](**options)
    variables = _random_variables(linen, 16)
    layer = cbam_jax.nnx.from_linen(linen, variables)
    x = jax.random.normal(jax.random.key(1), (3, 6, 5, 16))
    assert _max_difference(layer(x), linen.apply(variables, x)) <= TOLERANCE
    layer.train()
    expected, updates = linen.apply(variables, x, train=True, mutable=["batch_stats"])
    assert _max_difference(layer(x), expected) <= TOLERANCE
    if "batch_stats" in variables:  # the running averages moved, as Linen's
        assert _max_difference(layer.linen_variables()["batch_stats"], updates["batch_stats"]) <= TOLERANCE
        assert _max_difference(updates["batch_stats"], variables["batch_stats"]) > 1e-3


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.slow
def test_logits_gradients_and_one_sgd_step_equal_the_linen_model():
    linen = cbam_jax.ResNet(stage_sizes=(1, 1), block="basic", num_classes=10, stem="cifar", attention="cbam",
                            attention_options={"reduction": 4}, width=8)
    variables = _random_variables(linen, 3)
    images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    labels = jnp.arange(4) % 10
    model = cbam_jax.nnx.from_linen(linen, jax.tree.map(jnp.copy, variables))
    logits = nnx.jit(lambda model: model(images))(model)
    assert _max_difference(logits, jax.jit(linen.apply)(variables, images)) <= TOLERANCE

    # Gradients in training mode.
    def linen_loss(params):
        logits, updates = linen.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                      train=True, mutable=["batch_stats"])
        return _loss(logits, labels), updates["batch_stats"]

    (_, linen_stats), linen_grads = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))(variables["params"])
    model.train()
    nnx_grads = nnx.jit(nnx.grad(lambda m: _loss(m(images), labels)))(model)
    assert _max_difference(nnx_grads.to_pure_dict()["linen"], linen_grads) <= TOLERANCE

    # One SGD-with-momentum step: nnx.Optimizer under nnx.jit against optax on the Linen variables.
    tx = optax.sgd(0.1, momentum=0.9)
    model = cbam_jax.nnx.from_linen(linen, jax.tree.map(jnp.copy, variables))
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        grads = nnx.grad(lambda m: _loss(m(images), labels))(model)
        optimizer.update(model, grads)

    nnx_step(model, optimizer)
    updates, _ = tx.update(linen_grads, tx.init(variables["params"]), variables["params"])
    expected = {"params": optax.apply_updates(variables["params"], updates), "batch_stats": linen_stats}
    after = model.linen_variables()
    assert _max_difference(after, expected) <= TOLERANCE
    assert _max_difference(after["params"], variables["params"]) > 1e-3  # the step moved the weights


@pytest.mark.slow  # a full pretrained round trip; the layers are compared fast
def test_pretrained_weights_load_and_linen_variables_come_back(tmp_path):
    linen = cbam_jax.ResNet(stage_sizes=(1, 1), block="basic", num_classes=5, stem="cifar", attention="cbam",
                            attention_options={"reduction": 4}, width=8)
    variables = _random_variables(linen, 3)
    save_pretrained(tmp_path / "model", linen, variables)
    model = cbam_jax.nnx.load_pretrained(tmp_path / "model")
    assert isinstance(model, nnx.Module) and model.use_running_average
    images = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    logits = nnx.jit(lambda model, x: model(x))(model, images)
    assert _max_difference(logits, jax.jit(linen.apply)(variables, images)) <= TOLERANCE
    assert _max_difference(model.linen_variables(), variables) == 0.0
    assert model.linen_module == linen
    # Weights of the NNX model are the Linen names: surgery by path.
    assert model.linen.conv1["kernel"].shape == (3, 3, 3, 8)
    assert isinstance(model.linen.layer1_0["bn1"]["mean"], nnx.BatchStat)


@pytest.mark.slow
def test_create_model_passes_every_linen_option():
    model = cbam_jax.nnx.create_model("cbam_resnet18", rngs=nnx.Rngs(0), in_channels=1, num_classes=3, stem="cifar",
                                      width=8, reduction=4, pool_order="mean_max", spatial_use_bn=False)
    assert model.linen_module.attention_options["pool_order"] == "mean_max"
    assert "bn" not in model.linen.layer1_0["attention"]["spatial"]  # spatial_use_bn=False reached the layer
    assert model.linen.conv1["kernel"].shape == (3, 3, 1, 8) and model.linen.fc["kernel"].shape == (64, 3)
    with pytest.raises(ValueError, match="reduction"):
        cbam_jax.nnx.create_model("cbam_resnet18", rngs=nnx.Rngs(0), width=8, reduction=0)


def test_bad_layer_name_and_variables_are_refused():
    with pytest.raises(ValueError, match="Unknown layer 'cbma'"):
        cbam_jax.nnx.layer("cbma", 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="must hold 'params'"):
        cbam_jax.nnx.from_linen(cbam_jax.CBAM(), {"batch_stats": {}})
    with pytest.raises(ValueError, match="must hold 'params'"):
        cbam_jax.nnx.Bridged(cbam_jax.CBAM(), {"params": {}, "intermediates": {}})


@pytest.mark.slow
def test_step_time_benchmark_runs_every_variant(capsys):
    from benchmarks import nnx_step

    assert nnx_step.main(["--model", "resnet18", "--size", "8", "--batch", "2", "--rounds", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| linen", "| nnx.jit", "| nnx split/merge"]
