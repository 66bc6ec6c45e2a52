"""Each tile's outliers clipped in a training loop (:class:`TileClip`), so the encoder's tile ranges stay narrow.

The encoder maps each tile of a lossy tensor to pixels by the tile's minimum and maximum (:mod:`codec.mapping`), so
one outlying weight widens the step of all 4,096 weights of a 64 x 64 tile at every JPEG quality. A trained layer
is heavy-tailed: the bench MLP's ``fc1`` spans 10.9 standard deviations per tile on the mean (7.6 to 15.7; a
Gaussian tile of 4,096 values spans about 7.4), kurtosis 6.8. Clipped to the tile's mean +- k standard deviations
after every optimizer step, the weights train around the bound and the tiles' ranges shrink, so each JPEG quality
steps finer in the weights' units and costs more bytes: within one budget the loop then lands on a coarser quality
(the bench MLP at budget 0.2: q7.2-q7.4 against q8.2-q8.6) whose step in the weights is still finer, and the
outliers it cut no longer set it: at k = 4, 0.10 points less lost on the mean of 16 seeds (12 of 16 better), for
~0.7 ms a step (+0.085x of the plain schedule's time; on the bench CNN it did not pay: bench/JOURNAL.md, thirtieth
pass). Encoder-side only: the file and the decoder do not change.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["TileClip"]


class TileClip:
    """An optimizer step post-hook (``optimizer.register_step_post_hook(clip)``) that clips each of ``tensors``'
    values into its tile's mean +- ``k`` standard deviations (the tile's own, population; the tiles as the encoder
    cuts the tensor under ``setting`` and ``overrides``, :func:`codec.tiling.plan_tiling`: 64 x 64 grid tiles, or
    one per row in rows mode), after every ``every``-th step. Also clips once here.

    ``tensors``: parameter names (default: the largest floating tensor the setting and overrides code as JPEG, the
    one a :class:`codec.train.Budget` moves; else the largest coded lossily). ``setting`` / ``overrides``: as
    :func:`codec.train.finetune` takes them (only the tiling is read). :attr:`tensors` holds the names clipped.
    """

    def __init__(self, model: torch.nn.Module, k: float = 4.0, setting=None, overrides=None,
                 tensors: Iterable[str] | str | None = None, every: int = 1):
        from ..api import _sharing
        from ..tiling import plan_tiling
        from .finetune import _coded_as, as_overrides
        from .rate import as_setting

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"TileClip: model must be a torch.nn.Module, not {type(model).__name__}")
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise TypeError(f"TileClip: k must be a number of standard deviations, not {k!r}")
        if not k > 0:
            raise ValueError(f"TileClip: k must be a positive number of standard deviations, not {k!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"TileClip: every must be a positive integer, not {every!r}")
        opts, rules = as_setting(setting), as_overrides(overrides, setting)
        params = dict(model.named_parameters())
        aliases = _sharing(model.state_dict())[0]
        coded = {name: _coded_as(p, rules.options_for(name, opts) or opts) for name, p in params.items()
                 if name not in aliases and p.is_floating_point()}
        if tensors is None:
            for kind in (("jpeg",), ("jpeg", "quant")):
                sizes = {name: params[name].numel() for name, how in coded.items() if how in kind}
                if sizes:
                    tensors = [max(sizes, key=sizes.get)]
                    break
            else:
                raise ValueError("TileClip: no parameter is coded lossily under this setting and overrides "
                                 "(tensors= names them)")
        elif isinstance(tensors, str):
            tensors = [tensors]
        else:
            named = list(tensors) if isinstance(tensors, Iterable) else None
            if named is None or not all(isinstance(name, str) for name in named):
                raise TypeError(f"TileClip: tensors must be a parameter name or names, not {tensors!r}")
            tensors = named
        self.k, self.every, self.calls = float(k), every, 0
        self._plans: list[tuple[torch.Tensor, list[tuple[int, int, int, int, int, int]]]] = []
        self.tensors: list[str] = []
        for name in tensors:
            if name not in params:
                raise ValueError(f"TileClip: the model has no parameter {name!r}")
            how = coded.get(name)
            if how not in ("jpeg", "quant"):
                what = "tied to another tensor" if name in aliases else "stored losslessly"
                raise ValueError(f"TileClip: {name!r} is {what} under this setting and overrides; it clips tensors "
                                 f"coded as JPEG or quant")
            p = params[name]
            o = rules.options_for(name, opts) or opts
            rows, cols = p.shape[0], p[0].numel()
            tiling = plan_tiling(rows, cols, o.tile, o.row_shape, o.params)
            bh, bw = (1, cols) if tiling.mode == "rows" else (tiling.tile_h, tiling.tile_w)
            # the matrix as up to four blocks of whole tiles (the full bands, the last row band, the last column
            # band, their corner), each clipped in place through a view: no copy of the weight a step
            row_cuts = [(0, rows - rows % bh, bh), (rows - rows % bh, rows, rows % bh)]
            col_cuts = [(0, cols - cols % bw, bw), (cols - cols % bw, cols, cols % bw)]
            blocks = [(r0, r1, th, c0, c1, tw) for r0, r1, th in row_cuts for c0, c1, tw in col_cuts
                      if r1 > r0 and c1 > c0]
            self._plans.append((p, blocks))
            self.tensors.append(name)
        self()

    def __call__(self, *_) -> None:
        self.calls += 1
        if (self.calls - 1) % self.every:
            return
        with torch.no_grad():
            for p, blocks in self._plans:
                matrix = p.view(p.shape[0], -1) if p.is_contiguous() else p.reshape(p.shape[0], -1).clone()
                for r0, r1, th, c0, c1, tw in blocks:
                    tiles = matrix[r0:r1, c0:c1].view((r1 - r0) // th, th, (c1 - c0) // tw, tw)
                    mean = tiles.mean((1, 3), keepdim=True)
                    spread = (tiles.square().mean((1, 3), keepdim=True) - mean.square()).clamp_min(0).sqrt_()
                    spread *= self.k
                    # torch.clamp's min(max(x, lo), hi), in place: 0.13 against 0.58 ms with tensor bounds
                    torch.maximum(tiles, mean - spread, out=tiles)
                    torch.minimum(tiles, mean + spread, out=tiles)
                if matrix.data_ptr() != p.data_ptr():  # a non-contiguous parameter: clipped in a copy
                    p.copy_(matrix.view(p.shape))

    def __repr__(self) -> str:
        return f"TileClip(k={self.k:g}, every={self.every}: {', '.join(self.tensors)})"
