"""``jwt encode``."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path

import click

from .common import SIZE, check_encode_options, fail, handle_errors, jobs_option, progress_bar, same_file


def parse_meta(values: tuple[str, ...]) -> dict[str, str]:
    """Turn ``key=value`` strings into a dict."""
    meta = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--meta")
        if key.startswith("jwt."):
            raise click.BadParameter(f"{key!r}: keys starting with 'jwt.' are reserved", param_hint="--meta")
        meta[key] = value
    return meta


def parse_rules(values: tuple[str, ...]) -> list[tuple[str, str]]:
    """Turn ``GLOB=SETTING`` strings into (pattern, setting) pairs."""
    rules = []
    for item in values:
        pattern, _, setting = item.partition("=")  # 'fc*=table=flat': the first '=' ends the pattern
        if not pattern or not setting:
            raise click.BadParameter(f"{item!r} is not GLOB=SETTING", param_hint="--set")
        rules.append((pattern, setting))
    return rules


@click.command()
@click.argument("input", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=str,
              help="Output .jwt file (default: INPUT with the suffix .jwt; for a folder, FOLDER.jwt), or a folder "
                   "(existing, or ending in /: created) to write that file into.")
@click.option("--codec", "codec_name", type=click.Choice(["auto", "jpeg", "jpegxl", "quant", "lossless"]),
              default="auto", show_default=True,
              help="Codec for weight matrices: jpeg, jpegxl, quant (uniform --bits per tile + zstd) or lossless. "
                   "auto: jpeg when --quality, --table or --row-shape is given, jpegxl with --distance, otherwise "
                   "quant 8-bit, which loses no measurable accuracy on the benchmarks.")
@click.option("--bits", type=click.IntRange(1, 16), default=8, show_default=True, help="Pixel bits of --codec quant.")
@click.option("--bits-per-weight", "-b", type=click.FloatRange(0, 64, min_open=True),
              help="Size target for the whole file: a rate-distortion search picks codec, table and quality "
                   "per tensor so the file lands at or just under B bits per weight.")
@click.option("--max-error", type=click.FloatRange(0, 1, min_open=True),
              help="Quality target: the cheapest setting per tensor whose relative RMS error is at most E "
                   "(with --calibration, or a BatchNorm/LayerNorm after the layer: the error of the layer's output).")
@click.option("--search", type=click.Choice(["fast", "exhaustive"]), default="fast", show_default=True,
              help="Rate search for --bits-per-weight: fast predicts each tensor's candidates from a sample of its "
                   "tiles and measures in full only the ones it picks (the budget is still met exactly); exhaustive "
                   "measures every candidate on every tensor (7.5x the CPU time on all-MiniLM-L6-v2 -b 4).")
@click.option("--ray", "ray_address", metavar="auto|local|ADDRESS",
              help="Code the tensors on a Ray cluster: auto (the running cluster), local (start one here) or its "
                   "address; with -b the search's measurements run there too (the default fast search). The file "
                   "is the same bytes as a local encode. Needs pip install 'jwt-weights[ray]'.")
@click.option("--set", "rules", multiple=True, metavar="GLOB=SETTING",
              help="Per-tensor setting, repeatable, last match wins: lossless, qN (JPEG quality; qX.Y a table between two "
                   "qualities, e.g. q6.5), bN (quant bits), "
                   "dX (JPEG XL distance), jpegxl, table=flat|jpeg|ramp1|ramp2|ramp4, tile=HxW, rows=HxW; comma-separated. "
                   "E.g. --set 'fc2.*=lossless' --set '*.attention.*=q90'.")
@click.option("--quality", type=click.IntRange(1, 100),
              help="1..100 [default 90]: scales the JPEG quantization table (JPEG XL: libjxl's quality->distance map; "
                   "without --quality or --distance JPEG XL uses distance 0.2, measured to match JPEG's default).")
@click.option("--table", type=click.Choice(["auto", "jpeg", "flat", "ramp1", "ramp2", "ramp4"]), default="auto",
              show_default=True,
              help="JPEG quantization table: jpeg (T.81 Annex K), flat, ramp1/2/4 (steps growing linearly with "
                   "frequency, matched to natural images), or auto (jpeg with --row-shape, flat for grid tiles).")
@click.option("--distance", type=click.FloatRange(0, 25), help="JPEG XL distance (overrides --quality).")
@click.option("--effort", type=click.IntRange(1, 9), default=3, show_default=True, help="JPEG XL encoder effort.")
@click.option("--tile", type=SIZE, default="64x64", show_default=True, help="Grid tile size HxW.")
@click.option("--row-shape", type=SIZE, help="Code every matrix row of H*W values as one HxW tile "
                                              "(e.g. 28x28 for a first layer over MNIST images).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Unlabelled inputs to run the model on, so the rate search scores each layer by the error it "
                   "causes in the layer's output (weighted by how much the model's output moves) instead of in its "
                   "weights, then codes with repair. For a Hugging Face model folder: a text file of sentences, one "
                   "a line, or (an image model, its preprocessor_config.json present) a folder of images "
                   "(.png/.jpg/.jpeg/.bmp/.webp, read through the folder's image processor), or a .npy/.npz of the "
                   "model's own inputs (its main input: pixel_values, input_values, input_features, input_ids; as "
                   "they are, no processor run; an encoder-decoder's decoder reads its start token). With --model: "
                   "a .npy array (or .npz holding one) of samples along the first axis, or a folder of images of one size "
                   "fed as float32 N x C x H x W in [0, 1] (grey: C=1, others RGB: C=3), as they are: no resizing "
                   "or normalization (a model that expects normalized inputs: write them to a .npy, or use "
                   "codec.save(model, ..., calibration=batches)). Images are read a batch at a time. Needs "
                   "--bits-per-weight or --max-error.")
@click.option("--model", "model_spec", metavar="PACKAGE.MODULE:CLASS",
              help="The nn.Module class to run a .pt/.safetensors state_dict with --calibration: imported (only "
                   "when given), built without arguments, loaded with load_state_dict (a training checkpoint's "
                   "weights under model. or state_dict., a compiled or DataParallel model's under _orig_mod. or "
                   "module.: the file keeps the checkpoint's names).")
@click.option("--no-repair", is_flag=True, help="With --calibration: calibrated allocation only, no error "
                                                "compensation or repair of later parameters.")
@click.option("--finetune", "finetune_steps", type=click.IntRange(1, None), metavar="STEPS",
              help="With --calibration: after repair, STEPS Adam steps of codec-in-the-loop fine-tuning (the quant-"
                   "coded weights and the lossless parameters, each weight through its real encode/decode, "
                   "matching the model's own outputs on the calibration inputs); kept only where it lowers the "
                   "error on held-out calibration batches, within the planned size.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Free-form metadata to store (repeatable).")
@click.option("--base", type=click.Path(path_type=Path), metavar="MODEL",
              help="Write an update against MODEL (.jwt, .pt/.pth, .safetensors or a folder), the model the "
                   "receiver already holds: unchanged tensors cost a few bytes; with -b or --max-error the search "
                   "codes each changed tensor as a difference or in full, whichever costs less for the error "
                   "on the new weights. Without them every changed tensor is a difference at the default "
                   "setting: about the size of a full file, at a far smaller error. A .jwt base is decoded first, so errors do not pile up along a chain of updates. "
                   "Decode with `jwt decode UPDATE --base MODEL`.")
@jobs_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@handle_errors
def encode(input: Path, output: str | Path | None, codec_name: str, bits: int, bits_per_weight: float | None,
           max_error: float | None, rules: tuple[str, ...], quality: int | None, table: str, distance: float | None,
           effort: int, tile: tuple[int, int], row_shape: tuple[int, int] | None, calibration: Path | None,
           model_spec: str | None, no_repair: bool, finetune_steps: int | None, meta: tuple[str, ...],
           base: Path | None, jobs: int | None,
           quiet: bool, search: str = "fast", ray_address: str | None = None) -> None:
    """Encode a model (.pt/.pth, .safetensors, or a Hugging Face model folder) into a .jwt container.

    A folder's weights (model.safetensors, its shards, or pytorch_model.bin)
    become tensors; its other files (config, tokenizer, ...) travel inside
    the .jwt losslessly as attachments, restored by `jwt decode -o DIR/`.

    Weight matrices (floating, 2-D or more, at least 8x8 and 1024 values)
    are cut into tiles, mapped per tile to integer pixels by an offset and a
    scale, and coded as mosaics: 8-bit quant by default (no measurable
    accuracy loss), JPEG or JPEG XL on request (matrices under 16384 values
    then get 8-bit quant); everything else is stored losslessly.

    With --bits-per-weight or --max-error, every candidate setting of every
    tensor is measured and the allocator spends bits where they reduce
    distortion most (equal slopes); without them, one setting for all.
    Without data, a BatchNorm or LayerNorm after a layer weighs its output
    rows; a budget that can only be met by leaving a tensor with over 0.5
    relative error is met with a warning naming the tensors and the
    smallest budget that avoids it (also shown by `jwt info`).

    With --calibration the model is run on your inputs (no labels needed:
    the target is the model's own outputs) and each layer is scored by the
    error it causes in its output. The file is read by the same decoder.

    \b
    Examples:
      jwt encode mlp.pt --row-shape 28x28 --quality 20
      jwt encode mlp.pt --bits-per-weight 1.0
      jwt encode model.pt --set 'fc2.*=b8' --set '*.bias=lossless'
      jwt encode model.pt -o model.jwt --codec jpegxl --quality 80
      jwt encode model.safetensors
      jwt encode all-MiniLM-L6-v2/ -o minilm.jwt
      jwt encode v2.pt --base v1.jwt -o v2-update.jwt -b 0.1
      jwt encode all-MiniLM-L6-v2/ -b 3.5 --calibration sentences.txt
      jwt encode cnn.pt -b 0.6 --calibration images.npy --model mypkg.nets:CNN
      jwt encode cnn.pt -b 0.6 --calibration images/ --model mypkg.nets:CNN
      jwt encode vit-folder/ -b 3 --calibration images/
      jwt encode wav2vec2-folder/ -b 3 --calibration input_values.npy
    """
    from codec import encode as encoding
    from codec import io_formats

    metadata = parse_meta(meta)
    if ray_address is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            from codec.distributed.ray import INSTALL_HINT

            raise fail(f"--ray: {INSTALL_HINT}") from None
    if not input.exists():
        raise fail(f"{input}: no such file")
    if output is not None and same_file(input, output):
        raise fail(f"{output}: is the input folder; give another output" if input.is_dir()
                   else f"{output}: refusing to overwrite the input")
    output = io_formats.encode_output(input, output)
    if same_file(input, output):
        raise fail(f"{output}: refusing to overwrite the input")
    if base is not None and not base.exists():
        raise fail(f"{base}: no such file (--base)")
    if base is not None and same_file(base, output):
        raise fail(f"{output}: refusing to overwrite the base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = io_formats.open_source(input)
    if source.format == "jwt":
        source.close()
        raise fail(f"{input}: is already a .jwt file")
    state_dict = source.tensors
    if bits_per_weight is not None and max_error is not None:
        raise click.UsageError("give at most one of --bits-per-weight and --max-error")
    searching = bits_per_weight is not None or max_error is not None
    if (calibration is not None or model_spec is not None or no_repair) and not searching:
        raise click.UsageError("--calibration, --model and --no-repair need a rate target "
                               "(--bits-per-weight or --max-error)")
    if model_spec is not None and calibration is None:
        raise click.UsageError("--model needs --calibration (the inputs to run it on)")
    if no_repair and calibration is None:
        raise click.UsageError("--no-repair needs --calibration")
    if finetune_steps is not None and (calibration is None or no_repair):
        raise click.UsageError("--finetune needs --calibration (and repair: not with --no-repair)")
    check_encode_options({"codec": codec_name, "quality": quality, "table": table, "distance": distance,
                          "effort": effort, "tile": tile, "row_shape": row_shape, "bits": bits},
                         parse_rules(rules), searching)
    work = encoding.progress_total(state_dict, overrides=parse_rules(rules), bits_per_weight=bits_per_weight,
                              max_error=max_error, codec=codec_name, quality=quality, table=table, distance=distance,
                              effort=effort, tile=tile, row_shape=row_shape, bits=bits) if not quiet else 0
    bars: dict = {}
    with source, progress_bar(work, "encode", quiet) as bar:
        model = inputs = None
        calibration_notes: list = []
        names: dict = {}
        if calibration is not None:
            from .calibration import model_and_inputs

            model, inputs, calibration_notes, names = model_and_inputs(input, state_dict, calibration, model_spec)

        def stage_progress(stage: str, n: int) -> None:
            """One more bar per stage (calibration: inputs; repair: as it counts)."""
            if stage not in bars:
                samples = None if stage != "calibration" else \
                    inputs.samples if hasattr(inputs, "samples") else len(inputs)
                bars[stage] = progress_bar(samples, stage, quiet)
            bars[stage].update(n)

        watch = _watch_for_a_hard_exit(output) if ray_address is not None else None
        try:
            notes = source.notes + calibration_notes + encoding.save(
                state_dict, output, metadata={**metadata, "source": metadata.get("source", input.name),
                                              **source.metadata},
                attachments=source.attachments,
                overrides=parse_rules(rules), bits_per_weight=bits_per_weight, max_error=max_error,
                progress=lambda name, n: bar.update(n), codec=codec_name, quality=quality, table=table,
                distance=distance, effort=effort, tile=tile, row_shape=row_shape, bits=bits, jobs=jobs,
                search=search, ray=ray_address, base=base, calibration=inputs, model=model, model_names=names,
                repair=False if no_repair else _repair_settings(finetune_steps),
                calibration_progress=stage_progress if inputs is not None else None,
            )
        except ValueError as exc:  # bad calibration inputs: one line, before any coding
            raise fail(str(exc)) from None
        finally:
            if watch is not None:
                _disarm(watch)
            for stage_bar in bars.values():
                stage_bar.close()
    for message in [str(w.message) for w in caught] + notes:
        click.echo(f"jwt: {'note' if isinstance(message, encoding.Note) else 'warning'}: {message}", err=True)
    if not quiet:
        from codec.reader import Reader
        from codec.stats import file_totals

        with Reader(output) as written:
            totals = file_totals(written.index, written.size)
        carried = f" and {len(source.attachments)} attachments" if source.attachments else ""
        click.echo(f"{output}: {len(state_dict)} tensors{carried}, {totals.file_bytes:,} bytes ({totals.summary()})")
        if base is not None:
            with Reader(output) as reader:
                kinds = [e for e in reader.index.entries if e.alias is None]
                same = sum(e.unchanged for e in kinds)
                delta = sum(e.base is not None and not e.unchanged for e in kinds)
            click.echo(f"  update against {base}: {delta} differences, {same} unchanged, "
                       f"{len(kinds) - delta - same} stored in full")
            if not searching and delta:
                click.echo("  (the differences are coded with the fixed setting; -b B or --max-error E lets the "
                           "search make them much smaller)")


def _watch_for_a_hard_exit(output: str | Path) -> tuple[int, int] | None:
    """A watcher for the Ray encode: when the local cluster's raylet dies while this process reads its object
    store, Ray's core worker ends this process at once (``_Exit(1)``, its reason only in Ray's session log), and
    the user would see exit status 1 and nothing else. A forked watcher holds the read end of a pipe; if the
    write end closes before :func:`_disarm` wrote to it, this process ended without Python seeing it, and the
    watcher prints the one-line error. The watcher writes nothing else and ends with this process. Returns its
    pid and the write end (None where there is no ``fork``)."""
    if not hasattr(os, "fork"):
        return None
    message = (f"Error: {output}: the encode was ended from outside before it finished (Ray ends its driver "
               f"process when the local cluster fails mid-encode, the reason in the python-core-driver log of "
               f"Ray's session folder); nothing was written\n").encode(errors="replace")
    sys.stdout.flush()
    sys.stderr.flush()
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns of fork in a threaded process: the child only reads a pipe
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the watcher: no Python state beyond this, no locks taken (os.write, os._exit)
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: jwt reports it
            os.close(write)
            if os.read(read, 1) == b"":
                os.write(2, message)
        finally:
            os._exit(0)
    os.close(read)
    return pid, write


def _disarm(watch: tuple[int, int]) -> None:
    """This process goes on in Python's hands (done, or an error it reports itself): the watcher ends quietly."""
    pid, write = watch
    try:
        os.write(write, b"x")
    except OSError:  # the watcher is gone (killed): nothing to tell it, and jwt's own outcome stands
        pass
    finally:
        os.close(write)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _repair_settings(finetune_steps: int | None):
    """``codec.save``'s ``repair=``: None (the default repair) or repair with ``finetune_steps`` of fine-tuning."""
    if finetune_steps is None:
        return None
    from codec.rd.repair import RepairSettings

    return RepairSettings(finetune_steps=finetune_steps)
