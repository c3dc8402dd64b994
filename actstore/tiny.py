"""The project's own tiny language model: a small GPT-NeoX (Pythia's architecture) over bytes.

Why: the demo, the tests and every offline machine need a real model that loads in seconds without a
hub. Its vocabulary is the 256 byte values plus one end-of-text token, so any text tokenizes with no
learned merges and the corpus needs no tokenizer training. `examples/train_tiny_model.py` trains it on
the builtin corpus; the weights ship inside the package in Hugging Face's format, so the same loading
code that reads a local HF directory reads them.
"""

from __future__ import annotations

from pathlib import Path

EOT_ID = 256  # <|endoftext|>: separates documents, doubles as BOS when a BOS is asked for
VOCAB_SIZE = 257
MODELS_DIR = Path(__file__).parent / "models"
TINY_DIR = MODELS_DIR / "tiny"

# Pythia's shape at a toy size: rotary on a quarter of each head, parallel attention + MLP residual.
TINY_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=256,
    rotary_pct=0.25,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    bos_token_id=EOT_ID,
    eos_token_id=EOT_ID,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)


# The second shipped model: twice as deep, 1.5x as wide. Its 12 layers put layers 2, 6 and 10 at exactly
# the relative depths 1/6, 3/6, 5/6 of tiny's layers 1, 3, 5 -- the shape of a Pythia-70M vs 410M comparison.
TINY_192_CONFIG = {
    **TINY_CONFIG,
    "hidden_size": 192,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 768,
}

# Name -> (config, directory) of each model shipped inside the package; `--model NAME` loads them.
SHIPPED_MODELS = {
    "tiny": (TINY_CONFIG, TINY_DIR),
    "tiny-192": (TINY_192_CONFIG, MODELS_DIR / "tiny-192"),
}


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet byte-level tokenizers work in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """An HF fast tokenizer whose ids are the byte values (0–255) and 256 for <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in _byte_to_char().items()}
    vocab["<|endoftext|>"] = EOT_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=TINY_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


# Pythia's published shapes, for benchmarks of realistic cost with random weights (no download needed).
PYTHIA_SHAPES = {
    "pythia-70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def random_pythia(root: Path, shape: str = "pythia-70m", seed: int = 0) -> str:
    """A GPT-NeoX of a Pythia shape with random weights and the byte tokenizer, saved as an HF directory.

    Byte ids are valid ids of Pythia's 50,304-token vocabulary, so the builtin corpus runs through it.
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**{**TINY_CONFIG, "vocab_size": 50304, "max_position_embeddings": 2048, **PYTHIA_SHAPES[shape]})
    torch.manual_seed(seed)
    GPTNeoXForCausalLM(cfg).save_pretrained(root)
    byte_tokenizer().save_pretrained(root)
    return str(root)


def random_gemma2(root: Path, layers: int = 2, width: int = 32, window: int = 4, softcap: float = 5.0, seed: int = 0):
    """A tiny Gemma-2 with random weights and the byte tokenizer, saved as an HF directory; returns the model.

    Why: Gemma-2 is the architecture whose final logits are soft-capped and whose even layers see a sliding
    window, the two things a shared-suffix patch path can get wrong. The embedding (tied to the unembedding)
    is scaled up so the logits sit far beyond the cap and a missing cap shows; `window` below the sequence
    length makes the window matter. Layers alternate sliding and full attention, as Gemma-2's do.
    """
    import shutil

    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=width // 16,
        num_key_value_heads=max(1, width // 32),
        head_dim=16,
        max_position_embeddings=128,
        final_logit_softcapping=softcap,
        attn_logit_softcapping=50.0,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
    )
    hf = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # tied embedding: logits reach ~±60 at width 32, twelve times a cap of 5
        hf.model.embed_tokens.weight.mul_(40.0)
    hf.save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_DIR / name, Path(root) / name)
    return hf
