"""``jwt encode --calibration FOLDER``: a folder of unlabelled images as calibration inputs, for a state_dict with
``--model`` (the pixels as they are, float32 in [0, 1]) and for a Hugging Face image model folder (through its own
image processor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import codec

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

NETS = '''
import torch
from torch import nn


class Grey(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 8, 3, padding=1)
        self.f = nn.Linear(8 * 12 * 12, 10)

    def forward(self, x):
        return self.f(torch.relu(self.c(x)).flatten(1))


class Colour(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.f = nn.Linear(8 * 12 * 12, 10)

    def forward(self, x):
        return self.f(torch.relu(self.c(x)).flatten(1))
'''


def _run(args):
    from click.testing import CliRunner

    from jwt_cli.main import cli

    return CliRunner().invoke(cli, list(map(str, args)))


def _encode(*args):
    return _run(["encode", *args])


def _images(folder, n, size=(12, 12), mode="L", seed=0, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(folder / f"{i:03d}{suffix}")
    return folder


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """A module ``image_test_nets`` beside the user, the grey and colour nets' weights, a folder of 70 grey PNGs
    (and a text file, which is not an image)."""
    (tmp_path / "image_test_nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("image_test_nets")
    torch.manual_seed(0)
    torch.save(module.Grey().state_dict(), tmp_path / "grey.pt")
    torch.save(module.Colour().state_dict(), tmp_path / "colour.pt")
    _images(tmp_path / "imgs", 70)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    return tmp_path


def _one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_model_and_a_folder_of_grey_images(nets):
    """--model with a folder of grey PNGs: 70 inputs (the text file left out, said in a note with the tensor form
    the images are fed as); the file decodes with the plain decoder into the net; calibration changed the file."""
    out = nets / "grey.jwt"
    result = _encode("grey.pt", "-b", "4", "--calibration", "imgs", "--model", "image_test_nets:Grey", "-o", out)
    assert result.exit_code == 0, result.output
    assert "jwt: note: calibration: 70 images from imgs as float32 70 x 1 x 12 x 12 in [0, 1] (no resizing" \
        in result.output
    assert "jwt: note: calibration: 1 other entry of imgs left out" in result.output
    with codec.open(out) as f:
        assert f.metadata["jwt.calibration"].startswith("70 inputs in 2 batches")
    import image_test_nets

    net = image_test_nets.Grey()
    net.load_state_dict(codec.load(out))
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p), dtype=np.float32)[None] / 255
                                   for p in sorted((nets / "imgs").glob("*.png"))]))
    original = image_test_nets.Grey()
    original.load_state_dict(torch.load(nets / "grey.pt", weights_only=True))
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(net(x).flatten(), original(x).flatten(), dim=0) > 0.99
    plain = nets / "plain.jwt"
    assert _encode("grey.pt", "-b", "4", "-q", "-o", plain).exit_code == 0
    assert plain.read_bytes() != out.read_bytes()


def test_a_folder_of_pngs_calibrates_as_the_same_images_given_to_the_api(nets):
    """The folder's PNGs, read by the command line, are the array a user would pass to codec.save: the same
    decoded weights (--max-error: the plan does not depend on the metadata's few bytes, as a budget's does)."""
    import image_test_nets

    net = image_test_nets.Grey()
    net.load_state_dict(torch.load(nets / "grey.pt", weights_only=True))
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p), dtype=np.float32)[None] / 255
                                   for p in sorted((nets / "imgs").glob("*.png"))]))
    codec.save(net, nets / "api.jwt", max_error=0.05, calibration=x)
    result = _encode("grey.pt", "--max-error", "0.05", "--calibration", "imgs", "--model", "image_test_nets:Grey",
                     "-q", "-o", nets / "cli.jwt")
    assert result.exit_code == 0, result.output
    api, cli = codec.load(nets / "api.jwt"), codec.load(nets / "cli.jwt")
    assert api.keys() == cli.keys()
    for name in api:
        assert torch.equal(api[name], cli[name]), name
    assert not torch.equal(cli["f.weight"], net.f.weight.detach())


def test_repair_reads_the_folder_again_rather_than_holding_its_images(nets, monkeypatch):
    """A calibrated encode with repair decodes the folder's images again for its passes (its batches are not held:
    1,000 RGB 224 x 224 images would be 602 MB), and writes the file the same images in an array give."""
    import jwt_cli.calibration as C

    decoded = []
    inner = C._decoded
    monkeypatch.setattr(C, "_decoded", lambda path: decoded.append(path) or inner(path))
    result = _encode("grey.pt", "--max-error", "0.05", "--calibration", "imgs", "--model", "image_test_nets:Grey",
                     "-q", "-o", nets / "cli.jwt")
    assert result.exit_code == 0, result.output
    assert len(decoded) > 3 * 70  # (held: 140, calibration's pass and repair's one read into a list)
    x = np.stack([np.asarray(Image.open(p), dtype=np.float32)[None] / 255
                  for p in sorted((nets / "imgs").glob("*.png"))])
    np.save(nets / "x.npy", x)
    result = _encode("grey.pt", "--max-error", "0.05", "--calibration", "x.npy", "--model", "image_test_nets:Grey",
                     "-q", "-o", nets / "npy.jwt")
    assert result.exit_code == 0, result.output
    assert (nets / "cli.jwt").read_bytes() == (nets / "npy.jwt").read_bytes()


def test_model_and_a_folder_of_colour_images(nets):
    """RGBA images are read as RGB (3 channels, alpha dropped) for a 3-channel net."""
    _images(nets / "rgba", 5, mode="RGBA")
    out = nets / "colour.jwt"
    result = _encode("colour.pt", "-b", "6", "--calibration", "rgba", "--model", "image_test_nets:Colour",
                     "--no-repair", "-o", out)
    assert result.exit_code == 0, result.output
    assert "5 images from rgba as float32 5 x 3 x 12 x 12" in result.output
    assert "other entr" not in result.output
    assert set(codec.load(out)) == {"c.weight", "c.bias", "f.weight", "f.bias"}


def test_image_batches_read_pixels_as_they_are(tmp_path):
    """ImageBatches: float32 N x C x H x W in [0, 1] (8-bit over 255, 16-bit grey over 65535), batch by batch, the
    same batches on every pass (repair reads them again); a folder's files sorted by name."""
    from jwt_cli.calibration import ImageBatches, image_inputs

    folder = tmp_path / "px"
    folder.mkdir()
    Image.fromarray(np.full((4, 5), 255, dtype=np.uint8), "L").save(folder / "b.png")
    Image.fromarray(np.zeros((4, 5), dtype=np.uint8), "L").save(folder / "a.bmp")
    Image.fromarray(np.full((4, 5), 65535 // 5, dtype=np.uint16)).save(folder / "c.png")  # 16-bit grey
    batches, notes = image_inputs(folder)
    assert [p.name for p in batches.files] == ["a.bmp", "b.png", "c.png"] and batches.samples == 3
    first = list(batches)
    assert len(first) == len(batches) == 1
    x = first[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 1, 4, 5)
    assert x[0].max() == 0 and x[1].min() == 1 and torch.allclose(x[2], torch.tensor(0.2))
    assert torch.equal(list(batches)[0], x)
    small = ImageBatches(batches.files, 1, batch=2)
    assert [tuple(b.shape) for b in small] == [(2, 1, 4, 5), (1, 1, 4, 5)]
    # a sequence of batches: batch i made when asked for (repair reads it again rather than holding them all)
    assert torch.equal(small[1], list(small)[1]) and torch.equal(small[-2], small[0]) and len(small) == 2
    with pytest.raises(IndexError, match="batch 2 out of range"):
        small[2]
    with pytest.raises(TypeError, match="batch indices must be integers"):
        small[0:1]
    colour = tmp_path / "colour"
    colour.mkdir()
    Image.fromarray(np.array([[[255, 0, 51]]], dtype=np.uint8), "RGB").save(colour / "x.png")
    x = next(iter(image_inputs(colour)[0]))
    assert torch.allclose(x.flatten(), torch.tensor([1.0, 0.0, 0.2]))


@pytest.mark.parametrize("case, code, message", [
    ("empty", 1, "empty: holds no image (.png, .jpg, .jpeg, .bmp, .webp)"),
    ("text_only", 1, "text_only: holds no image"),
    ("nested", 1, "nested: holds no image (.png, .jpg, .jpeg, .bmp, .webp) (its 1 subfolder is not read)"),
    ("sizes", 1, "001.png: 14x12 pixels, 1 channel (L), where 000.png has 12x12 pixels, 1 channel (L): --model takes "
                 "images of one size and channel count, as they are (no resizing)"),
    ("modes", 1, "001.png: 12x12 pixels, 3 channels (RGB), where 000.png has 12x12 pixels, 1 channel (L)"),
    ("junk", 1, "002.png: not a readable image (cannot identify image file"),
    ("truncated", 1, "002.png: not a readable image (image file is truncated"),
    ("wrong_net", 1, "calibration batch 0: the model does not accept it"),
])
def test_hostile_image_folders(nets, case, code, message):
    """Each bad folder: exit 1 with one line naming the folder or the file (and both sizes), no output file."""
    folder = nets / case
    folder.mkdir()
    if case == "text_only":
        (folder / "a.txt").write_text("x")
    elif case == "nested":
        _images(folder / "class0", 3)
    elif case == "sizes":
        _images(folder, 1)
        _images(nets / "tmp", 1, size=(14, 12))
        (nets / "tmp" / "000.png").rename(folder / "001.png")
    elif case == "modes":
        _images(folder, 1)
        _images(nets / "tmp", 1, mode="RGB")
        (nets / "tmp" / "000.png").rename(folder / "001.png")
    elif case in ("junk", "truncated"):
        _images(folder, 80)
        data = (folder / "002.png").read_bytes()
        (folder / "002.png").write_bytes(b"not an image" if case == "junk" else data[:60])
    elif case == "wrong_net":
        _images(folder, 3, size=(10, 10))
    result = _encode("grey.pt", "-b", "4", "--calibration", case, "--model", "image_test_nets:Grey")
    assert result.exit_code == code, result.output
    assert message in _one_line_error(result)
    assert not (nets / "grey.jwt").exists()


def test_a_folder_of_images_needs_a_model_that_takes_them(nets):
    """Without --model a .pt cannot run (usage, exit 2); --model with a text file says what it takes."""
    result = _encode("grey.pt", "-b", "4", "--calibration", "imgs")
    assert result.exit_code == 2 and "--model package.module:ClassName" in result.output
    (nets / "texts.txt").write_text("a sentence\n")
    result = _encode("grey.pt", "-b", "4", "--calibration", "texts.txt", "--model", "image_test_nets:Grey")
    assert result.exit_code == 2 and "or a folder of images" in result.output
    assert _encode("grey.pt", "-b", "4", "--calibration", "nowhere", "--model", "image_test_nets:Grey").exit_code == 1
    assert not (nets / "grey.jwt").exists()


def _resnet_folder(tmp_path, processor=True):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(num_channels=1, embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1],
                                       num_labels=10)
    torch.manual_seed(0)
    folder = tmp_path / "resnet"
    model = transformers.ResNetForImageClassification(config).eval()
    model.save_pretrained(folder)
    if processor:
        transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]) \
            .save_pretrained(folder)
    return transformers, config, model, folder


