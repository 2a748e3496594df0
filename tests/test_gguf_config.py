"""ModelConfig from GGUF metadata, against what the file itself holds (written by the gguf package)."""

import gguf
import numpy as np
import pytest

from jaxinfer.config import UnsupportedModelError
from jaxinfer.weights.gguf import GGUFCheckpoint


def write_tiny_llama(path, *, vocab_size_key: bool, num_tokens: int = 40):
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_embedding_length, 64),
                       (writer.add_feed_forward_length, 128), (writer.add_head_count, 4),
                       (writer.add_head_count_kv, 2), (writer.add_context_length, 128),
                       (writer.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    if vocab_size_key:
        writer.add_vocab_size(num_tokens)
    if num_tokens:
        writer.add_token_list([f"t{i}" for i in range(num_tokens)])
    writer.add_tensor("token_embd.weight", np.zeros((max(num_tokens, 1), 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_vocab_size_comes_from_the_token_list_when_the_architecture_key_is_missing(tmp_path):
    """Qwen2 GGUFs (llama.cpp writes no qwen2.vocab_size) read 0 before: every token id was refused."""
    checkpoint = GGUFCheckpoint(write_tiny_llama(tmp_path / "a.gguf", vocab_size_key=False))
    assert checkpoint.config.vocab_size == len(checkpoint.fields["tokenizer.ggml.tokens"]) == 40


def test_vocab_size_key_wins_when_present(tmp_path):
    assert GGUFCheckpoint(write_tiny_llama(tmp_path / "b.gguf", vocab_size_key=True)).config.vocab_size == 40


def test_a_file_with_no_vocabulary_at_all_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedModelError, match="vocabulary size"):
        GGUFCheckpoint(write_tiny_llama(tmp_path / "c.gguf", vocab_size_key=False, num_tokens=0))
