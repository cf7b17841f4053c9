"""The benchmark's PyTorch twins are the same networks as cbam-jax's; its report arithmetic."""

import argparse
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.throughput import (
    Case,
    Variant,
    cpu_description,
    markdown,
    model_flops,
    process_order,
    ratios,
    round_ratios,
    run_processes,
    spread,
)
from benchmarks.throughput import main as throughput_main
from cbam_jax.registry import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jax_param_count(name: str, stem: str, num_classes: int, size: int) -> int:
    model = create_model(name, stem=stem, num_classes=num_classes)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def _put_torch_module(flat: dict, module, path: list[str]) -> None:
    """A Conv2d, BatchNorm2d or Linear's weights into `flat` as Flax variables under `path`, transposed
    to Flax's layouts (conv OIHW -> HWIO, grouped ones too: (O, I/G, H, W) -> (H, W, I/G, O))."""
    def array(tensor):
        return tensor.detach().numpy().copy()

    kind = type(module).__name__
    if kind == "Conv2d":
        flat[("params", *path, "kernel")] = array(module.weight).transpose(2, 3, 1, 0)
    elif kind == "BatchNorm2d":
        flat[("params", *path, "scale")], flat[("params", *path, "bias")] = array(module.weight), array(module.bias)
        flat[("batch_stats", *path, "mean")] = array(module.running_mean)
        flat[("batch_stats", *path, "var")] = array(module.running_var)
    elif kind == "Linear":
        flat[("params", *path, "kernel")], flat[("params", *path, "bias")] = array(module.weight).T, array(module.bias)


def _twin_variables(twin) -> dict:
    """The ResNet twin's weights as the Flax variables of the cbam-jax model of the same name: modules in
    order (stem conv and BN, then per block its convolutions and BNs, the CBAM MLP and spatial conv/BN,
    the shortcut), PyTorch layouts transposed to Flax's."""
    from flax.traverse_util import unflatten_dict

    flat = {}
    _put_torch_module(flat, twin.stem[0], ["conv1"])
    _put_torch_module(flat, twin.stem[1], ["bn1"])
    stage, index, channels = 0, 0, None
    for block in twin.blocks:
        convs = [m for m in block.residual if type(m).__name__ == "Conv2d"]
        norms = [m for m in block.residual if type(m).__name__ == "BatchNorm2d"]
        if convs[-1].out_channels != channels:  # the first block of a stage changes the width
            stage, index, channels = stage + 1, 0, convs[-1].out_channels
        name = f"layer{stage}_{index}"
        index += 1
        for number, (c, n) in enumerate(zip(convs, norms), 1):
            _put_torch_module(flat, c, [name, f"conv{number}"])
            _put_torch_module(flat, n, [name, f"bn{number}"])
        if type(block.residual[-1]).__name__ == "CBAM":
            channel, spatial = block.residual[-1]
            _put_torch_module(flat, channel.mlp[0], [name, "attention", "channel", "fc1"])
            _put_torch_module(flat, channel.mlp[2], [name, "attention", "channel", "fc2"])
            _put_torch_module(flat, spatial.conv, [name, "attention", "spatial", "conv"])
            _put_torch_module(flat, spatial.bn, [name, "attention", "spatial", "bn"])
        if type(block.shortcut).__name__ == "Sequential":
            _put_torch_module(flat, block.shortcut[0], [name, "downsample_conv"])
            _put_torch_module(flat, block.shortcut[1], [name, "downsample_bn"])
    _put_torch_module(flat, twin.fc, ["fc"])
    return unflatten_dict(flat)


def _mobilenet_twin_variables(twin) -> dict:
    """The MobileNet twin's weights as Flax variables: its module names are cbam-jax's parameter names
    but for `units.` and the CBAM's positions (0: channel gate with its MLP's Linears 0 and 2 = fc1, fc2;
    1: spatial gate)."""
    from flax.traverse_util import unflatten_dict

    flat = {}
    for name, module in twin.named_modules():
        parts, path = [p for p in name.split(".") if p != "units"], []
        for before, part in zip(["", *parts], parts):
            if before.endswith("attention"):
                path.append({"0": "channel", "1": "spatial"}[part])
            elif before == "mlp":
                path.append({"0": "fc1", "2": "fc2"}.get(part, part))  # 1: the ReLU
            elif part != "mlp":
                path.append(part)
        _put_torch_module(flat, module, path)
    return unflatten_dict(flat)


