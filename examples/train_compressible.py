"""Train the Fashion-MNIST MLP (or, with --cnn, the small CNN) plainly and for the codec; compare the files.

Both use one schedule (Adam, lr 1e-3, batch 128, same seed and batch order). The plain model is coded after
training at each setting of a ladder (the largest layer as JPEG at quality q, the rest few-bit quant, biases
losslessly with their significands rounded to 4 bits); the codec-trained one runs the schedule's last epoch (the
MLP: its whole schedule, the learning rate decayed to 0 over the last epoch for both; ``--codec-epochs``,
``--decay`` to choose) with the codec in the loop at that setting (coded every 4th step, biases rounded in the loop),
so it adapts to the exact file it will be stored as (the CNN with a unit penalty 0.1 on ``fc1``'s rows, ``--group``).
Prints bits/weight and test accuracy of the decoded files and the training time ratio, and writes a table and a PNG
of accuracy against bits/weight. In your own loop::

    import codec, codec.train
    setting = [("fc1.weight", "jpeg,q7,table=ramp1"), ("fc2.weight", "b3")]    # codec.save's overrides
    codec.train.finetune(model, batches, torch.nn.functional.cross_entropy, steps=len(batches), lr=1e-3,
                         overrides=setting, refresh=4, vector_bits=4, optimizer=optimizer,
                         validation=False)   # each epoch in the loop; your own validation decides
    codec.save(model, "model.jwt", overrides=setting)   # decodes to the weights of the last forward pass

To train for a file size rather than a quality: ``budget = codec.train.Budget(0.3)``, ``budget=budget`` in each
finetune call (the largest JPEG layer's quality is chosen in the loop so that the whole file stays within 0.3
bits/weight; ``--budget 0.3`` here), then ``budget.save(model, "model.jwt")``. With the MLP's whole schedule in the
loop the budget starts from a fresh model, whose file is over 0.6 bits/weight even at the coarsest quality: the loop
trains at the setting's quality (``Budget(0.3, start="coarsest")``, ``--budget-start coarsest``: at the coarsest)
and steps the quality down at each measurement of the file while the file is over. The file is measured at an
interval chosen from the timed costs (at most 10 % of the loop's time goes to measuring: every 32 steps on the
MLP, at every coding on the CNN); ``every=N``, ``--budget-every N`` fixes it. A file still over the budget at the
end is not saved: ``budget.within`` is False, ``budget.save`` names the size reached and the smallest budget that fits,
and the table's row says "over the budget". With ``--budget`` the loop's cross-entropy has label smoothing 0.1 (the
plain reference none; ``--label-smoothing 0`` for none): the logits stay bounded, the weights spread less, and the
budget spends the smaller file on a finer quality (in your loop: ``F.cross_entropy(..., label_smoothing=0.1)`` as
finetune's loss). The MLP's budget loop also holds at zero the ``fc1`` weights that read pixels nonzero in fewer
than 10 % of the training images (``--inputs-below 0.1``; in your loop:
``optimizer.register_step_post_hook(codec.train.InputMask(model, images, below=0.1))``): they get next to no
gradient, keep their random start and cost bytes the budget then spends on the rest. And it clips ``fc1``'s
weights after every step to each 64 x 64 tile's mean +- 4 standard deviations (``--tile-clip 4``; in your loop:
``optimizer.register_step_post_hook(codec.train.TileClip(model, 4, overrides=setting))``): the encoder maps each
tile by its extremes, so one outlier widens the step of the whole tile. And it reorders ``fc1``'s hidden units
once, a tenth into the loop, so that neighbouring rows are alike (``--order-units 0.1``; in your loop,
between two finetune calls: ``codec.train.order_units(model, "fc1", "fc2", optimizer)``; ``fc2``'s inputs and
Adam's moments move with them, so the network is the same): JPEG codes 8 x 8 blocks of 8 rows, and a trained
layer's units, alike in groups, sit in their random initial order.

(``loss_fn=None`` distils the model's own outputs, no labels; ``optimizer``: your Adam, so its state carries on.
To fine-tune a trained model instead, leave ``validation`` out: finetune holds out every 4th batch and keeps the
starting weights, with a warning, unless the coded model does better on them.)

Runs (2 CPU cores): ``python examples/train_compressible.py`` (MLP, minutes),
``python examples/train_compressible.py --cnn --train-size 20000`` (CNN). ``--lam L`` adds a rate-penalty run
(codec.train.rate, measured not to pay: bench/JOURNAL.md), ``--bits B`` the post-training rate search,
``--dct K`` a DCT-layer run; ``--help`` lists all.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import train


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    model = "cnn" if "--cnn" in args or "cnn" in args else "mlp"
    defaults = {"--lam": "0", "--calibration": "0", "--bits": "0.4", "--out": f"train_compressible_{model}",
                "--refresh": "4", "--vector-bits": "4", "--table": "ramp1"}
    if model == "cnn":
        # the CNN's fc1 with the flat table (bench/train.py's): at budget 0.3 ramp1 lost 0.16 points more on the mean
        # of 3 seeds, more on each (bench/JOURNAL.md, twenty-ninth pass); ramp1 is the MLP's best
        defaults["--table"] = "flat"
    if model == "mlp":  # the MLP's whole schedule in the loop: 0.5 points better at the same rate (bench/JOURNAL.md)
        defaults["--codec-epochs"] = _value(args, "--epochs") or "2"
        # and the learning rate decayed to 0 over the last epoch, plain and codec alike: a stable endpoint (plain
        # 86.1-86.5 % on 5 seeds, not 84.8-86.3), the codec file 0.2 points better (bench/JOURNAL.md, eighth pass)
        defaults["--decay"], defaults["--decay-epochs"] = "last", "1"
    else:  # the CNN: a unit penalty 0.1 on fc1's rows, 0.35 points better on 5 seeds (bench/JOURNAL.md, eighth pass)
        defaults["--group"] = "0.1"
    if any(a == "--budget" or a.startswith("--budget=") for a in args):
        # a budget's loop trains with label smoothing 0.1: at the same file size it lost less on 7 of 8 MLP seeds
        # (budget 0.2: 0.09 less on the mean of seeds 4-7) and on 2 of the CNN's 3 (budget 0.3: 0.06 less on the
        # mean; bench/JOURNAL.md, twenty-fifth pass)
        defaults["--label-smoothing"] = "0.1"
        if model == "mlp":
            # and fc1's columns that read pixels nonzero in under 10 % of the images held at zero (weights that see
            # no data): 8 of 8 seeds better at budget 0.2, 0.138 points on the mean (bench/JOURNAL.md,
            # twenty-seventh pass)
            defaults["--inputs-below"] = "0.1"
            # and fc1's weights clipped after every step to each 64 x 64 tile's mean +- 4 standard deviations (the
            # encoder's tile ranges narrower: a finer step in the weights at the same bytes): 0.10 points less lost
            # on the mean of 16 seeds at budget 0.2, 12 of 16 better, for +0.085x of the plain schedule's time
            # (bench/JOURNAL.md, thirtieth pass)
            defaults["--tile-clip"] = "4"
            # and fc1's units reordered once, a tenth into the loop, so that neighbouring rows are alike (JPEG's
            # 8 x 8 blocks smoother down the columns; the next layer's inputs and Adam's moments moved alike: the same
            # network): 0.30 points less lost on the mean of 16 seeds at budget 0.2, 14 of 16 better, at about the
            # same time (bench/JOURNAL.md, thirty-first pass)
            defaults["--order-units"] = "0.1"
    given = {a.split("=")[0] for a in args}
    extra = [item for option, value in defaults.items() if option not in given for item in (option, value)]
    own = " ".join(f"{option} {value}" for option, value in defaults.items())
    description = (f"{__doc__}\nThis example's defaults ({model}; they replace the defaults the option list below "
                   f"names, which are bench/train.py's): {own}. The table and plot go to the current folder.")
    train.main(extra + args, prog="train_compressible.py", description=description)


def _value(args: list[str], option: str) -> str | None:
    """The value the user gave ``option`` (``--epochs 3`` or ``--epochs=3``; the last one), or None."""
    found = None
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(option + "="):
            found = arg.split("=", 1)[1]
    return found


if __name__ == "__main__":
    main()
