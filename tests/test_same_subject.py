"""`benchmarks/same_subject.py`: questions that name an edited subject but ask something else."""

import importlib.util
import json
from pathlib import Path

from memserve.facts import Fact, read_facts

spec = importlib.util.spec_from_file_location("same_subject", Path(__file__).parents[1] / "benchmarks" / "same_subject.py")
same_subject = importlib.util.module_from_spec(spec)
spec.loader.exec_module(same_subject)

FACTS = [
    Fact("Toko Yasuda plays the instrument", "piano", subject="Toko Yasuda", line=1, source="f"),
    Fact("Danielle Darrieux speaks the language", "French", subject="Danielle Darrieux", line=2, source="f"),
    Fact("Paris is the capital of", "France", subject="Paris", line=3, source="f"),
    Fact("Ringo Starr plays the instrument", "drums", subject="Ringo Starr", line=4, source="f"),
    Fact("The {odd} band was formed in", "1990", subject="The {odd} band", line=5, source="f"),
    Fact("Who is Cher?", "a singer", subject=None, line=6, source="f"),
]


def test_probes_name_the_subject_in_another_facts_template_of_another_relation():
    probes = same_subject.same_subject_probes(FACTS, per_fact=5)
    by_edit: dict[str, list[dict]] = {}
    for probe in probes:
        by_edit.setdefault(probe["edit"], []).append(probe)
    assert set(by_edit) == {"f:1", "f:2", "f:3", "f:4", "f:5"}  # no subject, no probes
    # Toko Yasuda: never the instrument template again (Ringo Starr's shares "plays", "instrument")
    assert sorted(p["prompt"] for p in by_edit["f:1"]) == [
        "Toko Yasuda is the capital of", "Toko Yasuda speaks the language", "Toko Yasuda was formed in"]
    assert all(p["subject"] == "Toko Yasuda" and p["target_new"] != "piano" for p in by_edit["f:1"])
    assert "The {odd} band speaks the language" in [p["prompt"] for p in by_edit["f:5"]]  # braces are text
    assert same_subject.same_subject_probes(FACTS, per_fact=5) == probes  # seeded


def test_shipped_probes_are_read_as_never_edited_questions():
    data = Path(__file__).parents[1] / "benchmarks" / "data"
    for name in ("counterfact", "zsre"):
        path = data / f"{name}_same_subject.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        facts, skipped = read_facts(path)
        assert not skipped and len(facts) == len(rows) >= 1990
        assert all(row["subject"] in row["prompt"] for row in rows)


def test_shipped_probes_are_what_the_generator_writes(monkeypatch):
    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)  # the probes name their edit by the facts file's path as given
    for name, source in (("counterfact", "counterfact_dev"), ("zsre", "zsre_train_1k")):
        facts, _ = read_facts(f"benchmarks/data/{source}.jsonl", skip_invalid=True)
        shipped = [json.loads(line) for line in (root / "benchmarks" / "data" / f"{name}_same_subject.jsonl").read_text().splitlines()]
        assert same_subject.same_subject_probes(facts) == shipped
