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
    """... and one whose prompt carries its subject on into a longer name is marked so, alike by the
    trainer and when the store is loaded."""
    from memserve.editor import load_memory, open_session
    from memserve.models import down_proj

    from .conftest import tiny_config

    facts = [Fact("5G is", "a cellular network standard", subject="5G is"), Fact("Who founded Acme Robotics?", "Dana"),
             Fact("What league does Lehigh Valley United Sonic play in?", "NPSL", subject="Lehigh Valley United")]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        runner = open_session(Path(tmp) / "store", model_path=tiny_model_dir, config=tiny_config(steps=2), facts=facts)
        runner.apply(facts)
        records = [runner.store.record(i) for i in range(3)]
        trained = runner.edited.memory.anchors
        memory = load_memory(runner.store, down_proj(runner.edited.model, runner.edited.layer).weight)
        runner.store.close()
    assert records[0].get("anchor_suffices") is True and "anchor_suffices" not in records[1]
    assert memory.anchors.sufficient == trained.sufficient == {0} and memory.anchors.anchored == {0, 1, 2}
    assert memory.anchors.open_names == trained.open_names == {2}


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


def test_a_subject_followed_by_a_capitalised_word_is_part_of_a_longer_name():
    index = AnchorIndex()
    index.add(0, [[5, 6]])  # "United Nations"
    index.add(1, [[8]], sufficient=True)  # "The Hong": its prompt is its subject
    index.add(2, [[9]], open_name=True)  # "Lehigh Valley United": its prompt says "... United Sonic"
    capitalised = {7}.__contains__  # " General"
    assert index.mentioned([5, 6, 7, 3], capitalised) == set()  # "United Nations General Assembly"
    assert index.mentioned([5, 6, 7, 5, 6, 3], capitalised) == {0}  # a later whole mention counts
    assert index.mentioned([5, 6, 3], capitalised) == {0} and index.mentioned([1, 5, 6], capitalised) == {0}
    assert index.mentioned([8, 7], capitalised) == {1} and index.mentioned([9, 7], capitalised) == {2}
    assert index.mentioned([5, 6, 7]) == {0}  # without the rule


@pytest.mark.parametrize("prompt, subject, continues", [
    ("What league does Lehigh Valley United Sonic participate in?", "Lehigh Valley United", True),
    ("The official language of United Nations is", "United Nations", False),
    ("Arthur is located in", "Arthur", False), ("Arthur Erickson, Arthur", "Arthur", False),
    ("The Hong", "The Hong", False), ("Who founded Acme?", None, False), ("Where is Paris Émile Zola?", "Paris", True),
])
def test_a_prompt_carries_its_subject_on_only_when_a_capitalised_word_always_follows(prompt, subject, continues):
    from memserve.subjects import name_continues

    assert name_continues(prompt, subject) is continues


def test_capitalised_words_that_continue_a_name_on_the_real_tokenizer(default_model_dir):
    """The anchor of "United Nations" is not named by "United Nations General Assembly" nor by
    "Arthur Erickson" for "Arthur", but is by the plain question, its possessive and its chat turn."""
    from transformers import AutoTokenizer

    from memserve.chat import ChatFormat

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    chat = ChatFormat(tokenizer)
    index = AnchorIndex()
    index.add(0, anchor_tokens(tokenizer, "United Nations", "The official language of United Nations is"))
    index.add(1, anchor_tokens(tokenizer, "Arthur", "Arthur is located in"))

    def named(text):
        return set(index.mentioned(tokenizer(text, add_special_tokens=False)["input_ids"], chat.continues_name))

    assert named("In United Nations General Assembly, they understand") == set()
    assert named("United Nations Office for Outer Space Affairs's headquarters are in") == set()
    assert named("Arthur Erickson's life ended in") == set()
    assert named("The official language of United Nations is") == {0}
    assert named("What do they speak at the United Nations? Arthur is in") == {0, 1}
    assert named("United Nations's language, in Arthur's county") == {0, 1}
    span = chat.format("Where is Arthur")
    start, end = chat.routing_span(span)
    assert set(index.mentioned(span[start:end], chat.continues_name)) == {1}
