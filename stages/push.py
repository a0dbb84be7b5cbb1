"""Stage 5: publish the merged model to the Hugging Face Hub, or say what would be published.

Publishes only with hub.repo_id set and HF_TOKEN in the environment; the token is never printed
or written anywhere. Always writes a receipt.
"""

from __future__ import annotations

import os
import sys

from grpo_gsm8k import config, hub
from grpo_gsm8k.outputs import write_json

MERGED = "models/merged"
RECEIPT = "reports/push.json"


def main() -> None:
    try:
        p = config.load()
        token = os.environ.get("HF_TOKEN") or None
        hub.check_push(p.hub.repo_id, token)
    except config.ConfigError as err:
        sys.exit(f"error: {err}")
    receipt = hub.publish(MERGED, p.hub.repo_id, p.hub.private, token)
    write_json(RECEIPT, receipt)
    print(receipt["message"])


if __name__ == "__main__":
    main()
