"""Fine-tune a CBAM-ResNet that starts from a plain ResNet's weights, with the stem frozen.

    python docs/examples/finetune_from_plain.py                         # offline, scikit-learn digits, ~30 s on a CPU
    python docs/examples/finetune_from_plain.py --source resnet18.pth   # a torchvision ResNet-18 checkpoint
    python docs/examples/finetune_from_plain.py --source resnet18.tv_in1k  # the same, downloaded by name once

1. The plain ResNet: --source (a PyTorch checkpoint, a registry name, an `hf-hub:` id or a pretrained
   directory) or, offline, a plain ResNet-18 trained here for a few steps on the digits 0-6 and saved
   as a pretrained directory (standing in for ImageNet weights).
2. Transfer (`cbam_jax.init_from`): a CBAM-ResNet-18 with every backbone tensor of the
   plain one, its CBAM modules initialised as the official variant prescribes, and a new head; the
   report says what was new.
3. Fine-tune on the digits 7-9 with the stem (conv1, bn1) frozen: `optax.multi_transform` gives its
   parameters zero updates, and its BatchNorm statistics are put back after every step.

train.py does the same from a config: `--config.init_from=SOURCE --config.freeze=conv1,bn1`
(and `--config.new_lr_factor` for the parameters the source lacked); see the README.
"""

import argparse
import tempfile
import time

import jax
import numpy as np
import optax
from flax import traverse_util

from cbam_jax import create_model, save_pretrained
from cbam_jax.factory import init_from, load

FROZEN = ("conv1", "bn1")  # the stem


def digits(classes: range, size: int, channels: int) -> tuple[np.ndarray, ...]:
    """scikit-learn's 8x8 digits of `classes` (labels counted from 0), resized to `size`, split 80/20."""
    from sklearn.datasets import load_digits
    data = load_digits()
    keep = np.isin(data.target, classes)
    images = (data.images[keep] / 16.0).astype(np.float32)[..., None]
    images = np.asarray(jax.image.resize(images, (len(images), size, size, 1), "bilinear"))
    images = np.repeat((images - 0.3) / 0.4, channels, axis=-1)
    labels = data.target[keep] - classes.start
    split = int(0.8 * len(images))
    return images[:split], labels[:split], images[split:], labels[split:]


def train(model, variables, data, *, steps: int, learning_rate: float, frozen: tuple[str, ...] = ()):
    """Adam on cross-entropy, batch 64; modules named in `frozen` keep their parameters and statistics."""
    labels = traverse_util.path_aware_map(lambda path, _: "frozen" if path[0] in frozen else "trainable",
                                          variables["params"])
    tx = optax.multi_transform({"trainable": optax.adam(learning_rate), "frozen": optax.set_to_zero()}, labels)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, images, targets):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                          mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), updates["batch_stats"]
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_stats = {k: batch_stats[k] if k in frozen else v for k, v in new_stats.items()}  # frozen BN keeps its stats
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    images, targets = data[0], data[1]
    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = rng.choice(len(images), 64, replace=False)
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images[batch], targets[batch])
    return {"params": params, "batch_stats": batch_stats}, float(loss)


def accuracy(model, variables, images, labels) -> float:
    logits = jax.jit(model.apply)(variables, images)
    return float(np.mean(np.argmax(logits, -1) == labels))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="plain ResNet weights (default: train a small one here)")
    parser.add_argument("--arch", default="cbam_resnet18")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    with tempfile.TemporaryDirectory() as workdir:
        source = args.source
        if source is None:  # stand-in for ImageNet weights: a plain ResNet-18 trained on the digits 0-6
            plain = create_model("resnet18", num_classes=7, stem="cifar", width=16)
            data = digits(range(0, 7), 8, 1)
            variables = jax.jit(plain.init)(jax.random.key(0), data[0][:1])
            variables, loss = train(plain, variables, data, steps=args.steps, learning_rate=3e-3)
            print(f"plain resnet18 on digits 0-6: accuracy {accuracy(plain, variables, *data[2:]):.3f}")
            source = save_pretrained(f"{workdir}/plain", plain, variables)
        plain, plain_variables = load(source)  # its stem, width and input channels decide the target's
        channels = plain_variables["params"]["conv1"]["kernel"].shape[2]
        size = 8 if plain.stem == "cifar" else 64
        model = create_model(args.arch, num_classes=3, stem=plain.stem, width=plain.width,
                             **({"reduction": 4} if plain.width < 64 else {}))
        variables, report = init_from(source, model)
        print(f"{args.arch} from {'the plain resnet18' if args.source is None else args.source}: {report.summary()}")

    data = digits(range(7, 10), size, channels)
    before = accuracy(model, variables, *data[2:])
    tuned, loss = train(model, variables, data, steps=args.steps, learning_rate=1e-3, frozen=FROZEN)
    after = accuracy(model, tuned, *data[2:])
    stem_kept = all(np.array_equal(tuned[c][m][k], variables[c][m][k]) for c in ("params", "batch_stats")
                    for m in FROZEN if m in variables[c] for k in variables[c][m])
    print(f"fine-tuned on digits 7-9 with the stem frozen: accuracy {before:.3f} -> {after:.3f}; stem (parameters and "
          f"BatchNorm statistics) unchanged: {stem_kept}; {time.perf_counter() - start:.1f} s")
    return {"before": before, "after": after, "stem_kept": stem_kept, "new": len(report.new)}


if __name__ == "__main__":
    main()
