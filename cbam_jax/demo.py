"""A forward/backward demo: `python -m cbam_jax.demo` builds a CBAM-ResNet-18 (CIFAR stem),
runs a jitted training step on random data and prints shapes, the loss and the attention maps."""

import time

import jax
import jax.numpy as jnp
import optax

from cbam_jax import create_model


def main() -> None:
    model = create_model("cbam_resnet18", num_classes=10, stem="cifar")
    images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10
    variables = model.init(jax.random.key(1), images)
    params = variables["params"]
    print(f"cbam_resnet18 (CIFAR stem): {sum(p.size for p in jax.tree.leaves(params)):,} parameters")

    @jax.jit
    def loss_and_grads(params, batch_stats):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                          mutable=["batch_stats", "intermediates"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["intermediates"]
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    start = time.perf_counter()
    (loss, maps), grads = jax.block_until_ready(loss_and_grads(params, variables["batch_stats"]))
    print(f"forward + backward (with compile): {time.perf_counter() - start:.1f} s, loss {float(loss):.4f}")
    grad_norm = optax.global_norm(grads)
    print(f"gradient global norm {float(grad_norm):.4f} (finite: {bool(jnp.isfinite(grad_norm))})")
    spatial = maps["layer4_1"]["attention"]["spatial"]["spatial_attention"][0]
    channel = maps["layer4_1"]["attention"]["channel"]["channel_attention"][0]
    print(f"last block: spatial attention {spatial.shape}, channel attention {channel.shape}, "
          f"values in [{float(spatial.min()):.3f}, {float(spatial.max()):.3f}]")


if __name__ == "__main__":
    main()
