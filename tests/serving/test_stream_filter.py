"""Streamed chat content equals non-streamed content, however the text is split.

A client sends the assistant message back on its next turn; when the streamed content
differed (it kept the whitespace before a tool call), the chat template rendered other
tokens than the ones sampled and the turns no longer merged into one training sequence.
"""

from hypothesis import given
from hypothesis import strategies as st

from lightning.serving._chat import ToolCallStreamFilter, parse_tool_calls

_call = st.sampled_from([
    '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>',
    '<tool_call>{"name": "x"}</tool_call>',
    "<tool_call>not json</tool_call>",
    "<tool_",
])
_text = st.text(st.sampled_from(list("ab <>\n\t_")), max_size=12)


@given(parts=st.lists(st.one_of(_text, _call), max_size=5), cuts=st.lists(st.integers(0, 200)))
def test_streamed_content_is_the_non_streamed_content(parts, cuts):
    text = "".join(parts)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    f = ToolCallStreamFilter()
    shown = "".join(f.feed(text[a:b]) for a, b in zip(bounds, bounds[1:]))
    rest, calls = f.finish()
    content, want_calls = parse_tool_calls(text)
    assert [c["function"] for c in calls] == [c["function"] for c in want_calls]
    if want_calls:
        assert shown + rest == (content or "")
    else:
        assert shown + rest == text


def test_whitespace_before_a_call_is_not_streamed():
    f = ToolCallStreamFilter()
    shown = f.feed("Calling.\n") + f.feed('<tool_call>\n{"name": "m", "arguments": {}}\n</tool_call>')
    rest, calls = f.finish()
    assert shown + rest == "Calling." and len(calls) == 1