FULL_SIZE = pytest.mark.slow  # 1-6 s each; the CIFAR CBAM-ResNet-18 is the fast case


@pytest.mark.parametrize("name, stem, num_classes, size", [
    ("cbam_resnet18", "cifar", 10, 32),
    pytest.param("resnet18", "cifar", 10, 32, marks=FULL_SIZE),
    pytest.param("cbam_resnet50", "imagenet", 1000, 64, marks=FULL_SIZE),
    pytest.param("cbam_resnext50_32x4d", "imagenet", 1000, 64, marks=FULL_SIZE),
    pytest.param("cbam_mobilenet_w1", "imagenet", 1000, 64, marks=FULL_SIZE),
    pytest.param("mobilenet_w1", "imagenet", 1000, 64, marks=FULL_SIZE)])
def test_torch_twin_is_the_same_network(name, stem, num_classes, size):
    """The same parameters, and the same logits from the same weights (random BatchNorm parameters and
    statistics), in eval mode and in train mode (batch statistics: in eval mode the deep MobileNet's
    random running statistics shrink the input's share of the logits to nothing, so that only the
    train-mode logits depend on every layer)."""
    torch = pytest.importorskip("torch")
    from benchmarks.torch_models import twin as torch_twin
    from tests.torch_refs.harness import prepare

    torch.manual_seed(0)
    twin = prepare(torch_twin(name, num_classes, stem), (2, 3, size, size))
    assert sum(p.numel() for p in twin.parameters()) == _jax_param_count(name, stem, num_classes, size)
    model = create_model(name, stem=stem, num_classes=num_classes)
    variables = (_mobilenet_twin_variables if "mobilenet" in name else _twin_variables)(twin)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, dict(shapes))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    for train in (False, True):
        with torch.no_grad():
            expected = twin.train(train)(x).numpy()
        apply = functools.partial(model.apply, train=train, mutable=["batch_stats"] if train else False)
        logits = jax.jit(apply)(variables, x.numpy().transpose(0, 2, 3, 1))
        logits = np.asarray(logits[0] if train else logits)
        assert np.max(np.abs(logits - expected)) <= 1e-4 * max(1.0, np.max(np.abs(expected))), f"train={train}"
    assert np.max(np.abs(expected[0] - expected[1])) > 0.1 * np.max(np.abs(expected))  # the input counts


def test_torch_twin_of_a_name_without_one_is_refused():
    pytest.importorskip("torch")
    from benchmarks.torch_models import twin

    for name in ("se_resnet50", "bam_resnet50", "cbam_wide_resnet18_2"):
        with pytest.raises(ValueError, match="no PyTorch twin"):
            twin(name)


def test_case_parsing():
    assert Case.parse("cbam_resnet18:32:64:cifar") == Case("cbam_resnet18", 32, 64, "cifar")
    assert Case.parse("cbam_resnet50:224:8").stem == "imagenet"
    for bad in ("cbam_resnet50:224", "cbam_resnet51:224:8", "cbam_resnet50:224:8:mnist", "cbam_resnet50:x:8"):
        with pytest.raises(argparse.ArgumentTypeError):
            Case.parse(bad)


def test_detector_case_parsing():
    import benchmarks.throughput as throughput

    case = Case.parse("cbam_resnet50:512:2:fcos")
    assert case == Case("cbam_resnet50", 512, 2, "imagenet", detector=True) and case.name == "cbam_resnet50 fcos 512px b2"
    assert Case.parse("cbam_resnet50:512:2").detector is False
    with pytest.raises(SystemExit):  # no PyTorch twin of a detector
        throughput.parse_args(["--cases", "cbam_resnet18:64:2:fcos", "--impls", "jax", "torch"])


@pytest.mark.slow  # compiles a detector train step (~70 s cold on 2 loaded cores, 8 s from the cache)
def test_a_detector_case_times_the_detector_train_step(monkeypatch):
    """':fcos' cases build an FCOS detector on the backbone and time its train step (a tiny one here)."""
    import benchmarks.throughput as throughput

    monkeypatch.setattr(throughput, "DETECTOR_OPTIONS",
                        {"width": 8, "fpn_channels": 8, "head_convs": 1, "head_norm_groups": 4})
    variant = throughput.Variant(Case.parse("cbam_resnet18:32:2:fcos"), "cbam", "train", "float32", "jax")
    throughput.run([variant], repeats=2, warmup=1, settle_s=0.0, log=lambda message: None)
    assert len(variant.times) == 2 and all(t > 0 for t in variant.times) and variant.compile_s > 0
    assert variant.flops > 0


