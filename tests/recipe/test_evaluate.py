"""The evaluation's rows: numbers typed for the scorer, and under a chat format the prompt the model reads is the
one training rendered before the assistant's turn."""

from __future__ import annotations

from helpers import CHAT_TEMPLATE, tiny_tokenizer, write_jsonl

from loramix.recipe.evaluate import eval_rows
from loramix.science.scoring import prompt_text
from loramix.training.data import DataFormat, DataSource, chat_turns, tokenize_row


def test_chat_rows_are_scored_on_the_prompt_training_rendered(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    raw = {"prompt": "r ab=", "completion": "ba", "choices": ["ba", "ab"], "answer": "0", "target": "1.50"}
    path = write_jsonl(tmp_path / "t.jsonl", [raw])
    fmt = DataFormat(chat=True, system_prompt="be brief")
    (row,) = eval_rows(DataSource(path), fmt)
    assert (row["answer"], row["target"]) == (0, 1.5)
    # training: the tokens before the assistant's trained turn are the chat of the turns before it
    example = tokenize_row(raw, fmt, tok)
    untrained = [i for i, label in zip(example.input_ids, example.labels) if label == -100]
    assert tok(prompt_text(row, tok), add_special_tokens=False)["input_ids"] == untrained
    assert prompt_text(row, tok) == tok.apply_chat_template(chat_turns(raw, fmt)[:-1], tokenize=False,
                                                            add_generation_prompt=True)
    # without a chat format the prompt is read as it is
    (plain,) = eval_rows(DataSource(path), DataFormat())
    assert prompt_text(plain, tok) == "r ab="


def test_rows_that_bring_messages_are_scored_as_the_format_trains_them(tmp_path):
    """Packaged rows carry ready-made messages (no system turn); the format decides what the model reads: the
    system prompt of a chat format is there, a plain format reads the plain prompt (a base without a chat
    template must not be sent through one), a template format its rendered prompt."""
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    raw = {"prompt": "r ab=", "completion": "ba", "choices": ["ba", "ab"], "answer": 0,
           "messages": [{"role": "user", "content": "r ab="}, {"role": "assistant", "content": "ba"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [raw])
    fmt = DataFormat(chat=True, system_prompt="be brief")
    (row,) = eval_rows(DataSource(path), fmt)
    example = tokenize_row(raw, fmt, tok)
    untrained = [i for i, label in zip(example.input_ids, example.labels) if label == -100]
    assert tok(prompt_text(row, tok), add_special_tokens=False)["input_ids"] == untrained
    assert row["messages"][0] == {"role": "system", "content": "be brief"}
    (plain,) = eval_rows(DataSource(path), DataFormat())
    assert "messages" not in plain and prompt_text(plain, tok) == "r ab="
    templated = DataFormat(prompt_template="Q: {prompt}\nA:", completion_template=" {completion}")
    (row,) = eval_rows(DataSource(path), templated)
    assert prompt_text(row, tok) == "Q: r ab=\nA:" and row["completion"] == " ba"
