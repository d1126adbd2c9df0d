"""Chat templates render as HF transformers renders them, and text streams never split a character.

The expected prompts are written out by hand from the ChatML rule (each message as
`<|im_start|>role\\n...<|im_end|>\\n`), not by running the renderer under test.
"""
from __future__ import annotations

import pytest

from model.chat import ChatTemplate, ChatTemplateError, message_text
from model.demo_tokenizer import CHAT_TEMPLATE
from model.errors import InputError, PackageError
from model.tokenizer import ByteTokenizer, TextStream

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Torque check, Line 4?"}]


def test_chatml_renders_each_message_then_opens_the_assistant_turn():
    text = ChatTemplate(CHAT_TEMPLATE).render(MESSAGES)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTorque check, Line 4?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert ChatTemplate(CHAT_TEMPLATE).render(MESSAGES, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_blocks_are_trimmed_as_transformers_trims_them():
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before it
    template = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert ChatTemplate(template).render(MESSAGES) == "[Torque check, Line 4?]\n"


def test_special_tokens_are_template_variables():
    template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    assert ChatTemplate(template, "<s>", "</s>").render(MESSAGES[1:]) == "<s>Torque check, Line 4?</s>"


def test_a_template_that_raises_refuses_the_request_with_its_own_words():
    template = ("{% if messages[0].role != 'user' %}{{ raise_exception('the first message must be the user') }}"
                "{% endif %}ok")
    with pytest.raises(ChatTemplateError, match="the first message must be the user"):
        ChatTemplate(template).render(MESSAGES)
    assert ChatTemplate(template).render(MESSAGES[1:]) == "ok"
    assert issubclass(ChatTemplateError, InputError)  # the request is at fault: a 400, not a 500


def test_a_template_that_does_not_compile_is_the_packages_fault():
    with pytest.raises(PackageError, match="chat template"):
        ChatTemplate("{% for m in messages %}")


def test_the_sandbox_refuses_reaching_out_of_the_template():
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(template).render(MESSAGES)


@pytest.mark.parametrize("messages,mention", [
    ([], "at least one message"), ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user", "content": 3}], "content"),
])
def test_malformed_messages_are_refused(messages, mention):
    with pytest.raises(InputError, match=mention):
        ChatTemplate(CHAT_TEMPLATE).render(messages)


def test_openai_content_parts_flatten_to_text():
    assert message_text([{"type": "text", "text": "Line "}, {"type": "text", "text": "4"}]) == "Line 4"
    assert message_text(None) == ""
    with pytest.raises(InputError, match="image_url"):
        message_text([{"type": "image_url", "image_url": {"url": "x"}}])


def test_text_stream_holds_a_character_until_its_last_byte():
    ids = list("Grüße".encode())
    stream = TextStream(ByteTokenizer())
    pieces = [stream.feed(i)[0] for i in ids]
    assert "".join(pieces) + stream.flush() == "Grüße"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[2] == ""  # the first byte of ü alone is no text yet


def test_text_stream_stops_before_a_stop_string_split_over_tokens():
    stream = TextStream(ByteTokenizer(), stop=("END",))
    out, stopped = [], False
    for i in "abcENxyzEND tail".encode():
        piece, stopped = stream.feed(i)
        out.append(piece)
        if stopped:
            break
    assert stopped and "".join(out) == "abcENxyz"
