"""Measure coding with repair (codec.rd.repair) and GPTQ rounding (codec.rd.gptq) on the Fashion-MNIST models.

For each bit budget the allocator's options are chosen once (data-free,
exactly as ``codec.save(..., bits_per_weight=B)`` chooses them); then the
model is written with those options three ways -- plain (the original
values), with GPTQ only, with the full repair -- through the ordinary
writer, decoded with the ordinary reader, and scored on the Fashion-MNIST
TEST set. Calibration uses TRAINING images only (no labels)::

    python -m bench.repair --model mlp -b 0.4 -b 0.5 --calib 4096

prints one table row per (budget, variant): file bits/weight, accuracy,
seconds.
"""

from __future__ import annotations

import argparse
import io
import math
import time
from dataclasses import replace

import numpy as np
import torch

import codec
import codec.encode
from codec.api import _plan, encoder_versions, to_numpy
from codec.dtypes import get_dtype
from codec.encode import spare_bytes
from codec.rd.calibrate import SENSITIVITY_SAMPLES, calibrate
from codec.rd.price import RepairPrices
from codec.rd.repair import RepairSettings, code_with_repair, fitted_share
from codec.tensorcodec import EncodeOptions, Overrides, encode_tensor
from codec.writer import Writer

from .models import load_fashion_mnist, model_class, preprocess
from .prepare import get_model


def plan(state_dict: dict, bits: float, calibration=None, index: dict | None = None,
         rules: list[tuple[str, str]] | None = None, reserve: int = 0, price=None, plain: set | None = None
         ) -> dict[str, EncodeOptions]:
    """The options ``codec.save(state_dict, ..., bits_per_weight=bits)`` would choose; with a
    :class:`codec.rd.calibrate.Calibration`, those of ``codec.save(model, ..., calibration=inputs)`` (the output-space
    weighting, exhaustive search). ``index`` (a dict) gets ``compress=True`` where the budget counted on a
    compressed index, as codec.save's: :func:`write` must then compress it. ``rules`` (``(glob, setting)`` pairs, as
    ``jwt encode --set``'s) fix the matched tensors' settings, the search planning the others around them.
    ``reserve``: bytes of the budget kept out of the plan (repair's share, :data:`codec.encode.REPAIR_SHARE`).
    ``price``: a :class:`codec.rd.price.RepairPrices` (repair will code the plan: priced at what it codes); ``plain``
    (a set) then gets the JPEG tensors priced at their uncompensated point, which repair codes so
    (:attr:`codec.rd.repair.RepairSettings.plain_jpeg`)."""
    measure_by = None
    if calibration is not None:
        from codec.rd.allocate import Distortion, merge_weightings, norm_weightings

        values = lambda n: state_dict[n].detach().to("cpu", torch.float64).numpy()  # noqa: E731
        weightings = merge_weightings(norm_weightings({n: tuple(t.shape) for n, t in state_dict.items()}, values),
                                      calibration.weightings(), values)
        measure_by = Distortion(weightings)
    return _plan(state_dict, {}, EncodeOptions(), Overrides(rules), {}, encoder_versions(), bits, None, None, None,
                 {}, None, measure_by=measure_by, index=index, reserve=reserve, price=price, plain=plain)