def test_hugging_face_image_folder_through_its_image_processor(tmp_path):
    """An image classifier folder (preprocessor_config.json) with a folder of images of several sizes: the
    folder's own processor resizes and normalizes them (the slow one: no torchvision needed); the file decodes into
    the model and its logits stay close."""
    transformers, config, model, folder = _resnet_folder(tmp_path)
    _images(tmp_path / "imgs", 20, size=(20, 20))
    _images(tmp_path / "imgs", 3, size=(28, 24), seed=1, suffix=".jpg")
    out = tmp_path / "resnet.jwt"
    result = _encode(folder, "-b", "10", "--calibration", tmp_path / "imgs", "-o", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "23 images from" in result.output and "through the folder's image processor" in result.output
    with codec.open(out) as f:
        assert f.metadata["jwt.calibration"].startswith("23 inputs")
        assert "preprocessor_config.json" in f.attachments
    back = transformers.ResNetForImageClassification(config).eval()
    back.load_state_dict(codec.load(out), strict=False)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        a, b = model(pixel_values=x).logits, back(pixel_values=x).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def test_hugging_face_folder_without_an_image_processor(tmp_path):
    """A model folder with no preprocessor_config.json and a folder of images: one line saying what is missing,
    before the model is loaded; an empty image folder likewise; no output."""
    _, _, _, folder = _resnet_folder(tmp_path, processor=False)
    _images(tmp_path / "imgs", 3)
    result = _encode(folder, "-b", "10", "--calibration", tmp_path / "imgs")
    assert result.exit_code == 1
    assert "has no preprocessor_config.json" in _one_line_error(result)
    _resnet_folder(tmp_path / "with")
    (tmp_path / "none").mkdir()
    result = _encode(tmp_path / "with" / "resnet", "-b", "10", "--calibration", tmp_path / "none")
    assert result.exit_code == 1 and "holds no image" in _one_line_error(result)
    assert not list(tmp_path.glob("**/*.jwt"))


def _vit_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=1, hidden_size=48, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=96, num_labels=4)
    folder = tmp_path / "vit"
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]) \
        .save_pretrained(folder)
    return transformers, folder


