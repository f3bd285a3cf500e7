"""A tiny randomly initialised chat model, for tests and for a smoke run without downloads.

The tokenizer is a byte-level BPE trained on a few sentences (any UTF-8 text encodes), with
ChatML special tokens and a ChatML chat template, so it behaves like a real chat tokenizer.
"""

from __future__ import annotations

from pathlib import Path

# ChatML, the format SmolLM2 and many other chat models use. The answer of an assistant
# turn ends with <|im_end|>, which is also the end-of-turn / eos token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 7? The answer is 19.",
    "user assistant system You are a helpful assistant.",
    "def f(x):\n    return x * 2\n",
    "Hello! How can I help you today?",
]


def build_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with ChatML tokens; trained in milliseconds, fully offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


def build_tiny_model(
    tokenizer,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    seed: int = 0,
):
    """A randomly initialised Llama-architecture causal LM sized for millisecond steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(out_dir: str | Path, seed: int = 0, max_position_embeddings: int = 512) -> Path:
    """Write a tiny model + tokenizer as a Hugging Face directory; returns the directory."""
    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, max_position_embeddings=max_position_embeddings, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
