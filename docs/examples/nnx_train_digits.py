"""Train a CBAM-ResNet as a Flax NNX module on scikit-learn's 8x8 digits (offline, ~1 min on 2 cores).

    python docs/examples/nnx_train_digits.py --epochs 10 --out digits_nnx/

The NNX loop of the Flax tutorials: `cbam_jax.nnx.create_model`, `nnx.Optimizer(model, tx, wrt=nnx.Param)`
and an `nnx.jit` step; `model.train()` / `model.eval()` switch BatchNorm between batch statistics
and running averages. `--out` saves the trained model with `cbam_jax.save_pretrained` (Linen
variables), ready for `cbam-jax predict` / `cbam-jax export` / `cbam_jax.nnx.load_pretrained`.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cbam_jax
import cbam_jax.nnx
from cbam_jax.data import digits_source
from cbam_jax.images import normalize

MEAN, STD = (0.3,), (0.4,)  # per channel (one: greyscale)


def loss_fn(model: nnx.Module, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array) -> jax.Array:
    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, images, labels)
    optimizer.update(model, grads)  # the BatchNorm running averages were updated by the forward pass
    return loss


@nnx.jit
def correct(model: nnx.Module, images: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.sum(jnp.argmax(model(images), -1) == labels)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", help="save the trained model here (save_pretrained)")
    args = parser.parse_args(argv)

    train, test = digits_source("train"), digits_source("test")
    model = cbam_jax.nnx.create_model("cbam_resnet18", rngs=nnx.Rngs(0), in_channels=1, num_classes=10,
                                      stem="cifar", width=16, reduction=4)
    steps_per_epoch = len(train) // args.batch_size
    schedule = optax.cosine_decay_schedule(0.1, args.epochs * steps_per_epoch)
    optimizer = nnx.Optimizer(model, optax.sgd(schedule, momentum=0.9, nesterov=True), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(train))
        losses = []
        for step in range(steps_per_epoch):
            chosen = order[step * args.batch_size:(step + 1) * args.batch_size]
            images = normalize(jnp.asarray(train.images[chosen]), MEAN, STD)
            losses.append(train_step(model, optimizer, images, jnp.asarray(train.labels[chosen])))
        model.eval()
        test_images = normalize(jnp.asarray(test.images), MEAN, STD)
        accuracy = float(correct(model, test_images, jnp.asarray(test.labels))) / len(test)
        print(f"epoch {epoch + 1}: train loss {float(np.mean(losses)):.4f}, test accuracy {accuracy:.2%}", flush=True)
    summary = {"epochs": args.epochs, "test_accuracy": accuracy}
    if args.out:
        cbam_jax.save_pretrained(args.out, model.linen_module, model.linen_variables(), metadata={
            "class_names": [str(d) for d in range(10)],
            "preprocessing": {"resize": [8, 8], "crop": 8, "mean": [MEAN], "std": [STD], "channels": 1}})
        summary["saved"] = args.out
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
