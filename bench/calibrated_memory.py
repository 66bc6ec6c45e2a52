"""Memory and time of a calibrated all-MiniLM-L6-v2 encode, stage by stage (issue 9's 2x-the-model target).

Runs ``codec.save(model, path, bits_per_weight=B, calibration=bench.sentences.calibration_batches())`` (calibration,
rate search, repair, write) on the model of ``bench.repair``'s MiniLM case, sampling the process's resident memory
every 50 ms in a thread. Prints the peak above the resident memory before the encode (the model already loaded:
bench/README.md's "peak MB"), overall and per stage (a stage's peak includes what earlier stages left resident),
wall and CPU seconds, bits/weight, and the mean cosine on the everyday and rare-word sentence sets.

    python -m bench.calibrated_memory [--bits 3.5] [--threads 2] [--jobs N] [--no-quality] [--detail]
    python -m bench.calibrated_memory --base [--layers 12] [--dir /tmp/base] --threads 1 --jobs 1

``--base`` codes a base-size sentence model instead (issue 9: all-mpnet-base-v2's and BERT-base's size): a
``BertConfig()`` BERT (12 layers, hidden 768, FFN 3,072, 109.5 M weights; ``--layers`` fewer for a quick proxy),
random weights from seed 0, saved as a sentence-transformers folder with all-MiniLM-L6-v2's tokenizer
(:func:`base_folder`, in ``--dir`` or a temporary folder) and loaded from it as a user's folder is; the same
calibration batches; no cosine (random weights). CPU is also printed as user and system seconds, with the
save's minor and major page faults (either model).

``--detail`` also splits repair by tensor (collecting a layer's statistics, coding it) and prints the stages
with the highest peaks; the md5 of the file is printed to check that a change left the bytes as they were.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import torch

import codec
from codec import api, encode

#: Stages of codec.save timed and sampled, by the module and function that run each (codec.encode.save looks the
#: api functions up when it calls them, so replacing the module attributes is seen).
STAGES = {(api, "calibrated"): "calibration", (encode, "_plan"): "rate search", (api, "repaired_arrays"): "repair"}


def memory_mb() -> tuple[float, float, float]:
    """The process's resident memory, its anonymous part and its high-water mark, MB (Linux /proc; 0 elsewhere).

    ``VmRSS`` holds ~230 MB of file-backed pages (torch's libraries, the model's file), which the kernel may reclaim
    while they sit idle; ``RssAnon`` (heap, arenas, mapped arrays) is what the encode itself allocates."""
    found = {"VmRSS:": 0.0, "RssAnon:": 0.0, "VmHWM:": 0.0}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0, 0.0, 0.0
    for line in text.splitlines():
        key = line.split(":", 1)[0] + ":"
        if key in found:
            found[key] = int(line.split()[1]) / 1024
    return found["VmRSS:"], found["RssAnon:"], found["VmHWM:"]


def base_folder(folder: Path, layers: int = 12, seed: int = 0) -> Path:
    """A random base-size BERT (``BertConfig()`` with ``layers`` layers, seed ``seed``) saved in ``folder`` as a
    sentence-transformers folder: all-MiniLM-L6-v2's tokenizer and modules, mean pooling over 768 dimensions."""
    import json
    import shutil

    from transformers import BertConfig, BertModel

    from bench.minilm import model_dir

    folder, src = Path(folder), Path(model_dir())
    torch.manual_seed(seed)
    BertModel(BertConfig(num_hidden_layers=layers)).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json",
                 "sentence_bert_config.json", "config_sentence_transformers.json"):
        shutil.copy(src / name, folder / name)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = BertConfig().hidden_size
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    return folder


