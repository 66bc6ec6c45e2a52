"""Calibration: how a model uses its weights, measured on the user's own inputs.

:func:`calibrate` runs a PyTorch module (eval mode, no gradients) on
batches of inputs -- unlabelled: a folder of images or a file of sentences
is enough -- and collects, through forward hooks, what the rate search
needs to score a candidate by the error it causes in the model's output
instead of in the weights:

- for every ``nn.Linear`` and ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``,
  the second moment of the layer's inputs ``H = E[x x^T]`` over its
  in-features (convolutions: im2col columns, in the order of
  ``weight.reshape(out, -1)``, :func:`conv_rows`; groups pooled, each
  group's columns rows of their own, as for ``nn.Conv2d``), so that a
  weight error ``dW`` changes the layer's output by
  ``tr(dW H dW^T)`` on average; a diagonal where the full matrix would be
  too large (:data:`FULL_H_MAX` features, :data:`FULL_H_BYTES` in all);
  ``E[x]`` (for bias correction) and the number of rows seen;
- for every ``nn.ConvTranspose1d`` / ``2d`` / ``3d``, the same over the
  inputs each output position reads (:func:`transposed_rows`), which weigh
  the weight's matrix view ``[out, in/groups * prod(kernel)]``
  (:func:`transposed_matrix`; :class:`codec.rd.allocate.Weighting`'s
  ``transposed``); repair codes these weights with it, without refit or
  GPTQ;
- for every Hugging Face ``Conv1D`` (``transformers.pytorch_utils``:
  GPT-2's layers, weight stored ``(in, out)``, ``y = x W + b``), the
  diagonal of its inputs' second moment, which weighs the weight's *rows*
  (``kind="conv1d"``: :meth:`LayerStats.weighting` gives it as per-row
  weights ``R``, so the output error is ``sum_i H_ii |dW_i|^2``);
- for every ``nn.Embedding``, how often each row was looked up; for every
  ``nn.EmbeddingBag``, each row's share of the bags' output error: per bag,
  the square of the row's coefficient in it (``1/n`` for ``mode="mean"``
  over its ``n`` ids, its ``per_sample_weights`` summed for ``"sum"``, the
  fraction of the output's dimensions it is the maximum of for ``"max"``),
  from 2-D ids or flat ids with ``offsets``, as the model calls it; an
  embedding tied to an output head (GPT-2's ``wte`` = ``lm_head.weight``,
  one storage) is weighted as that head, by the head's inputs (its error
  reaches every logit, and the file holds the tensor once);
- for a mixture-of-experts layer (transformers' experts module of 3D
  parameters and its router, recognised by structure:
  :mod:`codec.rd.experts`), each expert's matrices' own moments over the
  tokens routed to it (``"P[e]"``), the router's weight as a linear layer,
  and a rank-one per-expert weighting of each whole 3D parameter;
- for every ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM``, each layer's and direction's ``weight_ih`` and ``weight_hh``
  as a linear layer over the inputs it multiplies at every step (the layer's input sequence; the hidden state the
  step reads, ``h0`` included), got by running single-layer modules that share the module's parameters
  (:mod:`codec.rd.recurrent`); an LSTM's projection ``weight_hr`` is not measured;
- for every ``nn.MultiheadAttention``, ``in_proj_weight`` (or ``q/k/v_proj_weight``) over the query, key and value
  rows of its calls and ``out_proj.weight`` over the attention output before it (:mod:`codec.rd.attention`; their
  sensitivity left at 1 unless ``codec.rd.attention.MEASURED_SENSITIVITY``);
- per layer, the sensitivity of the model's final output: Gaussian noise
  is added to the layer's weight, and the relative change of the final
  output is divided by the relative error this caused in the layer's
  output (a few batches; the same for the same seed). A model of several
  floating outputs (a tuple, a dict, a transformers ``ModelOutput``; not
  its ``loss``) has each output's relative change summed, as repair and
  fine-tuning match them all. An output wider than
  :data:`codec.rd.output_sample.WIDE_OUTPUT` on its last axis (a language
  model's logits) is compared on a fixed sample of that axis, drawn from
  the seed, and a head that makes it computes only those positions
  (:class:`codec.rd.output_sample.OutputSample`).

Statistics are accumulated batch by batch (each batch's products in
float32; a full ``H`` summed in float32, the rest in float64), so memory
is bounded by the statistics, not by the number of inputs. Everything
here is encoder side; nothing of it is stored in the file.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList as _ParametrizationList

from ..errors import first_line
from .allocate import Weighting
from .experts import (ExpertsCollector, FlatCollector, Target, expert_key, experts_info, moe_modules, parse_slice,
                      rank_one, targets)
from .output_sample import OutputSample
from .prefix import Prefix
from .pruned import MASK, ORIG, pruned_weight
from . import attention as attention_module
from .attention import (ATTENTION_PROJECTIONS, AttentionCollector, attention_modules, attention_out_proj,
                        attention_stats, attention_targets)
from .recurrent import (RecurrentCollector, recurrent_matrices, recurrent_modules, recurrent_targets,
                        recurrent_unmeasured)

__all__ = ["calibrate", "Calibration", "LayerStats", "as_batches", "layer_kind", "uncalibrated", "FULL_H_MAX",
           "FULL_H_BYTES", "NOISE", "SENSITIVITY_SAMPLES", "BATCH_SIZE", "UNREACHED"]

#: Layers with more in-features than this keep only the diagonal of H (and repair gives them no H:
#: ``RepairSettings.max_columns``). 8192 takes in a 3 x 3 convolution over 512 channels (4,608 im2col columns: ResNet-18
#: / 50's last stage, VGG), a Linear over 8,192 inputs; a full H takes 4 x columns^2 bytes here (85 MB at 4,608) and
#: 8 x columns^2 in repair, whose time grows as rows x columns^2. Measured (``python -m bench.wide_layers``): a
#: Fashion-MNIST CNN whose last conv has 4,608 columns, ``-b 1``: 84.73 % agreement with the float model under a 4096
#: limit, 99.51 % under 8192 (21 -> 104 CPU s, +157 -> +466 MB); a ResNet-18-shaped model's output error 25 % lower,
#: 1.85x the time, +176 -> +527 MB.
FULL_H_MAX = 8192
#: At most this many bytes of full H matrices in all; further layers keep diagonals.
FULL_H_BYTES = 1 << 30
#: Relative RMS of the noise added to a layer's weight to measure its sensitivity.
NOISE = 0.1
#: Inputs (first axis) used for the sensitivity passes (at least one batch).
SENSITIVITY_SAMPLES = 256
#: Batch size when the inputs are given as one array of samples.
BATCH_SIZE = 64
#: Bytes of unfolded convolution columns processed at once.
UNFOLD_BYTES = 64 << 20

Batch = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass
class LayerStats:
    """What calibration learned about one weight tensor's layer."""

    kind: str  # "linear", "conv2d", "conv1d_nn", "conv3d", "conv_transpose", "conv1d" (transformers' Conv1D: h weighs
    #           the rows), "embedding", "embedding_bag"
    h: np.ndarray  # (C, C) float32 or diagonal (C,) second moment of the inputs; embedding: (V,) lookup counts;
    #              embedding_bag: (V,) each row's squared coefficients in the bags, summed (:func:`bag_shares`)
    mean: np.ndarray | None  # E[x] over the in-features (None for an embedding)
    samples: int  # input rows seen (tokens, pixel positions, samples)
    sensitivity: float = 1.0  # relative change of the final output per unit relative output error
    rows: np.ndarray | None = None  # kind "experts" (a 3D experts parameter, E x ...): per-expert weights
    #: kind "embedding_bag": the factor that makes the weighting's relative error (rows mixed as an embedding's) the
    #: bags' relative output error, which the sensitivity is per unit of: ``sum(R |W_r|^2) sum(h) / sum |Y_b|^2``
    gain: float = 1.0
    #: kind "conv_transpose": the layer's groups (its weighting scores :func:`transposed_matrix`'s view)
    groups: int | None = None

    @property
    def diagonal(self) -> bool:
        """Whether only the diagonal of H was kept."""
        return self.h.ndim == 1

    def weighting(self) -> Weighting:
        """How the allocator weighs this tensor's error (:class:`codec.rd.allocate.Weighting`).

        An embedding's rows are weighted half by their lookup frequency and
        half uniformly: rows the calibration inputs never used still count,
        as rare tokens do in real use. An EmbeddingBag's the same, by its
        rows' shares of the bags' output error (:func:`bag_shares`), its
        scale times :attr:`gain`.
        """
        if self.kind in ("embedding", "embedding_bag"):
            return Weighting(rows=mixed_rows(self.h), scale=self.sensitivity * self.gain)
        if self.kind == "conv1d":  # weight (in, out): the inputs' second moment weighs its rows
            return Weighting(rows=self.h, scale=self.sensitivity)
        # a whole 3D experts parameter: per-expert rows, one diagonal over the columns; an attention's in_proj_weight:
        # per-block rows (codec.rd.attention); any other: rows None
        return Weighting(h=self.h, rows=self.rows, scale=self.sensitivity, transposed=self.groups)


def mixed_rows(counts: np.ndarray) -> np.ndarray:
    """An embedding's per-row weights from its rows' counts (lookups, or an EmbeddingBag's shares): half the counts'
    frequencies, half uniform (summing to 1)."""
    total = float(counts.sum())
    freq = counts / total if total > 0 else np.zeros_like(counts)
    return 0.5 * freq + 0.5 / len(counts)


#: The least sensitivity a measured layer is given: that of a layer whose noise did not move the compared outputs
#: (a layer the model's outputs do not use: ``Calibration.unmoved``, named in a note) or moved them less (a random
#: model's attention query and key, its softmax nearly flat).
SENSITIVITY_FLOOR = 1e-6


@dataclass
class Calibration:
    """Per weight name (``fc1.weight``), the statistics of :func:`calibrate`."""

    layers: dict[str, LayerStats]
    samples: int  # inputs seen (first axis of the batches; bags where a batch gives "offsets": :func:`_samples`)
    batches: int
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    output: str = "the model's output"  # what the sensitivity passes compared (:func:`compared_output`)
    unmoved: list[str] = field(default_factory=list)  # layers whose noise left those outputs exactly as they were
    #: transposed convolutions measured and left out for a repaired save (:data:`TRANSPOSED_UNDER_REPAIR`)
    set_aside: list[str] = field(default_factory=list)

    def weightings(self, names: Mapping[str, str] | None = None) -> dict[str, Weighting]:
        """The allocator's output-space weighting of every calibrated tensor, by its stored name. ``names``: the
        model's name of a stored tensor where it differs (:func:`codec.save`'s ``model_names``); a model name that
        is a slice of an expert's matrix (:func:`codec.rd.experts.slice_name`) gets that expert's weighting. The
        statistics of one expert's matrix (``"P[e]"``) are not a tensor of the model and are not given by their own
        name."""
        names = dict(names or {})
        stored_as = {model_name: name for name, model_name in names.items()}
        out = {stored_as.get(name, name): stats.weighting() for name, stats in self.layers.items()
               if parse_slice(name) is None}
        for stored, model_name in names.items():
            part = parse_slice(model_name)
            stats = None if part is None else self.layers.get(expert_key(*part))
            if stats is not None:
                out[stored] = stats.weighting()
        return out


