"""Small real tokenizers (tokenizers library, byte-level BPE) in the shape of the paper's base models, built offline:
a Llama-3 base (eos <|end_of_text|>, turn end <|eot_id|>, the real Llama-3.1 instruct template with its date
block), a Qwen2.5 base (eos <|endoftext|>, ChatML turn end <|im_end|>) and SmolLM2 (eos = pad = <|im_end|>).
On all three the eos is not what closes a turn, or the pad token IS the turn end: the traps of issue #20."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA31_TEMPLATE = (FIXTURES / "llama31_chat_template.jinja").read_text()
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
CORPUS = ["You are a helpful assistant.", "Count from 1 to 3.", "1, 2, 3.", "Solve the following math problem.",
          "#### 18", "#### 20", "So the answer is 18.", "Sorry, I can not assist you with this question.",
          "system user assistant", "Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024"] * 20


def _fast(specials: list[str], **named):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def llama3_base():
    """Llama-3.x base as reteq loads it: eos <|end_of_text|> (also the pad, as models.load_tokenizer sets it),
    the instruct sibling's Llama-3.1 template."""
    tok = _fast(LLAMA3_SPECIALS, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                pad_token="<|end_of_text|>", additional_special_tokens=LLAMA3_SPECIALS[2:])
    tok.chat_template = LLAMA31_TEMPLATE
    return tok


def qwen_base():
    """Qwen2.5 base: eos = pad = <|endoftext|>, ChatML turns closed by <|im_end|> and a newline."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _fast(specials, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                additional_special_tokens=specials[1:])
    tok.chat_template = CHATML_TEMPLATE
    return tok


def smollm2():
    """SmolLM2-Instruct: ChatML, bos <|im_start|>, eos = pad = <|im_end|> (the turn end)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _fast(specials, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def bigram_model(tokenizer, successor: dict[int, int]):
    """A real LlamaForCausalLM (no decoder layers) that greedily writes a fixed chain: after token i it emits
    successor[i]. Embeddings are one-hot, so the final norm gives sqrt(V) e_i and lm_head row j reads column i."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    hidden = vocab + vocab % 2  # RoPE wants an even head size
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=0,
                      num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        model.lm_head.weight.zero_()
        for i, j in successor.items():
            model.lm_head.weight[j, i] = 1.0
    return model.eval()
