"""Hostile model files (issue 10, the file side): memory and time bounded by what a file holds.

Every crafted file is small but, read naively, asks for gigabytes or never finishes: tensors with zero or
overlapping strides, compressed zip records, recorded constructor arguments that describe a network far
larger than the file's weights, and config bombs in the toolkit's own format. Each goes through ``edm inspect``,
``edm generate`` and ``edm convert`` under :func:`bounded` (new resident memory sampled, address space capped,
a wall-clock alarm), and must end in one ``Error:`` line naming the problem, with nothing written.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import resource
import signal
import threading
import types
import zipfile
from pathlib import Path

import psutil
import pytest
import torch
from click.testing import CliRunner
from test_edm_pickle import EDMPickler, Recorded, edm_globals

from edm_toolkit.checkpoints import FORMAT
from edm_toolkit.cli import main
from edm_toolkit.errors import CheckpointError
from edm_toolkit.loading import inspect_file, load_denoiser, load_model
from edm_toolkit.networks.song_unet import SongUNet
from edm_toolkit.precond import VPPrecond

MEMORY_MB = 256  # new resident memory any refusal may take; each bomb below asks for 400 MB to 1 GB or more
SECONDS = 60


@contextlib.contextmanager
def bounded(memory_mb: int = MEMORY_MB, seconds: int = SECONDS):
    """Fails if the block takes more than ``memory_mb`` of new resident memory (sampled every 2 ms) or runs
    longer than ``seconds``; the address space is capped 1.5 GB above its current size meanwhile, so that a
    regression fails fast instead of exhausting the machine."""
    process = psutil.Process()
    start = process.memory_info()
    peak, done = [start.rss], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], process.memory_info().rss)

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    limits = resource.getrlimit(resource.RLIMIT_AS)
    cap = start.vms + 1536 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap if limits[1] == resource.RLIM_INFINITY else min(cap, limits[1]),
                                            limits[1]))
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, limits)
        done.set()
        sampler.join()
    grown = (peak[0] - start.rss) / 2**20
    assert grown < memory_mb, f"took {grown:.0f} MB of new resident memory"


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr


def assert_refused(path: Path, tmp_path: Path, message: str, extra=()):
    """``inspect``, ``generate`` and ``convert`` each stop with one Error line containing ``message``, within the
    bounds, writing nothing."""
    out = tmp_path / "out"
    for args in (["inspect", path, *extra], ["generate", "--network", path, "--outdir", out, "--seeds", "0",
                                             "--steps", "2", *extra], ["convert", path, tmp_path / "c.pt", *extra]):
        with bounded():
            code, stderr = cli(*args)
        errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
        assert code == 1 and len(errors) == 1 and message in errors[0], (args[0], stderr)
        assert "Traceback" not in stderr
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "c.pt").exists()


# ----------------------------------------------------------------------------------------------------------
# Crafting files


class View:
    """A tensor that pickles as a view ``(size, stride)`` of ``storage`` (a TypedStorage, shared by identity)."""

    def __init__(self, storage, size, stride, offset=0):
        self.storage, self.size, self.stride, self.offset = storage, tuple(size), tuple(stride), offset

    def reduce(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                                 collections.OrderedDict())

    @classmethod
    def of(cls, shape, kind):
        """A view that needs ``prod(shape)`` stored values but stores 1 ('zero' strides) or a few ('overlapping')."""
        if kind == "zero":
            return cls(torch.zeros(1).storage(), shape, [0] * len(shape))
        return cls(torch.zeros(1 + sum(n - 1 for n in shape)).storage(), shape, [1] * len(shape))


class Raw:
    """An EDM persistent object with a given class name and state (``_init_args``/``_init_kwargs`` included)."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state


