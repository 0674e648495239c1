"""Claims in the docs that can be checked, checked: size steps, the server's status codes and prompt handling,
the README's training sequence (nothing is loaded: configs and text only)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sdxs.data.buckets import default_buckets
from sdxs.train.config import read_recipe

ROOT = Path(__file__).resolve().parents[1]


def _root_size_step() -> int:
    """decoder factor x UNet multiple of the shipped model, from its configs (what `pipe.size_step` computes)."""
    vae = json.loads((ROOT / "vae/config.json").read_text())
    unet = json.loads((ROOT / "unet/config.json").read_text())
    up = vae.get("up_block_out_channels", vae.get("block_out_channels"))
    decoder_factor = 2 ** (len(up) - 1)
    unet_multiple = 2 ** max(len(unet["down_block_types"]) - 2, 0)
    return decoder_factor * unet_multiple


def test_data_doc_size_step_is_the_models():
    step = _root_size_step()
    index = json.loads((ROOT / "model_index.json").read_text())
    size = (int(index.get("default_width") or 128), int(index.get("default_height") or 128))
    lo, hi, _ = default_buckets(size, step)
    text = " ".join((ROOT / "docs/data.md").read_text().split())
    assert f"{step} for the emoji model" in text
    assert f"for the emoji model (default {size[0]}x{size[1]}) {lo}..{hi} in steps of {step}" in text


def test_server_doc_lists_every_status_code_the_server_sends():
    code = "\n".join(f.read_text() for f in sorted((ROOT / "src/sdxs/server").glob("*.py")))
    sent = {int(c) for c in re.findall(r"(?:status_code=|HTTPException\(|else )(\d{3})", code)} - {200}
    doc = (ROOT / "docs/server.md").read_text()
    assert sent >= {411, 413, 422, 429, 499, 503}
    missing = {c for c in sent if str(c) not in doc}
    assert not missing, f"docs/server.md does not mention status codes {sorted(missing)}"


def test_server_doc_says_long_prompts_are_truncated():
    doc = " ".join((ROOT / "docs/server.md").read_text().split())
    assert "is **truncated** to its first 250 tokens and answered with 200" in doc  # tests/test_server.py checks it
    assert "2000 characters | 422" in doc


def test_readme_training_sequence_makes_what_the_config_reads():
    """The README's training block: init makes the config's model, prepare its cache (from that model), then train."""
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "sdxs train unet" in b)
    lines = [ln.split("#")[0].split() for ln in block.splitlines() if ln.strip()]
    commands = [ln[1] for ln in lines]
    assert commands.index("init") < commands.index("prepare") < commands.index("train") < commands.index("export")
    train = lines[commands.index("train")]
    config = read_recipe(ROOT / train[train.index("--config") + 1])
    init, prepare = lines[commands.index("init")], lines[commands.index("prepare")]
    assert init[2] == config["model"]["pretrained"]
    assert prepare[3] == config["data"]["path"] and prepare[prepare.index("--model") + 1] == init[2]
    emoji = lines[commands.index("data")]
    assert prepare[2].startswith(emoji[3])  # prepare reads the folder `sdxs data emoji` wrote
    export = lines[commands.index("export")]
    assert export[2] == config["run"]["output_dir"]


def test_every_example_prompt_was_checked_and_passed():
    """Every prompt a user is shown draws what it names: docs/examples-check.md records the strict check of each
    (scripts/check_examples.py, with the shipped model); an example added or changed since fails here."""
    from sdxs.eval.examples import find_examples

    record = (ROOT / "docs" / "examples-check.md").read_text()
    rows = {}
    for line in record.splitlines():
        m = re.match(r"\| `(.+?)` \| .+? \| (\d+) \| (pass|FAIL|limitation) \|", line)
        if m:
            rows[m.group(1)] = m.group(3)
    examples = find_examples(ROOT)
    assert examples, "no example prompts found: the extractor is broken"
    missing = sorted({e.key for e in examples} - set(rows))
    assert not missing, f"examples not checked yet (run scripts/check_examples.py): {missing}"
    # a limitation (a table row that rates its example under 50%) is recorded as what it draws; every other example
    # must pass, and an example shown as working anywhere is not excused by a limitation row elsewhere
    claims = {e.key for e in examples if not e.limitation}
    failed = sorted(p for p in {e.key for e in examples} if rows[p] != "pass" and (p in claims or rows[p] == "FAIL"))
    assert not failed, f"examples that do not draw what they name: {failed}"
