"""Build the small byte-level BPE tokenizer that the quickstart and the tests use.

It is trained on the bundled Self-Instruct seed tasks so that it tokenizes them sensibly with a
vocabulary of 2048 (tiny models train in seconds on CPU). It deliberately has no pad token, like
Llama's tokenizer: dpkit must handle that (it pads with eos and masks by attention mask).

    python scripts/make_tiny_tokenizer.py   # rewrites data/tokenizers/tiny-bpe/
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from dpkit.shipped import TOKENIZERS

ROOT = Path(__file__).resolve().parent.parent
OUT = TOKENIZERS / "tiny-bpe"
SPECIAL = ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]

# ChatML-like: each turn is "<|role|>\n{content}</s>\n"; the assistant's </s> is trained on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def corpus():
    for name in ("self_instruct_seed.alpaca.jsonl", "self_instruct_seed.messages.jsonl"):
        for line in (ROOT / "data" / name).read_text().splitlines():
            row = json.loads(line)
            if "messages" in row:
                yield from (m["content"] for m in row["messages"])
            else:
                yield " ".join(row[k] for k in ("instruction", "input", "output"))


def main():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    # Add <s> in front like Llama does; the chat template adds it itself (add_special_tokens=False).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} (vocab {fast.vocab_size}, pad token: {fast.pad_token})")


if __name__ == "__main__":
    main()
