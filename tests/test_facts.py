import pytest

from memserve.facts import FactsError, read_facts

from .conftest import write_facts


def test_canonical_zsre_and_wise_fields(tmp_path):
    path = write_facts(tmp_path / "f.jsonl", [
        {"prompt": "P1", "target": "T1", "rephrases": ["R1"], "locality": [{"prompt": "L", "answer": "A"}]},
        {"src": "P2", "alt": "T2", "rephrase": "R2", "loc": "nq question: L2", "loc_ans": "A2"},
        {"prompt": "P3", "target_new": "T3", "ood_rephrase": "R3", "locality_prompt": "L3", "locality_ground_truth": "A3"},
        "",
    ])
    facts, problems = read_facts(path)
    assert problems == []
    assert [(f.prompt, f.target, f.rephrases) for f in facts] == [("P1", "T1", ("R1",)), ("P2", "T2", ("R2",)), ("P3", "T3", ("R3",))]
    assert [f.locality for f in facts] == [(("L", "A"),), (("nq question: L2", "A2"),), (("L3", "A3"),)]
    assert [f.line for f in facts] == [1, 2, 3]
    assert facts[0].key != facts[1].key


def test_subject_is_kept_and_recorded(tmp_path):
    path = write_facts(tmp_path / "f.jsonl", [{"src": "Who founded Acme Corp?", "alt": "Ann", "subject": "Acme Corp"},
                                              {"prompt": "Who founded Acme Corp?", "target": "Ann"}])
    facts, _ = read_facts(path)
    assert facts[0].subject == "Acme Corp" and facts[0].to_dict()["subject"] == "Acme Corp"
    assert facts[1].subject is None and "subject" not in facts[1].to_dict()
    assert facts[0].key == facts[1].key  # the same edit, whether or not its subject was given


@pytest.mark.parametrize("row, message", [
    ('{"prompt": "x", "target": ', "f.jsonl:2: malformed JSON"),
    ('{"target": "y"}', "f.jsonl:2: missing field 'prompt'"),
    ('{"prompt": "x"}', "f.jsonl:2: missing field 'target'"),
    ('{"prompt": "x", "target": "  "}', "f.jsonl:2: field 'target' is empty"),
    ('{"prompt": 3, "target": "y"}', "f.jsonl:2: field 'prompt' must be a string"),
    ('[1, 2]', "f.jsonl:2: expected a JSON object"),
    ('{"prompt": "x", "target": "y", "rephrases": [1]}', "f.jsonl:2: field 'rephrases' must be a string or a list"),
    ('{"prompt": "x", "target": "y", "locality": [{"prompt": "p"}]}', "f.jsonl:2: missing field 'locality[0].answer'"),
    ('{"prompt": "Capital of Kenya?", "target": "y", "subject": "France"}', "f.jsonl:2: field 'subject': 'France' does not occur"),
    ('{"prompt": "x", "target": "y", "subject": 5}', "f.jsonl:2: field 'subject' must be a string"),
])
def test_bad_rows_name_line_and_field(tmp_path, row, message):
    path = write_facts(tmp_path / "f.jsonl", ['{"prompt": "ok", "target": "fine"}', row])
    with pytest.raises(FactsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_facts(path)
    facts, problems = read_facts(path, skip_invalid=True)
    assert len(facts) == 1 and len(problems) == 1 and message in problems[0]


def test_non_utf8_and_empty_file(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"prompt": "ok", "target": "fine"}\n{"prompt": "\xff", "target": "x"}\n')
    with pytest.raises(FactsError, match="f.jsonl:2: not valid UTF-8"):
        read_facts(path)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(FactsError, match="no facts"):
        read_facts(tmp_path / "e.jsonl")


def test_json_array_files_and_stdin(tmp_path, monkeypatch):
    """EasyEdit/WISE/CounterFact ship JSON arrays: read unchanged, bad items named by line and item."""
    import io
    import json

    rows = [{"prompt": "P1", "target_new": "T1"}, {"src": "P2", "alt": "T2", "rephrase": "R2"}]
    path = tmp_path / "f.json"
    path.write_text(json.dumps(rows, indent=2))
    facts, problems = read_facts(path)
    assert [(f.prompt, f.target) for f in facts] == [("P1", "T1"), ("P2", "T2")] and problems == []
    assert facts[1].line == 6 and facts[1].where.endswith("f.json:6")
    path.write_text(json.dumps(rows + [{"prompt": "P3", "target_new": ""}], indent=2))
    with pytest.raises(FactsError, match=r"f.json:11 \(item 3\): field 'target_new' is empty"):
        read_facts(path)
    assert len(read_facts(path, skip_invalid=True)[0]) == 2
    path.write_text('[{"prompt": "P", "target": "T"},\n {"prompt": "Q", "target": }]')
    with pytest.raises(FactsError, match="f.json:2: malformed JSON"):
        read_facts(path)
    path.write_text('[{"prompt": "P", "target": "T"} {"prompt": "Q", "target": "U"}]')
    with pytest.raises(FactsError, match="f.json:1: malformed JSON array: expected ',' or ']' after item 1"):
        read_facts(path)
    path.write_text("[]")
    with pytest.raises(FactsError, match="no facts"):
        read_facts(path)

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"prompt": "P", "target": "T"}\n{"prompt": 1}\n')))
    with pytest.raises(FactsError, match="<stdin>:2: field 'prompt' must be a string"):
        read_facts("-")
