"""Running the same model in PyTorch and in Flax and comparing everything: the parity harness.

`prepare` makes a torch model's weights generic (random BatchNorm affine parameters and biases,
running statistics moved by a few train-mode passes); `train_torch` / `train_flax` take the same
SGD-with-momentum steps in both frameworks and return what the tests compare.
"""

import dataclasses

import jax
import numpy as np
import optax
import torch
import torch.nn.functional as F

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4


def prepare(model: torch.nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> torch.nn.Module:
    """Randomise 1-D parameters (BN scale/bias, MLP biases, often constant at init), then move the
    BN running statistics away from 0/1 with three train-mode passes; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                fill = torch.rand(param.shape, generator=generator) + 0.5 if name.endswith("weight") else \
                    0.1 * torch.randn(param.shape, generator=generator)
                param.copy_(fill)
        model.train()
        for _ in range(3):
            model(torch.randn(input_shape, generator=generator))
    return model.eval()


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def batch(input_shape: tuple[int, ...], num_classes: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(input_shape, generator=generator), torch.randint(0, num_classes, (input_shape[0],),
                                                                       generator=generator)


@dataclasses.dataclass
class Steps:
    """What two SGD steps from the same weights produce (numpy, framework-native layouts)."""

    train_logits: np.ndarray  # first step, train mode
    loss: float  # first step
    grads: dict  # first step
    stats: dict  # BatchNorm running statistics after the first step
    params: dict  # parameters after both steps


def train_torch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> tuple[Steps, dict]:
    """SGD steps in PyTorch (in the model's dtype; results are returned in it). Returns the
    Steps (grads/stats/params as state_dicts) and, per BatchNorm running_var key, (torch momentum,
    running_var before, number of values per channel)."""
    x = x.to(next(model.parameters()).dtype)
    counts = {}

    def count_values(name):
        def hook(module, inputs):
            counts.setdefault(name, inputs[0].numel() // inputs[0].shape[1])
        return hook

    hooks = [module.register_forward_pre_hook(count_values(name)) for name, module in model.named_modules()
             if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        if step == 0:
            first = (_float32(logits), float(loss), {k: _float32(p.grad) for k, p in model.named_parameters()},
                     {k: _float32(v) for k, v in model.state_dict().items() if "running" in k})
        optimizer.step()
    for hook in hooks:
        hook.remove()
    model.eval()
    bn_info = {f"{name}.running_var": (model.get_submodule(name).momentum, _float32(before[f"{name}.running_var"]), n)
               for name, n in counts.items()}
    params = {k: _float32(p) for k, p in model.named_parameters()}
    return Steps(*first, params=params), bn_info


def _float32(tensor: torch.Tensor) -> np.ndarray:
    """float32 tensors as float32 arrays, float64 ones as float64 (a float64 model's exact results)."""
    return tensor.detach().numpy().copy()


def flax_running_stats(torch_stats: dict, bn_info: dict) -> dict:
    """Torch running statistics after one step, with the unbiased batch variance torch stores replaced by
    the biased one Flax stores: var_b = var_u * (n - 1) / n."""
    expected = dict(torch_stats)
    for key, (momentum, before, n) in bn_info.items():
        decayed = (1 - momentum) * before
        expected[key] = decayed + (torch_stats[key] - decayed) * (n - 1) / n
    return expected


def train_flax(model, variables: dict, x: np.ndarray, y: np.ndarray, steps: int = 2) -> Steps:
    """The same SGD steps in Flax (one jitted step function)."""
    tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))

    def loss_fn(params, batch_stats):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, updates["batch_stats"])

    @jax.jit
    def step(params, batch_stats, opt_state):
        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss, logits, grads

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    for index in range(steps):
        params, batch_stats, opt_state, loss, logits, grads = step(params, batch_stats, opt_state)
        if index == 0:
            first = (np.asarray(logits), float(loss), jax.tree.map(np.asarray, grads),
                     jax.tree.map(np.asarray, batch_stats))
    return Steps(*first, params=jax.tree.map(np.asarray, params))


def assert_matches_float64(flax_tree, torch_tree, exact_tree, *, rtol: float, label: str) -> float:
    """Flax float32 results agree with PyTorch float64 ones to `rtol` relative to each tensor's scale, or,
    where float32 itself is ill-conditioned (BatchNorm over a handful of values), to 10x PyTorch float32's
    own error there. Returns the worst relative difference between the two float32 results."""
    worst = 0.0
    paths = jax.tree_util.tree_leaves_with_path(exact_tree)
    floor = 1e-3 * max(float(np.max(np.abs(g))) for _, g in paths)
    for (path, exact), flax_value, torch_value in zip(paths, jax.tree.leaves(flax_tree), jax.tree.leaves(torch_tree)):
        scale = max(float(np.max(np.abs(exact))), floor)
        flax_error = float(np.max(np.abs(flax_value - exact))) / scale
        torch_error = float(np.max(np.abs(torch_value - exact))) / scale
        assert flax_error <= max(rtol, 10 * torch_error), (
            f"{label} {jax.tree_util.keystr(path)}: relative error {flax_error:.2e} "
            f"(PyTorch float32: {torch_error:.2e})")
        worst = max(worst, float(np.max(np.abs(flax_value - torch_value))) / scale)
    return worst


def assert_close_per_tensor(found, expected, *, rtol: float, label: str) -> float:
    """Every tensor within rtol of its own scale (max |expected|); returns the worst relative error.

    Tensors whose true value is ~0 (e.g. the gradient of a bias followed by BatchNorm) are measured
    against 1e-3 of the largest scale in the tree instead of their own rounding noise."""
    worst = 0.0
    paths = jax.tree_util.tree_leaves_with_path(expected)
    found_leaves = jax.tree.leaves(found)
    assert len(found_leaves) == len(paths)
    floor = 1e-3 * max(float(np.max(np.abs(want))) for _, want in paths)
    for (path, want), got in zip(paths, found_leaves):
        scale = max(float(np.max(np.abs(want))), floor)
        error = float(np.max(np.abs(got - want))) / scale
        assert error <= rtol, f"{label} {jax.tree_util.keystr(path)}: relative error {error:.2e} > {rtol}"
        worst = max(worst, error)
    return worst
