"""Training data, captions and the offline tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.builtin import data, tokenizer


def test_held_out_pairs_are_never_drawn_for_training() -> None:
    rng = np.random.default_rng(0)
    drawn = {(s.colour, s.shape) for s in (data.random_scene(rng) for _ in range(3000))}
    assert drawn.isdisjoint(data.HELD_OUT_PAIRS)
    assert drawn == set(data.training_pairs())


def test_captions_name_the_scene_and_vary() -> None:
    rng = np.random.default_rng(1)
    scene = data.place("red", "circle", "blue", "small", "top")
    captions = {data.random_caption(scene, rng) for _ in range(200)}
    assert len(captions) > 30
    for caption in captions:
        assert "red circle" in caption
        assert set(caption.replace(",", " ,").split()) <= set(data.caption_words())
    assert data.canonical_caption(scene) == "a small red circle at the top on a blue background"


def test_tokenizer_builds_offline_and_gives_each_word_one_token(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer.write_tokenizer(tmp_path, data.caption_words(), 32)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert tok.model_max_length == 32
    assert len(tok) == tokenizer.vocab_size(data.caption_words())
    for word in data.caption_words():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, ids)  # BOS, the word, EOS
    ids = tok("a red circle on a blue background", padding="max_length", max_length=32).input_ids
    assert len(ids) == 32 and ids[0] == tok.bos_token_id and ids[8] == tok.eos_token_id
    # unknown words still encode, byte by byte
    assert len(tok("zebra").input_ids) > 3
