"""Published weights by name: download from a local HTTP server, verify, convert, cache, load offline;
every failure is one line and leaves nothing in the cache; the registry's facts against the packages
that publish them; `cbam-jax list-pretrained`."""

import dataclasses
import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbam_jax
from cbam_jax import create_model, zoo
from cbam_jax.cli import main
from cbam_jax.convert import from_torch, to_numpy_state_dict
from cbam_jax.pretrained import load_metadata
from tests.helpers import random_variables

README = Path(__file__).parent.parent / "README.md"


class Server:
    """A local HTTP server of in-memory files. Modes per path: 'ok' (honours Range; 416 for a Range
    from the end), 'no_range' (ignores Range: the whole file every time), 'cut' (sends half, then closes,
    every time), 'cut_once' (the first request is cut, later ones are served), 'stall' (sends half, then
    waits for `release` before it closes)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.bytes_sent = 0
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                mode = server.modes.get(self.path, "ok")
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and mode not in ("cut", "no_range"):
                    start = int(match[1])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if mode in ("cut", "stall") or (mode == "cut_once" and len(server.requests) == 1):
                    body = body[: len(body) // 2]  # then the connection closes
                self.wfile.write(body)
                self.wfile.flush()
                server.bytes_sent += len(body)
                if mode == "stall":
                    server.release.wait(60)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # shutdown() waits for the serving loop's next poll: 0.5 s each test with the default interval
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    running = Server()
    yield running
    running.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def registered(monkeypatch):
    """Register test entries for the duration of a test only."""
    monkeypatch.setattr(zoo, "PRETRAINED", dict(zoo.PRETRAINED))

    def register(**fields):
        entry = zoo.Pretrained(**{"tag": "test", "layout": "official", "top1": 50.0, "top5": 80.0,
                                  "reported_by": "tests", "license": "MIT", **fields})
        zoo.register(entry)
        return entry
    return register


def closed_port_url(path: str) -> str:
    with socket.socket() as s:  # bound and closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def cache_files(cache: Path) -> list[str]:
    """What the zoo keeps in the cache root (not the compiled kernels, which share the root: `kernels/`)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")
                  if p.relative_to(cache).parts[0] != "kernels") if cache.exists() else []


def tiny_checkpoint() -> tuple[bytes, int]:
    """An official-layout CBAM-ResNet-18 (width 8, CIFAR stem) as safetensors, made without torch."""
    model = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, reduction=4)
    variables = random_variables(model, (1, 16, 16, 3))
    buffer = io.BytesIO()
    from safetensors.numpy import save
    buffer.write(save(to_numpy_state_dict(variables, arch=model)))
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    return buffer.getvalue(), count


@pytest.fixture(scope="module")
def checkpoint():
    return tiny_checkpoint()


def plain_entry(server, registered, checkpoint, mode="ok", **fields):
    data, count = checkpoint
    server.files["/w/tiny.safetensors"] = data
    server.modes["/w/tiny.safetensors"] = mode
    fields = {"checksum": "sha256:" + hashlib.sha256(data).hexdigest(), "num_params": count, **fields}
    return registered(arch="cbam_resnet18", url=server.url("/w/tiny.safetensors"), file_name="tiny.safetensors",
                      **fields)


def assert_one_line_failure(error, cache, *needles):
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not cache.exists(), cache_files(cache)  # no partial file, not even a folder


# ---- the whole path, with a checkpoint made by the PyTorch reference ------------------------------------------

