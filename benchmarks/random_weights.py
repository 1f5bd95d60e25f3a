"""A model folder with random weights, from a folder holding only a model's config and tokenizer.

For speed measurements where the weights cannot travel (the GPU machine of issue 17, point 5, reaches no
network, and the default model's 538 MB exceed what a call carries): the shapes, and so the work, are the
model's own; the values are seeded random. Outputs are meaningless, and benchmarks that stop at an end token
force their lengths (``min_new_tokens``) or compare systems on the same outputs.

    python benchmarks/random_weights.py .device/model /tmp/model [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="folder with config.json and the tokenizer files")
    ap.add_argument("target", help="folder to write (config, tokenizer and random weights)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    source, target = Path(args.source), Path(args.target)
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(args.seed)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    auto.from_config(config).save_pretrained(target)
    for f in source.iterdir():
        if f.is_file() and not (target / f.name).exists():
            shutil.copy(f, target / f.name)
    print(f"{target}: {config.model_type}, random weights (seed {args.seed})", flush=True)
    return target


if __name__ == "__main__":
    main()
