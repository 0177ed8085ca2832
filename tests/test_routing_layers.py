"""`benchmarks/routing_layers.py` scoring (how MEMOIR's layer and tau were chosen), on random tensors."""

import importlib.util
from pathlib import Path

import torch

from memserve.methods import MemoirConfig, MemoirMemory

spec = importlib.util.spec_from_file_location("routing_layers", Path(__file__).parents[1] / "benchmarks" / "routing_layers.py")
routing_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(routing_layers)


def test_layer_scores_count_rephrases_above_every_unrelated_prompt():
    torch.manual_seed(0)
    edits = torch.randn(6, 64)
    rephrases = edits + 0.1 * torch.randn(6, 64)
    rephrases[5] = torch.randn(64)  # a rephrase that looks like nothing it belongs to
    unrelated = torch.randn(6, 64)
    memory = MemoirMemory(MemoirConfig(layer=0, top_k=16), torch.randn(8, 64))
    scores = routing_layers.layer_scores(memory, torch.zeros(4, 64), edits, rephrases, unrelated)
    assert round(scores["top1"] * 6) == 5 and round(scores["hit_at_zero_false_routes"] * 6) == 5
    assert scores["max_unrelated_overlap"] < 1.0
    unrelated[0] = edits[0]  # an unrelated prompt identical to an edit: no tau separates them now
    memory = MemoirMemory(MemoirConfig(layer=0, top_k=16), torch.randn(8, 64))
    scores = routing_layers.layer_scores(memory, torch.zeros(4, 64), edits, rephrases, unrelated)
    assert scores["max_unrelated_overlap"] == 1.0 and scores["hit_at_zero_false_routes"] == 0.0


def test_layer_scores_count_questions_another_edit_would_capture():
    torch.manual_seed(0)
    edits = torch.randn(6, 512)
    edits[1] = edits[0] + 0.05 * torch.randn(512)  # two near-identical questions (same template)
    memory = MemoirMemory(MemoirConfig(layer=0, top_k=64, tau=0.5), torch.randn(8, 512))
    scores = routing_layers.layer_scores(memory, torch.zeros(4, 512), edits, edits, torch.randn(6, 512))
    assert round(scores["unedited_question_routed"] * 6) == 2  # 0 and 1 capture each other, nobody else
