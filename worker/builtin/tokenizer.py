"""Builds the built-in model's CLIP tokenizer files with no network.

A CLIP BPE vocabulary is the 256 byte symbols (each also with the end-of-word mark `</w>`), one merged
token per merge rule, and the two special tokens. We add the merges that make every caption word a
single token, so the text encoder's embedding table stays tiny (a few hundred rows instead of 49,408)
while any other text still tokenizes, byte by byte.

transformers 5 traps (see shared notes): `CLIPTokenizer(vocab_file=..., merges_file=...)` ignores the
files, so the directory is loaded with `from_pretrained`; and `model_max_length` must be set.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table GPT-2/CLIP BPE files are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _apply(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly merge the lowest-ranked adjacent pair."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merge list in which each of `words` encodes to one token.

    Words are added in order; for each, the merges already known are applied as BPE would, then new
    merges join what is left from left to right. New merges rank after all earlier ones, so they never
    change how an earlier word encodes.
    """
    b2u = bytes_to_unicode()
    base = [b2u[b] for b in range(256)]
    vocab_list = base + [c + END for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        chars = [b2u[b] for b in word.encode("utf-8")]
        chars[-1] += END
        symbols = _apply(chars, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_list.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1], *symbols[2:]]
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer(out_dir: Path, words: list[str], max_length: int) -> None:
    """Writes vocab.json, merges.txt and the configs; load with `CLIPTokenizer.from_pretrained(out_dir)`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def vocab_size(words: list[str]) -> int:
    return len(build_vocab(words)[0])