class _Batches:
    """A re-iterable view of one array of samples as batches along its first axis."""

    def __init__(self, data: torch.Tensor, size: int):
        self.data, self.size = data, size

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.size)

    def __iter__(self):
        for i in range(0, len(self.data), self.size):
            yield self.data[i:i + self.size]


def first_nonfinite(samples: torch.Tensor | np.ndarray, chunk: int = 1 << 22) -> int | None:
    """The index along the first axis of the first sample of a floating array holding NaN or Inf, or None (integer
    arrays: None). Checked ``chunk`` values at a time, so the check holds no copy of a large array."""
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(samples) if samples.dtype.kind == "f" else None
    if samples is None or not samples.is_floating_point() or samples.dim() == 0 or samples.shape[0] == 0:
        return None
    rows = max(1, chunk // max(1, samples[0].numel()))
    for start in range(0, samples.shape[0], rows):
        part = samples[start:start + rows].reshape(min(rows, samples.shape[0] - start), -1)
        ok = torch.isfinite(part).all(dim=1)
        if not bool(ok.all()):
            return start + int((~ok).nonzero()[0, 0])
    return None


def as_batches(inputs: object, batch_size: int = BATCH_SIZE) -> Iterable:
    """Calibration inputs as an iterable of batches.

    One tensor or numpy array is a set of samples along its first axis, cut
    into batches of ``batch_size``; a mapping of them (a tokenizer's output)
    is one batch; anything else iterable is taken as the batches themselves.
    A batch that is a tuple or list is ``(inputs, *targets)``, as a
    DataLoader over a labelled dataset gives them: its inputs are used, the
    targets are not (the original model's outputs are the target). A
    sequence other than a list or tuple (one that makes each batch when it is
    asked for, as the command line's image folder and text file) stays one,
    so that repair can read a batch again rather than hold them all.
    """
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(inputs)
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise ValueError("calibration inputs: a 0-d tensor holds no samples (give samples along the first axis)")
        bad = first_nonfinite(inputs)
        if bad is not None:  # found here, before any work, not at its batch after minutes of calibration
            raise ValueError(f"calibration inputs: sample {bad} holds NaN or Inf values")
        return _Batches(inputs, batch_size)
    if isinstance(inputs, Mapping):
        return [inputs]
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        raise TypeError(f"calibration inputs must be a tensor, an array or an iterable of batches, "
                        f"not {type(inputs).__name__}")
    if iter(inputs) is inputs:  # a one-shot iterator stays one
        return map(_inputs_of, inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, (list, tuple)):
        return _InputsAt(inputs)  # (repair reads its batches again by index: codec.rd.repair.inputs._check_inputs)
    return _InputsOf(inputs)


def _inputs_of(batch: object) -> object:
    """A batch's inputs: the first item of an ``(inputs, *targets)`` tuple or list, else the batch."""
    return batch[0] if isinstance(batch, (tuple, list)) and batch else batch


class _InputsOf:
    """A re-iterable source of batches (a list, a DataLoader) read as :func:`_inputs_of` each batch."""

    def __init__(self, source: Iterable):
        self.source = source

    def __iter__(self):
        return map(_inputs_of, self.source)


class _InputsAt(_InputsOf, Sequence):
    """A sequence of batches that makes each one when asked (the command line's image folder and text file,
    ``cli.calibration``), read as :func:`_inputs_of` each batch, by index too."""

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> object:
        return _inputs_of(self.source[index])


def _prepare(batch: object, index: int, device: torch.device, dtype: torch.dtype) -> Batch:
    """Check one batch and move it to the model's device (floating inputs in the model's dtype)."""

    def tensor(value: object, where: str) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            hint = ("; each item is a batch, samples on the first axis: per-sample records (a `datasets` Dataset's "
                    "rows) go through torch.utils.data.DataLoader(records, batch_size=64) first"
                    if where and isinstance(value, (int, float, bool, str)) else "")
            raise ValueError(f"calibration batch {index}{where}: not a tensor but {type(value).__name__}{hint}")
        if value.dim() == 0 or value.shape[0] == 0:
            raise ValueError(f"calibration batch {index}{where}: empty (shape {tuple(value.shape)})")
        if value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"calibration batch {index}{where}: holds NaN or Inf values")
            value = value.to(dtype)
        return value.to(device)

    if isinstance(batch, Mapping):
        if not batch:
            raise ValueError(f"calibration batch {index}: an empty mapping")
        return {k: tensor(v, f" {k!r}") for k, v in batch.items()}
    return tensor(batch, "")


def keywords(model: nn.Module, batch: Mapping) -> Mapping | None:
    """The keyword arguments a mapping batch goes in as (``model(**keywords)``), or None when it goes in whole
    (``model(batch)``). A forward that takes ``**kwargs`` or every key by name gets the batch (a tokenizer's output
    for a Hugging Face model); one that takes some of the keys by name gets those, the rest (a labelled dataset's
    ``label``, as the targets of an ``(inputs, *targets)`` tuple) left out; a ``forward(self, batch)`` that takes none
    of them gets the mapping whole, to read it itself."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return batch
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return batch
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if set(batch) <= names:
        return batch
    taken = {k: v for k, v in batch.items() if k in names}
    if taken:
        return taken
    return None if len(names) == 1 else batch


def call(model: nn.Module, batch: Batch):
    """The model's output on one batch: a mapping batch (a tokenizer's) as keywords (those its forward takes; whole
    to a ``forward(self, batch)`` that reads it itself, :func:`keywords`), anything else as the one argument
    (repair, calibration and :func:`codec.train.finetune` run a model the same way)."""
    if isinstance(batch, Mapping):
        given = keywords(model, batch)
        if given is not None:
            return model(**given)
    return model(batch)


def floating_outputs(out: object) -> list[torch.Tensor]:
    """The floating tensors of a model output (a tensor, a tuple / list, a dict or a transformers ModelOutput, nested
    ones flattened in order), the outputs calibration compares, as repair and finetune's distillation match them: not
    a mapping's ``loss`` (a function of the labels given, not an output to reproduce)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for k, v in out.items() if k != "loss" for t in floating_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in floating_outputs(v)]
    return []


#: A mapping output's keys calibration does not compare when it holds the key beside it: transformers' ``pooler_output``
#: (the first token's ``last_hidden_state`` through one more Linear and a tanh, which sentence-transformers' mean
#: pooling does not use) beside ``last_hidden_state``. Compared too, all-MiniLM-L6-v2 at -b 3.5 lost 0.0005 / 0.0003
#: of cosine (everyday / rare) and its save's peak rose 180 -> 185 MB (bench/JOURNAL.md, bag (twenty-sixth pass)).
NOT_COMPARED = {"pooler_output": "last_hidden_state"}


def _compared_part(out: object) -> object:
    """``out`` without the items of :data:`NOT_COMPARED` (a mapping that holds their companion key)."""
    if isinstance(out, Mapping) and any(k in out and v in out for k, v in NOT_COMPARED.items()):
        return {k: v for k, v in out.items() if NOT_COMPARED.get(k) not in out}
    return out


def compared_outputs(out: object) -> list[torch.Tensor]:
    """The outputs calibration compares: the floating tensors of a model output (:func:`floating_outputs`), but a
    ``pooler_output`` beside its ``last_hidden_state`` (:data:`NOT_COMPARED`)."""
    return floating_outputs(_compared_part(out))


