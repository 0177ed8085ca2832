"""Subject anchors: naming a fact's subject, finding it in token ids, and edits trained with one."""

import pytest

from memserve.facts import Fact
from memserve.subjects import AnchorIndex, anchor_tokens, infer_subject, is_short_name


@pytest.mark.parametrize("prompt, subject", [
    ("What is the capital of Australia?", "Australia"),
    ("Which programming language is Openfire written in?", "Openfire"),
    ("Who set the standards for ISO 3166-2:VE?", "ISO 3166-2:VE"),
    ("In Colombia, they understand", "Colombia"),
    ("What is the twin city of Wellington? It is", "Wellington"),
    ("Francisco Serrano, 1st Duke of la Torre found employment in", "Francisco Serrano"),
    ("Vincent van Gogh worked in the city of", "Vincent van Gogh"),
    ("Where was Kanye West's first concert?", "Kanye West"),
    ("millennialism works as a", None),
])
def test_infer_subject_takes_the_longest_name(prompt, subject):
    assert infer_subject(prompt) == subject


def test_anchor_index_finds_contiguous_variants_only():
    index = AnchorIndex()
    index.add(0, [[5, 6], [9, 6]])
    index.add(1, [[6]])
    assert index.mentioned([1, 5, 6]) == {0, 1}
    assert index.mentioned([9, 7, 6, 5]) == {1}  # 9 and 6 not adjacent
    assert index.mentioned([]) == set() and index.anchored == {0, 1}


@pytest.mark.parametrize("text, last", [
    ("Danielle Darrieux grew up in Paris. The mother tongue of Danielle Darrieux is",
     " The mother tongue of Danielle Darrieux is"),
    ("What is the capital of France?", "What is the capital of France?"),  # a final "?" opens nothing
    ("First! Then \"a quote.\" Second? Third is", " Third is"),
    ("The U.S. Army is based in", " Army is based in"),  # as the text rule: "S." then a space ends one
    ("One.\nTwo is", "\nTwo is"),
    ("Version 3.5 of Python is", "Version 3.5 of Python is"),  # no space after the dot
])
def test_last_sentence_of_a_routing_span(default_model_dir, text, last):
    from transformers import AutoTokenizer

    from memserve.chat import ChatFormat

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[ChatFormat(tokenizer).last_sentence_start(ids):]) == last


def test_anchor_tokens_cover_the_subject_at_the_start_inside_and_glued(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    variants = anchor_tokens(tokenizer, "Canada", "Is Canada's capital Ottawa?")
    index = AnchorIndex()
    index.add(0, variants)
    for text in ("Canada is big", "What is the capital of Canada?", "Tell me about Canada's capital."):
        assert index.mentioned(tokenizer(text, add_special_tokens=False)["input_ids"]) == {0}, text
    for text in ("What is the capital of Australia?", "canadian winters"):
        assert index.mentioned(tokenizer(text, add_special_tokens=False)["input_ids"]) == set(), text


def test_same_template_question_about_another_subject_does_not_reach_the_edit(tiny_model_dir):
    """End to end through the trainer, the store and the reference path (tiny random model): the
    edited question and a rephrase naming the subject reach the edit; the same question about
    another country never does, even though its key is nearly the edit's own."""
    import tempfile
    from pathlib import Path

    from memserve.editor import load_reference, open_session

    from .conftest import tiny_config

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        facts = [Fact("What is the capital of Australia?", "Sydney", ("Which city is Australia's capital?",))]
        runner = open_session(store, model_path=tiny_model_dir, config=tiny_config(tau=0.0), facts=facts)
        runner.apply(facts)
        record = runner.store.record(0)
        runner.store.close()
        assert record["anchors"] and record["fact"].get("subject") is None  # inferred: "Australia"
        assert "anchor_suffices" not in record  # "Australia" is one word of a question: the key still decides
        edited = load_reference(store)
        prompts = ["What is the capital of Australia?", "Which city is Australia's capital?", "What is the capital of Austria?"]
        for chat in (False, True):
            ids = [edited.chat.format(p) if chat else edited.encode(p) for p in prompts]
            _, routes = edited.generate(ids, 1)
            assert routes.tolist()[0] == 0 and routes.tolist()[2] == -1, (chat, routes)
            explained = edited.explain(ids[2])
            assert explained["candidates"][0]["subject_named"] is False


def test_an_edit_whose_prompt_is_its_subject_is_marked_sufficient(tiny_model_dir):
    from memserve.editor import load_memory, open_session
    from memserve.models import down_proj

    from .conftest import tiny_config

    facts = [Fact("5G is", "a cellular network standard", subject="5G is"), Fact("Who founded Acme Robotics?", "Dana")]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        runner = open_session(Path(tmp) / "store", model_path=tiny_model_dir, config=tiny_config(steps=2), facts=facts)
        runner.apply(facts)
        records = [runner.store.record(i) for i in range(2)]
        memory = load_memory(runner.store, down_proj(runner.edited.model, runner.edited.layer).weight)
        runner.store.close()
    assert records[0].get("anchor_suffices") is True and "anchor_suffices" not in records[1]
    assert memory.anchors.sufficient == {0} and memory.anchors.anchored == {0, 1}


@pytest.mark.parametrize("prompt, subject, suffices", [
    ("5G is", "5G", True), ("Climate change", "Climate change", True), ("Meghan Markle,", "Meghan Markle", True),
    ("Who founded Acme Robotics?", "Acme Robotics", False), ("Danielle Darrieux's mother tongue is", "Danielle Darrieux", False),
])
def test_naming_the_subject_suffices_only_when_the_prompt_asks_nothing_else(prompt, subject, suffices):
    from memserve.subjects import subject_suffices

    assert subject_suffices(prompt, subject) is suffices


@pytest.mark.parametrize("subject, name, short", [
    ("5G is", "5G", True), ("Oslo Airport, Gardermoen", "Oslo Airport", True),
    ("The Icelandic Dream", "Icelandic Dream", True), ("Dr. Anthony", "Anthony", True),
    ("iPhone 5", "5", False), ("St. Louis", "Louis", False), ("La dama boba", "La", False),
    ("Barnstable (village), Massachusetts", "Massachusetts", False), ("Lost in Space", "Space", False),
    ("Kanye West", "Kanye West", False),
])
def test_a_name_inferred_inside_the_subject_anchors_only_when_it_is_how_the_subject_begins(subject, name, short):
    """The anchor keeps a shorter name for the subject only when it begins the subject: a fragment from
    its middle or end ("5" of "iPhone 5") would let "Renault 5, developed by" reach the iPhone edit."""
    assert is_short_name(subject, name) is short