def test_download_verify_convert_cache_then_offline(tmp_path, server, cache, registered):
    torch = pytest.importorskip("torch")
    from tests.torch_refs import pytorchcv
    from tests.torch_refs.harness import prepare

    torch.manual_seed(0)
    reference = prepare(pytorchcv.cbam_resnet(18, num_classes=10, global_pool=True), (2, 3, 32, 32))
    torch.save(reference.state_dict(), tmp_path / "cbam18-sha1.pth")
    pth = (tmp_path / "cbam18-sha1.pth").read_bytes()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:  # as imgclsmob publishes: NAME.pth.zip, SHA-1 of NAME.pth
        zf.writestr("cbam18-sha1.pth", pth)
    server.files["/release/cbam18-sha1.pth.zip"] = archive.getvalue()
    entry = registered(arch="cbam_resnet18", layout="pytorchcv", url=server.url("/release/cbam18-sha1.pth.zip"),
                       file_name="cbam18-sha1.pth.zip", member="cbam18-sha1.pth",
                       checksum="sha1:" + hashlib.sha1(pth).hexdigest(),
                       num_params=sum(p.numel() for p in reference.parameters()))

    model, variables = zoo.load("cbam_resnet18.test")
    direct_model, direct = from_torch(tmp_path / "cbam18-sha1.pth", arch="cbam_resnet18", layout="pytorchcv")
    assert model == direct_model
    jax.tree.map(np.testing.assert_array_equal, variables, direct)
    assert cache_files(cache) == sorted(["models", "models/cbam_resnet18.test",
                                         *(f"models/cbam_resnet18.test/{p.relative_to(zoo.model_dir(entry))}"
                                           for p in zoo.model_dir(entry).rglob("*"))])
    metadata = load_metadata(zoo.model_dir(entry))
    assert metadata["source"]["checksum"] == entry.checksum and len(metadata["class_names"]) == 1000
    assert metadata["preprocessing"]["crop"] == 224 and metadata["metrics"]["top1"] == 50.0

    server.stop()  # no network from here on
    requests = len(server.requests)
    again_model, again = zoo.load("cbam_resnet18.test")
    assert again_model == model and len(server.requests) == requests
    jax.tree.map(np.testing.assert_array_equal, again, direct)
    # The same weights by name through create_model, in the same model (pytorchcv's spatial BatchNorm
    # momentum and scale init, not the official preset's), and as a backbone.
    by_name_model, by_name = create_model("cbam_resnet18", num_classes=10, pretrained="test")
    assert by_name_model == model
    jax.tree.map(np.testing.assert_array_equal, by_name, direct)
    backbone, features = create_model("cbam_resnet18", pretrained="test", features_only=True, out_indices=(1, 2))
    assert set(features["params"]) == {"conv1", "bn1", "layer1_0", "layer1_1", "layer2_0", "layer2_1"}
    jax.tree.map(np.testing.assert_array_equal, features["params"]["layer2_1"], direct["params"]["layer2_1"])
    assert backbone.feature_info[1].channels == 128


def test_cached_model_loads_offline_and_equals_direct_conversion(tmp_path, server, cache, registered, checkpoint):
    """The same path as above without torch: a safetensors checkpoint, SHA-256."""
    plain_entry(server, registered, checkpoint)
    model, variables = zoo.load("cbam_resnet18.test")
    (tmp_path / "direct.safetensors").write_bytes(checkpoint[0])
    direct_model, direct = from_torch(tmp_path / "direct.safetensors", arch="cbam_resnet18")
    assert model == direct_model
    jax.tree.map(np.testing.assert_array_equal, variables, direct)
    server.stop()
    requests = len(server.requests)
    again_model, again = zoo.load("cbam_resnet18.test")
    assert again_model == model and len(server.requests) == requests == 1
    jax.tree.map(np.testing.assert_array_equal, again, direct)
    assert cache_files(cache)[0] == "models"  # the download itself is not kept


def test_resume_after_a_cut_with_a_range_request(server, cache, registered, checkpoint):
    plain_entry(server, registered, checkpoint, mode="cut_once")
    zoo.load("cbam_resnet18.test")
    assert len(server.requests) == 2
    first_half = len(checkpoint[0]) // 2
    assert server.requests[1] == ("/w/tiny.safetensors", f"bytes={first_half}-")
    assert server.bytes_sent == len(checkpoint[0])  # nothing was sent twice
    assert (cache / "models" / "cbam_resnet18.test").is_dir()


# ---- a download that was killed or interrupted resumes in the next run ------------------------------------------

def direct_conversion(tmp_path, checkpoint):
    (tmp_path / "direct.safetensors").write_bytes(checkpoint[0])
    return from_torch(tmp_path / "direct.safetensors", arch="cbam_resnet18")[1]


