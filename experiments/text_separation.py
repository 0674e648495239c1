"""How far apart the text encoder puts the bare names of the training emoji, per kind (issue 16).

For every distinct untoned training name ("red apple", "flag: Japan", "grinning face") the script encodes the bare
name as the pipeline does (`encode_prompt`) and reports, per kind, the cosine of each name to its nearest other name:
once for the pooled slot (`emb[:, 0]`) and once for the mean of the real tokens. Names the encoder maps onto each
other (cosine near 1) cannot be told apart by the UNet, whatever it learns; names far apart can, if the UNet learns
the mapping. Beside it, the same question for the pictures: the RMS distance (32x32 on white, as the strict eval
measures) from each training render to the nearest render of another emoji. A kind whose emoji look like each other
shares what the UNet learns across them; a kind of one-off pictures has to be learnt emoji by emoji.

    python experiments/text_separation.py --model . --data /work/runs/data/emoji
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sdxs.eval import strict as es
from sdxs.model_folder import load_local_pipeline


def name_embeddings(pipe, names: list[str], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, mean of real tokens) of each name, L2-normalised, (N, D) each."""
    pooled, means = [], []
    with torch.no_grad():
        for i in range(0, len(names), batch):
            e, m, _, _ = pipe.encode_prompt(names[i : i + batch], do_classifier_free_guidance=False)
            pooled.append(e[:, 0])
            real = m[:, 1:].unsqueeze(-1).float()
            means.append((e[:, 1:] * real).sum(1) / real.sum(1))
    norm = torch.nn.functional.normalize
    return norm(torch.cat(pooled), dim=-1), norm(torch.cat(means), dim=-1)


def nearest_other_emoji(renders) -> np.ndarray:
    """RMS distance (32x32 on white) from each render to the nearest render with another name (tones excluded)."""
    import PIL.Image

    x = np.stack([es.thumbnail(PIL.Image.open(r.path)) for r in renders]).reshape(len(renders), -1)
    x = x.astype(np.float32)
    sq = (x**2).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0) / x.shape[1])
    names = np.array([r.name for r in renders])
    dist[names[:, None] == names[None]] = np.inf
    return dist.min(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".", help="a model folder (its text encoder and tokenizer are used)")
    parser.add_argument("--data", default="data/emoji", help="a folder made by `sdxs data emoji`")
    parser.add_argument("--examples", type=int, default=8, help="object names to print with their nearest name")
    args = parser.parse_args()

    pipe = load_local_pipeline(args.model, dtype=torch.float32)
    renders = [r for r in es.load_renders(args.data) if r.split == "train" and not r.skin_tones]
    names, kinds = zip(*sorted({r.name: r.kind for r in renders}.items()), strict=True)
    kinds = np.array(kinds)
    tokens = np.array([len(pipe.tokenizer(n)["input_ids"]) for n in names])
    print(f"{len(names)} distinct untoned training names, {args.model}\n")
    print(
        "| kind | names | tokens (median) | pooled: median cosine to nearest / > 0.95 / > 0.98 | mean of tokens: same |"
    )
    print("|---|---:|---:|---|---|")
    nearest = {}
    for label, x in zip(("pooled", "mean"), name_embeddings(pipe, list(names)), strict=True):
        sim = x @ x.T
        sim.fill_diagonal_(-1.0)
        nearest[label] = sim.max(1)
    for kind in sorted(set(kinds)):
        sel = torch.from_numpy(kinds == kind)
        cells = []
        for label in ("pooled", "mean"):
            v = nearest[label].values[sel].numpy()
            cells.append(f"{np.median(v):.3f} / {100 * np.mean(v > 0.95):.0f}% / {100 * np.mean(v > 0.98):.0f}%")
        print(f"| {kind} | {int(sel.sum())} | {np.median(tokens[kinds == kind]):.0f} | {cells[0]} | {cells[1]} |")
    every = es.load_renders(args.data)
    train = np.array([r.split == "train" for r in every])
    near = nearest_other_emoji(every)
    render_kinds = np.array([r.kind for r in every])
    print("\n| kind | training renders | RMS distance to the nearest render of another emoji (median) |")
    print("|---|---:|---:|")
    for kind in sorted(set(render_kinds)):
        sel = (render_kinds == kind) & train
        print(f"| {kind} | {int(sel.sum())} | {np.median(near[sel]):.3f} |")
    objects = np.flatnonzero(kinds == "objects/animals/food/travel")
    step = max(len(objects) // max(args.examples, 1), 1)
    print("\nobject -> nearest name by pooled slot (cosine):")
    for i in objects[::step][: args.examples]:
        j = int(nearest["pooled"].indices[i])
        print(f"  {names[i]} -> {names[j]} ({float(nearest['pooled'].values[i]):.3f})")


if __name__ == "__main__":
    main()
