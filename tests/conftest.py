"""Shared fixtures about data and tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2-135M-Instruct tokenizer (converted and cached on first use)."""
    from lit_align.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository; tests needing it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (a clone without ../shared)")
    return SHARED_DATA


def write_hh_fixture(directory: Path, subset: str = "helpful-base", rows: int = 40) -> Path:
    """A small HH-format file (``<subset>/test.jsonl``) of made-up dialogues, for clones without ../shared."""
    import json

    topics = ["tea", "rain", "chess", "bread", "rivers", "owls", "glass", "maps", "bells", "kites"]
    (directory / subset).mkdir(parents=True, exist_ok=True)
    with open(directory / subset / "test.jsonl", "w") as handle:
        for i in range(rows):
            topic = topics[i % len(topics)]
            prompt = f"\n\nHuman: Can you tell me something about {topic} number {i}?\n\nAssistant:"
            row = {
                "chosen": prompt + f" Sure. {topic.capitalize()} are interesting and useful in daily life.",
                "rejected": prompt + " No. Go away, I will not answer that question today.",
            }
            handle.write(json.dumps(row) + "\n")
    return directory


@pytest.fixture(scope="session")
def hh_dir(tmp_path_factory) -> Path:
    """Real HH-RLHF pairs from ../shared/data when present, else a written fixture in the same layout."""
    real = SHARED_DATA / "hh_rlhf"
    if (real / "helpful-base").is_dir():
        return real
    return write_hh_fixture(tmp_path_factory.mktemp("hh_rlhf"))


@pytest.fixture(scope="session")
def real_hh_dir(shared_data) -> Path:
    """Real HH-RLHF pairs only, for tests whose assertion rests on real dialogues (their varied prompts and lengths:
    a learning signal, padding saved by grouping); they skip in a clone without ../shared."""
    return shared_data / "hh_rlhf"


@pytest.fixture(scope="session")
def peaked_tiny(tmp_path_factory) -> str:
    """A 2-layer Llama with wide initial weights, saved with the tiny tokenizer: ~4 nats of entropy per token instead
    of ~10.8, so a policy-gradient signal on one token is visible within a few dozen updates."""
    from lit_align.models import load_tokenizer, tiny_llama

    directory = tmp_path_factory.mktemp("peaked_tiny")
    tiny_llama(seed=0, initializer_range=0.5).save_pretrained(directory)
    load_tokenizer("tiny-llama").save_pretrained(directory)
    return str(directory)


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Run every test in its own directory, so Lightning's default_root_dir never lands in the checkout."""
    monkeypatch.chdir(tmp_path)
