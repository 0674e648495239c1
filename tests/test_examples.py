"""The example finder of `sdxs.eval.examples`: what scripts/check_examples.py generates and scores, and what
tests/test_doc_claims.py requires to be checked."""

from sdxs.eval.examples import find_examples, table_examples, target_of

NAMES = ["red apple", "green apple", "grinning face", "smiling face", "smiling face with heart-eyes", "cucumber"]


def test_table_cells_are_examples_and_low_rates_mark_limitations(tmp_path):
    (tmp_path / "README.md").write_text(
        "Intro `not an example` in prose.\n\n"
        "| you type | example | top-5 |\n"
        "|---|---|---:|\n"
        '| other case / punctuation | `RED APPLE` / `"red apple"`, `red apple!` | 100% / 92% |\n'
        "| a plural / another word order | `three red apples` / `apple, red` | 77% / 40% |\n"
        "| a keyword instead of the name | `gherkin` for cucumber | 0% |\n"
        "| an emoji it never saw | held-out emoji | 32% |\n"
        "\n"
        "| prompts | top-5 |\n|---|---:|\n| `grinning face` | 99% |\n"  # no example column: a results table
    )
    found = {(e.prompt, e.limitation) for e in find_examples(tmp_path)}
    assert found == {
        ("RED APPLE", False),
        ('"red apple"', False),
        ("red apple!", False),
        ("three red apples", False),
        ("apple, red", True),  # its own part of the row: 40%
        ("gherkin", True),
    }


def test_a_prompt_shown_in_code_is_a_claim_even_if_a_table_calls_it_a_limitation(tmp_path):
    (tmp_path / "README.md").write_text(
        'image = pipe("apple, red").images[0]\n\n| form | example | top-5 |\n|---|---|---:|\n| order | `apple, red` | 10% |\n'
    )
    assert [(e.prompt, e.limitation) for e in find_examples(tmp_path)] == [("apple, red", False)]


def test_table_rates_pair_with_their_part_or_the_best_of_the_row():
    text = "| a | example | b |\n|---|---|---|\n| x | `one` / `two` / `three` | 20% / 90% |\n"
    assert table_examples(text) == [("one", False), ("two", False), ("three", False)]  # 3 parts, 2 rates: the best


def test_target_is_the_longest_name_in_any_order_and_number():
    assert target_of("three red apples", NAMES) == "red apple"
    assert target_of("apple, red", NAMES) == "red apple"
    assert target_of('SHOW ME "Red Apple"!', NAMES) == "red apple"
    assert target_of("smiling face with heart-eyes, 3d render", NAMES) == "smiling face with heart-eyes"
    assert target_of("grinning face, 3d render", NAMES) == "grinning face"
    assert target_of("gherkin", NAMES) is None
    assert target_of("apple", NAMES) is None  # half a name is no name


def test_a_request_body_shown_for_the_server_is_an_example(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "server.md").write_text(
        """curl -s localhost:8000/generate -d '{"prompt": "a red apple, 3d render", "seed": 7}'\n"""
    )
    assert [(e.source, e.prompt) for e in find_examples(tmp_path)] == [("docs/server.md", "a red apple, 3d render")]