def test_a_killed_download_resumes_from_its_partial_file(tmp_path, server, cache, registered, checkpoint):
    entry = plain_entry(server, registered, checkpoint)
    data, half = checkpoint[0], len(checkpoint[0]) // 2
    zoo.partial_path(entry).parent.mkdir(parents=True)
    zoo.partial_path(entry).write_bytes(data[:half])  # what a killed run leaves behind
    _, variables = zoo.load_entry(entry)
    assert server.requests == [("/w/tiny.safetensors", f"bytes={half}-")]
    assert server.bytes_sent == len(data) - half
    jax.tree.map(np.testing.assert_array_equal, variables, direct_conversion(tmp_path, checkpoint))
    assert not zoo.partial_path(entry).exists() and zoo.model_dir(entry).is_dir()


def test_kept_bytes_that_fail_the_checksum_are_downloaded_again(tmp_path, server, cache, registered, checkpoint):
    entry = plain_entry(server, registered, checkpoint)
    half = len(checkpoint[0]) // 2
    zoo.partial_path(entry).parent.mkdir(parents=True)
    zoo.partial_path(entry).write_bytes(b"x" * half)  # not this file's beginning (it changed on the server)
    _, variables = zoo.load_entry(entry)
    assert server.requests == [("/w/tiny.safetensors", f"bytes={half}-"), ("/w/tiny.safetensors", None)]
    jax.tree.map(np.testing.assert_array_equal, variables, direct_conversion(tmp_path, checkpoint))
    assert not zoo.partial_path(entry).exists()


def test_without_a_checksum_kept_bytes_are_not_resumed(server, cache, registered, checkpoint):
    entry = plain_entry(server, registered, checkpoint, checksum=None)
    zoo.partial_path(entry).parent.mkdir(parents=True)
    zoo.partial_path(entry).write_bytes(b"x" * 100)  # unverifiable: never used
    zoo.load_entry(entry)
    assert server.requests == [("/w/tiny.safetensors", None)]


def test_an_interrupted_download_is_kept_and_not_fetched_again(server, cache, registered, checkpoint, monkeypatch):
    entry = plain_entry(server, registered, checkpoint)
    verify = zoo._verify_download

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(zoo, "_verify_download", interrupted)
    with pytest.raises(KeyboardInterrupt):
        zoo.load_entry(entry)
    assert zoo.partial_path(entry).read_bytes() == checkpoint[0]  # kept, not used
    assert cache_files(cache) == ["downloads", str(zoo.partial_path(entry).relative_to(cache))]
    monkeypatch.setattr(zoo, "_verify_download", verify)
    zoo.load_entry(entry)  # the whole file is there: the server answers 416, the file is verified and used
    assert server.requests[1:] == [("/w/tiny.safetensors", f"bytes={len(checkpoint[0])}-")]
    assert server.bytes_sent == len(checkpoint[0]) and zoo.model_dir(entry).is_dir()
    assert not zoo.partial_path(entry).exists()


def test_a_server_that_ignores_range_sends_the_file_again(tmp_path, server, cache, registered, checkpoint):
    entry = plain_entry(server, registered, checkpoint, mode="no_range")
    data, half = checkpoint[0], len(checkpoint[0]) // 2
    zoo.partial_path(entry).parent.mkdir(parents=True)
    zoo.partial_path(entry).write_bytes(data[:half])
    _, variables = zoo.load_entry(entry)
    assert server.requests == [("/w/tiny.safetensors", f"bytes={half}-")]  # answered 200 with the whole file
    assert server.bytes_sent == len(data)
    jax.tree.map(np.testing.assert_array_equal, variables, direct_conversion(tmp_path, checkpoint))
    assert not zoo.partial_path(entry).exists()