def _base(layers: int, folder: str | None):
    """``(state_dict, model, calibration batches, None)`` for :func:`base_folder`'s model, loaded from its folder.

    ``from_pretrained`` maps the folder's ``model.safetensors`` and its weights become resident only as they are
    first read: during the encode, where the sampled peak counted them (the 12-layer base's 438 MB in its 1,195 MB
    above resident, twenty-third pass). The model is deep-copied into the process's own memory, as
    ``bench.repair._minilm``'s is, so that the resident memory before the encode holds the whole model."""
    import copy

    from transformers import AutoModel

    from bench import sentences

    with tempfile.TemporaryDirectory() as tmp:
        path = base_folder(Path(folder or tmp) / f"bert-base-{layers}", layers)
        model = copy.deepcopy(AutoModel.from_pretrained(str(path)).eval())  # (the mapping goes with the loaded one)
    return model.state_dict(), model, sentences.calibration_batches(), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, default=3.5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the coding threads are jwt's own)")
    parser.add_argument("--jobs", type=int, default=None, help="jwt's coding threads (default: one per core)")
    parser.add_argument("--no-quality", action="store_true", help="skip the cosine of the decoded file")
    parser.add_argument("--detail", action="store_true", help="split repair by tensor; print the highest stages")
    parser.add_argument("--timeline", action="store_true",
                        help="with --detail: every stage in the order it ran, its first sample and its peak")
    parser.add_argument("--base", action="store_true", help="a random base-size BERT instead of MiniLM (no cosine)")
    parser.add_argument("--layers", type=int, default=12, help="with --base: its layers (12: base size)")
    parser.add_argument("--dir", default=None, help="with --base: where its folder is made (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from bench.repair import _minilm

    stage = ["before"]

    def marked(fn, label):
        """``fn`` marking its stage while it runs."""
        def wrapped(*a, **k):
            stage[0] = label
            try:
                return fn(*a, **k)
            finally:
                stage[0] = f"after {label}"  # after repair: writing the file
        return wrapped

    for (module, name), label in STAGES.items():
        setattr(module, name, marked(getattr(module, name), label))
    if args.detail:
        from codec.rd.repair import loop as repair  # (_repair looks _code_within up in its own module)

        def slot_marked(fn, what):
            def wrapped(*a, **k):
                slot = next(x for x in a if isinstance(x, repair._Slot))
                stage[0] = f"repair {what} {slot.name}"
                try:
                    return fn(*a, **k)
                finally:
                    stage[0] = "repair"
            return wrapped

        repair._code_within = slot_marked(repair._code_within, "code")
        collect = repair._LayerFit.collect.__func__
        repair._LayerFit.collect = classmethod(slot_marked(collect, "collect"))
    state_dict, model, batches, score = _base(args.layers, args.dir) if args.base else _minilm()
    weights = sum(v.numel() for v in state_dict.values() if v.is_floating_point())
    samples: list[tuple[float, float, str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, anon, _ = memory_mb()
            samples.append((rss, anon, stage[0]))
            time.sleep(0.05)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.jwt"
        gc.collect()
        base, anon_base, hwm_base = memory_mb()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        codec.save(model, path, bits_per_weight=args.bits, calibration=batches, jobs=args.jobs)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        done.set()
        sampler.join()
        hwm = memory_mb()[2]
        size = os.path.getsize(path)
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
        quality = "" if args.no_quality or score is None else score(codec.load(path))
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    peaks: dict[str, float] = {}
    anon_peaks: dict[str, float] = {}
    for mb, anon, label in samples:
        peaks[label] = max(peaks.get(label, 0.0), mb - base)
        anon_peaks[label] = max(anon_peaks.get(label, 0.0), anon - anon_base)
    print(f"resident before {base:.0f} MB; peak above it {max(peaks.values()):.0f} MB "
          f"(target {8 * weights / 1e6:.0f} MB: 2x the fp32 model); wall {wall:.1f} s; CPU {cpu:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"CPU user {r1.ru_utime - r0.ru_utime:.1f} s, system {r1.ru_stime - r0.ru_stime:.1f} s; page faults "
          f"{r1.ru_minflt - r0.ru_minflt:,} minor, {r1.ru_majflt - r0.ru_majflt:,} major; {weights:,} weights "
          f"({4 * weights / 1e6:.0f} MB as float32)")
    # the anonymous part cannot be reclaimed without swap, so it moves less with load and idle time; VmHWM is the
    # kernel's own peak of VmRSS (no 50 ms sampling), above the same resident figure when it rose during the encode
    print(f"anonymous before {anon_base:.0f} MB; peak above it {max(anon_peaks.values()):.0f} MB; "
          f"VmHWM above resident {hwm - base:.0f} MB" + ("" if hwm > hwm_base else " (set before the encode)"))
    main_stages = [label for label in peaks if not label.startswith("repair ")]
    detail = sorted((label for label in peaks if label.startswith("repair ")), key=peaks.get, reverse=True)[:8]
    for label in main_stages + detail:
        print(f"  {label:12s} peak above resident {peaks[label]:6.0f} MB, anonymous {anon_peaks[label]:6.0f} MB")
    if args.timeline:  # consecutive samples of one stage form a run: its first sample and its peak, above resident
        runs: list[list] = []
        for mb, anon, label in samples:
            if not runs or runs[-1][0] != label:
                runs.append([label, mb - base, mb - base, anon - anon_base])
            runs[-1][2] = max(runs[-1][2], mb - base)
            runs[-1][3] = max(runs[-1][3], anon - anon_base)
        for label, first, peak, anon_peak in runs:
            print(f"    {label:50s} from {first:6.0f} MB, peak {peak:6.0f} MB, anonymous {anon_peak:6.0f} MB")
    print(f"bits/weight {8 * size / weights:.4f}" + (f"; cosine everyday / rare {quality}" if quality else "")
          + f"; md5 {md5}")


if __name__ == "__main__":
    main()
