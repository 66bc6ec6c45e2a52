"""``jwt encode --calibration``: the model to run and the inputs to run it on.

Two ways to get a runnable model, both imported only when asked for:

- a Hugging Face folder: the model class named by its ``config.json``
  (``architectures``; ``AutoModel`` otherwise) and its tokenizer, through
  transformers, with a text file of sentences, one a line;
  or, for an image model (its ``preprocessor_config.json`` present), a folder
  of images run through the folder's own image processor; or a ``.npy`` /
  ``.npz`` array of the model's own inputs (:class:`ArrayBatches`: its
  ``main_input_name``, as they are);
- a plain state_dict with ``--model package.module:ClassName``: the class is
  imported, built without arguments and given the state_dict through
  ``load_state_dict`` (strict); inputs are a ``.npy`` array or a ``.npz``
  holding one array, whose first axis is the sample axis, or a folder of
  images of one size, fed as float32 N x C x H x W in [0, 1] (no resizing, no
  normalization).

Images are read batch by batch (:class:`ImageBatches`), never all at once, and read again for each pass.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import click

from codec.errors import first_line
from codec.rd.experts import parse_slice

#: Sentences per batch and tokens per sentence for text calibration.
TEXT_BATCH = 16
TEXT_MAX_LENGTH = 128
#: Images per batch (calibration's own batch size for an array).
IMAGE_BATCH = 64
#: The image files a calibration folder is read for (by suffix, any case); other files are left out with a note.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: Pillow modes read as one channel (grey, its alpha dropped); every other mode is converted to RGB.
GREY_MODES = ("1", "L", "LA", "La", "I;16", "I;16L", "I;16B", "I")


class _Batches(Sequence):
    """Samples cut into batches of ``batch``, made when asked for (a sequence of batches: repair reads a batch again
    by its index rather than holding them all); subclasses make batch ``index`` of :meth:`_chunk`."""

    def __init__(self, items, batch: int):
        self._items, self.batch = items, batch

    def __len__(self) -> int:
        return math.ceil(len(self._items) / self.batch)

    @property
    def samples(self) -> int:
        return len(self._items)

    def _chunk(self, index: int):
        """The samples of batch ``index`` (:func:`_start`'s checks)."""
        start = _start(index, len(self), self.batch)
        return self._items[start:start + self.batch]

    def __iter__(self) -> Iterator:
        for i in range(len(self)):
            yield self[i]


class TextBatches(_Batches):
    """Sentences tokenized batch by batch (a sequence of batches: repair reads a batch again by its index rather
    than holding them all). ``decoder``: for an
    encoder-decoder model (T5, BART), a function of the batch's ``input_ids`` giving the decoder's inputs
    (:func:`decoder_inputs`): the decoder then reads the same sentence, shifted right, as in training with it as the
    target (its ``decoder_attention_mask`` is the sentence's mask)."""

    def __init__(self, tokenizer, lines: list[str], batch: int = TEXT_BATCH, max_length: int = TEXT_MAX_LENGTH,
                 decoder=None):
        super().__init__(lines, batch)
        self.tokenizer, self.lines, self.max_length, self.decoder = tokenizer, lines, max_length, decoder

    def __getitem__(self, index: int) -> Mapping:
        """Batch ``index``, tokenized (each time it is asked for)."""
        batch = dict(self.tokenizer(self._chunk(index), padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt"))
        if self.decoder is not None:
            batch["decoder_input_ids"] = self.decoder(batch["input_ids"])
            if "attention_mask" in batch:
                batch["decoder_attention_mask"] = batch["attention_mask"]
        return batch


def _start(index: int, batches: int, size: int) -> int:
    """The first sample of batch ``index`` (an int, negative from the end) of ``batches`` of ``size``; IndexError
    out of range, TypeError for a slice or anything not an int."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"batch indices must be integers, not {type(index).__name__}")
    if not -batches <= index < batches:
        raise IndexError(f"batch {index} out of range ({batches} batches)")
    return (index % batches) * size


def decoder_inputs(model):
    """For an encoder-decoder transformers model (``config.is_encoder_decoder``), the function giving its decoder's
    inputs from a batch's ``input_ids``: the model's own ``prepare_decoder_input_ids_from_labels`` (the tokens
    shifted right behind the decoder's start token) where it has one, else that shift by hand; None for any other
    model."""
    import torch

    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        return lambda ids: prepare(labels=ids)
    start = next((v for v in (getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None))
                  if v is not None), 0)
    return lambda ids: torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise click.ClickException(f"{path}: holds no sentence (one a line)")
    return lines


def read_array(path: Path):
    """The sample array of a ``.npy`` file or of a ``.npz`` holding exactly one array (no pickles)."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"{path}: not a readable .npy/.npz array ({str(exc).splitlines()[0]})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            names = list(loaded.files)
            if len(names) != 1:
                raise click.ClickException(f"{path}: a .npz must hold exactly one array, found {len(names)}"
                                           f" ({', '.join(names[:5])})")
            loaded = loaded[names[0]]
    if loaded.ndim == 0 or loaded.shape[0] == 0:
        raise click.ClickException(f"{path}: holds no samples (shape {loaded.shape})")
    if loaded.dtype.kind not in "biuf":
        raise click.ClickException(f"{path}: dtype {loaded.dtype} is not numeric")
    from codec.rd.calibrate import first_nonfinite

    bad = first_nonfinite(loaded)
    if bad is not None:  # before any work: found at its batch, it came after the search's first pass
        raise click.ClickException(f"{path}: sample {bad} holds NaN or Inf values")
    return loaded


def import_model(spec: str, state_dict: Mapping) -> tuple[object, dict[str, str]]:
    """Build ``package.module:ClassName`` without arguments and load ``state_dict`` into it (strict): ``(model,
    model_names)``, where a checkpoint holds the model's weights under a prefix (``model.``, ``state_dict.``, a
    compiled model's ``_orig_mod.``, ``module.``: :func:`codec.io_formats.weights_prefix`) ``model_names`` maps each
    stored name to the model's (the file keeps the checkpoint's names), else it is empty."""
    import torch

    from codec.io_formats import weights_prefix

    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise click.BadParameter(f"{spec!r} is not package.module:ClassName", param_hint="--model")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a module beside the user, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own error while importing
        top = module_name.partition(".")[0]
        where = (f": looked in the current folder ({Path.cwd()}) and on PYTHONPATH; run jwt from the folder that "
                 f"holds {top}.py (or the package {top}/), or add that folder to PYTHONPATH"
                 if isinstance(exc, ModuleNotFoundError) and exc.name == top else "")
        raise click.ClickException(f"--model {spec}: cannot import {module_name} ({type(exc).__name__}: "
                                   f"{first_line(exc)}){where}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise click.ClickException(f"--model {spec}: {module_name} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise click.ClickException(f"--model {spec}: {class_name} is not a torch.nn.Module class")
    try:
        model = cls()
    except Exception as exc:
        raise click.ClickException(f"--model {spec}: {class_name}() failed ({first_line(exc)})") from None
    prefix = weights_prefix(state_dict, model.state_dict())
    names = {k: k[len(prefix):] for k in state_dict if k.startswith(prefix)} if prefix else {}
    weights = {names[k]: v for k, v in state_dict.items() if k in names} if prefix else dict(state_dict)
    try:
        model.load_state_dict(weights)
    except Exception as exc:
        raise click.ClickException(f"--model {spec}: does not accept the state_dict "
                                   f"({_mismatch(model, weights) or first_line(exc)})") from None
    return model, names


def _mismatch(model, state_dict: Mapping, shown: int = 3) -> str:
    """What keeps ``state_dict`` out of ``model``, in a line: the keys it lacks, the ones it does not know, the
    tensors of another shape, a few of each ("" when the keys and shapes all agree)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(own[k].shape)]

    def few(items: list[str]) -> str:
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return ", ".join(items[:shown]) + more

    parts = [f"{what} {few(items)}" for what, items in (("the class has no", unexpected),
                                                         ("the file lacks", missing),
                                                         ("shapes differ:", shapes)) if items]
    return "; ".join(parts)


class ImageBatches(_Batches):
    """The images ``files`` of a folder, read batch by batch, never all at once (a sequence of batches: repair reads
    a batch again by its index rather than holding them all). Without ``processor``: each batch a float32
    ``N x C x H x W`` tensor in [0, 1], the pixels as they are
    (``channels`` 1: grey, 16-bit grey over 65535; 3: converted to RGB). With ``processor`` (a transformers image
    processor, which resizes and normalizes as the model was trained): each batch's images, converted to grey
    (``channels`` 1) or RGB, through it, as ``{"pixel_values": ...}``. An image that does not decode is a one-line
    ValueError naming its file."""

    def __init__(self, files: list[Path], channels: int, processor=None, batch: int = IMAGE_BATCH):
        super().__init__(files, batch)
        self.files, self.channels, self.processor = files, channels, processor
        self._first: tuple[int, int, int] | None = None  # C x H x W of the first image (its header read once)

    def __getitem__(self, index: int):
        """Batch ``index``, its files decoded (each time it is asked for)."""
        import numpy as np
        import torch

        chunk = self._chunk(index)
        images = [_decoded(path) for path in chunk]
        if self.processor is None:
            if self._first is None:
                self._first = (self.channels, *_shape(self.files[0]))
            return torch.from_numpy(np.stack([_pixels(path, im, self._first, self.files[0])
                                              for path, im in zip(chunk, images)]))
        mode = "L" if self.channels == 1 else "RGB"
        try:
            pixels = self.processor(images=[im.convert(mode) for im in images], return_tensors="pt")
            pixels = pixels["pixel_values"]
        except Exception as exc:
            raise ValueError(f"{chunk[0]}: the folder's image processor does not take the {len(chunk)} images "
                             f"from it on ({first_line(exc)})") from None
        return {"pixel_values": pixels}


def _decoded(path: Path):
    """The Pillow image of ``path``, decoded (a truncated or corrupt file: a one-line ValueError naming it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im
    except Exception as exc:  # Pillow's OSError, SyntaxError, DecompressionBombError, ...
        raise ValueError(f"{path}: not a readable image ({first_line(exc)})") from None


def _pixels(path: Path, im, shape: tuple[int, int, int], first: Path):
    """``im`` as a float32 ``C x H x W`` array in [0, 1], of the first image's ``shape`` (C x H x W)."""
    import numpy as np

    channels = shape[0]
    if channels == 1:
        if im.mode.startswith("I"):  # 16-bit grey
            a = np.asarray(im, dtype=np.float32) / 65535
        else:
            a = np.asarray(im.convert("L"), dtype=np.float32) / 255
        a = a[None]
    else:
        a = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
    if a.shape != shape:  # the file changed since it was listed
        raise ValueError(f"{path}: {_kind(im.size, im.mode)}, where {first.name} is {channels} x {shape[1:]}")
    return np.ascontiguousarray(a)


def _shape(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file, from its header."""
    w, h = _header(path)[0]
    return h, w


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """``((width, height), mode)`` from an image file's header (nothing decoded); a one-line error when Pillow
    cannot read it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except Exception as exc:
        raise click.ClickException(f"{path}: not a readable image ({first_line(exc)})") from None


def _channels(mode: str) -> int:
    return 1 if mode in GREY_MODES else 3


def _kind(size: tuple[int, int], mode: str) -> str:
    c = _channels(mode)
    return f"{size[0]}x{size[1]} pixels, {c} channel{'s' if c > 1 else ''} ({mode})"


def image_files(folder: Path) -> tuple[list[Path], int]:
    """The image files of ``folder`` (:data:`IMAGE_SUFFIXES`, any case; subfolders are not read), sorted by name,
    and the count of its other entries; a one-line error when it holds none."""
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise click.ClickException(f"{folder}: cannot be listed ({exc.strerror or exc})") from None
    files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        folders = sum(p.is_dir() for p in entries)
        inside = f" (its {folders} subfolder{'s are' if folders > 1 else ' is'} not read)" if folders else ""
        raise click.ClickException(f"{folder}: holds no image ({', '.join(IMAGE_SUFFIXES)}){inside}")
    return files, len(entries) - len(files)


def image_inputs(folder: Path, processor=None, channels: int | None = None) -> tuple[ImageBatches, list[str]]:
    """The images of ``folder`` as :class:`ImageBatches` and the notes that say how they are read. Every file's
    header is read first, so an unreadable file is refused before any work; without ``processor`` (``--model``)
    all must share the first one's size and channel count (no resizing is done), else a one-line error naming the
    first that differs and both sizes. ``channels``: the model's (its config's ``num_channels``) with a processor."""
    from codec.encode import Note

    files, others = image_files(folder)
    headers = [_header(path) for path in files]
    if processor is None:
        size, mode = headers[0]
        channels = _channels(mode)
        for path, (size_i, mode_i) in zip(files, headers):
            if size_i != size or _channels(mode_i) != channels:
                raise click.ClickException(
                    f"{path}: {_kind(size_i, mode_i)}, where {files[0].name} has {_kind(size, mode)}: --model takes "
                    "images of one size and channel count, as they are (no resizing)")
            if mode_i == "F":
                raise click.ClickException(f"{path}: 32-bit float pixels ({mode_i}): write the samples as a .npy")
        how = (f"as float32 {len(files)} x {channels} x {size[1]} x {size[0]} in [0, 1] (no resizing or "
               "normalization: for a model that expects other inputs, write them to a .npy)")
    else:
        channels = channels or 3
        how = (f"through the folder's image processor ({type(processor).__name__}), read as "
               f"{'grey' if channels == 1 else 'RGB'}")
    notes = [Note(f"calibration: {len(files)} image{'s' if len(files) > 1 else ''} from {folder} {how}")]
    if others:
        notes.append(Note(f"calibration: {others} other entr{'ies' if others > 1 else 'y'} of {folder} left out "
                          f"(only {', '.join(IMAGE_SUFFIXES)} files are read, subfolders are not)"))
    return ImageBatches(files, channels, processor), notes


class ArrayBatches(_Batches):
    """A sample array cut into batches of :data:`IMAGE_BATCH`, each ``{key: tensor}`` (``key``: a transformers
    model's ``main_input_name``: ``pixel_values``, ``input_values``, ``input_features``, ``input_ids``), with
    ``decoder``'s ``decoder_input_ids`` for an encoder-decoder model (:func:`start_tokens`)."""

    def __init__(self, array, key: str, decoder=None, batch: int = IMAGE_BATCH):
        super().__init__(array, batch)
        self.array, self.key, self.decoder = array, key, decoder

    def __getitem__(self, index: int) -> Mapping:
        import numpy as np
        import torch

        values = torch.from_numpy(np.ascontiguousarray(self._chunk(index)))
        batch = {self.key: values}
        if self.decoder is not None:
            batch["decoder_input_ids"] = self.decoder(len(values))
        return batch


def start_tokens(model):
    """For an encoder-decoder transformers model, the function giving ``n`` samples' decoder inputs when the
    calibration gives only the encoder's (an array of audio features or pixels): each the decoder's start token
    alone; None for any other model."""
    import torch

    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    start = next((v for v in (getattr(config, "decoder_start_token_id", None), getattr(config, "bos_token_id", None),
                              getattr(config, "pad_token_id", None)) if v is not None), 0)
    return lambda n: torch.full((n, 1), int(start), dtype=torch.long)


def array_inputs(model, array, calibration: Path) -> tuple[ArrayBatches, list]:
    """A Hugging Face folder's calibration from an array of its own inputs (already what its processor would give):
    the batches (:class:`ArrayBatches`, under the model's ``main_input_name``) and the notes saying how they are
    read."""
    from codec.encode import Note

    key = getattr(model, "main_input_name", None) or "input_ids"
    decoder = start_tokens(model)
    notes = [Note(f"calibration: {len(array)} samples of {calibration.name} as the model's {key} "
                  f"({' x '.join(map(str, array.shape[1:])) or 'scalars'} each, as they are: no processor is run)")]
    if decoder is not None:
        notes.append(Note("calibration: the array gives the encoder's inputs; the decoder reads its start token "
                          "alone, so its layers are measured on that one position (a decoder calibrated on text: "
                          "codec.save(model, path, bits_per_weight=B, calibration=dict batches with "
                          "decoder_input_ids)"))
    return ArrayBatches(array, key, decoder), notes


def hf_model(folder: Path, images: bool = False, reader: bool = True):
    """The folder's model (class from config.json) and its tokenizer, or with ``images`` its image processor
    (:func:`image_processor`), through transformers; without ``reader`` (an array of the model's own inputs) neither:
    ``(model, None)``."""
    try:
        import transformers
    except ImportError:
        raise click.ClickException("--calibration with a model folder needs transformers (pip install transformers)") \
            from None
    transformers.utils.logging.disable_progress_bar()  # jwt draws its own
    what = "image processor" if images else "tokenizer" if reader else "weights"
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        names = [a for a in (getattr(config, "architectures", None) or []) if hasattr(transformers, a)]
        cls = getattr(transformers, names[0]) if names else transformers.AutoModel
        model = cls.from_pretrained(folder, local_files_only=True)
        reader = None if not reader else image_processor(transformers, folder) if images else \
            transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        hint = ("; an image or audio model (preprocessor_config.json) takes a folder of images, or a .npy of its "
                "inputs, as --calibration" if not images and reader and (folder / PREPROCESSOR).is_file() else "")
        raise click.ClickException(f"{folder}: transformers cannot load the model or its {what} "
                                   f"({first_line(exc)}){hint}") from None
    if not images and reader is not None:
        _check_vocabulary(folder, model, reader)
    return model, reader


def _check_vocabulary(folder: Path, model, tokenizer) -> None:
    """A one-line error when ``tokenizer`` has under half as many tokens as ``model`` has embedding rows: a folder
    without its tokenizer files (vocab.txt, tokenizer.json) gets an empty tokenizer from transformers 5 (5 special
    tokens), which turns every calibration sentence into unknown tokens (a calibration on nothing but [UNK])."""
    try:
        rows = model.get_input_embeddings().weight.shape[0]
        tokens = len(tokenizer)
    except Exception:  # no input embedding (a model of other inputs), a tokenizer without a length: nothing to compare
        return
    if tokens * 2 < rows:
        raise click.ClickException(
            f"{folder}: its tokenizer has {tokens:,} tokens for the model's {rows:,} embedding rows, so the "
            "calibration sentences would be read as unknown tokens; put the model's tokenizer files (tokenizer.json, "
            "vocab.txt, tokenizer_config.json, ...) in the folder")


def model_names(folder: Path, model, state_dict: Mapping) -> dict[str, str]:
    """The model's name of each tensor of the folder's weights that the model holds under another name
    (:func:`codec.save`'s ``model_names``): transformers 5 loads some models under other names than their files hold
    (ViT's ``attention.attention.query`` is its ``attention.q_proj``) and saves them back under the file's. The map
    is transformers' own: its reverse conversion (what ``save_pretrained`` writes) applied to the model's tensors,
    each renamed tensor found by identity. A one-line error, before any work, when a parameter of the model is
    neither in the file nor renamed from it (a conversion that splits or merges tensors). A file's tensor the model
    does not use (an unused head: transformers' "unexpected" key) is no such case: it is coded by the data-free
    weighting."""
    import transformers

    own = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    own |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    foreign = [name for name in state_dict if name not in own]
    if not foreign:
        return {}
    renames: dict[str, str] = {}
    try:  # transformers 5: the reverse of the conversions it applied on loading
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        revert_weight_conversion = None
    if revert_weight_conversion is not None:
        tensors = model.state_dict()
        key = lambda t: (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)  # noqa: E731
        by_tensor = {key(t): name for name, t in tensors.items()}
        for stored, tensor in revert_weight_conversion(model, dict(tensors)).items():
            name = by_tensor.get(key(tensor))
            if name is not None and name != stored and stored in state_dict and stored not in own:
                renames[stored] = name
    renamed = set(renames.values())
    missing = [name for name, _ in model.named_parameters()  # a tied one: its first name
               if name not in state_dict and name not in renamed]
    unmatched = [name for name in foreign if name not in renames]
    if unmatched and missing and revert_weight_conversion is not None:  # tensors merged into experts' 3D ones
        sliced = expert_slices(model, missing, revert_weight_conversion)
        renames.update((stored, name) for stored, name in sliced.items() if stored in unmatched)
        parts: dict[str, list[str]] = {}
        for stored, name in sliced.items():
            parts.setdefault(parse_slice(name)[0], []).append(stored)
        covered = {param for param, stored in parts.items() if all(s in state_dict for s in stored)}
        missing = [name for name in missing if name not in covered]  # (a parameter the file holds in part: refused)
        unmatched = [name for name in unmatched if name not in renames]
    if unmatched and missing:
        def few(names: list[str]) -> str:
            return f"{names[0]!r} and {len(names) - 1} more are" if len(names) > 1 else f"{names[0]!r} is"

        raise click.ClickException(
            f"{folder}: transformers {transformers.__version__} does not load the model under the tensor names its "
            f"weights file holds ({few(unmatched)} not among its parameters; {few(missing)} not in the "
            "file): the command line cannot calibrate it; in Python, codec.save(model, path, bits_per_weight=B, "
            "calibration=batches) can (the file then holds the model's names)")
    return renames


def expert_slices(model, params: list[str], revert) -> dict[str, str]:
    """For the 3D experts parameters among ``params`` (:func:`codec.rd.experts.experts_info`), the file tensors
    transformers' reverse conversion ``revert`` (``revert_weight_conversion``) makes of them, each mapped to the
    slice of one expert's matrix it holds (:func:`codec.rd.experts.slice_name`): rows of ``P[e]``, or, for a
    transposed experts module, columns of ``P[e]`` transposed, so that the file tensor's columns are the matrix's
    in-features either way. Found by value: each parameter in turn is replaced by distinct float64 numbers (its
    elements' indices, exact below 2**53; one layer's experts at a time, 8 bytes an element), the conversion applied to them, and each tensor it gives read back as indices;
    a tensor that is not such a slice (parts of two experts, another order) is left out, and the caller refuses it.
    Mixtral's ``experts.N.w1`` is ``gate_up_proj[N, :I]``, ``w3`` ``gate_up_proj[N, I:]``, ``w2`` ``down_proj[N]``.
    """
    import torch

    from codec.rd.experts import experts_info

    modules = dict(model.named_modules())
    tensors = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name in params:  # one parameter at a time: the probe of one layer's experts, not of all of them
        owner_name, _, attr = name.rpartition(".")
        info = experts_info(modules.get(owner_name)) if owner_name in modules else None
        if info is None or attr not in info.params():
            continue
        shape = tuple(tensors[name].shape)
        if math.prod(shape) >= 2 ** 53:
            continue
        try:
            reverted = revert(model, {name: torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)})
        except Exception:  # a conversion that needs the other tensors too: nothing mapped (refused as before)
            continue
        for stored, values in reverted.items():
            found = _slice_of(values, name, shape, info.transposed)
            if found is not None:
                out[stored] = found
    return out


def _slice_of(values, name: str, shape: tuple[int, int, int], transposed: bool) -> str | None:
    """The :func:`codec.rd.experts.slice_name` of the probe values ``values`` (element indices of the parameter
    ``name`` of ``shape``, as :func:`expert_slices` made them, through the conversion) when they are one expert's
    rows (or, transposed, columns) in order, else None."""
    import torch

    from codec.rd.experts import slice_name

    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.numel() == 0 \
            or not values.is_floating_point():
        return None
    local = values.to(torch.float64).round().long()
    per = shape[1] * shape[2]
    expert = int(local.min()) // per
    local = local - expert * per
    if expert >= shape[0] or int(local.max()) >= per:
        return None
    rows, cols = shape[1], shape[2]
    if not transposed and values.shape[1] == cols:  # rows a:b of P[e]
        a = int(local[0, 0]) // cols
        if torch.equal(local, torch.arange(a * cols, (a + values.shape[0]) * cols).reshape(values.shape)):
            return slice_name(name, expert, a, a + values.shape[0], False)
    elif transposed and values.shape[1] == rows:  # columns a:b of P[e], transposed
        a = int(local[0, 0])
        expect = torch.arange(rows)[None, :] * cols + torch.arange(a, a + values.shape[0])[:, None]
        if torch.equal(local, expect):
            return slice_name(name, expert, a, a + values.shape[0], True)
    return None


#: The file of a Hugging Face folder that holds its image processor's settings.
PREPROCESSOR = "preprocessor_config.json"


def image_processor(transformers, folder: Path):
    """The folder's own image processor (``AutoImageProcessor``), the slow one (Pillow and numpy) where torchvision,
    which the fast ones need, is not installed."""
    import importlib.util

    slow = {}
    if importlib.util.find_spec("torchvision") is None:
        major = int(transformers.__version__.split(".")[0])
        slow = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    return transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True, **slow)


def model_and_inputs(input: Path, state_dict: Mapping, calibration: Path, model_spec: str | None):
    """``(nn.Module, inputs, notes, model_names)`` for ``jwt encode INPUT --calibration FILE|FOLDER [--model SPEC]``
    (``model_names``: :func:`model_names`, for a Hugging Face folder; :func:`import_model`'s for a checkpoint
    holding the model's weights under a prefix)."""
    images = calibration.is_dir()
    if not images and not calibration.is_file():
        raise click.ClickException(f"{calibration}: no such file or folder")
    text = not images and calibration.suffix.lower() not in (".npy", ".npz")
    if model_spec is not None:
        if text:
            raise click.UsageError("--model takes array or image inputs (--calibration inputs.npy, inputs.npz or a "
                                   "folder of images)")
        inputs, notes = image_inputs(calibration) if images else (None, [])  # every header read before the build
        model, names = import_model(model_spec, state_dict)
        return model, inputs if images else read_array(calibration), notes, names
    if not input.is_dir():
        raise click.UsageError("--calibration needs a model to run: a Hugging Face model folder as INPUT, or "
                               "--model package.module:ClassName for a state_dict")
    if images:
        if not (input / PREPROCESSOR).is_file():
            raise click.ClickException(f"{input}: has no {PREPROCESSOR}, the image processor a folder of images is "
                                       "read with (save it there: image_processor.save_pretrained(folder)); a text "
                                       "model takes a text file of sentences")
        image_files(calibration)  # an empty folder is refused before the model is loaded
        model, processor = hf_model(input, images=True)
        names = model_names(input, model, state_dict)
        inputs, notes = image_inputs(calibration, processor, getattr(model.config, "num_channels", None))
        return model, inputs, notes, names
    if not text:  # the model's own inputs as an array: no tokenizer or processor
        array = read_array(calibration)  # (refused before the model is loaded)
        model, _ = hf_model(input, reader=False)
        names = model_names(input, model, state_dict)
        inputs, notes = array_inputs(model, array, calibration)
        return model, inputs, notes, names
    model, tokenizer = hf_model(input)
    names = model_names(input, model, state_dict)
    return model, TextBatches(tokenizer, read_lines(calibration), decoder=decoder_inputs(model)), [], names
