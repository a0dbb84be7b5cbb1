import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ (the measurements) is not installed, unlike grpo_gsm8k
FIXTURES = ROOT / "tests" / "fixtures" / "gsm8k"

# Tests never reach the network: the Hub is either faked locally or must not be needed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight Qwen2-architecture model and tokenizer, built from the fixture questions."""
    from grpo_gsm8k.tiny import build_tiny

    texts = [json.loads(line)["question"] for line in (FIXTURES / "train.jsonl").open()]
    return build_tiny(texts, tmp_path_factory.mktemp("tiny") / "tiny-model")


@pytest.fixture
def tiny_params():
    """The tiny profile as a dict, to adjust and write where a test needs it."""
    from grpo_gsm8k.config import read_yaml

    return read_yaml(ROOT / "profiles" / "tiny.yaml")