class StorageRef:
    """A torch.save storage reference ('storage', FloatStorage, key, 'cpu', numel) to a record written by hand."""

    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class CraftingPickler(EDMPickler):
    """EDM's pickling of networks, plus :class:`View`, :class:`Raw` and :class:`StorageRef`."""

    def reducer_override(self, obj):
        if isinstance(obj, View):
            return obj.reduce()
        if isinstance(obj, Raw):
            return self._persistent(obj.class_name, obj.state)
        return super().reducer_override(obj)

    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def torch_save_crafted(obj, path):
    """torch.save with the crafting pickler (EDM's persistent classes, views)."""
    module = types.ModuleType("crafting_pickle")
    module.Pickler = CraftingPickler
    with edm_globals():
        torch.save(obj, path, pickle_module=module)
    return path


def write_zip_by_hand(path, obj, records: dict[str, int], compress: bool):
    """A torch.save-layout zip whose storage records ``key -> number of float32 zeros`` are streamed (deflated
    when ``compress``): the file stays small while the records decompress to hundreds of MB."""
    data = io.BytesIO()
    with edm_globals():
        CraftingPickler(data, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data.getvalue())
        archive.writestr("archive/byteorder", "little")
        for key, numel in records.items():
            write_zero_record(archive, f"archive/data/{key}", numel, compress)
        archive.writestr("archive/version", "3\n")
    return path