def test_a_stalled_connection_fails_in_one_line_and_keeps_nothing(server, cache, registered, checkpoint,
                                                                  monkeypatch):
    monkeypatch.setattr(zoo, "TIMEOUT_S", 0.3)
    entry = plain_entry(server, registered, checkpoint, mode="stall")  # half of what is asked, then silence
    with pytest.raises(zoo.DownloadError, match="timed out") as error:
        zoo.load_entry(entry)
    assert_one_line_failure(error, cache, entry.url, entry.checksum.split(":")[1], str(zoo.pickup_path(entry)))
    half = len(checkpoint[0]) // 2
    assert server.requests[:2] == [("/w/tiny.safetensors", None), ("/w/tiny.safetensors", f"bytes={half}-")]
    assert len(server.requests) == zoo.ATTEMPTS  # each attempt made progress, so each was resumed


def test_loads_of_the_same_entry_take_turns(server, cache, registered, checkpoint, capfd):
    entry = plain_entry(server, registered, checkpoint, mode="stall")
    half = len(checkpoint[0]) // 2
    results = {}

    def load(name):
        results[name] = zoo.load_entry(entry)
    first = threading.Thread(target=load, args=("first",))
    first.start()
    wait_for(lambda: zoo.partial_path(entry).is_file() and zoo.partial_path(entry).stat().st_size == half)
    second = threading.Thread(target=load, args=("second",))
    second.start()
    waited = []
    wait_for(lambda: waited.append(capfd.readouterr().err)
             or "Waiting for another process fetching cbam_resnet18.test" in "".join(waited))
    server.modes["/w/tiny.safetensors"] = "ok"
    server.release.set()
    first.join(60)
    second.join(60)
    assert server.bytes_sent == len(checkpoint[0]) and len(server.requests) == 2  # one download, resumed once
    jax.tree.map(np.testing.assert_array_equal, results["first"][1], results["second"][1])
    assert cache_files(cache)[0] == "models"


def test_a_folder_removed_by_a_finishing_fetch_is_made_again(server, cache, registered, checkpoint, monkeypatch):
    # Another process finishing its fetch of the same entry removes the (empty) downloads folder it
    # made: here, deterministically, right between this process's mkdir and its open.
    entry = plain_entry(server, registered, checkpoint)
    opened = []

    def open_after_a_cleanup(file, mode="r", *args, **kwargs):
        if Path(file) == zoo.partial_path(entry) and mode == "a+b":  # the open that takes the lock
            if not opened:
                Path(file).parent.rmdir()
            opened.append(file)
        return open(file, mode, *args, **kwargs)
    monkeypatch.setattr(zoo, "open", open_after_a_cleanup, raising=False)
    model, _ = zoo.load_entry(entry)
    assert model.attention == "cbam" and len(opened) == 2 and len(server.requests) == 1
    assert cache_files(cache)[0] == "models" and not zoo.partial_path(entry).parent.exists()  # its folder removed


