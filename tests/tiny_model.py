"""A tiny random-weight GGUF (llama architecture, its own small SentencePiece vocabulary).

A few hundred KB; it loads and generates through the real libllama path, so most tests can run
real child processes in well under a second each. The text it writes is noise, but deterministic
for a given seed and prompt under greedy sampling.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_CTX_TRAIN = 4096

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(gguf.TokenType.BYTE)
    words = ["▁" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += ["▁the", "▁of", "▁and", "▁to", "▁is", "▁Paris", "▁France", "▁capital", "▁hello", "▁world",
              ".", ",", "!", "?", "▁", "<|", "|>", "user", "assistant", "system"]
    for word in words:
        tokens.append(word)
        types.append(gguf.TokenType.NORMAL)
    # SentencePiece prefers higher scores: longer pieces first.
    scores = [0.0 if t != gguf.TokenType.NORMAL else float(len(tok)) for tok, t in zip(tokens, types, strict=True)]
    return tokens, scores, [int(t) for t in types]


def write_tiny_model(path: Path, seed: int = 1234, weight_type: str = "f32") -> Path:
    """weight_type "q4_1" stores the matrices as Q4_1, like SmolLM2's file, for the quantized kernels."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocabulary()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD
    n_embd_kv = head_dim * N_HEAD_KV

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if weight_type == "q4_1" else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def add_matrix(name: str, matrix: np.ndarray) -> None:
        if weight_type == "q4_1":
            writer.add_tensor(name, gguf.quants.quantize(matrix, gguf.GGMLQuantizationType.Q4_1),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            writer.add_tensor(name, matrix)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5 / np.sqrt(shape[-1])).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        add_matrix(f"blk.{i}.attn_q.weight", weight(N_EMBD, N_EMBD))
        add_matrix(f"blk.{i}.attn_k.weight", weight(n_embd_kv, N_EMBD))
        add_matrix(f"blk.{i}.attn_v.weight", weight(n_embd_kv, N_EMBD))
        add_matrix(f"blk.{i}.attn_output.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        add_matrix(f"blk.{i}.ffn_gate.weight", weight(N_FF, N_EMBD))
        add_matrix(f"blk.{i}.ffn_up.weight", weight(N_FF, N_EMBD))
        add_matrix(f"blk.{i}.ffn_down.weight", weight(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    add_matrix("output.weight", weight(n_vocab, N_EMBD) * 4.0)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