def write_zero_record(archive: zipfile.ZipFile, name: str, numel: int, compress: bool) -> None:
    """A zip record of ``numel`` float32 zeros, streamed in 4 MB chunks (deflated with ``compress``)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with archive.open(info, "w", force_zip64=True) as record:
        chunk = bytes(2**22)
        for start in range(0, numel * 4, len(chunk)):
            record.write(chunk[: min(len(chunk), numel * 4 - start)])


def huge_song_unet_precond(kind: str, model_channels: int = 256) -> VPPrecond:
    """A VPPrecond around a DDPM++ network of 225M parameters (900 MB), every tensor a crafted view of a
    storage of one (or a few) values: EDM pickles of it are about 100 KB."""
    with torch.device("meta"):
        backbone = SongUNet(img_resolution=32, in_channels=3, out_channels=3, model_channels=model_channels)
    net = VPPrecond(backbone, img_resolution=32, img_channels=3)
    for module in net.modules():
        for group in (module._parameters, module._buffers):
            for name, tensor in list(group.items()):
                if tensor is not None:
                    group[name] = View.of(tensor.shape, kind)
    net._edm_init_kwargs = dict(img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, beta_d=19.9,
                                beta_min=0.1, M=1000, epsilon_t=1e-5, model_type="SongUNet",
                                model_channels=model_channels)
    return net


def edm_precond_record(**recorded) -> Raw:
    """A pickled VPPrecond around an empty SongUNet record, with the given recorded keyword arguments."""
    empty = {"_parameters": {}, "_buffers": {}, "_modules": {}, "_init_args": (), "_init_kwargs": {}}
    kwargs = {"img_resolution": 32, "img_channels": 3, "model_type": "SongUNet", **recorded}
    return Raw("VPPrecond", {"_parameters": {}, "_buffers": {}, "_modules": {"model": Raw("SongUNet", empty)},
                             "_init_args": (), "_init_kwargs": kwargs})


# ----------------------------------------------------------------------------------------------------------
# Tensors that pose as more data than the file holds


@pytest.mark.parametrize("kind, message", [("zero", "zero stride"), ("overlapping", "overlapping stride")])
def test_edm_pickle_with_crafted_strides_is_refused(kind, message, tmp_path):
    path = tmp_path / "network-snapshot.pkl"
    with edm_globals(), open(path, "wb") as stream:
        CraftingPickler(stream, protocol=4).dump({"ema": huge_song_unet_precond(kind)})
    assert path.stat().st_size < 2_000_000  # for a network of 900 MB
    assert_refused(path, tmp_path, message)


@pytest.mark.parametrize("kind, message", [("zero", "zero stride"), ("overlapping", "overlapping stride")])
def test_torch_files_with_crafted_strides_are_refused(kind, message, tmp_path, load_fixture):
    """A guided-diffusion state_dict whose weights are views of a few stored values, and a toolkit file."""
    fx = load_fixture("gd_unet_legacy")
    state = {name: View.of(tensor.shape, kind) for name, tensor in fx.state_dict.items()}
    state["input_blocks.0.0.weight"] = View.of((2**14, 2**12, 3, 3), kind)  # 600M values
    path = torch_save_crafted(state, tmp_path / "model.pt")
    assert_refused(path, tmp_path, message, ["--model-flags", "--image_size 16 --num_heads 2"])
    toolkit = torch_save_crafted({"format": FORMAT, "version": 1, "config": "{}", "state_dict": state},
                                 tmp_path / "toolkit.pt")
    assert_refused(toolkit, tmp_path, message)


def test_views_sharing_one_storage_are_refused(tmp_path, load_fixture):
    """Each view fits its storage, but 145 views of one storage would be copied apart when loaded."""
    fx = load_fixture("gd_unet_legacy")
    largest = max(t.numel() for t in fx.state_dict.values())
    storage = torch.zeros(largest).storage()
    state = {name: View(storage, t.shape, torch.empty(t.shape).stride()) for name, t in fx.state_dict.items()}
    path = torch_save_crafted(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="tensors that share stored values"):
        inspect_file(path)


def test_one_tensor_under_many_names_is_refused(tmp_path, load_fixture):
    """The same stored tensor under every name of a state_dict (one pickle object, one identical view each time)
    would be copied once per name when loaded: counted per name, the file claims far more than it stores."""
    fx = load_fixture("gd_unet_legacy")
    shared = torch.zeros(max(t.numel() for t in fx.state_dict.values()))
    path = tmp_path / "model.pt"
    torch.save({name: shared for name in fx.state_dict}, path)
    with pytest.raises(CheckpointError, match="tensors that share stored values"):
        inspect_file(path)


# ----------------------------------------------------------------------------------------------------------
# Compressed zip records


@pytest.mark.parametrize("container", ["training-state", "state_dict"])
def test_compressed_records_are_refused(container, tmp_path):
    """400 MB of zeros deflate to 400 KB: refused from the zip directory, before any record is read."""
    tensor = View(StorageRef("0", 100_000_000), (100_000_000,), (1,))
    obj = ({"net": tensor, "loss_fn": Recorded("EDMLoss", P_mean=-1.2)} if container == "training-state"
           else {"input_blocks.0.0.weight": tensor, "time_embed.0.weight": tensor, "out.2.weight": tensor})
    path = write_zip_by_hand(tmp_path / "training-state-000000.pt", obj, {"0": 100_000_000}, compress=True)
    assert path.stat().st_size < 1_000_000
    assert_refused(path, tmp_path, "is compressed")


def test_records_claiming_more_bytes_than_the_file_are_refused(tmp_path, load_fixture):
    """Zip entries that point at the same stored bytes: their sizes add up to more than the file."""
    fx = load_fixture("gd_unet_legacy")
    path = tmp_path / "model.pt"
    torch.save(dict(fx.state_dict), path)
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    data = bytearray(path.read_bytes())
    # Point every central-directory entry of a data record at the largest record's local header.
    largest = max((i for i in infos if "/data/" in i.filename), key=lambda i: i.file_size)
    directory = data.rfind(b"PK\x05\x06")
    position = data.find(b"PK\x01\x02")
    while 0 <= position < directory:
        name_length = int.from_bytes(data[position + 28:position + 30], "little")
        extra = int.from_bytes(data[position + 30:position + 32], "little") + int.from_bytes(
            data[position + 32:position + 34], "little")
        name = bytes(data[position + 46:position + 46 + name_length]).decode()
        if "/data/" in name:
            for field, value in ((16, largest.CRC), (20, largest.compress_size), (24, largest.file_size),
                                 (42, largest.header_offset)):
                data[position + field:position + field + 4] = value.to_bytes(4, "little")
        position += 46 + name_length + extra
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="records claim .* bytes in a .*-byte file"):
        load_denoiser(path)


# ----------------------------------------------------------------------------------------------------------
# Constructor arguments far beyond the weights


@pytest.mark.parametrize("recorded, message", [
    ({"num_blocks": 10**6}, "weights missing: its arguments describe more than"),
    ({"channel_mult": [1] * 100_000}, "a list of 100,000 entries"),
    ({"channel_mult": [100_000]}, "do not match"),
    ({"model_channels": 10**12}, "model_channels=1000000000000 is out of range"),
    ({"img_resolution": 10**6}, "img_resolution=1000000"),
])
def test_edm_pickle_arguments_beyond_the_weights(recorded, message, tmp_path):
    path = tmp_path / "edm.pkl"
    with edm_globals(), open(path, "wb") as stream:
        CraftingPickler(stream, protocol=4).dump({"ema": edm_precond_record(**recorded)})
    assert_refused(path, tmp_path, message)


def toolkit_file(tmp_path, config, state_dict=None, suffix=".pt"):
    """A toolkit model file written by hand (torch zip, or safetensors with the config in its metadata)."""
    path = tmp_path / f"model{suffix}"
    text = config if isinstance(config, str) else json.dumps(config)
    if suffix == ".safetensors":
        from edm_toolkit.io.tensorfile import write_safetensors

        with open(path, "wb") as stream:
            write_safetensors(stream, state_dict or {}, {"format": FORMAT, "version": "1", "config": text})
    else:
        torch.save({"format": FORMAT, "version": 1, "config": text, "state_dict": state_dict or {}}, path)
    return path


SONG = {"type": "song_unet", "kwargs": {"img_resolution": 32, "in_channels": 3, "out_channels": 3}}
CONFIG_BOMBS = {
    "wide network": ({"type": "precond", "precond": {"name": "vp"}, "img_resolution": 32, "img_channels": 3,
                      "network": {**SONG, "kwargs": {**SONG["kwargs"], "model_channels": 1024}}}, "do not match"),
    "deep network": ({"type": "precond", "precond": {"name": "vp"}, "img_resolution": 32, "img_channels": 3,
                      "network": {**SONG, "kwargs": {**SONG["kwargs"], "num_blocks": 10**6}}},
                     "weights missing: its arguments describe more than"),
    "ideal data": ({"type": "ideal", "shape": [100_000, 3, 64, 64], "label_dim": 0, "width": 0.0,
                    "labelled": False}, "do not match"),
    "nested config": ("[" * 100_000 + "]" * 100_000, "malformed config"),
    "huge geometry": ({"type": "precond", "precond": {"name": "vp"}, "img_resolution": 10**7, "img_channels": 3,
                       "network": SONG}, "img_resolution=10000000"),
}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("bomb", list(CONFIG_BOMBS))
def test_toolkit_config_bombs(bomb, suffix, tmp_path):
    config, message = CONFIG_BOMBS[bomb]
    path = toolkit_file(tmp_path, config, suffix=suffix)
    assert path.stat().st_size < 300_000
    with bounded():
        for load in (load_model, load_denoiser, inspect_file):
            with pytest.raises(CheckpointError, match=message):
                load(path)
    assert_refused(path, tmp_path, message)


def test_huge_diffusion_steps_in_model_flags(tmp_path, load_fixture):
    path = tmp_path / "model.pt"
    torch.save(dict(load_fixture("gd_unet_legacy").state_dict), path)
    flags = ["--model-flags", "--image_size 16 --num_heads 2 --use_new_attention_order False --noise_schedule "
                              "cosine --rescale_timesteps False --diffusion_steps 1000000000"]
    assert_refused(path, tmp_path, "diffusion_steps must be a positive integer of at most 100000", flags)
