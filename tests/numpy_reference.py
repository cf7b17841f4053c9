"""NumPy versions of the attention formulas, written from the papers and the official code,
independently of the Flax layers they check (NHWC, float64)."""

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def conv2d(x, kernel, bias=None, padding=0, dilation=1):
    """Cross-correlation of x (B, H, W, I) with kernel (kh, kw, I, O), stride 1, zero padding."""
    kh, kw, _, out = kernel.shape
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h = xp.shape[1] - dilation * (kh - 1)
    w = xp.shape[2] - dilation * (kw - 1)
    y = np.zeros(x.shape[:1] + (h, w, out))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w, :]
            y += patch @ kernel[i, j]
    return y if bias is None else y + bias


def batch_norm(x, scale, bias, mean, var, eps=1e-5, train=False):
    """BatchNorm over all axes but the last; batch statistics (biased variance) when training."""
    if train:
        axes = tuple(range(x.ndim - 1))
        mean, var = x.mean(axes), x.var(axes)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def channel_gate(x, w1, w2, b1=None, b2=None, pool_types=("avg", "max")):
    """CBAM Eq. 2: sigmoid(sum_p MLP(pool_p(x))) * x, one MLP shared by the pools."""
    return x * sigmoid(channel_logits(x, w1, w2, b1, b2, pool_types))


def channel_logits(x, w1, w2, b1=None, b2=None, pool_types=("avg", "max")):
    """The channel gate's map before its sigmoid, (B, 1, 1, C)."""
    pools = {
        "avg": x.mean(axis=(1, 2)),
        "max": x.max(axis=(1, 2)),
        "lp": np.sqrt((x ** 2).sum(axis=(1, 2))),
        "lse": np.log(np.exp(x).sum(axis=(1, 2))),
    }
    logits = 0.0
    for p in pool_types:
        h = pools[p] @ w1 + (0 if b1 is None else b1)
        logits = logits + np.maximum(h, 0) @ w2 + (0 if b2 is None else b2)
    return logits[:, None, None, :]


def spatial_gate(x, kernel, order="max_mean", bn=None, train=False, compress=None):
    """CBAM Eq. 3: sigmoid(BN(conv([pool_a; pool_b]))) * x; bn = (scale, bias, mean, var) or None.
    With `compress` (C, 1), the paper's Sec. 4.1 alternative descriptor: x @ compress (a 1x1 conv)
    instead of the two channel pools."""
    return x * sigmoid(spatial_logits(x, kernel, order, bn, train, compress))


def spatial_logits(x, kernel, order="max_mean", bn=None, train=False, compress=None):
    """The spatial gate's map before its sigmoid, (B, H, W, 1)."""
    if compress is None:
        maps = {"max": x.max(axis=-1), "mean": x.mean(axis=-1)}
        first, second = order.split("_")
        descriptor = np.stack([maps[first], maps[second]], axis=-1)
    else:
        descriptor = x @ compress
    y = conv2d(descriptor, kernel, padding=kernel.shape[0] // 2)
    if bn is not None:
        y = batch_norm(y, *bn, train=train)
    return y


def cbam(x, channel, spatial, arrangement="channel_first"):
    """CBAM in the paper's three arrangements (Sec. 4.1, Table 3). `channel(x)` and `spatial(x)`
    return a gate's logits, (B, 1, 1, C) and (B, H, W, 1)."""
    if arrangement == "channel_first":
        x = x * sigmoid(channel(x))
        return x * sigmoid(spatial(x))
    if arrangement == "spatial_first":
        x = x * sigmoid(spatial(x))
        return x * sigmoid(channel(x))
    return x * sigmoid(channel(x) + spatial(x))  # parallel: one 3-D map from the summed logits


def bam_logits(x, p, dilation=4):
    """Official BAM's two branches before their combination (eval mode): the channel logits (B, 1, 1, C)
    and the spatial logits (B, H, W, 1); p holds NumPy params/stats by name."""
    def bn(y, name):
        return batch_norm(y, p[name]["scale"], p[name]["bias"], p[name]["mean"], p[name]["var"])

    c = x.mean(axis=(1, 2)) @ p["channel_fc1"]["kernel"] + p["channel_fc1"]["bias"]
    c = np.maximum(bn(c, "channel_bn"), 0) @ p["channel_fc2"]["kernel"] + p["channel_fc2"]["bias"]
    s = np.maximum(bn(conv2d(x, p["spatial_reduce"]["kernel"], p["spatial_reduce"]["bias"]), "spatial_reduce_bn"), 0)
    for i in range(2):
        conv = p[f"spatial_dilated{i}"]
        s = conv2d(s, conv["kernel"], conv["bias"], padding=dilation, dilation=dilation)
        s = np.maximum(bn(s, f"spatial_dilated{i}_bn"), 0)
    s = conv2d(s, p["spatial_final"]["kernel"], p["spatial_final"]["bias"])
    return c[:, None, None, :], s


def bam(x, p, combine="product", dilation=4):
    """Official BAM (eval mode): x * (1 + sigmoid(M_c (x) M_s)); p holds NumPy params/stats by name."""
    c, s = bam_logits(x, p, dilation)
    att = c * s if combine == "product" else c + s
    return x * (1 + sigmoid(att))