def write(state_dict: dict, options: dict[str, EncodeOptions], targets: dict[str, np.ndarray],
          compress_index: bool | None = None) -> bytes:
    """A .jwt file of ``state_dict`` (``targets`` replacing values) coded with ``options``; ``compress_index`` as
    :class:`codec.writer.Writer`'s."""
    buf = io.BytesIO()
    with Writer(buf, encoder=encoder_versions(), compress_index=compress_index) as writer:
        for name, tensor in state_dict.items():
            array, dtype_name = to_numpy(tensor)
            array = targets.get(name, array)
            writer.add(name, get_dtype(dtype_name), tuple(array.shape),
                       encode_tensor(array, get_dtype(dtype_name), options[name]))
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn", "bncnn", "minilm"])
    parser.add_argument("--calibrated-plan", action="store_true",
                        help="plan with the calibrated output-space weighting (as codec.save(model, calibration=))")
    parser.add_argument("-b", "--bits", type=float, action="append", help="bits/weight budgets (repeatable)")
    parser.add_argument("--calib", type=int, default=4096, help="training images used for calibration")
    parser.add_argument("--select", choices=["random", "first", "stratified"], default="random",
                        help="which training images calibrate: random (seed --seed), the first N, or N/10 of each "
                             "class the model itself predicts (no labels)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random / stratified choice")
    parser.add_argument("--validation", type=int, default=0,
                        help="also score the KL divergence to the original's softmax (and top-1 agreement) on this "
                             "many other training images, none of them calibrating (held_out; seed --seed): the "
                             "measure to decide on, the test set being the one to report")
    parser.add_argument("--fold-batchnorm", action="store_true",
                        help="fold each BatchNorm's per-channel scale into the layer before it first "
                             "(codec.rd.fold.fold_batchnorm: the same function, other stored values)")
    parser.add_argument("--set", dest="rules", action="append", default=[], metavar="GLOB=SETTING",
                        help="fix the matched tensors' settings, as jwt encode --set (e.g. 'conv3.weight=b2'); the "
                             "search plans the others around them within the budget (repeatable)")
    parser.add_argument("--no-spend", dest="spend", action="store_false",
                        help="do not give repair the bytes the plan leaves under the budget (codec.encode.spare_bytes)")
    parser.add_argument("--no-price", dest="price", action="store_false",
                        help="plan a calibrated, repaired budget at the original values' bytes only, not also at what "
                             "repair codes (codec.rd.price, as codec.save prices a small model's)")
    parser.add_argument("--compensate-all", dest="plain", action="store_false",
                        help="repair compensates every JPEG weight, also those the priced plan chose uncompensated "
                             "(before the thirty-first pass; codec.rd.price.PLAIN_AS_PRICED)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=RepairSettings.steps)
    parser.add_argument("--final-steps", type=int, default=RepairSettings.final_steps)
    parser.add_argument("--lr", type=float, default=RepairSettings.lr)
    parser.add_argument("--finetune-steps", type=int, default=200, help="steps of the finetune variant")
    parser.add_argument("--finetune-lr", type=float, default=RepairSettings.finetune_lr)
    parser.add_argument("--finetune-refresh", type=int, default=RepairSettings.finetune_refresh)
    parser.add_argument("--finetune-loss", choices=["mse", "kl"], default=RepairSettings.finetune_loss)
    parser.add_argument("--prune-grid", action="store_true",
                        help="prune JPEG coefficients in grid tiles too, in every variant "
                             "(codec.rd.repair.RepairSettings.prune_grid)")
    parser.add_argument("--variants", default="plain,gptq,bias,refit,distill,all",
                        help="comma-separated: plain gptq jpeg bias refit distill closed closed-nogptq "
                             "closed-nojpeg closed-norefit closed-noprune (no output-weighted pruning of rows-mode "
                             "JPEG, codec.rd.rdo) closed-damp0.1 (GPTQ's and the refit's damping 0.1) closed-bngain (RepairSettings.batchnorm_gain) final all finetune (closed + codec-in-the-loop fine-tuning)")
    args = parser.parse_args()
    rules = [tuple(rule.split("=", 1)) for rule in args.rules]
    if any(len(rule) != 2 or not all(rule) for rule in rules):
        parser.error("--set takes GLOB=SETTING")
    torch.set_num_threads(2)
    if args.model == "minilm":
        if args.validation:
            parser.error("--validation is for the Fashion-MNIST models")
        state_dict, model, batches, score = _minilm()
    else:
        state_dict, model, batches, score = _fmnist(args.model, args.calib, args.batch, args.select, args.seed,
                                                    args.validation)
    if args.fold_batchnorm:
        from codec.rd.fold import fold_batchnorm

        print("folded:", ", ".join(fold_batchnorm(model, batches[0])) or "nothing")
        state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_weights = sum(t.numel() for t in state_dict.values())
    print(f"{args.model}: {n_weights} weights, original {score(state_dict)}")
    print(f"{'budget':>6} {'variant':>13} {'bits/w':>7} {'quality':>16} {'seconds':>7}")
    distill = {"steps": args.steps, "final_steps": args.final_steps, "lr": args.lr}
    variants = {  # each technique alone, and together
        "gptq": RepairSettings(steps=0, final_steps=0, bias_correction=False, refit=False, compensate=False),
        "jpeg": RepairSettings(steps=0, final_steps=0, bias_correction=False, refit=False, gptq=False),
        "bias": RepairSettings(steps=0, final_steps=0, gptq=False, refit=False, compensate=False),
        "refit": RepairSettings(steps=0, final_steps=0, gptq=False, bias_correction=False, compensate=False),
        "distill": RepairSettings(**distill, gptq=False, refit=False, bias_correction=False, compensate=False),
        "closed": RepairSettings(steps=0, final_steps=0),
        "closed-nogptq": RepairSettings(steps=0, final_steps=0, gptq=False),
        "closed-nojpeg": RepairSettings(steps=0, final_steps=0, compensate=False),
        "closed-norefit": RepairSettings(steps=0, final_steps=0, refit=False),
        "closed-noprune": RepairSettings(steps=0, final_steps=0, prune=False),
        "closed-damp0.1": RepairSettings(steps=0, final_steps=0, damp=0.1),
        "closed-bngain": RepairSettings(steps=0, final_steps=0, batchnorm_gain=True),
        "final": RepairSettings(steps=0, final_steps=args.final_steps, lr=args.lr),
        "all": RepairSettings(**distill),
        "finetune": RepairSettings(steps=0, final_steps=0, finetune_steps=args.finetune_steps,
                                   finetune_lr=args.finetune_lr, finetune_refresh=args.finetune_refresh,
                                   finetune_loss=args.finetune_loss),
    }
    variants = {k: replace(v, prune_grid=args.prune_grid) for k, v in variants.items()}
    calibration = calibrate(model, batches, sensitivity_samples=SENSITIVITY_SAMPLES) if args.calibrated_plan else None
    for bits in args.bits or [0.5]:
        start = time.process_time()
        index: dict = {}
        # a calibrated save leaves repair its share of the budget, as codec.save does
        share = math.ceil(codec.encode.REPAIR_SHARE * fitted_share(model) * bits * n_weights / 8) \
            if calibration is not None and args.spend else 0
        price = RepairPrices.of(RepairSettings()) if calibration is not None and args.price and args.spend \
            and n_weights <= codec.encode.REPLAN_WEIGHTS else None  # as codec.save prices a small model's
        plain: set = set()  # the JPEG tensors the priced plan chose uncompensated: repair codes them so
        options = plan(state_dict, bits, calibration, index, rules, share, price, plain)
        planned = len(write(state_dict, options, {}, index.get("compress")))
        spare = spare_bytes(int(bits * n_weights / 8), planned) if args.spend else 0
        print(f"{bits:6.2f} plan ({'calibrated' if calibration else 'data-free'}): "
              f"{time.process_time() - start:.0f} CPU s, {planned} bytes as planned, {spare} spare", flush=True)
        for variant in args.variants.split(","):
            start = time.perf_counter()
            if variant == "plain":
                targets, notes, changed = {}, [], {}
            else:
                settings = replace(variants[variant], plain_jpeg=frozenset(plain if args.plain else ()))
                targets, notes, changed = code_with_repair(model, batches, options, settings=settings,
                                                           spare=spare, index_zstd=bool(index.get("compress")))
            seconds = time.perf_counter() - start
            blob = write(state_dict, {**options, **changed}, targets, index.get("compress"))
            decoded = codec.load(blob)
            print(f"{bits:6.2f} {variant:>13} {8 * len(blob) / n_weights:7.3f} {score(decoded):>16} {seconds:7.1f}",
                  flush=True)
            for note in notes:
                print("       ", note)


def _fmnist(kind: str, n: int, batch: int, select: str = "random", seed: int = 0, validation: int = 0):
    """``(state_dict, model, calibration batches, score)``: a Fashion-MNIST model, ``n`` training images to
    calibrate on (:func:`choose`), test accuracy and agreement with the original model's top-1 as the score; with
    ``validation``, also the KL divergence to the original's softmax and the agreement on that many other training
    images (:func:`held_out`)."""
    state_dict = get_model(kind)
    model = model_class(kind)()
    model.load_state_dict(state_dict)
    model.eval()
    train_x, _ = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    chosen = choose(model, train_x, n, select, seed)
    batches = list(preprocess(train_x[chosen]).split(batch))
    val_x = preprocess(train_x[held_out(len(train_x), chosen, validation, seed)]) if validation else None
    with torch.no_grad():
        original = model(preprocess(test_x)).argmax(1).numpy()
        val_ref = torch.log_softmax(model(val_x), 1) if validation else None

    def score(sd) -> str:
        coded = model_class(kind)()
        coded.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()})
        with torch.no_grad():
            predicted = coded.eval()(preprocess(test_x)).argmax(1).numpy()
            text = f"{100 * np.mean(predicted == test_y):.2f} % ({100 * np.mean(predicted == original):.2f} % agree)"
            if validation:
                log_p = torch.log_softmax(coded(val_x), 1)
                kl = float((val_ref.exp() * (val_ref - log_p)).sum(1).mean())
                agree = float((log_p.argmax(1) == val_ref.argmax(1)).double().mean())
                text += f", held-out KL {kl:.5f} ({100 * agree:.2f} % agree)"
        return text

    return state_dict, model, batches, score


