"""Which layer routes best: MEMOIR's TopHash overlap between a fact's prompt and its rephrase,
against unrelated prompts, at every layer of the model (no editing: the masks of the edit prompts
are all a stream would store). This is how MEMOIR's default layer and tau were chosen.

Per layer: the share of rephrases whose best-overlapping edit is their own (top1), the share that
reach their own edit above every unrelated prompt's best overlap (hit at zero false routes, the tau
that would separate them), and the share of the dataset's questions that another fact's edit would
capture at the default tau if they were not edited themselves (same-source locality). Writes JSON and a PNG.

    .venv/bin/python benchmarks/routing_layers.py --json benchmarks/results/routing_layers.json \
        --plot benchmarks/results/routing_layers.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memserve.editor import background_prompts
from memserve.facts import read_facts
from memserve.machine import describe
from memserve.methods import MemoirConfig, MemoirMemory
from memserve.models import down_proj, load_model

DATA = Path(__file__).resolve().parent / "data"  # shipped with the repository (data/README.md)


@torch.no_grad()
def prompt_means(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """[layers, prompts, I]: each prompt's mean down_proj input at every layer."""
    layers = len(model.model.layers)
    caught: list[torch.Tensor | None] = [None] * layers
    hooks = [
        down_proj(model, i).register_forward_pre_hook(lambda _m, inp, i=i: caught.__setitem__(i, inp[0][0].mean(0)))
        for i in range(layers)
    ]
    out = []
    try:
        for prompt in prompts:
            model(torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]]))
            out.append(torch.stack(caught))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(out, dim=1)


def layer_scores(memory: MemoirMemory, background: torch.Tensor, edits, rephrases, unrelated) -> dict:
    memory.calibrate(background.mean(0))
    for mean in edits:
        memory.add_edit(memory.key(mean[None]))
    reph = memory.overlaps(memory.key(rephrases))  # [facts, edits]
    own = reph.diagonal()
    top1 = reph.argmax(1) == torch.arange(len(own))
    threshold = memory.overlaps(memory.key(unrelated)).max().item()
    # Each fact's own question against the OTHER facts' keys: would it be hijacked by another edit
    # of the same source if it had not been edited itself? (Same-template questions, e.g. "What
    # university did X attend?", share most of their prompt mean.)
    others = memory.overlaps(memory.key(edits)).fill_diagonal_(0).max(1).values
    return {
        "top1": top1.float().mean().item(),
        "hit_at_zero_false_routes": ((own > threshold) & top1).float().mean().item(),
        "max_unrelated_overlap": threshold,
        "rephrase_overlap_median": own.median().item(),
        "unedited_question_routed": (others >= memory.config.tau).float().mean().item(),
        "unedited_question_overlap_median": others.median().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--top-k", type=int, default=MemoirConfig.top_k)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    facts, _ = read_facts(DATA / f"{args.dataset}_dev.jsonl", skip_invalid=True)
    facts = [f for f in facts if f.rephrases and f.locality]
    model, tokenizer = load_model()
    means = {
        name: prompt_means(model, tokenizer, prompts)
        for name, prompts in {
            "background": background_prompts(),
            "edits": [f.prompt for f in facts],
            "rephrases": [f.rephrases[0] for f in facts],
            "unrelated": [f.locality[0][0] for f in facts],
        }.items()
    }
    rows = []
    for layer in range(len(model.model.layers)):
        memory = MemoirMemory(MemoirConfig(layer=layer, top_k=args.top_k), down_proj(model, layer).weight)
        scores = layer_scores(memory, *(means[n][layer] for n in ("background", "edits", "rephrases", "unrelated")))
        rows.append({"layer": layer, **scores})
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"dataset": args.dataset, "facts": len(facts), "top_k": args.top_k, "layers": rows,
                                      "machine": describe()}, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        x = [r["layer"] for r in rows]
        ax.plot(x, [r["top1"] for r in rows], "o-", label="rephrase's best overlap is its own edit")
        ax.plot(x, [r["hit_at_zero_false_routes"] for r in rows], "s-", label="...and above every unrelated prompt")
        ax.plot(x, [r["max_unrelated_overlap"] for r in rows], ":", color="grey", label="max unrelated overlap (tau floor)")
        ax.plot(x, [r["unedited_question_routed"] for r in rows], "^--", color="tab:red",
                label=f"unedited question -> another edit (tau {MemoirConfig.tau})")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"share of {len(facts)} {args.dataset} rephrases")
        ax.set_title(f"MEMOIR TopHash routing by layer (top_k {args.top_k}, SmolLM2-135M)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
