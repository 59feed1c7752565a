"""Streaming text never splits a UTF-8 character and stop strings cut text exactly."""

from __future__ import annotations

from decoding.detokenizer import IncrementalDetokenizer, StopMatcher


def test_incremental_text_equals_full_decode(default_model):
    _, tokenizer, _ = default_model
    text = "Grüße aus Köln! 東京タワー 🚀🎉 naïve café — done."
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some emoji/CJK tokens were held back until complete


def test_stop_string_cuts_and_holds_back():
    stopper = StopMatcher(("###", "END"))
    assert not stopper.add("Hello wor")
    assert stopper.pop(final=False) == "Hello wor"
    assert not stopper.add("ld #")
    assert stopper.pop(final=False) == "ld "  # "#" may start "###": held back
    assert not stopper.add("#")
    assert stopper.pop(final=False) == ""
    assert stopper.add("# tail")
    assert stopper.text == "Hello world "
    assert stopper.pop(final=True) == ""


def test_stop_string_spanning_deltas():
    stopper = StopMatcher(("\n\n",))
    assert not stopper.add("one\n")
    assert stopper.add("\ntwo")
    assert stopper.pop(final=True) == "one"


def test_no_stop_strings_emit_everything():
    stopper = StopMatcher(())
    assert not stopper.add("abc")
    assert stopper.pop(final=False) == "abc"