def wait_for(condition, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_download_killed_mid_file_resumes_in_the_next_process(tmp_path, server, cache, registered, checkpoint):
    entry = plain_entry(server, registered, checkpoint, mode="stall")
    half = len(checkpoint[0]) // 2
    script = ("import json, sys\nfrom cbam_jax import zoo\n"
              "zoo.load_entry(zoo.Pretrained(**json.loads(sys.argv[1])))\n")
    env = {**os.environ, "PYTHONPATH": str(README.parent), zoo.CACHE_ENV: str(cache)}
    process = subprocess.Popen([sys.executable, "-c", script, json.dumps(dataclasses.asdict(entry))], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: zoo.partial_path(entry).is_file() and zoo.partial_path(entry).stat().st_size == half)
    finally:
        process.kill()
        process.wait()
    server.modes["/w/tiny.safetensors"] = "ok"
    _, variables = zoo.load_entry(entry)
    assert server.requests == [("/w/tiny.safetensors", None), ("/w/tiny.safetensors", f"bytes={half}-")]
    assert server.bytes_sent == len(checkpoint[0])  # the second half only, once
    jax.tree.map(np.testing.assert_array_equal, variables, direct_conversion(tmp_path, checkpoint))
    assert not zoo.partial_path(entry).exists()


def test_wrong_checksum(server, cache, registered, checkpoint):
    entry = plain_entry(server, registered, checkpoint, checksum="sha256:" + "0" * 64)
    with pytest.raises(zoo.DownloadError) as error:
        zoo.load_entry(entry)
    assert_one_line_failure(error, cache, entry.url, "has SHA256 ", "0" * 64, str(zoo.pickup_path(entry)),
                            "(nothing was kept)")


def test_downloads_without_tqdm(server, cache, registered, checkpoint, monkeypatch):
    """tqdm (the progress bar) comes with the `train` extra: without it a download still resumes and loads."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` raises ImportError
    entry = plain_entry(server, registered, checkpoint, mode="cut_once")
    zoo.load_entry(entry)
    assert len(server.requests) == 2 and zoo.model_dir(entry).is_dir()


def test_prefix_checksums_right_and_wrong(server, cache, registered, checkpoint):
    """torchvision publishes the first 8 hex digits of the SHA-256: a prefix that matches is accepted
    (comparing the whole digest with it would refuse every torchvision entry), one that does not is refused."""
    digest = hashlib.sha256(checkpoint[0]).hexdigest()
    entry = plain_entry(server, registered, checkpoint, checksum=f"sha256:{digest[:8]}")
    zoo.load_entry(entry)
    assert zoo.model_dir(entry).is_dir()
    wrong = f"{(int(digest[:8], 16) ^ 1):08x}"
    entry = plain_entry(server, registered, checkpoint, checksum=f"sha256:{wrong}", tag="wrong")
    with pytest.raises(zoo.DownloadError) as error:
        zoo.load_entry(entry)
    assert "\n" not in str(error.value) and wrong in str(error.value) and "SHA256 prefix" in str(error.value)
    assert not zoo.model_dir(entry).exists() and not zoo.partial_path(entry).exists()


def torch_checkpoint(tmp_path) -> tuple[bytes, int]:
    """The tiny official-layout model as torch.save writes it: itself a zip archive."""
    torch = pytest.importorskip("torch")
    model = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, reduction=4)
    variables = random_variables(model, (1, 16, 16, 3))
    state = {k: torch.from_numpy(np.array(v)) for k, v in to_numpy_state_dict(variables, arch=model).items()}
    torch.save(state, tmp_path / "member.pth")
    data = (tmp_path / "member.pth").read_bytes()
    assert zipfile.is_zipfile(io.BytesIO(data))  # what made the member's checksum be skipped
    return data, sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def zipped_entry(server, registered, member: bytes, count: int, sha1: str):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:  # as imgclsmob publishes: NAME.pth.zip, SHA-1 of NAME.pth
        zf.writestr("tiny-0000-abcd.pth", member)
    server.files["/release/tiny-0000-abcd.pth.zip"] = archive.getvalue()
    return registered(arch="cbam_resnet18", url=server.url("/release/tiny-0000-abcd.pth.zip"),
                      file_name="tiny-0000-abcd.pth.zip", member="tiny-0000-abcd.pth", checksum=f"sha1:{sha1}",
                      num_params=count)


def test_a_zipped_torch_file_with_a_wrong_sha1_is_refused(tmp_path, server, cache, registered):
    member, count = torch_checkpoint(tmp_path)
    entry = zipped_entry(server, registered, member, count, "0" * 40)
    with pytest.raises(zoo.DownloadError) as error:
        zoo.load_entry(entry)
    assert_one_line_failure(error, cache, "tiny-0000-abcd.pth", "0" * 40, str(zoo.pickup_path(entry)))
    # With its true SHA-1 the same archive is accepted.
    entry = zipped_entry(server, registered, member, count, hashlib.sha1(member).hexdigest())
    _, variables = zoo.load_entry(entry)
    direct = from_torch(tmp_path / "member.pth", arch="cbam_resnet18")[1]
    jax.tree.map(np.testing.assert_array_equal, variables, direct)


def test_the_right_pth_put_by_hand_is_accepted_and_a_wrong_one_refused(tmp_path, cache, registered):
    member, count = torch_checkpoint(tmp_path)
    entry = registered(arch="cbam_resnet18", url=closed_port_url("/tiny-0000-abcd.pth.zip"),
                       file_name="tiny-0000-abcd.pth.zip", member="tiny-0000-abcd.pth",
                       checksum="sha1:" + hashlib.sha1(member).hexdigest(), num_params=count)
    by_hand = zoo.pickup_path(entry).with_name(entry.member)  # unzipped, as the message allows
    by_hand.parent.mkdir(parents=True)
    by_hand.write_bytes(member[:-1] + bytes([member[-1] ^ 1]))
    with pytest.raises(zoo.DownloadError, match="it was left there") as error:
        zoo.load_entry(entry)
    assert "\n" not in str(error.value) and by_hand.is_file() and not zoo.model_dir(entry).exists()
    by_hand.write_bytes(member)
    _, variables = zoo.load_entry(entry)
    jax.tree.map(np.testing.assert_array_equal, variables, from_torch(tmp_path / "member.pth")[1])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a low mantissa bit of the last array: a readable file of other numbers
    path.write_bytes(bytes(data))


def test_a_damaged_cache_entry_is_fetched_again_never_used(tmp_path, server, cache, registered, checkpoint, capsys):
    entry = plain_entry(server, registered, checkpoint)
    zoo.load_entry(entry)
    flip_a_bit(zoo.model_dir(entry) / "model.safetensors")
    _, variables = zoo.load_entry(entry)
    jax.tree.map(np.testing.assert_array_equal, variables, direct_conversion(tmp_path, checkpoint))
    assert len(server.requests) == 2  # fetched again
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the cached {entry.name}" in err and "damaged" in err
    # Without network, a damaged entry is refused in one line and nothing damaged stays.
    flip_a_bit(zoo.model_dir(entry) / "model.safetensors")
    server.stop()
    with pytest.raises(zoo.DownloadError) as error:
        zoo.load_entry(entry)
    assert "\n" not in str(error.value) and not zoo.model_dir(entry).exists()


def test_a_cache_entry_in_the_old_orbax_format_is_converted_again(tmp_path, server, cache, registered, checkpoint):
    from tests.test_pretrained import save_old_format

    entry = plain_entry(server, registered, checkpoint)
    (tmp_path / "direct.safetensors").write_bytes(checkpoint[0])
    model, variables = from_torch(tmp_path / "direct.safetensors", arch="cbam_resnet18")
    zoo.model_dir(entry).parent.mkdir(parents=True)
    save_old_format(zoo.model_dir(entry), model, variables, {})
    _, loaded = zoo.load_entry(entry)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    assert len(server.requests) == 1 and (zoo.model_dir(entry) / "model.safetensors").is_file()
    assert not (zoo.model_dir(entry) / "cbam_jax.json").exists()


def test_connection_cut_mid_file(server, cache, registered, checkpoint):
    entry = plain_entry(server, registered, checkpoint, mode="cut")
    with pytest.raises(zoo.DownloadError) as error:
        zoo.load_entry(entry)
    assert_one_line_failure(error, cache, entry.url, entry.checksum.split(":")[1], str(zoo.pickup_path(entry)))
    assert 2 <= len(server.requests) <= zoo.ATTEMPTS  # it retried with Range while it made progress


def test_no_network(cache, registered, checkpoint):
    entry = registered(arch="cbam_resnet18", url=closed_port_url("/w/tiny.safetensors"), file_name="tiny.safetensors",
                       checksum="sha256:" + hashlib.sha256(checkpoint[0]).hexdigest(), num_params=checkpoint[1])
    with pytest.raises(zoo.DownloadError) as error:
        create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, reduction=4, pretrained="test")
    assert_one_line_failure(error, cache, entry.url, entry.checksum.split(":")[1], str(zoo.pickup_path(entry)))
    # A file downloaded by hand at the named path is picked up (and left where it was).
    zoo.pickup_path(entry).parent.mkdir(parents=True)
    zoo.pickup_path(entry).write_bytes(checkpoint[0])
    model, variables = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, reduction=4,
                                    pretrained="test")
    assert zoo.pickup_path(entry).is_file() and (cache / "models" / "cbam_resnet18.test").is_dir()


def test_wrong_file_by_hand_is_refused_and_kept(cache, registered, checkpoint):
    entry = registered(arch="cbam_resnet18", url=closed_port_url("/x"), file_name="tiny.safetensors",
                       checksum="sha256:" + hashlib.sha256(checkpoint[0]).hexdigest(), num_params=checkpoint[1])
    zoo.pickup_path(entry).parent.mkdir(parents=True)
    zoo.pickup_path(entry).write_bytes(checkpoint[0][:-1] + b"!")
    with pytest.raises(zoo.DownloadError, match=r"\(it was left there\)") as error:
        zoo.load_entry(entry)
    assert "\n" not in str(error.value) and zoo.pickup_path(entry).is_file()
    assert not (cache / "models").exists()


def test_manual_entry_names_the_page_and_the_path(cache, registered, checkpoint):
    entry = registered(arch="cbam_resnet18", url="https://drive.example/file/d/ID/view", file_name="ckpt.safetensors",
                       checksum=None, num_params=checkpoint[1], manual=True)
    with pytest.raises(zoo.DownloadError) as error:
        zoo.load_entry(entry)
    assert_one_line_failure(error, cache, entry.url, str(zoo.pickup_path(entry)), "no published checksum")
    # Put there by hand, it loads; without a published checksum the SHA-256 of what was loaded is recorded.
    zoo.pickup_path(entry).parent.mkdir(parents=True)
    zoo.pickup_path(entry).write_bytes(checkpoint[0])
    zoo.load_entry(entry)
    source = load_metadata(zoo.model_dir(entry))["source"]
    assert source["sha256"] == hashlib.sha256(checkpoint[0]).hexdigest() and "checksum" not in source


def test_a_file_of_another_model_is_refused(server, cache, registered, checkpoint):
    entry = plain_entry(server, registered, checkpoint, num_params=123)
    with pytest.raises(ValueError, match="123"):
        zoo.load_entry(entry)
    assert not cache.exists()


@pytest.mark.slow  # the predict and export CLIs compile the model; the fetch is covered fast
def test_predict_and_export_take_a_registered_name(tmp_path, server, cache, registered, checkpoint, capsys):
    from PIL import Image

    from cbam_jax.cli import main

    entry = plain_entry(server, registered, checkpoint, preprocessing={"resize": 20, "crop": 16, "mean": [0.5] * 3,
                                                                       "std": [0.25] * 3})
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(image)
    outputs = []
    for source in (entry.name, str(zoo.model_dir(entry))):  # downloaded and cached by name, then the cache itself
        assert main(["predict", "--pretrained", source, "--json", str(image)]) == 0, capsys.readouterr().err
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and len(server.requests) == 1
    assert main(["export", entry.name, str(tmp_path / "exported"), "--formats", "stablehlo"]) == 0, capsys.readouterr()
    assert json.loads((tmp_path / "exported" / "artifact.json").read_text())["input"]["shape"][1:3] == [16, 16]


# ---- names and the table ---------------------------------------------------------------------------------------

def test_names_tags_and_errors():
    assert zoo.get("cbam_resnet50").name == "cbam_resnet50.imgclsmob"  # the first entry is the default
    assert zoo.get("cbam_resnet50", "official").manual
    assert zoo.get("resnet50.tv2_in1k").preprocessing["resize"] == 232
    with pytest.raises(ValueError, match="tags: imgclsmob, official"):
        zoo.get("cbam_resnet50", "nope")
    with pytest.raises(ValueError, match="published for"):
        zoo.get("cbam_resnet77")
    with pytest.raises(ValueError, match="not cbam_resnet50"):
        create_model("cbam_resnet50", pretrained="resnet50.tv_in1k")
    with pytest.raises(ValueError, match="variant='official'"):
        create_model("cbam_resnet50", variant="timm", pretrained=True)
    with pytest.raises(ValueError, match="No pretrained weights named 'no_such_thing'"):
        zoo.load("no_such_thing")  # registered names only
    with pytest.raises(ValueError, match="no registered pretrained model"):
        cbam_jax.load("no_such_thing")  # any source
    with pytest.raises(ValueError, match=r"use cbam_jax.load\('hf-hub:a/b'\)"):
        zoo.load("hf-hub:a/b")


def test_list_pretrained_cli(capsys):
    assert main(["list-pretrained"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in zoo.PRETRAINED)
    assert "28,089,624" in out and "d8cf8488efb97afecd6b3287a3ca9fa093fc3127" in out
    assert main(["list-pretrained", "--markdown"]) == 0  # the table in docs/pretrained.md: tests/test_docs.py
    assert capsys.readouterr().out.startswith("| name | source |")
    assert main(["list-pretrained", "cbam_*"]) == 0
    assert "resnet50.tv_in1k" not in capsys.readouterr().out
    assert main(["list-pretrained", "nothing*"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "nothing*" in captured.err


def test_imagenet_class_names():
    names = zoo.imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[207] == "golden retriever" and names[999] == "toilet tissue"


def test_imagenet_class_names_are_torchvisions():
    torchvision = pytest.importorskip("torchvision")
    assert zoo.imagenet_class_names() == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


# ---- the registry's facts against the packages that publish them -----------------------------------------------

def test_imgclsmob_entries_match_pytorchcv():
    pytest.importorskip("torch")
    pytorchcv_store = pytest.importorskip("pytorchcv.models.common.model_store")
    info = pytorchcv_store.get_model_metainfo_dict()
    entries = [e for e in zoo.PRETRAINED.values() if e.tag == "imgclsmob"]
    assert len(entries) == 18
    for entry in entries:
        pytorchcv_name = entry.member.split("-")[0]
        params, error, sha1, release = info[pytorchcv_name]
        assert entry.checksum == f"sha1:{sha1}" and entry.num_params == params
        assert entry.url == (f"{pytorchcv_store.imgclsmob_repo_url}/releases/download/{release}/"
                             f"{pytorchcv_name}-{error}-{sha1[:8]}.pth.zip")
        assert entry.top5 == round(100 - int(error) / 100, 2)  # the file name's error is the top-5 error
        # Its model builds with the stride on the 3x3 convolution, as cbam-jax does.
        assert not (pytorchcv_name.startswith(("resnet5", "resnet10", "resnet15", "seresnet5", "seresnet10"))
                    and not pytorchcv_name.endswith("b"))


def test_torchvision_entries_match_torchvision():
    models = pytest.importorskip("torchvision.models")
    for entry in (e for e in zoo.PRETRAINED.values() if e.layout == "torchvision"):
        version = 1 if entry.tag == "tv_in1k" else 2
        weights = models.get_model_weights(entry.arch)[f"IMAGENET1K_V{version}"]  # ResNets, ResNeXts, Wide ResNets
        metrics = weights.meta["_metrics"]["ImageNet-1K"]
        assert entry.url == weights.url and weights.url.endswith(f"-{entry.checksum.split(':')[1]}.pth")
        assert (entry.top1, entry.top5, entry.num_params) == (metrics["acc@1"], metrics["acc@5"],
                                                             weights.meta["num_params"])
        transforms = weights.transforms()
        assert [entry.preprocessing["resize"]] == transforms.resize_size
        assert [entry.preprocessing["crop"]] == transforms.crop_size
        assert entry.preprocessing["mean"] == transforms.mean and entry.preprocessing["std"] == transforms.std


@pytest.mark.slow
def test_entries_describe_their_models():
    """Every entry's arch has the entry's parameter count and its layout maps every tensor (no download)."""
    from cbam_jax.convert.layouts import get_layout
    counts = {}
    for entry in zoo.PRETRAINED.values():
        if entry.arch not in counts:
            shapes = jax.eval_shape(create_model(entry.arch).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
            counts[entry.arch] = (sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"])), shapes)
        count, shapes = counts[entry.arch]
        assert count == entry.num_params, entry.name
        layout = get_layout(entry.layout)
        for path in jax.tree_util.tree_leaves_with_path(shapes):
            module = "/".join(k.key for k in path[0][1:-1])
            assert layout.torch_module(module) is not None, (entry.name, module)