def test_a_folder_whose_tensor_names_transformers_changes_is_calibrated_under_the_models_names(tmp_path):
    """transformers 5 loads a ViT under other names than its file holds (attention.attention.query ->
    attention.q_proj): calibration and repair run under the model's names, the file keeps the folder's (before:
    refused; before that, after calibrating, "options name ... is not a parameter or buffer of the model"); the
    decoded folder loads back into transformers and its logits stay close."""
    from safetensors.torch import load_file

    transformers, folder = _vit_folder(tmp_path)
    loaded = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    stored = set(load_file(folder / "model.safetensors"))
    renamed = stored - set(loaded.state_dict())
    if not renamed:
        pytest.skip("this transformers loads ViT under its file's names")
    _images(tmp_path / "imgs", 12)
    out = tmp_path / "vit.jwt"
    result = _encode(folder, "-b", "6", "--calibration", tmp_path / "imgs", "-o", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "repair: coded" in result.output
    assert set(codec.load(out)) == stored  # the folder's own names
    with codec.open(out) as f:
        assert f.metadata["jwt.calibration"].startswith("12 inputs")
    back_dir = tmp_path / "back"
    assert _run(["decode", str(out), "-o", f"{back_dir}/"]).exit_code == 0
    back = transformers.ViTForImageClassification.from_pretrained(back_dir).eval()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        a, b = loaded(pixel_values=x).logits, back(pixel_values=x).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_a_folder_whose_weights_the_model_cannot_find_is_refused_before_work(tmp_path):
    """A parameter of the model neither in the file nor renamed from it (here the file's classifier is under a name
    the model does not know): one line naming both, before calibration; no output."""
    from safetensors.torch import load_file, save_file

    transformers, folder = _vit_folder(tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["head.weight"] = weights.pop("classifier.weight")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _images(tmp_path / "imgs", 3)
    result = _encode(folder, "-b", "24", "--calibration", tmp_path / "imgs")
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert "does not load the model under the tensor names its weights file holds ('head.weight' is not among" in line
    assert "'classifier.weight' is not in the file" in line
    assert "codec.save(model, path, bits_per_weight=B, calibration=batches)" in line
    assert "calibration" not in result.output.split("Error")[0]  # no calibration bar: refused before any work
    assert not (tmp_path / "vit.jwt").exists()


def test_a_stored_tensor_the_model_does_not_hold_is_coded_as_planned_beside_repair(tmp_path):
    """A state_dict with a tensor the model does not hold (a checkpoint's unused head: transformers loads it as an
    "unexpected" key) is coded by the data-free weighting beside repair, not refused (before: ValueError "options
    name 'unused.weight' is not a parameter or buffer of the model", after calibrating); through the command line
    too (a transformers folder: the extra tensor is not a renamed one)."""
    transformers, config, model, folder = _resnet_folder(tmp_path)
    state = dict(model.state_dict())
    state["unused.weight"] = torch.randn(64, 64)
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    notes = codec.save(state, tmp_path / "api.jwt", model=model, bits_per_weight=10, calibration=x)
    assert any("'unused.weight'" in n for n in notes), notes
    back = codec.load(tmp_path / "api.jwt")
    assert back.keys() == state.keys()
    assert torch.nn.functional.cosine_similarity(back["unused.weight"].flatten(), state["unused.weight"].flatten(),
                                                 dim=0) > 0.99
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["unused.weight"] = state["unused.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _images(tmp_path / "imgs", 8)
    out = tmp_path / "cli.jwt"
    result = _encode(folder, "-b", "10", "--calibration", tmp_path / "imgs", "-o", out)
    assert result.exit_code == 0, result.output
    assert "'unused.weight'" in result.output and "data-free" in result.output
    assert "unused.weight" in codec.load(out)