def _run(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    """The model's compared outputs on one batch (:func:`compared_outputs`)."""
    return compared_outputs(call(model, batch))


def compared_output(out: object) -> str:
    """Which part of a model output the sensitivity passes compare (:func:`compared_outputs`), in words for a note:
    "the model's output" for a tensor, the one floating tensor compared (``"'last_hidden_state' of its
    BaseModelOutputWithPooling output of 2"``), else every one (``"its 2 floating tensors of its tuple output of
    2"``, ``"'hidden' and 'logits' of its dict output of 2"``)."""
    whole, out = out, _compared_part(out)
    kind = type(whole).__name__
    size = len(whole) if isinstance(whole, (Mapping, tuple, list)) else 0
    if isinstance(out, torch.Tensor) or len(floating_outputs(out)) <= 1:
        if isinstance(out, Mapping):
            key = next((k for k, v in out.items() if k != "loss" and floating_outputs(v)), None)
            return f"{key!r} of its {kind} output of {size}"
        if isinstance(out, (tuple, list)):
            index = next((i for i, v in enumerate(out) if floating_outputs(v)), None)
            return f"item {index} of its {kind} output of {size}"
        return "the model's output"
    if isinstance(out, Mapping):
        keys = [k for k, v in out.items() if k != "loss" and floating_outputs(v)]
        return f"{', '.join(map(repr, keys[:-1]))} and {keys[-1]!r} of its {kind} output of {size}"
    return f"its {len(floating_outputs(out))} floating tensors of its {kind} output of {size}"


def _samples(batch: Batch, last_offset: bool = False) -> int:
    """A batch's number of samples: its bags where a mapping holds a 1-D ``"offsets"`` (flat ids and the offsets of
    their bags, as ``nn.EmbeddingBag`` takes them: one sample a bag, whatever else the mapping holds,
    ``per_sample_weights`` too): the offsets' length, less one where ``last_offset`` (the model's bags end their last
    bag with one more offset, ``include_last_offset=True``); else the first axis of the first tensor (2-D ids: one
    sample a row)."""
    if isinstance(batch, Mapping):
        offsets = batch.get("offsets")
        if isinstance(offsets, torch.Tensor) and offsets.dim() == 1:
            return max(int(offsets.shape[0]) - last_offset, 1)
        batch = next(iter(batch.values()))
    return int(batch.shape[0])


def _conv1d_type() -> type | None:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` if transformers is loaded (a model made of it is), else
    None: transformers is never imported here."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


#: The kinds of torch's convolutions (``nn.Conv1d`` is ``"conv1d_nn"``: ``"conv1d"`` is transformers' Conv1D, a
#: linear layer), by :func:`layer_kind`; their weights ``[out, in/groups, *kernel]`` are rows over im2col columns.
CONV_KINDS = ("conv1d_nn", "conv2d", "conv3d")
#: The kind of ``nn.ConvTranspose1d / 2d / 3d``: weight ``[in, out/groups, *kernel]``, whose matrix view is
#: :func:`transposed_matrix` (each output channel a row over the ``in/groups * kernel`` inputs that reach it).
TRANSPOSED = "conv_transpose"
#: Whether a calibrated save that repairs weighs the transposed convolutions by their measured statistics (else by the
#: data-free weighting, as before they were measured; without repair they always are). Repair fits the layers after
#: a coded one (refit, GPTQ) but not a transposed convolution, so the calibrated plan, which does not know that, moves
#: bytes from the transposed layers to the ones repair would mend anyway. Measured on a denoising autoencoder (two
#: ConvTranspose2d, 63 % of its weights; bench/JOURNAL.md, "convs (twenty-eighth pass)"): with repair, output error
#: 0.00571 / 0.00220 measured against 0.00562 / 0.00088 data-free at -b 1.5 / 2.5; without repair (where they are
#: weighed as measured) mixed: 0.02539 / 0.00341 against 0.01851 / 0.00908. Measured again once repair gave them a
#: judged least-squares bias (codec.rd.repair.fit.TRANSPOSED_BIAS; "vocoder (twenty-ninth pass)"): the autoencoder
#: 0.00505 measured against 0.00389 data-free at -b 1.5, a weight_norm vocoder (two ConvTranspose1d, 61 % of its
#: weights) 0.352 against 0.255 at -b 1: still off.
TRANSPOSED_UNDER_REPAIR = False


def layer_kind(module: nn.Module) -> str | None:
    """``"embedding"``, ``"embedding_bag"``, ``"conv2d"``, ``"conv1d_nn"`` / ``"conv3d"`` (torch's ``nn.Conv1d`` /
    ``nn.Conv3d``), ``"conv_transpose"`` (:data:`TRANSPOSED`: ``nn.ConvTranspose1d / 2d / 3d``), ``"linear"``,
    ``"conv1d"`` (transformers' Conv1D, weight ``(in, out)``), ``"bilinear"`` (``nn.Bilinear``: measured over the
    outer products of its two inputs, :func:`bilinear_rows`) for the layers calibration measures, None for the
    others."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.EmbeddingBag):
        return "embedding_bag"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d_nn"
    if isinstance(module, nn.Conv3d):
        return "conv3d"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return TRANSPOSED
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Bilinear):
        return "bilinear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d) and getattr(module, "weight", None) is not None \
            and module.weight.dim() == 2:
        return "conv1d"
    return None


def add_moments(acc, x: torch.Tensor) -> None:
    """Add the rows ``x`` (rows x in-features) to ``acc.h`` (``x^T x``, or with ``acc.full`` False its diagonal),
    ``acc.sum`` (of ``x``) and ``acc.rows``: ``H`` and the mean are ``acc.h / acc.rows``, ``acc.sum / acc.rows``.
    One batch's products in float32 (fast), summed over batches in place (no new cols^2 matrices per batch): a full
    H in float32, what the rate search measures with (a relative error of the order of 1e-7 per batch, where the
    measure needs 3 digits; half the memory: all-MiniLM-L6-v2's 36 matrices, 75 MB less), a diagonal in float64."""
    x = x.detach().float()
    second = x.T @ x if acc.full else (x * x).sum(0)
    if acc.h is None:
        acc.h = second if acc.full else second.to(torch.float64, copy=True)
    else:
        acc.h.add_(second)
    total = x.sum(0).double()
    acc.sum = total if acc.sum is None else acc.sum + total
    acc.rows += x.shape[0]


_BAG_ARGS = ("input", "offsets", "per_sample_weights")


def bag_arguments(args: tuple, kwargs: Mapping) -> dict:
    """An ``nn.EmbeddingBag`` call's arguments by name (``input``, ``offsets``, ``per_sample_weights``), from a forward
    hook's positional and keyword arguments."""
    given = {**dict(zip(_BAG_ARGS, args)), **{k: v for k, v in kwargs.items() if k in _BAG_ARGS}}
    return {name: given.get(name) for name in _BAG_ARGS}


def _bag_call(module: nn.EmbeddingBag, given: Mapping, weight: torch.Tensor, ids: torch.Tensor | None = None,
              padding_idx: int | None = None) -> torch.Tensor:
    """``module``'s bags of the call ``given`` (:func:`bag_arguments`) over ``weight`` in place of its own (no
    ``max_norm`` renormalization); ``ids`` replaces the call's input (the same bags over other row numbers, with
    ``padding_idx`` for them)."""
    return F.embedding_bag(given["input"] if ids is None else ids, weight, given["offsets"], mode=module.mode,
                           per_sample_weights=given["per_sample_weights"],
                           include_last_offset=module.include_last_offset,
                           padding_idx=module.padding_idx if ids is None else padding_idx)


def bag_shares(module: nn.EmbeddingBag, given: Mapping) -> torch.Tensor:
    """Each row's share of the output error of the bags of one ``nn.EmbeddingBag`` call (``given``:
    :func:`bag_arguments`), float64 ``(num_embeddings,)``: a bag's output error is ``sum_r c_r dW_r`` with ``c_r`` the
    row's coefficient in it (``1/n`` for each of the ``n`` ids of a ``mode="mean"`` bag, 1 or its
    ``per_sample_weights`` for ``"sum"``, a row's ids in one bag added), so independent row errors cost
    ``sum_r c_r^2 |dW_r|^2``: the shares are the ``c_r^2`` summed over the bags. ``"max"``: per bag, the fraction of
    the output's dimensions whose maximum the row holds (the error passes through those). Ids equal to the padding
    index are left out, as the bag does."""
    ids, offsets, psw = given["input"], given["offsets"], given["per_sample_weights"]
    rows = module.num_embeddings
    if module.mode == "max":
        flat = ids.dim() == 1  # flat ids with the call's offsets, else one bag a row
        bags = offsets if flat else torch.arange(0, ids.numel(), ids.shape[1], device=ids.device)
        # (scale_grad_by_freq, mode 2 = max, sparse, per_sample_weights, include_last_offset, padding_idx)
        _, _, sizes, best = torch.embedding_bag(module.weight.detach(), ids.reshape(-1), bags, False, 2, False, None,
                                                module.include_last_offset and flat, module.padding_idx)
        best = best[sizes > 0].reshape(-1)  # (an empty bag's "maximum" is row 0)
        return torch.bincount(best.long(), minlength=rows).double().cpu() / module.embedding_dim
    if ids.dim() == 2:
        bag = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
    else:
        starts = offsets[:-1] if module.include_last_offset else offsets
        bag = torch.searchsorted(starts.contiguous(), torch.arange(ids.numel(), device=ids.device), right=True) - 1
        if module.include_last_offset:  # ids past the last offset belong to no bag
            keep = torch.arange(ids.numel(), device=ids.device) < offsets[-1]
            ids, bag = ids[keep], bag[keep]
            psw = None if psw is None else psw.reshape(-1)[keep]
    ids = ids.reshape(-1).long()
    coef = (torch.ones(ids.shape, dtype=torch.float64, device=ids.device) if psw is None
            else psw.reshape(-1).detach().double())
    keep = bag >= 0
    if module.padding_idx is not None:
        keep &= ids != module.padding_idx
    ids, bag, coef = ids[keep], bag[keep], coef[keep]
    if ids.numel() == 0:
        return torch.zeros(rows, dtype=torch.float64)
    if module.mode == "mean":
        sizes = torch.bincount(bag)
        coef = coef / sizes[bag].double()
    pairs, inverse = torch.unique(bag * rows + ids, return_inverse=True)
    summed = torch.zeros(len(pairs), dtype=torch.float64, device=ids.device).index_add_(0, inverse, coef)
    return torch.bincount(pairs % rows, weights=summed.square(), minlength=rows).cpu()


class _Collector:
    """Forward hooks accumulating one layer's input statistics."""

    with_kwargs = False  # (registered with the call's keyword arguments: :class:`_BagCollector`)

    def __init__(self, module: nn.Module, full: bool):
        self.module, self.full = module, full
        self.kind = layer_kind(module)
        self.h: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.rows = 0
        self.mask: torch.Tensor | None = None  # the batch's attention mask, for token inputs
        self.active = True  # off during the sensitivity passes

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0] if args else None
        if not self.active or not isinstance(x, torch.Tensor):
            return
        if self.kind == "embedding":
            ids = lookup_ids(module, x)
            if ids is None:
                return
            ids = self._tokens(ids, ids.shape)
            counts = torch.bincount(ids.reshape(-1).long(), minlength=module.num_embeddings).double()
            self.h = counts if self.h is None else self.h + counts
            self.rows += ids.numel()
        elif self.kind in CONV_KINDS:
            for cols in conv_rows(module, x, UNFOLD_BYTES // 2):  # float32 columns and their product
                self._add(cols)
        elif self.kind == TRANSPOSED:
            width = _columns(module)  # (the output's size: the padding forward used, output_size given or not)
            for columns, cols in transposed_rows(module, x, output.shape[-len(module.kernel_size):],
                                                 UNFOLD_BYTES // 2):
                add_moments_at(self, cols, columns, width)
        elif self.kind == "bilinear":
            x2 = args[1] if len(args) > 1 else None
            if not isinstance(x2, torch.Tensor):
                return
            for rows in bilinear_rows(self._tokens(x, x.shape[:-1]), self._tokens(x2, x2.shape[:-1]),
                                      UNFOLD_BYTES // 2):
                self._add(rows)
        else:
            self._add(self._tokens(x, x.shape[:-1]).reshape(-1, x.shape[-1]))

    def _tokens(self, x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        """``x`` without the padding positions of the batch's attention mask (when the shapes match)."""
        if self.mask is not None and tuple(lead[:2]) == tuple(self.mask.shape) and len(lead) >= 2:
            return x[self.mask.bool()]
        return x

    def _add(self, x: torch.Tensor) -> None:
        add_moments(self, x)

    def stats(self) -> LayerStats | None:
        """The layer's statistics; called once, at the end (the accumulated ``H`` is divided in place)."""
        if self.h is None or self.rows == 0:
            return None
        if self.kind == "embedding_bag":
            return self._bag_stats()
        if self.kind == "embedding":
            return LayerStats("embedding", self.h.cpu().numpy(), None, self.rows)
        # divided in place: a second copy of every H at once was calibration's peak (MiniLM: 148 MB more)
        h, self.h = self.h.div_(self.rows), None
        groups = self.module.groups if self.kind == TRANSPOSED else None
        return LayerStats(self.kind, h.cpu().numpy(), (self.sum / self.rows).cpu().numpy(), self.rows,
                          groups=groups)


class _BagCollector(_Collector):
    """An ``nn.EmbeddingBag``'s hook (with the call's keyword arguments: ``offsets``, ``per_sample_weights``): its rows'
    shares of the bags' output error (:func:`bag_shares`) and the bags' output energy."""

    with_kwargs = True

    def __init__(self, module: nn.Module, full: bool):
        super().__init__(module, full)
        self.energy = 0.0  # sum of the bags' squared outputs

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        given = bag_arguments(args, kwargs)
        if not self.active or not isinstance(given["input"], torch.Tensor):
            return
        shares = bag_shares(module, given)
        self.h = shares if self.h is None else self.h + shares
        self.rows += given["input"].numel()
        self.energy += _squared_sum(output)

    def _bag_stats(self) -> LayerStats | None:
        """``h``: the shares; ``gain``: ``sum(R |W_r|^2) sum(h) / sum |Y_b|^2`` with ``R`` the weighting's mixed rows
        (:func:`mixed_rows`), so that the allocation's relative error (``tr(R dW dW^T) / tr(R W W^T)``) times it is
        ``E|dY|^2 / |Y|^2`` for row errors spread as evenly as the sensitivity pass's noise."""
        shares = self.h.numpy()
        total = float(shares.sum())
        if total <= 0 or self.energy <= 0:
            return None
        weight = self.module.weight.detach()
        row_energy = torch.cat([part.double().pow(2).sum(1) for part in weight.split(max(1, _RMS_CHUNK // max(
            1, weight.shape[1])))]).cpu().numpy()
        gain = float(mixed_rows(shares) @ row_energy) * total / self.energy
        return LayerStats("embedding_bag", shares, None, self.rows, gain=gain)


def conv_rows(module: nn.modules.conv._ConvNd, x: torch.Tensor, max_bytes: int):
    """The im2col columns ``(rows, C/groups * prod(kernel))`` of a conv input ``x`` (``nn.Conv1d``, ``nn.Conv2d``,
    ``nn.Conv3d``), a few samples at a time: at most ``max_bytes`` of columns (at least one sample) per chunk, the
    whole batch in one when it fits. Groups: each group's columns are rows of their own. The columns are in the order
    of ``weight.reshape(out, -1)``. Any padding mode and string padding (padded here as the module pads), stride and
    dilation. Calibration and repair (:mod:`codec.rd.repair`) collect with it."""
    m = module
    padding = m.padding
    flat = x.dim() == len(m.kernel_size) + 1  # an unbatched input (C, *spatial)
    x = x.unsqueeze(0) if flat else x
    if m.padding_mode != "zeros" or isinstance(padding, str) or not isinstance(m, nn.Conv2d):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    per_sample = x[0].numel() * math.prod(m.kernel_size) * x.element_size()
    step = max(1, max_bytes // max(per_sample, 1))
    for i in range(0, x.shape[0], step):
        if isinstance(m, nn.Conv2d):  # (F.unfold: the rows Conv2d always had, in their order)
            cols = F.unfold(x[i:i + step], m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
            n, ck, length = cols.shape
            yield cols.reshape(n, m.groups, ck // m.groups, length).permute(0, 1, 3, 2).reshape(-1, ck // m.groups)
        else:
            yield _patches(x[i:i + step], m.kernel_size, m.dilation, m.stride, m.groups)


def _patches(x: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...],
             groups: int) -> torch.Tensor:
    """The patches of a padded input ``x`` (N, C, *spatial), any number of spatial dims, as rows
    ``(N * positions * groups, C/groups * prod(kernel))``, columns ordered ``(channel, *kernel)`` as a conv weight
    ``[out, C/groups, *kernel]`` reshaped to ``[out, -1]`` (``Tensor.unfold`` over each spatial dim: exact)."""
    d = len(kernel)
    for axis, (k, dil, s) in enumerate(zip(kernel, dilation, stride)):
        x = x.unfold(2 + axis, dil * (k - 1) + 1, s)  # appends the window's axis
        if dil > 1:
            x = x[..., ::dil]
    n, c = x.shape[:2]
    positions = x.shape[2:2 + d]
    # (N, C, *positions, *kernel) -> (N, *positions, groups, C/groups, *kernel)
    x = x.reshape(n, groups, c // groups, *positions, *kernel)
    order = [0, *range(3, 3 + d), 1, 2, *range(3 + d, 3 + 2 * d)]
    return x.permute(order).reshape(-1, c // groups * math.prod(kernel))


def transposed_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A transposed convolution's weight ``[in, out/groups, *kernel]`` as the matrix ``[out, in/groups *
    prod(kernel)]`` whose row ``o`` maps the inputs that reach output channel ``o`` (:func:`transposed_rows`'
    columns): ``y[o, q] = sum_{c, k} x[c, p(q, k)] W[c, o, k]`` is that row times the column of position ``q``."""
    c_in, per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    w = weight.reshape(groups, c_in // groups, per_group, math.prod(kernel))
    return w.permute(0, 2, 1, 3).reshape(groups * per_group, -1)


def _output_padding(module: nn.modules.conv._ConvTransposeNd, x: torch.Tensor,
                    size: Sequence[int] | None) -> Sequence[int]:
    """The output padding a transposed convolution's forward used on ``x``: its own ``output_padding``, or where
    ``forward`` was given ``output_size``, the padding that gives the output's spatial ``size``."""
    if size is None:
        return module.output_padding
    return module._output_padding(x, list(size), module.stride, module.padding, module.kernel_size,
                                  len(module.kernel_size), module.dilation)


def transposed_rows(module: nn.modules.conv._ConvTransposeNd, x: torch.Tensor, size: Sequence[int] | None,
                    max_bytes: int):
    """The inputs a transposed convolution's output positions read, as ``(columns, rows)`` pairs: ``rows`` of the
    positions of one phase (their index modulo the stride) over the ``columns`` (indices into the ``in/groups *
    prod(kernel)`` columns of :func:`transposed_matrix`) that phase's kernel taps reach; every other column of those
    rows is zero. A few samples at a time (as :func:`conv_rows`). The output error of a weight error ``dW`` is
    ``sum |rows @ transposed_matrix(dW)[:, columns]^T|^2`` over the pairs, exactly.

    A transposed convolution is the convolution of the input spread ``stride`` apart (zeros between) and padded
    ``dilation * (kernel - 1) - padding`` on each side (``output_padding`` more at the end), by the kernel flipped:
    the patches of that input, their kernel axes flipped back. Of a patch, only the taps that land on the input's own
    positions (not the zeros between) are non-zero, and which ones depends on the position's phase: taking each phase's
    positions and taps alone, the rows take ``1 / prod(stride)`` of the patches' values and their moments
    ``1 / prod(stride)^2`` of the products (a 4 x 4, stride-2 ConvTranspose2d over 64 channels: 256 columns a
    phase, not 1,024). ``size``: the output's spatial size where ``forward`` was given ``output_size`` (else the
    module's ``output_padding``)."""
    m = module
    d = len(m.kernel_size)
    x = x.unsqueeze(0) if x.dim() == d + 1 else x  # (an unbatched input)
    extra = _output_padding(m, x, size)
    edges = [m.dilation[a] * (m.kernel_size[a] - 1) - m.padding[a] for a in range(d)]
    pads: list[int] = []
    for axis in reversed(range(d)):  # F.pad: the last axis first; a negative pad crops
        pads += [edges[axis], edges[axis] + extra[axis]]
    c = x.shape[1]
    index = torch.arange(c // m.groups * math.prod(m.kernel_size)).reshape(c // m.groups, *m.kernel_size)
    phases = []
    for phase in itertools.product(*[range(st) for st in m.stride]):
        # original tap k reads the spread input at phase + stride * t + (kernel - 1 - k) * dilation - edge
        taps = [torch.tensor([k for k in range(m.kernel_size[a])
                              if (phase[a] + (m.kernel_size[a] - 1 - k) * m.dilation[a] - edges[a]) % m.stride[a] == 0],
                             dtype=torch.long) for a in range(d)]
        if all(len(t) for t in taps):
            columns = index
            for a, t in enumerate(taps):
                columns = columns.index_select(1 + a, t)
            phases.append((phase, taps, columns.reshape(-1).to(x.device)))
    reach = [m.dilation[a] * (m.kernel_size[a] - 1) + 1 for a in range(d)]
    per_sample = x[0].numel() * math.prod(m.kernel_size) * x.element_size()
    step = max(1, max_bytes // max(per_sample, 1))
    for i in range(0, x.shape[0], step):
        part = x[i:i + step]
        spread = part.new_zeros((part.shape[0], c, *[(n - 1) * st + 1 for n, st in zip(part.shape[2:], m.stride)]))
        spread[(slice(None), slice(None), *[slice(None, None, st) for st in m.stride])] = part
        padded = F.pad(spread, pads)
        for phase, taps, columns in phases:
            if any(padded.shape[2 + a] - phase[a] < reach[a] for a in range(d)):
                continue  # (no output position of this phase)
            view = padded[(slice(None), slice(None), *[slice(p, None) for p in phase])]
            rows = _patches(view, m.kernel_size, m.dilation, m.stride, m.groups)
            rows = rows.reshape(-1, c // m.groups, *m.kernel_size).flip(list(range(2, 2 + d)))
            for a, t in enumerate(taps):
                rows = rows.index_select(2 + a, t.to(rows.device))
            yield columns, rows.reshape(len(rows), -1)


def bilinear_rows(x1: torch.Tensor, x2: torch.Tensor, max_bytes: int) -> Iterator[torch.Tensor]:
    """An ``nn.Bilinear``'s input rows for its weight's ``[out, in1 * in2]`` view: ``y_o = sum_ij W[o, i, j] x1_i
    x2_j + b_o`` is a Linear over the outer product ``x1 (x) x2`` (column ``i * in2 + j``), so its ``H`` is that
    product's second moment. Made a chunk of rows at a time, at most ``max_bytes`` each (the product has ``in1 *
    in2`` columns: 4,096 for two 64-wide inputs)."""
    x1, x2 = x1.reshape(-1, x1.shape[-1]), x2.reshape(-1, x2.shape[-1])
    width = x1.shape[1] * x2.shape[1]
    step = max(1, max_bytes // max(1, width * x1.element_size()))
    for i in range(0, x1.shape[0], step):
        yield (x1[i:i + step, :, None] * x2[i:i + step, None, :]).reshape(-1, width)


def add_moments_at(acc, x: torch.Tensor, columns: torch.Tensor, width: int) -> None:
    """:func:`add_moments` of rows ``x`` that are zero outside ``columns`` (of ``width`` in all), given as those
    columns only: their products added to that block of ``acc.h`` (or of its diagonal), their sums to ``acc.sum``."""
    x = x.detach().float()
    if acc.h is None:
        acc.h = (x.new_zeros((width, width)) if acc.full
                 else torch.zeros(width, dtype=torch.float64, device=x.device))
        acc.sum = torch.zeros(width, dtype=torch.float64, device=x.device)
    if acc.full:
        acc.h[columns.unsqueeze(1), columns] += x.T @ x
    else:
        acc.h[columns] += (x * x).sum(0).double()
    acc.sum[columns] += x.sum(0).double()
    acc.rows += x.shape[0]


def _computed_weight(model: nn.Module, name: str) -> tuple[bool, str]:
    """``(known, computed)`` for a parametrized layer's stored tensor ``name``: the weight the layer computes
    (``fc1.parametrizations.weight.original1`` -> ``fc1.weight``), and whether that parametrization is weight_norm
    or spectral_norm alone, whose originals the search weighs as the computed weight
    (:func:`codec.rd.allocate.reparametrized`; weight_norm's ``g``, one value per output unit, goes with its ``v``:
    its relative error is the weight's)."""
    from .allocate import PARAMETRIZED

    head, _, tail = ("." + name).rpartition(PARAMETRIZED)
    head, param = head[1:], tail.partition(".")[0]
    layer = model.get_submodule(head) if head else model
    chain = getattr(getattr(layer, "parametrizations", None), param, None)
    kinds = [type(p).__name__ for p in chain] if chain is not None else []
    return kinds in (["_WeightNorm"], ["_SpectralNorm"]), f"{head}.{param}" if head else param


def hook_weight_norm(module: nn.Module, name: str = "weight"):
    """The ``torch.nn.utils.weight_norm`` (the hook form: a forward pre-hook computing ``module.<name>`` from
    ``<name>_g`` and ``<name>_v``) on ``module``'s ``name``, or None."""
    from torch.nn.utils.weight_norm import WeightNorm

    return next((h for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm) and h.name == name), None)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """Weight name -> module, for the Linear, convolution (1d / 2d / 3d, transposed too), Embedding, EmbeddingBag
    and transformers Conv1D layers whose weight is in the state_dict."""
    keys = set(model.state_dict().keys())
    attention = attention_out_proj(model)  # (Linears their attention module never calls: codec.rd.attention's)
    out = {}
    for name, module in model.named_modules():
        if layer_kind(module) is not None:
            key = f"{name}.weight" if name else "weight"
            # a weight computed by a parametrization (weight_norm, spectral_norm) is measured as the weight the
            # layer uses; the search moves its measure to the stored tensors (codec.rd.allocate.stored_weightings)
            # so is a torch.nn.utils.prune layer's (weight_orig * weight_mask; codec.rd.pruned codes weight_orig so)
            if (key in keys or parametrize.is_parametrized(module, "weight") or hook_weight_norm(module) is not None
                    or pruned_weight(module) is not None) and key not in attention:
                out[key] = module
    return out


def _columns(module: nn.Module) -> int:
    """The columns of a layer's ``H`` (in-features, im2col columns; a transposed convolution's
    ``in/groups * prod(kernel)``), 0 for the kinds that keep no full ``H``."""
    kind = layer_kind(module)
    if kind == TRANSPOSED:
        return module.weight.shape[0] // module.groups * math.prod(module.kernel_size)
    return module.weight[0].numel() if kind in ("linear", "bilinear") or kind in CONV_KINDS else 0


def _several_inputs_hint(exc: BaseException) -> str:
    """What to do when a model of several positional inputs got one: a tuple batch is ``(inputs, *targets)``."""
    if isinstance(exc, TypeError) and "missing" in str(exc) and "positional argument" in str(exc):
        return ("; a tuple or list batch is (inputs, *targets) and only its first item goes in: give a forward of "
                "several inputs each batch as a dict of its arguments by name, e.g. {'x': ..., 'y': ...}")
    return ""


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """While open, a buffer that a forward pass of ``model`` changes is given back, when the pass ends, the value it
    had when the pass started: a forward that updates a buffer in eval mode too (the observers of a model prepared
    for quantization-aware training, ``torch.ao.quantization.prepare_qat``: their ranges and scales) would otherwise
    leave the user's model, and the file written from it, holding what the calibration inputs made of them, and
    each pass would run a model other than the last. A change made between passes (repair setting a running mean)
    is kept. Compared by value, not by tensor version: the fused observers of torch's default QAT configuration
    (``FusedMovingAvgObsFakeQuantize``) update their buffers in place without counting a version. Each buffer is
    copied once on entering, and again only after a change between passes."""
    held = [[b, b.detach().clone()] for b in model.buffers()]
    if not held:
        yield
        return

    def taken(module: nn.Module, args: tuple) -> None:
        for entry in held:
            if not _same(entry[0], entry[1]):  # changed since: by the caller, between passes
                entry[1] = entry[0].detach().clone()

    def given_back(module: nn.Module, args: tuple, output: object) -> None:
        with torch.no_grad():
            for buffer, value in held:
                if not _same(buffer, value):
                    if buffer.shape != value.shape:
                        buffer.resize_(value.shape)
                    buffer.copy_(value)

    handles = [model.register_forward_pre_hook(taken), model.register_forward_hook(given_back)]
    _PASS_ENDS.setdefault(id(model), []).append(lambda: given_back(model, (), None))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        ends = _PASS_ENDS.get(id(model), [])
        ends.pop()
        if not ends:
            _PASS_ENDS.pop(id(model), None)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values (NaN equal to NaN: a buffer holding one is not changed)."""
    return a.shape == b.shape and bool(torch.equal(a, b) or (a.is_floating_point() and torch.allclose(
        a, b, rtol=0, atol=0, equal_nan=True)))


#: id(model) -> what gives its buffers back after a pass, for each :func:`kept_buffers` open on it
_PASS_ENDS: dict[int, list[Callable[[], None]]] = {}


def pass_ended(model: nn.Module) -> None:
    """After a forward pass of ``model`` ended early by an exception (repair's ``_Stop`` once a layer's inputs are
    seen), whose forward hooks did not run: what :func:`kept_buffers` gives back at a pass's end, given back now."""
    for end in _PASS_ENDS.get(id(model), []):
        end()


#: The names transformers models give their main inputs (``main_input_name``): a model whose forward takes two of
#: them (CLIP's ``input_ids`` and ``pixel_values``) may need both in each batch.
MAIN_INPUTS = ("input_ids", "pixel_values", "input_values", "input_features")


def _missing_inputs_hint(model: nn.Module, batch: object) -> str:
    """When a mapping batch gives one of :data:`MAIN_INPUTS` and the model's forward also takes another by name (a
    dual encoder given sentences alone), what else it takes and how to give both."""
    if not isinstance(batch, Mapping):
        return ""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return ""
    given = [k for k in MAIN_INPUTS if k in batch]
    missing = [k for k in MAIN_INPUTS if k in params and k not in batch]
    if not given or not missing:
        return ""
    both = ", ".join(f"'{k}': ..." for k in (given[0], *missing))
    return (f"; its forward also takes {', '.join(missing)}, which the batches do not give: a model of two inputs "
            f"(a dual encoder) may need both, as dict batches {{{both}}}")


def calibrate(model: nn.Module, inputs: object, *, max_batches: int | None = None, seed: int = 0,
              progress: Callable[[str, int], None] | None = None,
              sensitivity_samples: int = SENSITIVITY_SAMPLES, transposed: bool = True) -> Calibration:
    """Run ``model`` on ``inputs`` and collect per-layer statistics (see the module docstring).

    ``inputs``: an iterable of batches (tensors, numpy arrays, or mappings
    of them passed as ``model(**batch)``, e.g. a tokenizer's output, or whole
    to a ``forward(self, batch)`` that reads the mapping itself), or one
    tensor / array of samples along its first axis (cut into batches of
    :data:`BATCH_SIZE`). At most ``max_batches`` batches are used. The
    first ``sensitivity_samples`` inputs (at least one batch) also serve the
    sensitivity passes: one more forward pass per layer and batch, with
    noise drawn from a generator seeded by ``seed`` (a model output wider than
    :data:`codec.rd.output_sample.WIDE_OUTPUT` on its last axis compared on
    that many positions of it, drawn from ``seed``). ``progress(stage, n)``
    is called with ``"calibration"`` and each batch's number of inputs.
    ``transposed`` False: the transposed convolutions are not measured (their names in ``set_aside``: a repaired
    save's, :data:`TRANSPOSED_UNDER_REPAIR`).

    A bad batch (not a tensor, empty, NaN/Inf, refused by the model) is a
    one-line ValueError naming it; the first batch is checked before any
    statistics are gathered.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate() needs a torch.nn.Module, not {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):  # its layers are script modules: no hook of theirs would run
        raise TypeError("calibration: a TorchScript module (torch.jit.script / trace) cannot be measured layer by "
                        "layer; pass the nn.Module it was made from (it has the same state_dict names)")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    batches = as_batches(inputs)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    layers = _layers(model)
    set_aside = [] if transposed else [n for n, m in layers.items() if layer_kind(m) == TRANSPOSED]
    for name in set_aside:
        del layers[name]
    experts, routers = moe_modules(model)
    recurrent = recurrent_modules(model)
    attention = attention_modules(model)
    if not layers and not set_aside and not experts and not routers and not recurrent and not attention:
        raise ValueError("calibration: the model has no Linear, Bilinear, Conv1d / 2d / 3d, ConvTranspose, Conv1D, "
                         "Embedding, EmbeddingBag, RNN, GRU, LSTM or MultiheadAttention layer with a weight to "
                         "calibrate")
    full_bytes = 0

    def full_h(cols: int, count: int = 1) -> bool:
        nonlocal full_bytes
        full = 0 < cols <= FULL_H_MAX and full_bytes + 8 * cols * cols * count <= FULL_H_BYTES
        full_bytes += 8 * cols * cols * count if full else 0
        return full

    collectors = {}
    for name, module in layers.items():
        cols = _columns(module)
        kind = _BagCollector if layer_kind(module) == "embedding_bag" else _Collector
        collectors[name] = kind(module, full_h(cols))
    moe_collectors: dict = {name: FlatCollector(module, full_h(module.weight.shape[1]))
                            for name, module in routers.items()}
    for name, (module, info) in experts.items():  # full H over each expert matrix's in-features where it fits
        full = {p: full_h(getattr(module, p).shape[1 if info.transposed else 2], info.count) for p in info.params()}
        moe_collectors[name] = ExpertsCollector(name, module, info, full)
    rnn_collectors = {name: RecurrentCollector(name, module, full_h) for name, module in recurrent.items()}
    att_collectors = {name: AttentionCollector(name, module, full_h) for name, module in attention.items()}
    # router weights, expert matrices, recurrent matrices and attention projections: noise put in the parameter
    moe_targets = {**targets(experts, routers), **recurrent_targets(rnn_collectors),
                   **(attention_targets(att_collectors) if attention_module.MEASURED_SENSITIVITY else {})}
    noise_num = dict.fromkeys([*layers, *moe_targets], 0.0)
    noise_den = dict.fromkeys([*layers, *moe_targets], 0.0)
    was_training = model.training
    model.eval()
    handles = [c.module.register_forward_hook(c, with_kwargs=c.with_kwargs) for c in collectors.values()]
    handles += [c.module.register_forward_hook(c, with_kwargs=isinstance(c, ExpertsCollector))
                for c in moe_collectors.values()]
    handles += [c.module.register_forward_hook(c, with_kwargs=True)
                for c in [*rnn_collectors.values(), *att_collectors.values()]]
    collectors_all = [*collectors.values(), *moe_collectors.values(), *rnn_collectors.values(),
                      *att_collectors.values()]
    samples = count = sensitivity_seen = 0
    last_offset = any(isinstance(m, nn.EmbeddingBag) and m.include_last_offset for m in layers.values())
    sample = OutputSample(seed)
    prefix = Prefix(model)  # (eval mode: set above; the sensitivity passes start at the layer they perturb)
    try:
        with torch.no_grad(), own_lookups(layers.values()), kept_buffers(model):
            for index, raw in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                batch = _prepare(raw, index, device, dtype)
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                for c in collectors_all:
                    c.mask, c.active = mask, True
                try:
                    with sample.watch(model) if index == 0 else contextlib.nullcontext(), \
                            prefix.recording() if sensitivity_seen < sensitivity_samples else contextlib.nullcontext():
                        out = call(model, batch)
                except Exception as exc:  # the model's own error on a wrong shape or type (a ValueError too)
                    raise ValueError(f"calibration batch {index}: the model does not accept it "
                                     f"({first_line(exc)}){_several_inputs_hint(exc)}"
                                     f"{_missing_inputs_hint(model, batch)}") from None
                clean = compared_outputs(out)
                if not clean:
                    raise ValueError(f"calibration: the model's output ({type(out).__name__}) holds no floating "
                                     "tensor to compare")
                if index == 0:
                    sample.adopt(clean)
                    compared = compared_output(out)
                if not all(bool(torch.isfinite(t).all()) for t in clean):
                    raise ValueError(f"calibration batch {index}: the model's output holds NaN or Inf")
                n = _samples(batch, last_offset)
                if sensitivity_seen < sensitivity_samples:
                    for c in collectors_all:
                        c.active = False
                    clean = sample.reference(model, batch, _run, list, clean)
                    _sensitivity_pass(model, batch, clean, layers, seed, index, noise_num, noise_den, sample, prefix)
                    _target_sensitivity_pass(model, batch, clean, moe_targets, seed, index, noise_num, noise_den,
                                             sample, len(layers))
                    sensitivity_seen += n
                samples += n
                count += 1
                if progress:
                    progress("calibration", n)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        prefix.disable()  # (no outputs of the last batch kept)
    if count == 0:
        raise ValueError("calibration inputs are empty (no batch)")
    out, notes = {}, []

    unmoved: list[str] = []  # noise in the layer left the compared output exactly as it was

    def sensitive(name: str, stats: LayerStats) -> None:
        den = noise_den[name]
        stats.sensitivity = max(noise_num[name] / den, SENSITIVITY_FLOOR) if den > 0 else 1.0
        if den > 0 and noise_num[name] == 0:
            unmoved.append(name)
        out[name] = stats

    for name, c in collectors.items():
        stats = c.stats()
        if stats is None:
            notes.append(f"layer {name!r}: not used by the calibration inputs")
            continue
        sensitive(name, stats)
    for name, c in moe_collectors.items():
        if isinstance(c, FlatCollector):
            stats = c.stats()
            if stats is None:
                notes.append(f"router {name!r}: not used by the calibration inputs")
            else:
                sensitive(name, stats)
            continue
        got = c.stats()
        for key, stats in got.items():
            sensitive(key, stats)
        notes += _unreached_experts(c, out)
        for param in c.info.params():
            whole = _whole_experts(c, param, out)
            if whole is not None:
                out[c.param_name(param)] = whole
    for c in rnn_collectors.values():
        for key, stats in c.stats().items():
            sensitive(key, stats)

    def sensitivity(key: str) -> float:  # as sensitive() gives it
        den = noise_den[key]
        if den > 0 and noise_num[key] == 0:
            unmoved.append(key)
        return max(noise_num[key] / den, SENSITIVITY_FLOOR) if den > 0 else 1.0

    for name, c in att_collectors.items():
        got = attention_stats(c, sensitivity)
        if not got:
            notes.append(f"attention {name!r}: not used by the calibration inputs")
        out.update(got)
    blocks = [k for k in unmoved if k.endswith(("[q]", "[k]", "[v]"))]  # in_proj_weight's row blocks
    unmoved[:] = [k for k in unmoved if k not in blocks]
    unmoved += [k[:-3] for k in blocks if k.endswith("[q]") and {k[:-3] + "[k]", k[:-3] + "[v]"} <= set(blocks)]
    _tie_heads(layers, out)
    return Calibration(out, samples, count, seed, notes, compared, unmoved, set_aside)


#: How an expert that no calibration token was routed to is weighed: "mean" (the mean of its module's reached
#: experts' statistics, H and sensitivity, for the same parameter) or "data-free" (no statistics: the data-free
#: weighting). Measured in bench/JOURNAL.md, moe (twenty-second pass).
UNREACHED = "mean"


def _unreached_experts(c: ExpertsCollector, out: dict[str, LayerStats]) -> list[str]:
    """A note naming the experts of ``c``'s module that no calibration token reached (and, with :data:`UNREACHED`
    "mean", their statistics in ``out``: the mean of the reached experts')."""
    missing = [e for e in range(c.info.count) if expert_key(c.param_name(c.info.up), e) not in out]
    if not missing:
        return []
    if UNREACHED == "mean" and len(missing) < c.info.count:
        for param in c.info.params():
            name = c.param_name(param)
            reached = [out[expert_key(name, e)] for e in range(c.info.count) if e not in missing]
            h = np.mean([s.h for s in reached], axis=0).astype(reached[0].h.dtype)
            mean = np.mean([s.mean for s in reached], axis=0)
            sens = float(np.mean([s.sensitivity for s in reached]))
            for e in missing:
                out[expert_key(name, e)] = LayerStats("linear", h, mean, 0, sens)
        how = "weighed by the mean of the other experts' statistics"
    else:
        how = "coded by the data-free weighting"
    shown = ", ".join(map(str, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    plural = "s" if len(missing) > 1 else ""
    return [f"calibration: expert{plural} {shown} of {c.name!r} ({c.info.count} experts): no calibration token was "
            f"routed to {'them' if plural else 'it'}; {how}"]


def _whole_experts(c: ExpertsCollector, param: str, out: Mapping[str, LayerStats]) -> LayerStats | None:
    """The statistics of a whole 3D experts parameter ``(E, rows, columns)`` (what :func:`codec.save` of the model
    stores): the per-expert output-error weight of each element, ``M[e, k] = s_e H_e[k, k] / tr(W_e H_e W_e^T)``
    (``k`` an in-feature, ``s_e`` the expert's sensitivity), approximated by its best rank-one product
    ``u_e v_k``: per-expert row weights ``u`` and a diagonal ``H`` that repeats ``v`` over the out-features, scaled
    so that the weighting's relative error times its scale is the sum of the experts' own
    (``kind="experts"``). None when an expert has no statistics (the data-free weighting then codes the tensor)."""
    name = c.param_name(param)
    stats = [out.get(expert_key(name, e)) for e in range(c.info.count)]
    if any(s is None for s in stats):
        return None
    weight = getattr(c.module, param).detach()
    diag = []
    for e, s in enumerate(stats):
        h = s.h if s.h.ndim == 1 else np.diagonal(s.h)
        w = weight[e].T if c.info.transposed else weight[e]  # (out, in)
        w2 = w.double().pow(2).cpu().numpy()
        energy = float(w2.sum(0) @ h)
        diag.append(s.sensitivity * h / energy if energy > 0 else np.zeros_like(h, dtype=np.float64))
    u, v = rank_one(np.asarray(diag, dtype=np.float64))
    if not u.any() or not v.any():
        return None
    out_features = weight.shape[2 if c.info.transposed else 1]
    h = np.repeat(v, out_features) if c.info.transposed else np.tile(v, out_features)
    rows = u / u.mean()
    per_row = (weight.double().pow(2).reshape(c.info.count, -1).cpu().numpy() @ h)
    scale = float(per_row @ rows) * float(u.mean())
    return LayerStats("experts", h, None, sum(s.samples for s in stats), scale, rows)


def _target_sensitivity_pass(model: nn.Module, batch: Batch, clean: list[torch.Tensor],
                             moe_targets: Mapping[str, Target],
                             seed: int, index: int, num: dict[str, float], den: dict[str, float],
                             sample: OutputSample, first: int) -> None:
    """:func:`_sensitivity_pass` for matrices that are not a module's whole weight (an expert's ``param[e]``) or
    whose module returns more than its output (a router): the noise is added to the parameter itself for one
    forward pass and taken out again (the clean values copied back), and a hook on the module measures the
    relative output error it caused in that matrix's output (over the tokens routed to the expert). ``first``: the
    number of ordinary layers before these (each matrix's noise seed follows theirs)."""
    if not moe_targets:
        return
    energy, change = _output_change(clean)
    for k, (name, target) in enumerate(moe_targets.items(), start=first):
        view = target.view()
        noise = _Noise(view, clean[0].device, seed * 1_000_003 + k * 7919 + index)
        dw = noise.whole()
        weight = view.clone()
        caused = [0.0, 0.0]

        def measure(mod: nn.Module, args: tuple, kwargs: dict, output) -> None:
            a, b = target.caused(args, kwargs, weight, dw)  # noqa: B023
            caused[0] += a  # noqa: B023
            caused[1] += b  # noqa: B023

        handle = target.module.register_forward_hook(measure, with_kwargs=True)
        try:
            view.add_(dw)
            with sample.narrowed(model):
                out = [sample.take(t) for t in _run(model, batch)]
        finally:
            view.copy_(weight)
            handle.remove()
        if caused[1] > 0 and caused[0] > 0:
            num[name] += change(out)
            den[name] += energy * caused[0] / caused[1]


def _tie_heads(layers: dict[str, nn.Module], out: dict[str, LayerStats]) -> None:
    """Layers that share one weight tensor (stored once, under the first name of the state_dict) get one set of
    statistics, whichever of their names the file stores it under and whichever of their modules the inputs ran.

    An embedding whose weight is an output head's too (GPT-2's ``wte`` = ``lm_head.weight``) gets the head's
    statistics: its coding error reaches every logit through the head, weighed by the head's inputs, where as a
    lookup table it only moves the rows looked up (bench/newuser.py's 2x64 GPT-2 at -b 3: held-out next-token
    agreement 75.31 % weighted as a table, 75.55 % as the head; bench/JOURNAL.md, eighteenth pass, qa). Names of
    the group that never ran (T5's ``shared``, whose weight its encoder's and decoder's ``embed_tokens`` and its
    ``lm_head`` use; stored as ``shared.weight``) get the head's too; with no head, the lookup counts of every
    embedding of the group that ran, summed (their sensitivities too: the table's error reaches the output through
    each), bench/JOURNAL.md, nineteenth pass, qa."""
    groups: dict[int, list[str]] = {}
    for name, module in layers.items():
        groups.setdefault(id(module.weight), []).append(name)
    for names in groups.values():
        if len(names) < 2:
            continue
        head = next((n for n in names if layer_kind(layers[n]) in ("linear", "conv1d") and n in out), None)
        if head is not None:
            for name in names:
                if layer_kind(layers[name]) in ("embedding", "embedding_bag") or name not in out:
                    out[name] = out[head]
            continue
        looked = [out[n] for n in names if n in out and out[n].kind == "embedding"]
        if not looked:
            continue
        merged = looked[0] if len(looked) == 1 else LayerStats(
            "embedding", np.sum([s.h for s in looked], axis=0), None, sum(s.samples for s in looked),
            float(sum(s.sensitivity for s in looked)))
        for name in names:
            if name not in out or out[name].kind == "embedding":
                out[name] = merged


def uncalibrated(model: nn.Module, calib: Calibration, names: Iterable[str]) -> str | None:
    """A one-line note naming the tensors of ``names`` (the weights a calibrated encode codes: floating, 2-D or
    more) that ``calib`` has no statistics for, so that they are coded by the data-free weighting: layers of a kind
    calibration does not measure (a module of the user's own, an LSTM's projection ``weight_hr``, ...:
    by their module's class) or not reached by the calibration inputs. None if there are none."""
    names = list(names)
    modules = dict(model.named_modules(remove_duplicate=False))
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    kinds: dict[str, list[str]] = {}
    unreached: list[str] = []
    for name in names:
        if name in calib.layers:
            continue
        part = parse_slice(name)
        if part is not None:  # a file's tensor that is one expert's matrix, or rows of it: its expert unreached
            if expert_key(*part) not in calib.layers:  # (calibrate()'s note says so)
                unreached.append(name)
            continue
        owner = modules.get(name.rpartition(".")[0])
        parent = modules.get(name.rpartition(".")[0].rpartition(".")[0])
        if owner is not None and name.rpartition(".")[2] in ("weight_g", "weight_v") \
                and hook_weight_norm(owner) is not None and name[:-2] in calib.layers:
            continue  # weight_norm's hook form: measured as the weight it computes (codec.rd.allocate.HOOK_V)
        leaf = name.rpartition(".")[2]
        if owner is not None and leaf.endswith((ORIG, MASK)) and pruned_weight(owner, leaf[:-len(ORIG)]) is not None:
            if leaf.endswith(MASK) or name[:-len(ORIG)] in calib.layers:  # (a mask is coded exactly)
                continue  # torch.nn.utils.prune: weight_orig measured as the weight it computes (codec.rd.pruned)
            if layer_kind(owner) is None:
                kinds.setdefault(type(owner).__name__, []).append(name)
            else:
                unreached.append(name)
            continue
        if (isinstance(owner, nn.MultiheadAttention) and name.rpartition(".")[2] in ATTENTION_PROJECTIONS) or (
                isinstance(parent, nn.MultiheadAttention) and owner is parent.out_proj):
            unreached.append(name)  # (codec.rd.attention measures its projections when the module runs)
        elif owner is not None and (layer_kind(owner) is not None or experts_info(owner) is not None
                                    or name.rpartition(".")[2] in recurrent_matrices(owner)):
            unreached.append(name)  # (an experts module's whole parameter: an expert of it unreached)
        elif name.rpartition(".")[2] in recurrent_unmeasured(owner):
            kinds.setdefault(f"{type(owner).__name__} projection: its input, the cell's output, is not returned by "
                             "the module", []).append(name)
        elif name in buffers:  # a matrix the model multiplies by itself (a fixed projection): no layer, no module
            kinds.setdefault(f"a buffer of {type(owner).__name__}{' itself' if owner is model else ''}: used outside "
                             "any layer calibration measures", []).append(name)
        elif isinstance(owner, _ParametrizationList):  # weight_norm's g and v, spectral_norm's original, ...
            known, computed = _computed_weight(model, name)
            layer = modules.get(computed.rpartition(".")[0])
            if known and computed in calib.layers:  # (codec.rd.allocate.stored_weightings moves the measure)
                continue
            if known and layer is not None and layer_kind(layer) is None:  # weight_norm on a Conv1d
                kinds.setdefault(type(layer).__name__, []).append(name)
            elif known and layer is not None:
                unreached.append(name)
            else:
                kinds.setdefault("the originals of a torch.nn.utils.parametrize parametrization other than "
                                 "weight_norm and spectral_norm: calibration measures the weight a layer computes "
                                 "from them, not them; parametrize.remove_parametrizations(layer, \"weight\") on "
                                 "each before saving stores that weight, which it measures", []).append(name)
        elif owner is model:  # a parameter of the model itself (a position table added to the inputs): no layer
            kinds.setdefault(f"a parameter of {type(model).__name__} itself, used outside any layer calibration "
                             "measures", []).append(name)
        else:
            kinds.setdefault(type(owner).__name__ if owner is not None else "a tensor of no layer", []).append(name)
    if not kinds and not unreached:
        return None

    def listed(items: list[str], most: int = 6) -> str:
        shown = ", ".join(map(repr, items[:most]))
        return shown + (f" and {len(items) - most} more" if len(items) > most else "")

    unmeasured = ": a layer kind calibration does not measure"
    parts = [f"{listed(items)} ({kind}{'' if 'itself' in kind or ':' in kind else unmeasured})"  # (':': said why)
             for kind, items in kinds.items()]
    if unreached:
        parts.append(f"{listed(unreached)} (not reached by the calibration inputs)")
    count = sum(map(len, kinds.values())) + len(unreached)
    plural = "s" if count != 1 else ""
    return f"calibration: {count} tensor{plural} coded by the data-free weighting: {'; '.join(parts)}"



def _weight_error(module: nn.Module, x: torch.Tensor, dw: torch.Tensor, size: Sequence[int] | None = None
                  ) -> torch.Tensor:
    """The change of ``module``'s output on input ``x`` when its weight changes by ``dw`` (``size``: a transposed
    convolution's output size where its forward was given ``output_size``)."""
    if isinstance(module, nn.Embedding):
        return F.embedding(x, dw, module.padding_idx)
    if layer_kind(module) in CONV_KINDS:
        return module._conv_forward(x, dw, None)
    if layer_kind(module) == TRANSPOSED:  # (the output size given to forward, if any: the padding that gives it)
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(module.kernel_size) - 1]
        return fn(x, dw, None, module.stride, module.padding, _output_padding(module, x, size), module.groups,
                  module.dilation)
    if layer_kind(module) == "conv1d":  # transformers' Conv1D: y = x W + b, W (in, out)
        return x @ dw
    return F.linear(x, dw)


class _Lookups(torch.overrides.TorchFunctionMode):
    """Records the rows of ``weight`` a forward reads (see :func:`own_lookups`): the ids of an ``F.embedding`` call
    made with it, or of ``weight[ids]`` / ``weight[a:b]`` (Whisper's decoder positions index the weight itself)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight, self.ids = weight, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.embedding and len(args) > 1 and args[1] is self.weight:
            self.ids = args[0]
        elif func is torch.Tensor.__getitem__ and len(args) > 1 and args[0] is self.weight:
            index = args[1]
            if isinstance(index, slice) and index.step in (None, 1):
                self.ids = torch.arange(*index.indices(self.weight.shape[0])[:2])
            elif isinstance(index, torch.Tensor) and not index.is_floating_point() and index.dtype != torch.bool:
                self.ids = index
        return func(*args, **(kwargs or {}))


#: module -> the ids its last call looked up, for the embeddings :func:`own_lookups` watches
_LOOKED_UP: dict[nn.Module, torch.Tensor] = {}


@contextlib.contextmanager
def own_lookups(modules: Iterable[nn.Module]) -> Iterator[None]:
    """While open, an ``nn.Embedding`` among ``modules`` whose class overrides ``forward`` has the ids its call
    looked up recorded (:func:`lookup_ids`), not only its call's arguments: transformers'
    ``BartLearnedPositionalEmbedding`` is called with the token embeddings "for the shape only" and looks up the
    positions through ``nn.Embedding.forward``, so its hooks see floats where the rows it reads are the positions.
    Its forward runs under a torch function mode that notes the ``F.embedding`` call made with its weight."""
    own = [m for m in modules if isinstance(m, nn.Embedding) and type(m).forward is not nn.Embedding.forward]
    for module in own:
        original = module.forward

        def watched(*args, _module=module, _original=original, **kwargs):
            with _Lookups(_module.weight) as mode:
                out = _original(*args, **kwargs)
            _LOOKED_UP[_module] = mode.ids  # (None: rows read some other way, not known)
            return out

        module.forward = watched  # (an instance attribute: nn.Module.__call__ reads self.forward)
    try:
        yield
    finally:
        for module in own:
            del module.forward
            _LOOKED_UP.pop(module, None)


def lookup_ids(module: nn.Module, x: object) -> torch.Tensor | None:
    """The ids an ``nn.Embedding`` call looked up: recorded by :func:`own_lookups` for a class that chooses its rows
    itself, else its first argument ``x``; None when they are not known, not an integer tensor or not rows of its
    weight (nothing to count them by: the layer keeps the data-free weighting)."""
    ids = _LOOKED_UP.get(module, x)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        return None
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= module.weight.shape[0]):
        return None
    return ids


#: Elements of a weight squared and summed at once by :func:`_rms`.
_RMS_CHUNK = 1 << 20


def _rms(weight: torch.Tensor) -> float:
    """The root mean square of ``weight``: its float32 squares summed in float64, :data:`_RMS_CHUNK` elements at a
    time (``pow(2).mean(dtype=float64)`` of a whole tensor makes a float64 copy of it: all-MiniLM-L6-v2's embedding,
    94 MB next to 47 MB of squares). The same value for a weight of one chunk."""
    flat = weight.reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    for part in flat.split(_RMS_CHUNK):
        total += part.pow(2).sum(dtype=torch.float64)
    return float(total.div_(max(flat.numel(), 1)).sqrt())


class _Noise:
    """A layer's weight noise ``dW``: Gaussian, drawn from a generator seeded by ``seed``, of relative RMS
    :data:`NOISE`; :meth:`error` gives the change it causes in the layer's output.

    An embedding on the CPU whose rows are a whole number of 16-element groups draws its noise :data:`_RMS_CHUNK`
    elements at a time and keeps only the rows looked up: the same values as one draw of the whole weight (torch
    draws normal values 16 at a time), without a noise tensor of the embedding's size (all-MiniLM-L6-v2's: 47 MB).
    """

    def __init__(self, weight: torch.Tensor, device: torch.device, seed: int):
        self.weight, self.device, self.seed = weight, device, seed
        self.scale = NOISE * _rms(weight)
        cols = math.prod(weight.shape[1:])
        self.by_rows = (weight.dim() == 2 and weight.device.type == "cpu" and torch.device(device).type == "cpu"
                        and cols > 0 and cols % 16 == 0)
        self.dw: torch.Tensor | None = None

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def whole(self) -> torch.Tensor:
        """``dW`` of the weight's shape (drawn once)."""
        if self.dw is None:
            w = self.weight
            self.dw = torch.randn(w.shape, generator=self._generator(), device=w.device, dtype=w.dtype)
            self.dw *= self.scale
        return self.dw

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (sorted, unique) of :meth:`whole`, drawn again for every call."""
        w = self.weight
        step = max(1, _RMS_CHUNK // w.shape[1])
        gen, parts = self._generator(), []
        for start in range(0, w.shape[0], step):
            block = torch.randn((min(step, w.shape[0] - start), w.shape[1]), generator=gen, dtype=w.dtype)
            parts.append(block[ids[(ids >= start) & (ids < start + step)] - start])
        dw = torch.cat(parts)
        dw *= self.scale
        return dw

    def error(self, module: nn.Module, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """The change of ``module``'s output on input ``x`` caused by ``dW`` (an EmbeddingBag: :meth:`bag_error`;
        ``size``: as :func:`_weight_error`'s)."""
        if isinstance(module, nn.Embedding) and self.by_rows:
            ids, inverse = torch.unique(x, sorted=True, return_inverse=True)
            return F.embedding(inverse, self.rows(ids))
        return _weight_error(module, x, self.whole(), size)

    def bag_error(self, module: nn.EmbeddingBag, given: Mapping, output: torch.Tensor) -> torch.Tensor:
        """The change of an EmbeddingBag's output on its call ``given`` (:func:`bag_arguments`: its bags, offsets and
        per-sample weights; ``output`` the clean one) caused by ``dW`` (``mode="max"``: the bags of ``W + dW`` less
        ``output``)."""
        if self.by_rows:  # only the rows the bags hold, renumbered
            ids, inverse = torch.unique(given["input"], sorted=True, return_inverse=True)
            pad = module.padding_idx
            pad = int(torch.searchsorted(ids, pad)) if pad is not None and bool((ids == pad).any()) else None
            dw = self.rows(ids)
            if module.mode == "max":
                return _bag_call(module, given, module.weight.detach()[ids] + dw, inverse, pad) - output
            return _bag_call(module, given, dw, inverse, pad)
        if module.mode == "max":
            return _bag_call(module, given, module.weight.detach() + self.whole()) - output
        return _bag_call(module, given, self.whole())


#: Elements per chunk of :func:`_squared_sum` (4 MB of float32).
SUM_CHUNK = 1 << 20
#: A chunk's float32 sum of squares at or above this (and finite) is kept; below it (squares that may have
#: underflowed), infinite (overflowed) or NaN, the chunk is summed again in float64.
_FLOAT32_SUM_FROM = 2.0 ** -60


def _squared_sum(a: torch.Tensor, b: torch.Tensor | None = None, chunk: int = SUM_CHUNK) -> float:
    """``sum((a - b)^2)`` (``b`` None: ``sum(a^2)``), a chunk of elements at a time, each chunk's total added in
    float64.

    A chunk's differences and squares are made in one buffer reused for every chunk, of ``a``'s dtype widened to
    float32 (float64 for a float64 ``a``), and summed in that precision by torch's pairwise sum (relative error
    measured at 7e-9 on 11.7 M logits). A language model's output is a float32 (batch, tokens, vocabulary) tensor
    (GPT-2, 16 x 128 tokens: 412 MB): a whole float64 copy of it was most of a calibrated encode's memory, and a
    float64 copy of each 32 MB chunk most of the time of a T5 with a 30,522-word vocabulary (38 of 116 CPU s; 9x
    faster now). A chunk whose float32 sum is not a normal number well inside float32's range (at or above
    :data:`_FLOAT32_SUM_FROM`, finite: squares of values beyond 1.8e19 overflow, those below 1e-19 underflow) is
    summed again in float64, so large, tiny and mixed values keep float64's accuracy. Never writes into ``a`` or
    ``b``."""
    a = a.detach().reshape(-1)
    b = None if b is None else b.detach().reshape(-1)
    if a.numel() == 0:
        return 0.0
    wide = torch.float64 if a.dtype == torch.float64 else torch.float32
    buffer = torch.empty(min(chunk, a.numel()), dtype=wide, device=a.device)
    total = 0.0
    for i in range(0, a.numel(), chunk):
        part = a[i:i + chunk]
        x = buffer[:part.numel()]
        if b is None and part.dtype == wide:
            torch.mul(part, part, out=x)
        else:
            if b is not None and part.dtype == wide and b.dtype == wide:
                torch.sub(part, b[i:i + chunk], out=x)
            else:
                x.copy_(part)
                if b is not None:
                    x -= b[i:i + chunk]
            x.square_()
        value = float(x.sum())
        if wide != torch.float64 and not _FLOAT32_SUM_FROM <= value < math.inf:
            y = part.to(torch.float64, copy=True)
            if b is not None:
                y -= b[i:i + chunk]
            value = float(y.square_().sum())
        total += value
    return total


def _output_change(clean: list[torch.Tensor]) -> tuple[float, Callable[[list[torch.Tensor]], float]]:
    """``(E, change)``: the first compared output's energy ``E = |y_0|^2`` and a function of the perturbed outputs
    giving ``E`` times the sum of their relative squared changes, ``sum_j |y_j' - y_j|^2 E / |y_j|^2`` (an output of
    no energy left out): repair's objective (each output's relative MSE, summed), so that a layer's sensitivity is the
    summed relative change of the model's outputs per unit of its own relative output error. With one output, its
    squared change (the same arithmetic as comparing it alone)."""
    energies = [_squared_sum(t) for t in clean]
    energy = energies[0]

    def change(out: list[torch.Tensor]) -> float:
        if len(out) != len(clean):
            raise ValueError(f"calibration: the model returned {len(out)} floating outputs on a perturbed run, "
                             f"{len(clean)} on the clean one")
        return sum(_squared_sum(o, c) * (energy / e) for o, c, e in zip(out, clean, energies) if e > 0)

    return energy, change


def _sensitivity_pass(model: nn.Module, batch: Batch, clean: list[torch.Tensor], layers: dict[str, nn.Module],
                      seed: int, index: int, num: dict[str, float], den: dict[str, float], sample: OutputSample,
                      prefix: Prefix | None = None) -> None:
    """One perturbed forward pass per layer (``clean``: the model's floating outputs on ``batch``
    (:func:`floating_outputs`), sampled by ``sample``; each perturbed run narrowed by it but at the perturbed layer
    itself, its outputs sampled the same way).

    The layer's weight gets Gaussian noise of relative RMS :data:`NOISE`
    (an error shaped like a coding error: the same at every position of a
    convolution or token, so it does not average out downstream the way
    independent noise on each output would). ``num`` collects the first
    output's energy times the outputs' relative squared changes, summed
    (:func:`_output_change`; one output: its squared change), ``den`` that
    energy times the relative output error ``||dW x||^2 / ||W x||^2`` this
    caused in the layer, so ``num / den`` is the outputs' summed relative
    change per unit of it.

    ``prefix`` (its clean pass of ``batch`` recorded, :meth:`codec.rd.prefix.Prefix.recording`): each pass gives
    back the outputs of the modules completed before the perturbed layer starts instead of running them
    (:class:`codec.rd.prefix.Prefix`; the same outputs bit for bit). On the first batch (``index`` 0) each
    shortened pass is checked against the whole one, whose figures are used, and any difference stops the
    shortcut for the rest of the calibration.
    """
    energy, change = _output_change(clean)
    skips = [prefix.before(module) if prefix is not None else [] for module in layers.values()]
    later: list[set[int]] = [set() for _ in skips]  # the modules a later layer's passes skip: their outputs kept
    for k in range(len(skips) - 2, -1, -1):
        later[k] = later[k + 1] | set(skips[k + 1])
    for k, (name, module) in enumerate(layers.items()):
        noise = _Noise(module.weight.detach(), clean[0].device, seed * 1_000_003 + k * 7919 + index)
        caused = [0.0, 0.0]  # ||dW x||^2, ||W x||^2 at this layer

        def perturbed(mod: nn.Module, args: tuple, *rest) -> torch.Tensor:  # (kwargs: an EmbeddingBag's,) output
            output = rest[-1]
            kind = layer_kind(mod)
            conv = kind in CONV_KINDS or kind == TRANSPOSED
            # (a transposed convolution's output size: the padding its forward used, output_size given or not,
            # by position or by keyword)
            size = output.shape[-len(mod.kernel_size):] if kind == TRANSPOSED else None
            x = args[0] if args else None
            if kind == "embedding":  # (the rows it looked up: an embedding may choose them itself)
                x = lookup_ids(mod, x)
                if x is None:
                    return output
            if kind == "bilinear":  # (its two inputs)
                delta = F.bilinear(x, args[1], noise.whole())  # noqa: B023
            else:
                delta = (noise.bag_error(mod, bag_arguments(args, rest[0]), output)  # noqa: B023
                         if isinstance(mod, nn.EmbeddingBag) else noise.error(mod, x, size))  # noqa: B023
            signal = output
            if getattr(mod, "bias", None) is not None:  # (a conv's: over its channel axis, batched or not)
                signal = output - (mod.bias.view(-1, *[1] * len(mod.kernel_size)) if conv else mod.bias)
            caused[0] += _squared_sum(delta)  # noqa: B023
            caused[1] += _squared_sum(signal)  # noqa: B023
            return output + delta

        handle = module.register_forward_hook(perturbed, with_kwargs=isinstance(module, nn.EmbeddingBag))
        skip = skips[k] if prefix is not None and prefix.enabled else []
        try:
            with sample.narrowed(model, keep=module):
                with prefix.shortcut(skip) if skip else contextlib.nullcontext():
                    out = [sample.take(t) for t in _run(model, batch)]
                if skip and index == 0:  # checked: the whole pass's figures, and no more shortcuts on a difference
                    short, caused[:] = out, [0.0, 0.0]
                    out = [sample.take(t) for t in _run(model, batch)]
                    if not (len(short) == len(out) and all(a.shape == b.shape and bool(torch.equal(a, b))
                                                           for a, b in zip(short, out))):
                        prefix.disable()
                    del short
        finally:
            handle.remove()
        if prefix is not None and prefix.enabled:
            prefix.keep_only(later[k])
        if caused[1] > 0 and caused[0] > 0:
            num[name] += change(out)
            den[name] += energy * caused[0] / caused[1]
