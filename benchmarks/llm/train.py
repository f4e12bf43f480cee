"""A small Llama-architecture decoder trained on real text that ships with Python (issue 17).

Text: CPython's pydoc topics (``pydoc_data.topics``) and the docstrings of the modules, classes and
functions of the standard library and of numpy, read from source with ``ast`` (nothing is imported). Every 20th
document (by a stable hash of its name) is held out for evaluation and never trained on.

Model: RMSNorm, RoPE, SwiGLU, grouped-query attention (6 query heads, 2 key/value heads), tied input
and output embeddings; about 16M parameters. Tokenizer: byte-level BPE trained with ``tokenizers`` on
the training split. Training: AdamW, cosine schedule, seeded, on the CPU.

Writes an ordinary Hugging Face checkpoint (``config.json``, ``model.safetensors``, tokenizer files),
the held-out text (``heldout.txt``) and ``train.json`` (sizes, seconds, losses).

    python benchmarks/llm/train.py OUT_DIR [--steps N]

Needs torch, transformers and tokenizers (``benchmarks/llm/setup.sh`` makes that environment).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

HELD_OUT_EVERY = 20
MIN_DOCSTRING = 80
VOCAB = 8192
SEQUENCE = 256
BATCH = 16
SEED = 0
MODEL = {
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def documents() -> list[tuple[str, str]]:
    """(name, text) of every pydoc topic and every docstring of at least ``MIN_DOCSTRING``
    characters in the standard library and in numpy's installed source, in a fixed order."""
    from pydoc_data.topics import topics

    found = [(f"topic:{name}", text) for name, text in sorted(topics.items())]
    import numpy

    roots = [(Path(sysconfig.get_paths()["stdlib"]), ""), (Path(numpy.__file__).parent, "numpy.")]
    for root, prefix in roots:
        found += _docstrings(root, prefix)
    return found


def _docstrings(root: Path, prefix: str) -> list[tuple[str, str]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = prefix + ".".join(path.relative_to(root).with_suffix("").parts)
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
        for node in nodes:
            text = ast.get_docstring(node)
            if text and len(text) >= MIN_DOCSTRING:
                found.append((f"{module}:{getattr(node, 'name', '')}:{getattr(node, 'lineno', 0)}", text))
    return found


def held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def train_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids += [tokenizer.bos_token_id, *tokenizer(text)["input_ids"], tokenizer.eos_token_id]
    return ids


def train(out: Path, steps: int) -> dict:
    import numpy
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    docs = documents()
    train_docs = [text for name, text in docs if not held_out(name)]
    evaluation = [text for name, text in docs if held_out(name)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout.txt").write_text("\n\n".join(evaluation), encoding="utf-8")
    tokenizer = train_tokenizer(train_docs, out)
    stream = torch.tensor(token_stream(tokenizer, train_docs), dtype=torch.long)
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **MODEL
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(SEED)
    losses, started = [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(stream) - SEQUENCE - 1, (BATCH,), generator=generator)
        batch = torch.stack([stream[s : s + SEQUENCE] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} {time.time() - started:.0f}s", flush=True)
    model.save_pretrained(out)
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "documents": {"train": len(train_docs), "held_out": len(evaluation)},
        "train_tokens": len(stream),
        "tokens_seen": steps * BATCH * SEQUENCE,
        "steps": steps,
        "seconds": round(time.time() - started, 1),
        "loss_first": losses[0],
        "loss_last_50_mean": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "config": MODEL,
        "text_from": {"python": sys.version.split()[0], "numpy": numpy.__version__},
    }
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args()
    print(json.dumps(train(args.out, args.steps), indent=2))


if __name__ == "__main__":
    main()