def held_out(total: int, chosen: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` of ``total`` training images that are not in ``chosen`` (the calibration images), at
    random (a generator of its own for ``seed``, not :func:`choose`'s): the validation set of ``--validation``."""
    rest = np.setdiff1d(np.arange(total), chosen)
    if not 0 < n <= len(rest):
        raise ValueError(f"validation needs 1 to {len(rest)} images (those not calibrating), not {n}")
    return np.sort(np.random.default_rng([seed, 1]).choice(rest, n, replace=False))


def choose(model: torch.nn.Module, images: np.ndarray, n: int, select: str = "random", seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` of ``images`` to calibrate on: ``random`` (seed ``seed``; seed 0 is what this bench
    always used), the ``first`` n, or ``stratified``: n // 10 at random from each class the model itself predicts
    (labels are never used)."""
    if select == "first":
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if select == "random":
        return np.sort(rng.choice(len(images), n, replace=False))
    if select != "stratified":
        raise ValueError(f"select must be 'random', 'first' or 'stratified', not {select!r}")
    with torch.no_grad():
        predicted = torch.cat([model(preprocess(images[i:i + 5000])).argmax(1)
                               for i in range(0, len(images), 5000)]).numpy()
    classes = np.unique(predicted)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(predicted == c), n // len(classes), replace=False)
                                   for c in classes]))


def _minilm():
    """``(state_dict, model, calibration batches, score)`` for all-MiniLM-L6-v2: the calibration sentences of
    :mod:`bench.sentences`, the mean cosines on the everyday and the rare-word sets as the score."""
    import copy

    from . import minilm, sentences

    model = copy.deepcopy(minilm._model()[0].auto_model).eval()
    keys = set(minilm.load_state_dict())

    def score(sd) -> str:
        sd = {k: v for k, v in sd.items() if k in keys}
        return " / ".join(f"{minilm.cosine_quality(sd, s):.4f}" for s in sentences.EVALUATION.values())

    return model.state_dict(), model, sentences.calibration_batches(), score


if __name__ == "__main__":
    main()
