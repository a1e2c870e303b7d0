"""Response log-probabilities: locating turn h's response through the chat template, and summing it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from refuel_agents.logprobs import (
    ResponseEncodingError,
    SequenceTooLongError,
    collate,
    encode_response,
    end_of_turn_token_ids,
    sequence_logprobs,
    sequence_logprobs_and_entropy,
)

# The Llama-3-8B-Instruct chat template, written out (no hub access in tests).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

RESPONSES = [
    "Hello there",
    "Sure!\n\n```python\nprint(1 + 1)\n```\nThat prints 2.",
    "Ça coûte 3 € — 日本語 🙂",
    "x",
    "",
]

DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 + 3?"},
]


@pytest.fixture(scope="module")
def chatml(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def llama3(smollm2_dir):
    """SmolLM2's vocabulary with Llama-3's special tokens and Llama-3-Instruct's chat template."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
        }
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


@pytest.fixture(params=["chatml", "llama3"])
def tokenizer_and_eot(request):
    return request.getfixturevalue(request.param), {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[request.param]


def masked_text(tokenizer, encoded) -> str:
    return tokenizer.decode([i for i, m in zip(encoded.input_ids, encoded.response_mask) if m])


def test_end_of_turn_comes_from_the_template(chatml, llama3):
    assert end_of_turn_token_ids(chatml) == {chatml.convert_tokens_to_ids("<|im_end|>")}
    assert end_of_turn_token_ids(llama3) == {llama3.convert_tokens_to_ids("<|eot_id|>")}


@pytest.mark.parametrize("response", RESPONSES)
def test_mask_is_exactly_the_response_and_its_end_of_turn(tokenizer_and_eot, response):
    tokenizer, eot = tokenizer_and_eot
    prompt = [{"role": "user", "content": "Say something."}]
    encoded = encode_response(tokenizer, prompt, response)

    assert masked_text(tokenizer, encoded) == response + eot
    assert len(encoded.response_mask) == len(encoded.input_ids)
    # The unmasked part is exactly the generation prompt the policy saw, and nothing follows eot.
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    n_prompt = len(encoded.input_ids) - encoded.num_response_tokens
    assert encoded.input_ids[:n_prompt] == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert encoded.response_mask == [0] * n_prompt + [1] * encoded.num_response_tokens
    assert encoded.input_ids[-1] == tokenizer.convert_tokens_to_ids(eot)


# Printable text: the tokenizer itself drops control characters and cannot encode unassigned code points.
printable = st.text(st.characters(categories=("L", "M", "N", "P", "S", "Zs"), include_characters="\n\t"), max_size=40)


@settings(max_examples=100, deadline=None)
@given(text=printable)
def test_any_printable_response_is_located_under_both_templates(chatml, llama3, text):
    response = text.strip()  # the generator strips responses; Llama-3's template trims them too
    for tokenizer, eot in ((chatml, "<|im_end|>"), (llama3, "<|eot_id|>")):
        encoded = encode_response(tokenizer, [{"role": "user", "content": "Q " + text}], response)
        assert masked_text(tokenizer, encoded) == response + eot


def test_llama3_begin_of_text_appears_once(llama3):
    encoded = encode_response(llama3, [{"role": "user", "content": "Hi"}], "Hello")
    assert encoded.input_ids.count(llama3.bos_token_id) == 1
    assert encoded.input_ids[0] == llama3.bos_token_id


def test_multi_turn_masks_only_the_last_response(tokenizer_and_eot):
    tokenizer, eot = tokenizer_and_eot
    encoded = encode_response(tokenizer, DIALOGUE, "It is 6.")

    assert masked_text(tokenizer, encoded) == "It is 6." + eot
    n_prompt = len(encoded.input_ids) - encoded.num_response_tokens
    context = tokenizer.decode(encoded.input_ids[:n_prompt])
    assert "It is 4." in context and "And 3 + 3?" in context
    # The earlier assistant turn's end-of-turn token is in the context, unmasked.
    assert context.count(eot) >= 2


def test_too_long_raises_with_length_and_limit(chatml):
    encoded = encode_response(chatml, DIALOGUE, "It is 6.")
    n = len(encoded.input_ids)
    assert encode_response(chatml, DIALOGUE, "It is 6.", max_length=n) == encoded
    with pytest.raises(SequenceTooLongError, match=rf"{n} tokens .*limit of {n - 1}"):
        encode_response(chatml, DIALOGUE, "It is 6.", max_length=n - 1)


def test_template_that_changes_the_prompt_is_reported(chatml):
    tokenizer = AutoTokenizer.from_pretrained(chatml.name_or_path)
    # A "thinking" template: the generation prompt opens a block that the history rendering omits.
    tokenizer.chat_template = chatml.chat_template.replace(
        "'<|im_start|>assistant\n' }}", "'<|im_start|>assistant\n<think>' }}"
    )
    with pytest.raises(ResponseEncodingError, match="chat template problem"):
        encode_response(tokenizer, [{"role": "user", "content": "Hi"}], "Hello")


def test_template_without_end_of_turn_is_reported(chatml):
    tokenizer = AutoTokenizer.from_pretrained(chatml.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    tokenizer.chat_template += "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    with pytest.raises(ResponseEncodingError, match="no end-of-turn token"):
        encode_response(tokenizer, [{"role": "user", "content": "Hi"}], "Hello")


@pytest.mark.parametrize("response", ["  Hello", "\nHello"])
def test_response_merging_with_the_prompt_keeps_the_prompt_tokens(chatml, response):
    # ChatML's generation prompt ends in a newline; these responses merge with it when the whole text
    # is tokenized. The context must stay the generation prompt's own tokens, as the policy saw them.
    prompt = [{"role": "user", "content": "Hi"}]
    prompt_text = chatml.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt_ids = chatml(prompt_text, add_special_tokens=False)["input_ids"]
    encoded = encode_response(chatml, prompt, response)
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
    assert masked_text(chatml, encoded) == response + "<|im_end|>"


def test_tokenizer_that_prefixes_every_string_is_reported():
    """A sentencepiece-style tokenizer prepends "▁" to each string it tokenizes, so the response
    cannot be tokenized apart from the prompt, and the whole text does not keep the prompt's tokens."""
    vocab = ["<unk>", "</s>", "▁user:", "▁assistant:", "▁hi", "▁hello", "▁"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ResponseEncodingError, match="cannot be tokenized as a continuation"):
        encode_response(tokenizer, [{"role": "user", "content": "hi"}], "hello")


@pytest.mark.parametrize(
    ("prompt", "response", "message"),
    [
        ([], "Hello", "ending with a user message"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "Hello", "user message"),
        ([{"role": "user", "content": "Hi"}], "Hello<|im_end|> more", "end-of-turn token text"),
        ([{"role": "user", "content": "Hi"}], None, "must be a string"),
    ],
)
def test_bad_input_is_reported(chatml, prompt, response, message):
    with pytest.raises(ResponseEncodingError, match=message):
        encode_response(chatml, prompt, response)


def test_collate_right_pads(chatml):
    short = encode_response(chatml, [{"role": "user", "content": "Hi"}], "Yo")
    long = encode_response(chatml, DIALOGUE, "It is 6.")
    batch = collate([short, long], pad_token_id=-7)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == batch["response_mask"].shape == (2, len(long.input_ids))
    assert batch["input_ids"][0, :n].tolist() == short.input_ids
    assert (batch["input_ids"][0, n:] == -7).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert batch["response_mask"][0, :n].tolist() == short.response_mask
    assert batch["response_mask"][1].tolist() == long.response_mask
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_token_id=0)


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()


def hand_logprob(model, encoded, temperature=1.0) -> tuple[float, float]:
    """Sum of response-token log-probs and mean response entropy, from full logits of the lone sequence."""
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    total, entropy = 0.0, 0.0
    for t, (token, in_response) in enumerate(zip(encoded.input_ids, encoded.response_mask)):
        if in_response:
            total += logp[t - 1, token].item()
            entropy += -(logp[t - 1].exp() * logp[t - 1]).sum().item()
    return total, entropy / encoded.num_response_tokens


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_sequence_logprobs_match_a_hand_computation(chatml, tiny_lm, temperature):
    encoded = [
        encode_response(chatml, [{"role": "user", "content": "Hi"}], "Hello there, how are you today?"),
        encode_response(chatml, DIALOGUE, "It is 6."),
        encode_response(chatml, [{"role": "user", "content": "A much longer question " * 5}], "Ok"),
    ]
    batch = collate(encoded, chatml.pad_token_id)
    with torch.no_grad():
        batched, entropy = sequence_logprobs_and_entropy(tiny_lm, batch, temperature=temperature)
        alone = torch.cat([sequence_logprobs(tiny_lm, collate([e], 0), temperature=temperature) for e in encoded])
    expected = [hand_logprob(tiny_lm, e, temperature) for e in encoded]

    assert batched.dtype == torch.float32 and batched.shape == (3,)
    torch.testing.assert_close(batched, torch.tensor([e[0] for e in expected]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy, torch.tensor([e[1] for e in expected]), rtol=1e-5, atol=1e-4)


def test_sequence_logprobs_carry_grad_and_temperature_matters(chatml, tiny_lm):
    batch = collate([encode_response(chatml, DIALOGUE, "It is 6.")], chatml.pad_token_id)
    logp = sequence_logprobs(tiny_lm, batch)
    logp.sum().backward()
    grads = [p.grad for p in tiny_lm.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    tiny_lm.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert not torch.allclose(sequence_logprobs(tiny_lm, batch, temperature=0.5), logp.detach())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sequence_logprobs(tiny_lm, batch, temperature=0.0)


def test_sequence_logprobs_reject_a_batch_without_response(chatml, tiny_lm):
    batch = collate([encode_response(chatml, DIALOGUE, "It is 6.")], chatml.pad_token_id)
    batch["response_mask"].zero_()
    with pytest.raises(ValueError, match="at least one response token"):
        sequence_logprobs(tiny_lm, batch)


def test_a_reply_ending_on_another_listed_eos_is_trained_and_an_unencodable_one_is_dropped(smollm2_dir, tmp_path):
    from collections import Counter

    from transformers import GenerationConfig

    from refuel_agents.tuples import encode_tuples

    # Llama-3-Instruct: the template ends a turn with <|eot_id|>; the generation config also lists <|end_of_text|>
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|end_of_text|>"]})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    end_of_text, eot = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    tokenizer.save_pretrained(tmp_path)
    GenerationConfig(eos_token_id=[end_of_text, eot]).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # as the trainer loads it: beside its checkpoint
    words = tokenizer("It is six", add_special_tokens=False)["input_ids"]
    state = [{"role": "user", "content": "Hi"}]

    def row(ids, finish="stop"):
        return {"state": state, "response": "It is six", "response_prime": "It is six",
                "response_token_ids": ids, "response_finish_reason": finish,
                "response_prime_token_ids": words, "response_prime_finish_reason": "length"}

    kept, too_long = encode_tuples([row([*words, end_of_text])], tokenizer, 512)
    assert len(kept) == 1 and too_long == 0  # raised ResponseEncodingError, which ended the iteration
    masked = [i for i, m in zip(kept[0]["input_ids"], kept[0]["response_mask"]) if m]
    assert masked == [*words, end_of_text]  # exactly the sampled tokens, the eos that stopped it included
    reasons = Counter()
    kept, too_long = encode_tuples([row(words), row([*words, end_of_text])], tokenizer, 512, reasons)
    assert len(kept) == 1 and too_long == 0 and sum(reasons.values()) == 1  # 'stop' on no end token: dropped
    assert "must end with its sampled end-of-turn token" in next(iter(reasons))
    with pytest.warns(UserWarning, match="dropped 1 of 1 tuples whose responses cannot be encoded"):
        assert encode_tuples([row(words)], tokenizer, 512) == ([], 0)
