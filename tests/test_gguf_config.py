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


# -- the metadata reader ---------------------------------------------------------------------------

def write_every_value_type(path):
    """A GGUF with a field of each scalar type, strings (empty, non-ASCII), arrays of each and tensors
    of three types, written by the gguf package (which writes no empty array)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    T = gguf.GGUFValueType
    scalars = {T.UINT8: 200, T.INT8: -100, T.UINT16: 60000, T.INT16: -30000, T.UINT32: 4_000_000_000,
               T.INT32: -2_000_000_000, T.FLOAT32: 0.1, T.UINT64: 2**63 + 5, T.INT64: -(2**62), T.FLOAT64: 0.1,
               T.BOOL: True}
    for kind, value in scalars.items():
        writer.add_key_value(f"test.{kind.name.lower()}", value, kind)
        writer.add_key_value(f"test.array.{kind.name.lower()}", [value, value], T.ARRAY, sub_type=kind)
    writer.add_string("test.string", "héllo ✓")
    writer.add_string("test.empty_string", "")
    writer.add_array("test.strings", ["a", "", "ünïcode ✓", "x" * 1000])
    writer.add_token_list([f"tok{i}" for i in range(3000)])
    writer.add_tensor("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b.weight", np.arange(64, dtype=np.float16).reshape(2, 32))
    q8 = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("c.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def tensor_table(tensors):
    return [(t.name, t.tensor_type, tuple(t.shape), t.n_elements, t.n_bytes, t.data_offset, t.data.dtype,
             t.data.shape, np.asarray(t.data).tobytes()) for t in tensors]


@pytest.mark.parametrize("which", ["every value type", "SmolLM2"])
def test_metadata_and_tensors_read_as_the_gguf_package_reads_them(which, tmp_path, smollm2_path):
    from jaxinfer.weights.gguf import _Reader, decoded_fields

    path = write_every_value_type(tmp_path / "every.gguf") if which == "every value type" else smollm2_path
    ours, theirs = _Reader(path), gguf.GGUFReader(path)
    assert decoded_fields(ours) == decoded_fields(theirs)
    assert len(decoded_fields(ours)) == len(theirs.fields)  # every field decoded, none skipped
    assert tensor_table(ours.tensors) == tensor_table(theirs.tensors)
    if which == "every value type":
        assert decoded_fields(ours)["test.strings"] == ["a", "", "ünïcode ✓", "x" * 1000]


def test_a_truncated_file_is_refused_and_a_rewritten_one_read_again(tmp_path):
    from jaxinfer.weights.gguf import read_gguf

    path = write_every_value_type(tmp_path / "every.gguf")
    fields, tensors = read_gguf(path)
    assert read_gguf(path)[0] is fields  # parsed once
    data = open(path, "rb").read()
    cut = data.index(b"tok2999")  # inside the token list
    with open(path, "wb") as f:
        f.write(data[:cut])
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        read_gguf(path)
    write_tiny_llama(path, vocab_size_key=True)
    assert read_gguf(path)[0]["general.architecture"] == "llama" and len(read_gguf(path)[0]["tokenizer.ggml.tokens"]) == 40
