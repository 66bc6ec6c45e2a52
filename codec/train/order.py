"""A layer's hidden units put in an order JPEG codes well (:func:`order_units`), in or after a training loop.

A hidden layer's units can be listed in any order: permute the rows of the layer's weight (and its bias) and the
columns of the next layer's weight alike, and the network computes the same function. The order a network trains in
is its random initialisation's, so neighbouring rows of the weight, which share JPEG's 8 x 8 blocks down a column,
are unrelated (the bench MLP's ``fc1``: mean cosine 0.013 between neighbouring rows), and every vertical frequency
of every block carries energy. Trained units are alike in groups (templates of the same garment's parts): ordered by
a greedy nearest-neighbour walk over their cosine similarities, neighbouring rows are 0.45 alike on the mean, the
blocks are smoother down the columns: their energy moves from the high vertical frequencies, which the table steps
coarsely (mostly zeroed: cheap, and lost), to the low ones (finely stepped: coded, and kept), so the same quality
costs more bytes and codes the weights with a fraction of the error (the bench MLP's plain model at q6: 74.0 %
against 41.9 % at 10.4 against 9.3 KB). In a training loop with a budget (the bench MLP at 0.2 bits/weight, the
units reordered once a tenth into the loop, between two finetune calls): 0.30 points less lost on the mean of 16
seeds, 14 of 16 better, the budget landing on a coarser quality (q6.3 against q7.2-q7.4) that loses less
(bench/JOURNAL.md, thirty-first pass). Encoder-side only: the file holds an ordinary model, the decoder does not
change.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["order_units", "similar_order"]


def similar_order(weight: torch.Tensor, tile: int | None = 64, block: int = 8) -> list[int]:
    """A greedy nearest-neighbour walk over the rows of ``weight`` (flattened past the first dimension) by cosine
    similarity, from the row of largest norm (at each step the most similar row not yet taken), laid out so that
    each ``tile`` rows (the encoder's tile height; None: no tiles) hold a mix of the walk: its runs of ``block`` rows
    (JPEG's block height) dealt in turn to the tiles, the first run to the first tile's first block row, the next
    to the second tile's, and so on. Alike rows are alike in scale too; gathered in one tile they would set its
    range by their own extremes and take the bytes of a finer step where the weights matter least; dealt, each tile
    spans the layer's scales as an unordered one does and each 8-row block is still a run of alike rows (the bench
    MLP's plain ``fc1`` at q6: 74.0 % at 10.4 KB dealt, 69.7 % at 12.0 KB gathered, 41.9 % at 9.3 KB unordered).
    Returns the order (``new[i] = old[order[i]]``)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 1 or not weight.is_floating_point():
        what = f"a {weight.dtype} tensor of {weight.dim()} dimensions" if isinstance(weight, torch.Tensor) \
            else type(weight).__name__
        raise TypeError(f"similar_order: weight must be a floating torch.Tensor with rows, not {what}")
    if tile is not None and (not isinstance(tile, int) or tile < 1) or not isinstance(block, int) or block < 1:
        raise TypeError(f"similar_order: tile (None or a positive int) and block (a positive int), not {tile!r} / "
                        f"{block!r}")
    rows = weight.detach().reshape(weight.shape[0], -1).double()
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    similar = (unit @ unit.T).numpy()
    taken = np.zeros(len(similar), dtype=bool)
    current = int(rows.norm(dim=1).argmax())
    walk = [current]
    taken[current] = True
    for _ in range(len(similar) - 1):
        row = np.where(taken, -np.inf, similar[current])
        current = int(row.argmax())
        walk.append(current)
        taken[current] = True
    if tile is None:
        return walk
    # the rows' places filled in the order: block row 0 of every tile, then block row 1 of every tile, ...
    places = sorted(range(len(walk)), key=lambda r: ((r % tile) // block, r // tile, r % block))
    order = [0] * len(walk)
    for place, row in zip(places, walk):
        order[place] = row
    return order


def order_units(model: torch.nn.Module, layer: str, following: Iterable[str] | str,
                optimizer: torch.optim.Optimizer | None = None, order: Iterable[int] | None = None,
                tile: int | None = 64) -> list[int]:
    """Reorder the output units of ``layer`` (a ``torch.nn.Linear`` or ``Conv*d``: its weight's rows, its bias) and
    the matching inputs of each of ``following`` (the layers that read them: their weight's columns, dimension 1), in
    place, so that neighbouring rows are alike (:func:`similar_order`, or the given ``order``: a permutation of the
    units). The model computes the same function only if what lies between (an activation, dropout) works on each
    unit alone: a normalisation or a residual connection over the units must be permuted too, and is not.
    ``optimizer``: its per-parameter state (Adam's moments, any state tensor shaped like the parameter) is permuted
    alike, so training continues as if nothing moved. Returns the order (``new[i] = old[order[i]]``)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"order_units: model must be a torch.nn.Module, not {type(model).__name__}")
    named = [following] if isinstance(following, str) else list(following) if isinstance(following, Iterable) else None
    if named is None or not all(isinstance(name, str) for name in named):
        raise TypeError(f"order_units: following must be a layer name or names, not {following!r}")
    following = named
    if not isinstance(layer, str):
        raise TypeError(f"order_units: layer must be a layer name, not {layer!r}")
    modules = dict(model.named_modules())
    for name in [layer, *following]:
        module = modules.get(name)
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() < 2:
            what = "not in the model" if module is None else f"a {type(module).__name__} without a 2-d or wider weight"
            raise ValueError(f"order_units: layer {name!r} is {what}")
    source = modules[layer]
    units = source.weight.shape[0]
    for name in following:
        if modules[name].weight.shape[1] != units:
            raise ValueError(f"order_units: {name!r} reads {modules[name].weight.shape[1]} inputs, but {layer!r} has "
                             f"{units} units")
    order = similar_order(source.weight, tile) if order is None else [int(i) for i in order]
    if sorted(order) != list(range(units)):
        raise ValueError(f"order_units: order must be a permutation of {layer!r}'s {units} units")
    index = torch.as_tensor(order, device=source.weight.device)
    moves = [(source.weight, 0)] + ([(source.bias, 0)] if source.bias is not None else [])
    moves += [(modules[name].weight, 1) for name in following]
    state = optimizer.state if optimizer is not None else {}
    with torch.no_grad():
        for p, dim in moves:
            p.copy_(p.index_select(dim, index))
            for value in state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.copy_(value.index_select(dim, index))
    return order