def test_ratios_compare_jax_with_torch_and_cbam_with_plain():
    def row(arch, impl, images_per_s, step_s):
        return {"case": "c", "arch": arch, "mode": "train", "dtype": "float32", "impl": impl,
                "images_per_s": images_per_s, "step_s_median": step_s}

    rows = [row("cbam", "jax", 30.0, 2.0), row("cbam", "torch", 20.0, 3.0),
            row("plain", "jax", 40.0, 1.5), row("plain", "torch", 25.0, 2.4)]
    by_impl = {(e["arch"], e["impl"]): e for e in ratios(rows)}
    assert by_impl["cbam", "jax"]["jax_over_torch"] == pytest.approx(1.5)
    assert by_impl["cbam", "jax"]["cbam_cost"] == pytest.approx(2.0 / 1.5)
    assert by_impl["cbam", "torch"]["cbam_cost"] == pytest.approx(3.0 / 2.4)
    assert by_impl["plain", "jax"]["jax_over_torch"] == pytest.approx(40 / 25)
    assert ("plain", "torch") not in by_impl


@pytest.mark.parametrize("model, giga_macs", [("resnet18", 1.814), pytest.param("resnet50", 4.089, marks=FULL_SIZE),
                                              pytest.param("resnext50_32x4d", 4.23, marks=FULL_SIZE),
                                              pytest.param("mobilenet_w1", 0.569, marks=FULL_SIZE)])
def test_model_flops_match_published_counts(model, giga_macs):
    """torchvision's model table: 1.81 / 4.09 / 4.23 GFLOPS (multiply-adds) per 224px image for ResNet-18 /
    ResNet-50 / ResNeXt-50 32x4d (grouped convs count 1/32 of a dense one), the MobileNet paper's 569 M
    multiply-adds (depthwise convs); a train step is 3x."""
    case = Case("cbam_" + model, 224, 2)
    assert model_flops(case, "plain", "infer") == pytest.approx(2 * 2 * giga_macs * 1e9, rel=2e-3)
    assert model_flops(case, "plain", "train") == pytest.approx(3 * model_flops(case, "plain", "infer"))
    assert model_flops(case, "cbam", "infer") > model_flops(case, "plain", "infer")


