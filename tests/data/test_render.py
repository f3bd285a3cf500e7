import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from spinlm.data.chat import Conversation, Turn
from spinlm.data.render import ChatRenderer, conversation_to_messages, find_end_marker
from spinlm.errors import ConfigError, DataError
from spinlm.model.tiny import build_tiny_tokenizer

NEMO_TOKENS = {
    "system_turn_start": "<extra_id_0>",
    "turn_start": "<extra_id_1>",
    "label_start": "<extra_id_2>",
    "end_of_turn": "\n",
    "end_of_name": "\n",
}
SINGLE = Conversation((Turn("user", "What is 12 + 7?"), Turn("assistant", "The answer is 19.")), system="Be brief.")
MULTI = Conversation(
    (
        Turn("user", "Hello!"),
        Turn("assistant", "How can I help you today?"),
        Turn("user", "What is 12 + 7?"),
        Turn("assistant", "19."),
    )
)


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return ChatRenderer(tokenizer)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_messages_include_system_first():
    assert conversation_to_messages(SINGLE) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": "The answer is 19."},
    ]
    assert conversation_to_messages(MULTI)[0]["role"] == "user"


def test_prompt_is_the_generation_prompt(tokenizer, renderer):
    prompt_ids, _ = renderer.render(SINGLE)
    gen_prompt = tokenizer.apply_chat_template(
        conversation_to_messages(SINGLE)[:-1], tokenize=False, add_generation_prompt=True
    )
    assert gen_prompt.endswith("<|im_start|>assistant\n")
    assert prompt_ids == encode(tokenizer, gen_prompt)


def test_prompt_and_answer_are_the_template_text_span(tokenizer, renderer):
    prompt_ids, answer_ids = renderer.render(SINGLE)
    full = tokenizer.apply_chat_template(conversation_to_messages(SINGLE), tokenize=False)
    span_end = full.index("<|im_end|>", full.index("The answer is 19.")) + len("<|im_end|>")
    prompt_text, answer_text = renderer.render_text(SINGLE)
    assert prompt_text + answer_text == full[:span_end]
    assert answer_text == "The answer is 19.<|im_end|>"
    assert prompt_ids + answer_ids == encode(tokenizer, prompt_text) + encode(tokenizer, answer_text)
    assert answer_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "\n" not in tokenizer.decode(answer_ids)


def test_multi_turn_keeps_earlier_turns_in_prompt(tokenizer, renderer):
    prompt_ids, answer_ids = renderer.render(MULTI)
    prompt = tokenizer.decode(prompt_ids)
    assert "How can I help you today?<|im_end|>" in prompt
    assert prompt.endswith("What is 12 + 7?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(answer_ids) == "19.<|im_end|>"


def test_end_strings_default(renderer):
    assert renderer.end_strings == ["<|im_end|>"]


def test_template_without_end_marker_gets_eos_appended():
    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    prompt_text, answer_text = ChatRenderer(tok).render_text(SINGLE)
    assert prompt_text.endswith("user: What is 12 + 7?\nassistant: ")
    assert answer_text == "The answer is 19.\n<|im_end|>"


def test_template_that_cannot_split_is_a_clear_error():
    tok = build_tiny_tokenizer()
    # Puts the generation prompt on its own line: the full text does not start with it.
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\nGO:' }}{% endif %}"
    )
    with pytest.raises(DataError, match="cannot split prompt and answer"):
        ChatRenderer(tok)


def test_end_marker_is_searched_after_the_content():
    text = "say <|im_end|> please<|im_end|>\n"
    assert find_end_marker(text, "say <|im_end|> please", ["<|im_end|>"]) == ("<|im_end|>", len(text) - 1)


def test_nemo_mode_text_is_exact(tokenizer):
    renderer = ChatRenderer(tokenizer, NEMO_TOKENS)
    prompt_ids, answer_ids = renderer.render(MULTI)
    assert tokenizer.decode(prompt_ids) == (
        "<extra_id_0>System\n\n"
        "<extra_id_1>User\nHello!\n"
        "<extra_id_1>Assistant\nHow can I help you today?\n"
        "<extra_id_1>User\nWhat is 12 + 7?\n"
        "<extra_id_1>Assistant\n"
    )
    assert tokenizer.decode(answer_ids) == "19.\n<extra_id_1>"
    prompt_text, _ = renderer.render_text(SINGLE)
    assert prompt_text.startswith("<extra_id_0>System\nBe brief.\n<extra_id_1>User\n")
    assert renderer.end_strings == ["<extra_id_1>", "<|im_end|>"]


def test_nemo_mode_missing_key():
    tokens = {k: v for k, v in NEMO_TOKENS.items() if k != "end_of_name"}
    with pytest.raises(ConfigError, match="end_of_name"):
        ChatRenderer(build_tiny_tokenizer(), tokens)


@pytest.mark.parametrize("nemo", [False, True])
def test_earlier_answer_mask_marks_exactly_the_earlier_answers(tokenizer, nemo):
    renderer = ChatRenderer(tokenizer, NEMO_TOKENS if nemo else None)
    prompt_ids, _ = renderer.render(MULTI)
    mask = renderer.earlier_answer_mask(MULTI)
    assert len(mask) == len(prompt_ids)
    marked = tokenizer.decode([t for t, m in zip(prompt_ids, mask) if m])
    # the earlier answer with its end-of-turn marker, as a final answer is rendered
    assert marked == ("How can I help you today?\n<extra_id_1>" if nemo else "How can I help you today?<|im_end|>")
    assert renderer.earlier_answer_mask(SINGLE) == [False] * len(renderer.render(SINGLE)[0])
