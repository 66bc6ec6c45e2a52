"""``jwt encode --calibration``: the model to run and the inputs to run it on.

Two ways to get a runnable model, both imported only when asked for:

- a Hugging Face folder: the model class named by its ``config.json``
  (``architectures``; ``AutoModel`` otherwise) and its tokenizer, through
  transformers, with a text file of sentences, one a line;
- a plain state_dict with ``--model package.module:ClassName``: the class is
  imported, built without arguments and given the state_dict through
  ``load_state_dict`` (strict); inputs are a ``.npy`` array or a ``.npz``
  holding one array, whose first axis is the sample axis.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import click

from codec.errors import first_line

#: Sentences per batch and tokens per sentence for text calibration.
TEXT_BATCH = 16
TEXT_MAX_LENGTH = 128


class TextBatches:
    """Sentences tokenized batch by batch (re-iterable: repair runs the inputs again). ``decoder``: for an
    encoder-decoder model (T5, BART), a function of the batch's ``input_ids`` giving the decoder's inputs
    (:func:`decoder_inputs`): the decoder then reads the same sentence, shifted right, as in training with it as the
    target (its ``decoder_attention_mask`` is the sentence's mask)."""

    def __init__(self, tokenizer, lines: list[str], batch: int = TEXT_BATCH, max_length: int = TEXT_MAX_LENGTH,
                 decoder=None):
        self.tokenizer, self.lines, self.batch, self.max_length = tokenizer, lines, batch, max_length
        self.decoder = decoder

    def __len__(self) -> int:
        return math.ceil(len(self.lines) / self.batch)

    def __iter__(self) -> Iterator[Mapping]:
        for i in range(0, len(self.lines), self.batch):
            batch = dict(self.tokenizer(self.lines[i:i + self.batch], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt"))
            if self.decoder is not None:
                batch["decoder_input_ids"] = self.decoder(batch["input_ids"])
                if "attention_mask" in batch:
                    batch["decoder_attention_mask"] = batch["attention_mask"]
            yield batch


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


def import_model(spec: str, state_dict: Mapping):
    """Build ``package.module:ClassName`` without arguments and load ``state_dict`` into it (strict)."""
    import torch

    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise click.BadParameter(f"{spec!r} is not package.module:ClassName", param_hint="--model")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a module beside the user, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own error while importing
        raise click.ClickException(f"--model {spec}: cannot import {module_name} ({type(exc).__name__}: "
                                   f"{first_line(exc)})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise click.ClickException(f"--model {spec}: {module_name} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise click.ClickException(f"--model {spec}: {class_name} is not a torch.nn.Module class")
    try:
        model = cls()
    except Exception as exc:
        raise click.ClickException(f"--model {spec}: {class_name}() failed ({first_line(exc)})") from None
    try:
        model.load_state_dict(dict(state_dict))
    except Exception as exc:
        raise click.ClickException(f"--model {spec}: does not accept the state_dict "
                                   f"({_mismatch(model, state_dict) or first_line(exc)})") from None
    return model


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


def hf_model(folder: Path):
    """The folder's model (class from config.json) and tokenizer, through transformers."""
    try:
        import transformers
    except ImportError:
        raise click.ClickException("--calibration with a model folder needs transformers (pip install transformers)") \
            from None
    transformers.utils.logging.disable_progress_bar()  # jwt draws its own
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        names = [a for a in (getattr(config, "architectures", None) or []) if hasattr(transformers, a)]
        cls = getattr(transformers, names[0]) if names else transformers.AutoModel
        model = cls.from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise click.ClickException(f"{folder}: transformers cannot load the model or its tokenizer "
                                   f"({first_line(exc)})") from None
    return model, tokenizer



def model_and_inputs(input: Path, state_dict: Mapping, calibration: Path, model_spec: str | None):
    """``(nn.Module, inputs)`` for ``jwt encode INPUT --calibration FILE [--model SPEC]``."""
    if not calibration.is_file():
        raise click.ClickException(f"{calibration}: no such file")
    text = calibration.suffix.lower() not in (".npy", ".npz")
    if model_spec is not None:
        if text:
            raise click.UsageError("--model takes array inputs (--calibration inputs.npy or inputs.npz)")
        return import_model(model_spec, state_dict), read_array(calibration)
    if not input.is_dir():
        raise click.UsageError("--calibration needs a model to run: a Hugging Face model folder as INPUT, or "
                               "--model package.module:ClassName for a state_dict")
    model, tokenizer = hf_model(input)
    inputs = TextBatches(tokenizer, read_lines(calibration), decoder=decoder_inputs(model)) if text \
        else read_array(calibration)
    return model, inputs