def test_spread_gives_median_range_and_interquartile_range():
    s = spread([1.0, 4.0, 2.0, 3.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 4.0, 4)
    assert (s["q1"], s["q3"]) == pytest.approx((1.75, 3.25))  # linear interpolation between order statistics


def test_round_ratios_pair_rounds():
    """This side 2 s and 4 s, the other 3 s and 2 s: this side is 1.5x and 0.5x as fast, round by round."""
    assert round_ratios([2.0, 4.0], [3.0, 2.0]) == pytest.approx([1.5, 0.5])


def test_ratios_are_medians_of_per_round_ratios_with_their_spread():
    def row(impl, rounds):
        return {"case": "c", "arch": "cbam", "mode": "train", "dtype": "float32", "impl": impl,
                "round_medians_s": rounds, "step_s_median": float(np.median(rounds)),
                "images_per_s": 8 / float(np.median(rounds))}

    # per-round ratios 3/2, 2/4, 6/3 = 1.5, 0.5, 2.0: median 1.5, whereas the ratio of medians is 3/3 = 1
    entry, = ratios([row("jax", [2.0, 4.0, 3.0]), row("torch-cl", [3.0, 2.0, 6.0])])
    assert entry["jax_over_torch-cl"] == pytest.approx(1.5)
    assert entry["jax_over_torch-cl_spread"]["min"] == pytest.approx(0.5)
    assert entry["jax_over_torch-cl_spread"]["max"] == pytest.approx(2.0)
    assert entry["jax_over_torch-cl_spread"]["n"] == 3
    single, = ratios([row("jax", [2.0]), row("torch-cl", [3.0])])  # one round: the plain ratio, no spread
    assert single["jax_over_torch-cl"] == pytest.approx(1.5) and "jax_over_torch-cl_spread" not in single


def _variants(impls, archs=("cbam",)):
    case = Case("cbam_resnet18", 16, 2, "cifar")
    return [Variant(case, arch, "train", "float32", impl) for arch in archs for impl in impls]


def test_process_order_alternates_implementations_and_reverses_every_other_round():
    order = process_order(_variants(["jax", "torch-cl"], archs=("cbam", "plain")), rounds=3)
    names = [(r, v.arch, v.impl) for r, v in order]
    assert names == [(0, "cbam", "jax"), (0, "cbam", "torch-cl"), (0, "plain", "jax"), (0, "plain", "torch-cl"),
                     (1, "cbam", "torch-cl"), (1, "cbam", "jax"), (1, "plain", "torch-cl"), (1, "plain", "jax"),
                     (2, "cbam", "jax"), (2, "cbam", "torch-cl"), (2, "plain", "jax"), (2, "plain", "torch-cl")]


def test_run_processes_collects_one_median_per_round():
    launched = []

    def launch(spec, env):  # a fake child: jax takes 1 s per call in round 1, 3 s later; torch 2 s
        launched.append(spec["impl"])
        seconds = 2.0 if spec["impl"] == "torch-cl" else (1.0 if launched.count("jax") == 1 else 3.0)
        return {"times": [seconds, seconds + 0.5, seconds - 0.5][:spec["repeats"]], "compile_s": len(launched),
                "peak_mib": 10.0 * len(launched), "process_peak_mib": 100.0 * len(launched), "flops": 1e9,
                "pid": 1000 + len(launched)}

    variants = _variants(["jax", "torch-cl"])
    run_processes(variants, rounds=2, repeats=3, warmup=1, log=lambda message: None, env={}, launch=launch)
    jax_variant, torch_variant = variants
    assert launched == ["jax", "torch-cl", "torch-cl", "jax"]
    assert jax_variant.round_medians == [1.0, 3.0] and torch_variant.round_medians == [2.0, 2.0]
    assert len(jax_variant.times) == 6 and jax_variant.pids == [1001, 1004]
    assert jax_variant.compile_s == 1 and jax_variant.compile_s_all == [1, 4]  # the cold compile is reported
    assert jax_variant.peak_mib == 40.0 and jax_variant.process_peak_mib == 400.0  # the largest of its processes
    entry, = ratios([v.summary({"float32": 1e12}) for v in variants])
    assert entry["jax_over_torch-cl_spread"]["min"] == pytest.approx(2 / 3)
    assert entry["jax_over_torch-cl_spread"]["max"] == pytest.approx(2.0)


def test_markdown_names_the_cpu_and_its_flags():
    report = {"machine": {"cpu": "Test CPU 9000", "cpu_shown_flags": ["avx512f", "amx_bf16"], "cores": 2,
                          "jax": "0", "backend": "cpu", "device_kind": "cpu"},
              "matmul_peak_tflops": {"float32": 0.2}, "mode": "processes", "rounds": 3, "repeats": 3,
              "load_before": [1.0], "load_after": [1.0], "results": [], "ratios": []}
    assert "Test CPU 9000 (lscpu flags: avx512f amx_bf16)" in markdown(report)
    assert "3 rounds alternating" in markdown(report)


def test_cpu_description_reads_model_and_flags():
    cpu = cpu_description()
    assert cpu["model"] and set(cpu["shown_flags"]) <= set(cpu["flags"])


@pytest.mark.slow
def test_benchmark_runs_every_variant_in_processes_of_its_own(tmp_path):
    """The real thing on a tiny network: two implementations, two rounds, four child processes."""
    report_path = tmp_path / "report.json"
    assert throughput_main(["--cases", "cbam_resnet18:8:2:cifar", "--impls", "jax", "jax-xla", "--nets", "cbam",
                            "--modes", "train", "--dtypes", "float32", "--rounds", "2", "--repeats", "1",
                            "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["mode"] == "processes" and report["machine"]["cpu"]
    pids = [pid for r in report["results"] for pid in r["pids"]]
    assert len(pids) == len(set(pids)) == 4 and os.getpid() not in pids
    assert all(len(r["round_medians_s"]) == 2 for r in report["results"])
    entry, = report["ratios"]
    assert entry["jax_over_jax-xla_spread"]["n"] == 2 and entry["jax_over_jax-xla"] > 0


def test_scaling_sweeps_and_table():
    from benchmarks.scaling import sweep_variants, table

    by_batch = sweep_variants("batch", [8, 16], [50], 224, ["jax", "torch-cl"], "float32")
    assert [(v.case.model, v.case.batch, v.impl) for v in by_batch] == [
        ("cbam_resnet50", 8, "jax"), ("cbam_resnet50", 8, "torch-cl"),
        ("cbam_resnet50", 16, "jax"), ("cbam_resnet50", 16, "torch-cl")]
    by_depth = sweep_variants("depth", [8, 16], [18, 101], 224, ["jax"], "float32")
    assert [(v.case.model, v.case.batch) for v in by_depth] == [("cbam_resnet18", 8), ("cbam_resnet101", 8)]
    for variant, (jax_s, torch_s) in zip(by_batch, [(2.0, 3.0), (2.0, 3.0), (4.0, 5.0), (4.0, 5.0)]):
        variant.round_medians = [jax_s if variant.impl == "jax" else torch_s]
        variant.compile_s, variant.peak_mib, variant.flops = 7.0, 100.0, 1e9
        variant.process_peak_mib = 300.0 if variant.impl == "jax" else 200.0
    text = table([v.summary({"float32": 1e12}) for v in by_batch], "batch", ["jax", "torch-cl"])
    assert "| 8 | 2000 (2000-2000) | 4.0 | 100 | 300 | 3000 (3000-3000) | 2.7 | 100 | 200 | 7.0 | 1.50 | 1.50 |" in text
    assert "| 16 | 4000 (4000-4000) | 4.0 | 100 | 300 | 5000 (5000-5000) | 3.2 | 100 | 200 | 7.0 | 1.25 | 1.50 |" in text
    assert "jax / torch-cl memory" in text


def test_largest_batch_that_fits_comes_from_a_line_through_the_measured_peaks():
    from benchmarks.scaling import batch_fits, fits_table

    rows = [{"impl": "jax", "batch": b, "process_peak_mib": 200.0 + 100.0 * b} for b in (8, 16, 32)]
    rows += [{"impl": "torch-cl", "batch": b, "process_peak_mib": 300.0 + 50.0 * b} for b in (8, 32)]
    rows.append({"impl": "jax-remat", "batch": 8, "process_peak_mib": 500.0})  # one point: no line
    jax_fit, torch_fit = batch_fits(rows, [1, 2])
    assert jax_fit["impl"] == "jax" and jax_fit["fixed_mib"] == pytest.approx(200.0)
    assert jax_fit["mib_per_image"] == pytest.approx(100.0)
    assert jax_fit["largest_batch"] == {"1": 8, "2": 18}  # (1024 - 200) / 100, (2048 - 200) / 100
    assert torch_fit["largest_batch"] == {"1": 14, "2": 34}
    assert "| jax | 200 | 100.0 | 8 | 18 |" in fits_table([jax_fit, torch_fit], [1, 2])


@pytest.mark.slow
def test_scaling_benchmark_runs(tmp_path):
    from benchmarks.scaling import main as scaling_main

    out = tmp_path / "scaling.json"
    assert scaling_main(["--sweep", "depth", "--depths", "18", "--batches", "2", "--size", "32", "--impls", "jax",
                         "--repeats", "1", "--json", str(out)]) == 0
    row, = json.loads(out.read_text())["sweeps"]["depth"]
    assert row["model"] == "cbam_resnet18" and row["batch"] == 2 and row["compile_s"] > 0 and len(row["pids"]) == 1


@pytest.mark.slow  # six compiled programs
def test_grouped_convs_benchmark_times_both_sides_of_every_pass(tmp_path):
    """A MobileNet depthwise layer at batch 1: both sides timed for each pass, one table row from the JSON."""
    from benchmarks import grouped_convs
    from cbam_jax.layers import native

    if not native.available():
        pytest.skip("oneDNN unavailable here")
    out = tmp_path / "grouped.json"
    assert grouped_convs.main(["--nets", "mobilenet_w1", "--dtypes", "float32", "--batch", "1", "--layers", "1",
                               "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    row, = report["rows"]
    assert (row["net"], row["size"], row["groups"], row["stride"], row["batch"]) == ("mobilenet_w1", 112, 32, 1, 1)
    assert all(row[f"{p}_{side}_ms"] > 0 for p in grouped_convs.PASSES for side in ("xla", "onednn"))
    table = grouped_convs.table(report)
    assert "| mobilenet_w1 | 1 | 112, 32->32, g32, s1 | float32 |" in table and report["machine"]["cpu"] in table


# ----------------------------------------------------------------------------- benchmarks.detection_seeds


def _detection_report(values: dict[str, list[tuple[float, float, float]]]) -> dict:
    from benchmarks import detection_seeds

    seeds = [0, 1, 2]
    runs = {model: {str(s): {"final": dict(zip(("mAP", "mAP50", "mAP75"), figures))} for s, figures in zip(seeds, rows)}
            for model, rows in values.items()}
    return {"seeds": seeds, "runs": runs, "stats": detection_seeds.aggregate(runs, seeds),
            "width": {model: 8 for model in values}}


def test_detection_table_is_mean_std_per_seed_and_the_paired_difference():
    from benchmarks import detection_seeds

    report = _detection_report({"cbam_resnet18": [(0.4, 0.6, 0.5), (0.5, 0.7, 0.5), (0.6, 0.8, 0.5)],
                                "resnet18": [(0.3, 0.6, 0.4), (0.3, 0.5, 0.4), (0.3, 0.7, 0.4)]})
    assert detection_seeds.markdown(report).splitlines() == [
        "| backbone | mAP@[.5:.95] | mAP@.5 | mAP@.75 | mAP@.5 per seed (0 / 1 / 2) |",
        "|---|---|---|---|---|",
        "| cbam_resnet18 (width 8) | 0.500 +/- 0.100 | 0.700 +/- 0.100 | 0.500 +/- 0.000 | 0.600 / 0.700 / 0.800 |",
        "| resnet18 (width 8) | 0.300 +/- 0.000 | 0.600 +/- 0.100 | 0.400 +/- 0.000 | 0.600 / 0.500 / 0.700 |",
        # seed by seed: mAP@.5 differences 0.0, +0.2, +0.1 (mean 0.1, sample std 0.1)
        "| difference, cbam_resnet18 - resnet18 | +0.200 +/- 0.100 | +0.100 +/- 0.100 | +0.100 +/- 0.000 "
        "| +0.000 / +0.200 / +0.100 |"]
    one = _detection_report({"resnet18": [(0.3, 0.6, 0.4)] * 3})
    assert "difference" not in detection_seeds.markdown(one)
    for model, seconds in (("cbam_resnet18", (50.0, 40.4, 45.0)), ("resnet18", (38.0, 41.0, 39.0))):
        for seed, train in zip("012", seconds):
            report["runs"][model][seed].update(train_seconds=train, first_step_seconds=train / 4, wall_seconds=train + 9)
    report.update(recipe="configs/detection_shapes.py", overrides=[], steps=600, batch_size=16, train_images=512,
                  eval_images=128, machine={"cpu": "Test CPU", "cpu_shown_flags": ["avx512f"], "cores": 2,
                                            "python": "3.11.7", "jax": "0.10.2", "backend": "cpu"},
                  load_before=[1.0, 0.5, 0.5], load_after=[4.25, 3.0, 2.0])
    assert detection_seeds.caption(report) == (
        "`configs/detection_shapes.py`: 600 steps of batch 16 on 512 generated training images, COCO figures on 128 "
        "held-out images; seeds 0, 1, 2; Test CPU (lscpu flags: avx512f), 2 cores, Python 3.11.7, jax 0.10.2 (cpu). "
        "Each run trained for 38-50 s after a first (compiling) step of 10-12 s; the 1-minute load average was 1.0 "
        "before the study and 4.2 after it.")
    for by_seed in report["runs"].values():  # runs an earlier invocation trained: this one's load says nothing
        for run in by_seed.values():
            del run["wall_seconds"]
    assert detection_seeds.caption(report).endswith("Each run trained for 38-50 s after a first (compiling) step of 10-12 s.")


def test_detection_study_reads_the_summary_of_a_finished_run_only(tmp_path):
    from benchmarks.detection_seeds import finished_summary

    assert finished_summary(str(tmp_path / "none")) is None
    records = [{"step": 2, "split": "summary", "status": "stopped"}, {"step": 4, "split": "eval", "mAP": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert finished_summary(str(tmp_path)) is None  # stopped: train it (train.py resumes it)
    records.append({"step": 4, "split": "summary", "status": "finished", "final": {"mAP": 0.1}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert finished_summary(str(tmp_path))["final"] == {"mAP": 0.1}


@pytest.mark.parametrize("arguments, message", [
    (["--models", "resnet7"], "resnet7 seed 0: config.model.name = 'resnet7' is not a model"),
    (["--config.seed=1"], "use --seeds"),
    (["--config.model.name=resnet18"], "use --models"),
    (["--seeds", "0", "0"], "each value once"),
    (["--seeds", "x"], "invalid int value: 'x'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--config.batchsize=8"], "did you mean 'batch_size'?"),
    (["--json", os.path.join(ROOT, "README.md", "report.json")], "is a file, not a folder"),
])
def test_detection_study_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, arguments, message):
    from benchmarks import detection_seeds

    study = tmp_path / "study"
    assert detection_seeds.main(["--study-dir", str(study), *arguments]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m benchmarks.detection_seeds: error: ") and message in err
    assert not study.exists()


@pytest.mark.slow
def test_detection_study_runs_train_py_and_skips_finished_runs(tmp_path):
    """Two tiny runs (2 steps, 8 eval images) through train.py; the second invocation trains nothing."""
    study, record = tmp_path / "study", tmp_path / "record.json"
    tiny = ["--models", "resnet18", "--seeds", "0", "1", "--study-dir", str(study), "--json", str(record),
            "--config.num_train_steps=2", "--config.dataset.num_train_images=32", "--config.dataset.num_eval_images=8",
            "--config.tensorboard=False", "--config.compilation_cache_dir="]  # the session's cache: seed 1 reuses seed 0's programs
    env = {**os.environ, "PYTHONPATH": ROOT}
    first = subprocess.run([sys.executable, "-m", "benchmarks.detection_seeds", *tiny], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads(record.read_text())
    assert report["command"] == "python -m benchmarks.detection_seeds " + " ".join(tiny)
    assert set(report["runs"]["resnet18"]) == {"0", "1"} and report["steps"] == 2 and report["eval_images"] == 8
    for seed in ("0", "1"):
        workdir = study / f"resnet18_seed{seed}"
        summary = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
        assert report["runs"]["resnet18"][seed]["final"] == summary["final"]
    assert report["machine"]["cpu"] and "jax" in report["machine"]
    assert (study / "results.md").read_text() in first.stdout
    metrics = {p: p.read_text() for p in study.glob("*/metrics.jsonl")}
    second = subprocess.run([sys.executable, "-m", "benchmarks.detection_seeds", *tiny], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.read_text() for p in study.glob("*/metrics.jsonl")} == metrics
    table = first.stdout.split("\n\n", 1)[1]
    assert second.stdout.endswith(table) and "load average" in first.stdout and "load average" not in second.stdout


# ----------------------------------------------------------------------------- benchmarks.profile_step

_HLO = """
  %ffi_call.7 = bf16[8,56,56,64]{3,2,1,0} custom-call(%a, %b), custom_call_target="cbam_onednn_conv_forward", metadata={op_name="jit(train_step)/jvp(ResNet)/layer1_0/conv1/ffi_call"}
  %ffi_call.9 = (bf16[8,3136,256]{2,1,0}, f32[8,256]{1,0}) custom-call(%x, %g, %s), custom_call_target="cbam_gate_grad", metadata={op_name="jit(train_step)/transpose(jvp(ResNet))/layer1_0/layer1_0.attend_and_add/attention/channel/ffi_call"}
  %add_fusion.3 = f32[64]{0} fusion(%p), kind=kLoop, calls=%fc.3, metadata={op_name="jit(train_step)/transpose(jvp(ResNet))/layer1_0/bn2/reduce_sum"}
  %ynn_fusion.2 = f32[8,256]{1,0} fusion(%q), kind=kCustom, calls=%fc.4, metadata={op_name="jit(train_step)/jvp(ResNet)/layer1_0/layer1_0.attend_and_add/attention/spatial/reduce_max"}, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  ROOT %convert_fusion.1 = bf16[8]{0} fusion(%r), kind=kLoop, calls=%fc.5
"""


def test_profile_step_attributes_each_thunk_to_a_model_part_and_a_kernel():
    from benchmarks.profile_step import instructions, markdown, summarise, thunk_ms

    table = instructions(_HLO)
    assert set(table) == {"ffi_call.7", "ffi_call.9", "add_fusion.3", "ynn_fusion.2", "convert_fusion.1"}
    trace = {"traceEvents": [{"ph": "X", "name": "ffi_call.7", "dur": 3000.0}, {"ph": "X", "name": "ffi_call.9", "dur": 1000.0},
                             {"ph": "X", "name": "ffi_call.9", "dur": 1000.0}, {"ph": "X", "name": "add_fusion.3", "dur": 500.0},
                             {"ph": "X", "name": "ynn_fusion.2", "dur": 250.0}, {"ph": "X", "name": "convert_fusion.1", "dur": 250.0},
                             {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e9}, {"ph": "M", "name": "ffi_call.7"}]}
    summary = summarise(thunk_ms(trace, table, steps=2), table, top=2)
    assert summary["thunk_ms"] == 3.0  # (3 + 1 + 1 + 0.5 + 0.25 + 0.25) ms over 2 steps; other events ignored
    parts = {r["part"]: (r["forward"], r["backward"], r.get("no pass")) for r in summary["parts"]}
    assert parts == {"convolution (oneDNN)": (1.5, 0, None), "channel gate": (0, 1.0, None), "BatchNorm": (0, 0.25, None),
                     "spatial gate": (0.125, 0, None), "no source (XLA's converts, copies)": (0, 0, 0.125)}
    kinds = {r["kind"]: r["ms"] for r in summary["kinds"]}
    assert kinds == {"native cbam_onednn_conv_forward": 1.5, "native cbam_gate_grad": 1.0, "XLA fusion": 0.375,
                     "XLA library fusion (YNNPACK)": 0.125}
    assert [r["name"] for r in summary["top"]] == ["ffi_call.7", "ffi_call.9"]
    report = {"case": "cbam_resnet50:224:8", "dtype": "bfloat16", "steps": 2, "step_ms": 2.5,
              "machine": {"cpu": "Some CPU", "cpu_shown_flags": ["avx2"], "cores": 2, "jax": jax.__version__}, **summary}
    text = markdown(report)
    assert "| channel gate | 0.0 | 1.0 | 1.0 | 33% |" in text and "Some CPU (lscpu flags: avx2)" in text
    assert "| no source (XLA's converts, copies) | | | 0.1 | 4% |" in text


@pytest.mark.slow
def test_profile_step_runs_on_a_small_model(tmp_path, capsys):
    """A CIFAR CBAM-ResNet-18 at batch 2: every convolution pass and both gates show up, the thunks account
    for most of the step."""
    from benchmarks.profile_step import main as profile_main

    out = tmp_path / "profile.json"
    assert profile_main(["--case", "cbam_resnet18:16:2:cifar", "--dtype", "float32", "--steps", "1", "--warmup", "1",
                         "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    parts = {r["part"] for r in report["parts"]}
    assert {"channel gate", "spatial gate", "BatchNorm"} <= parts
    assert 0.3 * report["step_ms"] < report["thunk_ms"]
    assert "| model part |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["--case", "cbam_resnet50:224"], "case must be MODEL:SIZE:BATCH"),
                                           (["--case", "cbam_resnet50:512:2:fcos"], "drop ':fcos'"),
                                           (["--steps", "0"], "--steps must be >= 1"), (["--top", "-1"], "--top >= 0"),
                                           (["--dtype", "float16"], "invalid choice")])
def test_profile_step_rejects_bad_arguments_in_one_line(args, message, capsys):
    from benchmarks.profile_step import main as profile_main

    assert profile_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m benchmarks.profile_step: error: ") and message in err


def test_profile_step_refuses_a_json_under_a_file_before_any_work(tmp_path, capsys):
    """Checked before minutes of compiling: one line, exit 2, nothing created."""
    from benchmarks.profile_step import main as profile_main

    (tmp_path / "file").write_text("")
    assert profile_main(["--case", "cbam_resnet18:16:2:cifar", "--json", str(tmp_path / "file" / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--json" in err and "is a file, not a folder" in err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_profile_step_on_a_full_disk_says_so_in_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    """The report's write fails with ENOSPC: exit 1, one line naming the file and the reason, no
    half-written JSON (the profile itself is stubbed: this is about the output)."""
    import pathlib

    import benchmarks.profile_step as profile_step

    summary = {"step_ms": 1.0, "thunk_ms": 1.0, "parts": [], "kinds": [], "top": []}
    monkeypatch.setattr(profile_step, "profile", lambda *args: summary)
    real_write_text = pathlib.Path.write_text

    def full_disk(self, text, *args, **kwargs):
        # Only the report's folder is full: the run also writes elsewhere (the native kernels'
        # cache on first use), and a fault there would leak into later tests in this process.
        if self.parent != tmp_path:
            return real_write_text(self, text, *args, **kwargs)
        real_write_text(self, text[:10], *args, **kwargs)  # part of it written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    target = tmp_path / "profile.json"
    assert profile_step.main(["--case", "cbam_resnet18:16:2:cifar", "--json", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and str(target) in err
    assert list(tmp_path.iterdir()) == []
